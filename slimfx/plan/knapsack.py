"""The multiple-choice knapsack: one option per layer, least summed value under a summed-cost capacity.

Costs are discretised, rounded up, into ``resolution`` units of the capacity, so a solution never exceeds the
capacity; values are kept exact. ``frontier`` reads the whole trade-off (least value at every capacity) off the
same table, which is what the report's Pareto plot shows. As in ROCKET, the layers' errors are summed as squared
relative output errors, a proxy the end-to-end check and the optional search correct.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Solution:
    choice: list[int]  # option index per group
    cost: float  # summed (exact) cost of the choice
    value: float  # summed value


def _units(costs: Sequence[float], unit: float) -> np.ndarray:
    return np.ceil(np.asarray(costs, dtype=np.float64) / unit - 1e-9).clip(min=0).astype(np.int64)


def _table(groups: list[list[tuple[float, float]]], capacity: float, resolution: int, slack: int = 0):
    unit = capacity / resolution if capacity > 0 else 1.0
    size = resolution + 1 + slack
    best = np.full(size, np.inf)
    best[0] = 0.0
    choices = np.zeros((len(groups), size), dtype=np.int32)
    for g, options in enumerate(groups):
        units = _units([c for c, _ in options], unit)
        values = np.array([v for _, v in options], dtype=np.float64)
        new = np.full(size, np.inf)
        pick = np.zeros(size, dtype=np.int32)
        for index, (u, v) in enumerate(zip(units, values)):
            if u >= size:
                continue
            shifted = np.full(size, np.inf)
            shifted[u:] = best[: size - u] + v
            better = shifted < new
            new[better], pick[better] = shifted[better], index
        best, choices[g] = new, pick
    return best, choices, unit


def solve(groups: list[list[tuple[float, float]]], capacity: float, resolution: int = 4000) -> Solution | None:
    """``groups[g]`` lists (cost, value) per option. None if no choice fits ``capacity``."""
    best, choices, unit = _table(groups, capacity, resolution)
    if not np.isfinite(best).any():
        return None
    at = int(np.argmin(best))  # least value; ties go to the lowest cost
    choice = []
    for g in range(len(groups) - 1, -1, -1):
        index = int(choices[g, at])
        choice.append(index)
        at -= int(_units([groups[g][index][0]], unit)[0])
    choice.reverse()
    return Solution(choice, sum(groups[g][i][0] for g, i in enumerate(choice)),
                    sum(groups[g][i][1] for g, i in enumerate(choice)))


def frontier(groups: list[list[tuple[float, float]]], capacity: float, points: int = 24,
             resolution: int = 2000) -> list[tuple[float, float]]:
    """(capacity, least summed value) at ``points`` capacities up to ``capacity``, where any choice fits."""
    best, _, unit = _table(groups, capacity, resolution, slack=len(groups))  # rounding up costs a unit per group
    running = np.minimum.accumulate(best)
    picks = np.unique(np.linspace(0, resolution + len(groups), points).round().astype(int))
    return [(min(float(i * unit), capacity), float(running[i])) for i in picks if np.isfinite(running[i])]


def least_cost(groups: list[list[tuple[float, float]]]) -> float:
    return float(sum(min(c for c, _ in options) for options in groups))
