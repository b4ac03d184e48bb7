"""Latency measured side by side: candidates interleaved round by round, so drift and load hit them alike."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Timing:
    median_s: float
    low_s: float  # fastest round
    high_s: float  # slowest round
    rounds: int

    @property
    def spread(self) -> float:
        """Half the range of the rounds, relative to the median."""
        return (self.high_s - self.low_s) / 2 / self.median_s if self.median_s else 0.0

    def __str__(self) -> str:
        return f"{self.median_s * 1e3:.2f} ms (±{self.spread:.0%}, {self.rounds} rounds)"


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 15, min_time: float = 0.02,
                warmup: int = 3) -> dict[str, Timing]:
    """Median seconds per call of each function; every round times each function once, in rotating order."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    calls = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(min_time / max(time.perf_counter() - start, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(calls[name]):
                fns[name]()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {n: Timing(statistics.median(s), min(s), max(s), rounds) for n, s in samples.items()}


def random_like(node, hints: dict | None = None) -> "torch.Tensor":
    """A random tensor shaped like an fx node's value at its example sizes, or at ``hints`` (symbol -> size), for
    timing a piece of a graph."""
    import torch

    from .hw_profiles.op_costs import concrete_shape, size_hints

    value = node.meta["val"]
    dims = concrete_shape(value, size_hints(node.graph) if hints is None else hints)
    if value.is_floating_point():
        return torch.randn(dims, dtype=value.dtype, device=value.device)
    return torch.zeros(dims, dtype=value.dtype, device=value.device)
