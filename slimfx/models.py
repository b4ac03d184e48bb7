"""Small models trained on real data, so examples, tests and the demo measure real accuracy, not noise.

The data is the UCI handwritten digits set (1,797 8×8 grey images, 10 classes), shipped in
``slimfx/data/digits.npz`` (exported once from scikit-learn's copy, which is under CC BY 4.0). Training a
model here takes seconds on 2 CPU cores and is deterministic for a given seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .progress import progress


@dataclass
class Digits:
    train_x: torch.Tensor  # (N, 1, 8, 8) float32 in [0, 1]
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Digits:
    with resources.files("slimfx.data").joinpath("digits.npz").open("rb") as fh:
        raw = np.load(fh)
        images, labels = raw["images"], raw["labels"]
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU stack with a BN'd MLP head: a ResNet-style stem in miniature."""

    def __init__(self, width: int = 32, hidden: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 16, hidden)
        self.bn3 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.fc1(x.flatten(1))))
        return self.fc2(x)


class DigitsProjCNN(nn.Module):
    """Layers that merge exactly, as in real nets: a 3×3 conv followed by a 1×1 projection with no activation
    between them (a linear bottleneck), and two head linears with no activation between them."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.proj = nn.Conv2d(2 * width, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc1 = nn.Linear(width * 16, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.proj(self.conv2(x)))), 2)
        return self.fc2(self.fc1(x.flatten(1)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand, BN, ReLU6, 3×3 depthwise, BN, ReLU6, 1×1 linear projection, BN, and the
    identity skip where the shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.skip else y


class DigitsMobileNet(nn.Module):
    """A MobileNetV2 in miniature: a stem, five inverted residuals (one strided), a 1×1 head conv and a linear."""

    def __init__(self, width: int = 16):
        super().__init__()
        wide = width * 3 // 2
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(width, width), InvertedResidual(width, width),
                                    InvertedResidual(width, wide, stride=2), InvertedResidual(wide, wide),
                                    InvertedResidual(wide, wide))
        self.head = nn.Sequential(nn.Conv2d(wide, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x.flatten(1)))
        x = F.gelu(self.fc2(x))
        return self.fc3(x)


class DigitsTransformer(nn.Module):
    """A pre-norm transformer over the image's 8 rows (8 tokens of 8 pixels), mean-pooled into a classifier."""

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, mlp: int = 128):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, mlp)
        self.down = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


ZOO: dict[str, Callable[[], nn.Module]] = {
    "digits-cnn": DigitsCNN,
    "digits-mlp": DigitsMLP,
    "digits-transformer": DigitsTransformer,
    "digits-proj-cnn": DigitsProjCNN,
    "digits-mobilenet": DigitsMobileNet,
}

# What `slimfx demo` runs on each: input and output layers stay dense (they are small and most sensitive).
DEMO_PIPELINES = {
    "digits-cnn": "fold-bn,factorize{keep=0.5,exclude=fc2|conv1},dead-code",
    "digits-mlp": "factorize{keep=0.3,exclude=fc3},dead-code",
    "digits-transformer": "factorize{keep=0.5,exclude=head|embed},dead-code",
    "digits-proj-cnn": "fold-bn,depth-merge,factorize{keep=0.5,exclude=conv1|fc2},dead-code",
    "digits-mobilenet": "fold-bn,depth-merge{latency=0.7},dead-code",
}


def train(model: nn.Module, data: Digits, epochs: int = 20, lr: float = 3e-3, seed: int = 0,
          batch_size: int = 64, desc: str = "training") -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(data.train_y) // batch_size))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in progress(range(epochs), desc):
        order = torch.randperm(len(data.train_y), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: Callable, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a held-out split."""
    logits = model(x)
    return (logits.argmax(-1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def cache_dir() -> Path:
    """Where trained models are kept: ``$SLIMFX_CACHE``, else ``~/.cache/slimfx``."""
    return Path(os.environ.get("SLIMFX_CACHE") or Path.home() / ".cache" / "slimfx")


# (name, seed, epochs) -> weights in slimfx/data, made by ``pretrained(..., cache=False)`` with torch 2.13 on a
# 2-core CPU: the demo, the CLI and the tests load them instead of training again
SHIPPED = {(name, 0, epochs): f"{name}-seed0-epochs{epochs}.safetensors" for name, epochs in (
    ("digits-cnn", 20), ("digits-mlp", 20), ("digits-transformer", 20), ("digits-proj-cnn", 20),
    ("digits-mobilenet", 20), ("digits-mobilenet", 8))}


def shipped_weights(filename: str) -> dict[str, torch.Tensor]:
    """A state dict that ships in slimfx/data."""
    from importlib import resources

    from safetensors.torch import load as load_tensors

    return load_tensors(resources.files("slimfx.data").joinpath(filename).read_bytes())


def pretrained(name: str, seed: int = 0, epochs: int = 20, cache: bool = True) -> tuple[nn.Module, Digits]:
    """Build and train a zoo model on the digits data (deterministic for a seed), or load the shipped or cached
    result (``cache=False`` trains anew)."""
    if name not in ZOO:
        raise KeyError(f"unknown model {name!r}; built-in models: {', '.join(ZOO)}")
    torch.manual_seed(seed)
    data = load_digits(seed)
    path = cache_dir() / "models" / f"{name}-seed{seed}-epochs{epochs}-torch{torch.__version__}.pt"
    model = ZOO[name]()
    if cache and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), data
    if cache and (name, seed, epochs) in SHIPPED:
        model.load_state_dict(shipped_weights(SHIPPED[name, seed, epochs]))
        return model.eval(), data
    model = train(model, data, epochs=epochs, seed=seed, desc=f"training {name}")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(model.state_dict(), partial)
        partial.replace(path)  # atomic: a concurrent reader never sees half a file
    return model, data
