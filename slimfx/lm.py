"""A small byte-level language model trained on text every Python install has: its standard library's source.

Used where a task metric must react to compression the way an LLM's does (perplexity on held-out text), which
the digits models are too easy to show. Deterministic for a seed; trained once (about 80 s on 2 CPU cores) and
cached like the digits models.
"""
from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import cache_dir, shipped_weights
from .progress import progress


@dataclass
class TextData:
    train: torch.Tensor  # uint8 bytes
    test: torch.Tensor

    def windows(self, split: str, count: int, length: int, seed: int = 0) -> torch.Tensor:
        """``count`` windows of ``length + 1`` bytes (inputs and next-byte targets), int64."""
        data = self.train if split == "train" else self.test
        starts = torch.randint(0, len(data) - length - 1, (count,), generator=torch.Generator().manual_seed(seed))
        return torch.stack([data[s : s + length + 1] for s in starts.tolist()]).long()


def load_python_text(max_bytes: int = 800_000, test_fraction: float = 0.1) -> TextData:
    """The standard library's top-level ``.py`` files in name order, concatenated up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        raw = path.read_bytes()
        chunks.append(raw)
        total += len(raw)
        if total >= max_bytes:
            break
    data = torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).clone()
    cut = int(len(data) * (1 - test_fraction))
    return TextData(data[:cut], data[cut:])


class CausalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class ByteLM(nn.Module):
    """Bytes in, next-byte logits out: embedding, causal pre-norm blocks, head."""

    def __init__(self, dim: int = 128, heads: int = 4, layers: int = 2, mlp: int = 512, context: int = 64):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.zeros(1, context, dim))
        self.blocks = nn.ModuleList(CausalBlock(dim, heads, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[:, : ids.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


@torch.no_grad()
def bits_per_byte(model: nn.Module, windows: torch.Tensor) -> float:
    """Mean next-byte cross-entropy on the windows, in bits per byte (lower is better)."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1)).item() / math.log(2)


def train_lm(model: ByteLM, data: TextData, steps: int = 1500, batch: int = 32, lr: float = 3e-3,
             seed: int = 0) -> ByteLM:
    torch.manual_seed(seed)
    context = model.pos.shape[1]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for step in progress(range(steps), "training byte LM"):
        windows = data.windows("train", batch, context, seed=seed * 100_003 + step)
        logits = model(windows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


SHIPPED = {(0, 1500): "byte-lm-seed0-steps1500.safetensors"}  # (seed, steps) -> weights in slimfx/data


def pretrained_lm(seed: int = 0, steps: int = 1500, cache: bool = True) -> tuple[ByteLM, TextData]:
    """The byte LM trained on the local standard library's source (cached per seed, steps and torch version).

    The default one (seed 0, 1,500 steps) ships with slimfx: ``train_lm`` made it from CPython 3.11's standard
    library on a 2-core CPU in about 80 s, and the demo and the tests load it instead of training it again.
    ``cache=False`` trains anew."""
    import os

    data = load_python_text()
    path = cache_dir() / "models" / f"byte-lm-seed{seed}-steps{steps}-torch{torch.__version__}.pt"
    torch.manual_seed(seed)
    model = ByteLM()
    if cache and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), data
    if cache and (seed, steps) in SHIPPED:
        model.load_state_dict(shipped_weights(SHIPPED[seed, steps]))
        return model.eval(), data
    model = train_lm(model, data, steps=steps, seed=seed)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(model.state_dict(), partial)
        partial.replace(path)
    return model, data
