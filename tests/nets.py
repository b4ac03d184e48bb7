"""Architectures used across the tests, written here so the suite needs no downloads."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock shape: conv-bn-relu-conv-bn + (conv1x1-bn) shortcut, then add+relu."""

    def __init__(self, cin: int = 8, cout: int = 16, stride: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.down(x))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 16)
        self.layer2 = BasicBlock(16, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SharedConvBN(nn.Module):
    """A BN whose conv output is also used elsewhere: folding it would change the other use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class GraphBreakNet(nn.Module):
    """Data-dependent Python control flow in the top-level forward, as in many real models: Dynamo breaks the
    graph there and export cannot trace the model, but its feature extractor and head trace on their own."""

    def __init__(self, width: int = 8, hidden: int = 4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x).mean((2, 3))
        if y.sum() > 0:  # depends on tensor values
            y = y * 2
        return self.head(y)


class WindowAttention(nn.Module):
    """A Swin-style block: pad H and W to a window multiple, attend within windows, reverse, crop.

    The padding amounts depend on the (symbolic) input size, which is what broke fake-tensor propagation."""
    def __init__(self, dim=32, heads=2, window=4):
        super().__init__()
        self.window, self.heads = window, heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2*dim), nn.GELU(), nn.Linear(2*dim, dim))
    def forward(self, x):  # x: (B, H, W, C)
        B, H, W, C = x.shape
        ws = self.window
        shortcut = x
        x = self.norm(x)
        pad_b = (ws - H % ws) % ws
        pad_r = (ws - W % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = x.shape[1], x.shape[2]
        x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        q, k, v = self.qkv(x).reshape(x.shape[0], ws*ws, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, ws*ws, C)
        x = self.proj(x).view(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        x = x[:, :H, :W, :].contiguous()
        x = shortcut + x
        return x + self.mlp(self.norm2(x))

class TinySwin(nn.Module):
    """Patch embedding, two windowed-attention blocks, mean-pooled head."""
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 2, 2)
        self.blocks = nn.Sequential(WindowAttention(), WindowAttention())
        self.head = nn.Linear(32, 10)
    def forward(self, x):
        x = self.patch(x).permute(0, 2, 3, 1)
        x = self.blocks(x)
        return self.head(x.mean((1, 2)))

class MobileViTBlock(nn.Module):
    """MobileViT-style: local conv, unfold into patches, a transformer over them, fold back, fuse; resizes when
    the size is not a multiple of the patch (a size-dependent interpolate)."""
    def __init__(self, c=16, d=32, patch=2):
        super().__init__()
        self.p = patch
        self.local = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.SiLU(), nn.Conv2d(c, d, 1, bias=False))
        self.attn = nn.TransformerEncoderLayer(d, 2, 2*d, batch_first=True, dropout=0.0)
        self.fuse = nn.Sequential(nn.Conv2d(d, c, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU())
    def forward(self, x):
        y = self.local(x)
        B, D, H, W = y.shape
        p = self.p
        nh, nw = (H + p - 1)//p, (W + p - 1)//p
        if H % p or W % p:
            y = F.interpolate(y, size=(nh*p, nw*p), mode="bilinear", align_corners=False)
        t = y.reshape(B, D, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(B * p * p, nh * nw, D)
        t = self.attn(t)
        y = t.reshape(B, p, p, nh, nw, D).permute(0, 5, 3, 1, 4, 2).reshape(B, D, nh*p, nw*p)
        return x + self.fuse(y[:, :, :H, :W])

class TinyMobileViT(nn.Module):
    """Conv stem, an inverted-residual block (pointwise, depthwise, pointwise), a MobileViT block, a head."""
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.ir = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU(),
                                nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False), nn.BatchNorm2d(32), nn.SiLU(),
                                nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.vit = MobileViTBlock()
        self.head = nn.Linear(16, 10)
    def forward(self, x):
        x = self.stem(x)
        x = x + self.ir(x)
        x = self.vit(x)
        return self.head(x.mean((2, 3)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorms non-trivial statistics so folding them is actually tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=gen))
                m.bias.data.copy_(torch.randn(n, generator=gen))
    return model.eval()


def count_modules(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def compress_canonical(*args, **kwargs):
    """slimfx.compress without the lower stage and without a target: the canonical compressed ops stay, for tests
    that inspect them."""
    import slimfx

    kwargs.setdefault("profile", "none")  # canonical ops for every layer the pass may rewrite: no target's gate
    return slimfx.compress(*args, lower=False, **kwargs)
