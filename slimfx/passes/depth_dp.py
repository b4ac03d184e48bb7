"""The two-stage dynamic program of Kim et al., "Efficient Latency-Aware CNN Depth Compression via Two-Stage
Dynamic Programming" (ICML 2023), over plain tables so it can be tested against brute force.

Layers 0..n-1 lie on chains; boundary b sits before layer b (n + 1 boundaries). A block (i, j) is layers
i..j-1 with every activation strictly inside removed; the activation at boundary j, if any, is kept.

- Stage 1 (``fastest_runs``): a block need not become one layer. Merging a 1×1-3×3-1×1 run can be slower than
  merging two of them, so the block's latency is the fastest split into merged runs, from the table
  ``merged[i][j]`` (runs i..j-1 as one layer; inf where that cannot be merged).
- Stage 2 (``solve``): choose the kept boundaries to minimise the summed importance (the error of removing a
  block's activations, measured on calibration data) with the summed latency under a budget: a knapsack that
  keeps latency exact and discretises importance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import BudgetError

INF = math.inf
Table = Sequence[Sequence[float]]


@dataclass(frozen=True)
class Block:
    start: int
    end: int
    runs: tuple[tuple[int, int], ...]  # the merged runs inside the block (stage 1)
    error: float  # importance of the activations removed inside it
    latency_s: float  # its runs, plus the kept activation at its end


@dataclass(frozen=True)
class DepthPlan:
    blocks: tuple[Block, ...]
    latency_s: float
    error: float


def fastest_runs(merged: Table) -> tuple[list[list[float]], list[list[tuple]]]:
    """Stage 1: for every block (i, j), the fastest split into merged runs, and the runs."""
    n = len(merged) - 1
    best = [[INF] * (n + 1) for _ in range(n + 1)]
    runs: list[list[tuple]] = [[()] * (n + 1) for _ in range(n + 1)]
    for length in range(1, n + 1):
        for i in range(n - length + 1):
            j = i + length
            best[i][j], runs[i][j] = merged[i][j], ((i, j),)
            for k in range(i + 1, j):
                if best[i][k] + best[k][j] < best[i][j]:
                    best[i][j], runs[i][j] = best[i][k] + best[k][j], runs[i][k] + runs[k][j]
    return best, runs


def block_costs(merged: Table, importance: Table, kept_activation_s: Sequence[float]):
    """(latency, runs, importance) of every block: the fastest runs plus the activation kept at its end."""
    best, runs = fastest_runs(merged)
    n = len(merged) - 1
    latency = [[best[i][j] + (kept_activation_s[j] if j < n else 0.0) for j in range(n + 1)] for i in range(n + 1)]
    return latency, runs, importance


def lowest_latency(latency: Table) -> float:
    """The fastest plan whatever its error: a shortest path over boundaries."""
    n = len(latency) - 1
    reach = [0.0] + [INF] * n
    for j in range(1, n + 1):
        reach[j] = min(reach[i] + latency[i][j] for i in range(j))
    return reach[n]


def solve(merged: Table, importance: Table, kept_activation_s: Sequence[float], budget_s: float,
          resolution: int = 4000) -> DepthPlan:
    """Stage 2: the blocks of least summed importance whose summed latency is within ``budget_s``.

    ``importance[i][j]`` is inf for a block that may not be formed (it crosses a branch). Latency is kept exact,
    so a plan never exceeds the budget and the dense plan always fits a budget of 1×; importance is rounded up
    to steps of (the sum of all importances) / ``resolution``, so the plan's error is optimal to within one step
    per block. Among plans of equal error the faster wins. Raises BudgetError, naming the lowest achievable
    latency, if no plan fits.
    """
    latency, runs, importance = block_costs(merged, importance, kept_activation_s)
    n = len(latency) - 1
    allowed = [[latency[i][j] if math.isfinite(importance[i][j]) else INF for j in range(n + 1)] for i in range(n + 1)]
    lowest = lowest_latency(allowed)
    if lowest > budget_s * (1 + 1e-12):
        raise BudgetError(f"the latency budget {budget_s * 1e6:.1f} us is below the lowest achievable "
                          f"{lowest * 1e6:.1f} us (every removable activation removed)", lowest)
    total = sum(v for row in importance for v in row if math.isfinite(v))
    unit = total / resolution or 1.0  # (a total so small that the step underflows: every error is one level)

    levels = resolution + n + 1  # each block rounds up by less than one step: every plan has a column

    def steps(i: int, j: int) -> int:
        return math.ceil(importance[i][j] / unit - 1e-9)

    fastest = np.full((n + 1, levels), INF)  # fastest[j, e]: least latency up to boundary j, error <= e
    fastest[0, :] = 0.0
    choice = np.full((n + 1, levels), -1, dtype=np.int64)
    for j in range(1, n + 1):
        for i in range(j):
            if not math.isfinite(allowed[i][j]):
                continue
            e = steps(i, j)
            if e >= levels:
                continue
            candidate = np.full(levels, INF)
            candidate[e:] = fastest[i, : levels - e] + allowed[i][j]
            better = candidate < fastest[j]
            fastest[j, better] = candidate[better]
            choice[j, better] = i
    fits = np.flatnonzero(fastest[n] <= budget_s * (1 + 1e-12))
    if not len(fits):  # cannot happen when the shortest path fits; kept as a guard against a silent wrong plan
        raise BudgetError(f"no plan fits {budget_s * 1e6:.1f} us; the lowest achievable is {lowest * 1e6:.1f} us",
                          lowest)
    level = int(fits[0])  # the least error that fits
    blocks, j = [], n
    while j > 0:
        i = int(choice[j, level])
        assert i >= 0, "depth DP backtracking reached an unset cell"
        level -= steps(i, j)
        blocks.append(Block(i, j, runs[i][j], float(importance[i][j]), allowed[i][j]))
        j = i
    blocks.reverse()
    return DepthPlan(tuple(blocks), sum(b.latency_s for b in blocks), sum(b.error for b in blocks))
