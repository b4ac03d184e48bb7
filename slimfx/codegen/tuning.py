"""Tile configurations: pruned by shape, timed once on the device, kept in a persistent cache file.

The key is (family, epilogue, dtype, shape bucket, device name); the bucket rounds M up to a power of two (decode
shapes 1..16 share one), and keeps N, K and the rank. Under Triton's interpreter nothing is timed: the first
config that fits is used, so tests are deterministic.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch

from .source import interpreting

Config = dict  # {"BM": 64, "BN": 64, "BK": 32, "num_warps": 4}

_MEMORY: dict[str, Config] = {}


def bucket(m: int) -> int:
    return max(16, 1 << (max(m, 1) - 1).bit_length())


def _path():
    from ..models import cache_dir

    return cache_dir() / "kernels" / "tuning.json"


def _load() -> dict:
    path = _path()
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def choose(key: str, configs: list[Config], run: Callable[[Config], object], device: torch.device) -> Config:
    """The fastest of ``configs`` for ``key`` (timed here once, then read from the cache file)."""
    if interpreting() or device.type != "cuda" or len(configs) == 1:
        return configs[0]
    if key in _MEMORY:
        return _MEMORY[key]
    stored = _load()
    if key in stored and stored[key] in configs:
        _MEMORY[key] = stored[key]
        return stored[key]
    from triton.testing import do_bench

    timings = {}
    for i, config in enumerate(configs):
        try:
            timings[i] = do_bench(lambda: run(config), warmup=5, rep=20)
        except Exception:  # noqa: BLE001 - a config that does not compile (too many registers) is not a choice
            continue
    best = configs[min(timings, key=timings.get)] if timings else configs[0]
    _MEMORY[key] = best
    stored = _load()
    stored[key] = best
    path = _path()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(stored, indent=1, sort_keys=True))
    partial.replace(path)
    return best


def fitting(configs: list[Config], rows) -> list[Config]:
    """The configs whose row tile does not exceed the rows (all of the smallest kind for symbolic rows)."""
    if not isinstance(rows, int):
        return configs[:1]
    return [c for c in configs if c["BM"] <= bucket(rows)] or configs[:1]


def run_tuned(key: Callable[[], str], configs: list[Config], launch: Callable[[Config], object],
              x: torch.Tensor) -> None:
    """Launch with the tuned config, on x's device. While torch.compile traces the op (fake tensors, symbolic
    sizes) nothing is timed or stored: the first config is traced."""
    from torch._subclasses.fake_tensor import FakeTensor

    tracing = torch.compiler.is_compiling() or isinstance(x, FakeTensor) or not all(
        isinstance(d, int) for d in x.shape)
    config = configs[0] if tracing else choose(key(), configs, launch, x.device)
    if x.is_cuda:
        with torch.cuda.device(x.device):
            launch(config)
    else:
        launch(config)


def precision(x: torch.Tensor) -> str:
    """fp32 products in full precision (TF32 would move outputs by ~1e-3: not the op's math)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"
