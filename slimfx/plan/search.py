"""Evolutionary refinement of a plan, scored end to end (in the spirit of EvoPress).

Per-layer errors do not add up exactly: a layer before a residual join or a normalisation matters less than its
own output error says, one before the logits more. Starting from the knapsack's choice, each generation makes
``offspring`` mutants, each moving a few layers to other options and then repairing the budget by moving layers
to cheaper options where that costs least predicted error; the mutant with the lowest measured error on the
calibration data replaces the parent if it is better ((1+λ) selection). Every mutant fits the budget.
"""
from __future__ import annotations

import random
from typing import Callable


def refine(problem, choice: list[int], score: Callable[[list[int]], float], generations: int, seed: int = 0,
           offspring: int = 6) -> tuple[list[int], float]:
    from ..progress import progress

    rng = random.Random(seed)
    groups, capacity = problem.groups, problem.capacity
    best, best_score = list(choice), score(choice)
    for _ in progress(range(generations), "planner: search generations"):
        parent = best
        for _ in range(offspring):
            child = _mutate(parent, groups, capacity, rng)
            if child is None or child == parent:
                continue
            s = score(child)
            if s < best_score:
                best, best_score = child, s
    return best, best_score


def _cost(choice: list[int], groups) -> float:
    return sum(groups[g][i][0] for g, i in enumerate(choice))


def _mutate(parent: list[int], groups, capacity: float, rng: random.Random) -> list[int] | None:
    child = list(parent)
    movable = [g for g in range(len(groups)) if len(groups[g]) > 1]
    if not movable:
        return None
    for g in rng.sample(movable, k=min(len(movable), rng.choice((1, 1, 2, 3)))):
        child[g] = rng.randrange(len(groups[g]))
    for _ in range(4 * len(groups)):  # repair: the cheapest extra error per unit of cost saved, until it fits
        over = _cost(child, groups) - capacity
        if over <= 1e-12 * max(capacity, 1e-30):
            return child
        best = None
        for g in movable:
            cost, value = groups[g][child[g]]
            for i, (c, v) in enumerate(groups[g]):
                if c < cost:
                    rate = (v - value) / (cost - c)
                    if best is None or rate < best[0]:
                        best = (rate, g, i)
        if best is None:
            return None
        child[best[1]] = best[2]
    return None
