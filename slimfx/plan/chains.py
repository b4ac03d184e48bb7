"""The knapsack's groups ("units"): a layer on its own, or a chain of layers that depth merging may shorten.

A chain (``depth_spans``) is one group of the joint plan. Its options are partitions of its layers into blocks: a
block of one layer takes any of that layer's own options (low rank, N:M, int codes, dense); a longer block loses
the activations inside it and its layers merge into the fastest runs (stage 1 of ``depth_dp``), at the
importance ``DepthShrink`` measured end to end. A DP over the chain's boundaries keeps only the partitions no
other beats in both cost and error, so the knapsack chooses between merging a block and compressing its layers
one by one, and the plan may mix the two in one chain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..hw_profiles.cost_model import latency as kernels_latency
from ..hw_profiles.op_costs import concrete, node_kernels
from ..ir.ops import quantize_input_rows
from ..passes.depth_dp import Block
from ..passes.depth_spans import merged_numel
from .options import LayerOptions, Merge, Option


@dataclass
class Item:
    """One option of a unit: its cost, its error weighed by sensitivity (squared), and what it means per layer."""

    latency_s: float
    bytes: int
    value: float
    layers: dict[str, Option]  # origin -> the option that layer takes
    overrides: Callable[[], dict] = field(repr=False)  # fx node -> its altered run, to score without rewriting
    blocks: tuple[Block, ...] = ()  # the merged blocks (global layer indices of the DepthShrink layout)


def layer_items(layer: LayerOptions, sensitivity: float) -> list[Item]:
    return [Item(o.latency_s, o.bytes, sensitivity * o.error ** 2, {layer.layer: o}, _weight_override(layer, o))
            for o in layer.options]


def _weight_override(layer: LayerOptions, option: Option) -> Callable[[], dict]:
    def overrides() -> dict:
        if option.decision.technique == "dense":
            return {}
        weight = layer.approximate(option.decision)
        rows_in_int8 = option.decision.technique == "int8"  # W8A8 rounds the layer's inputs too
        return {use: _with_weight(weight, rows_in_int8) for use in layer.uses}
    return overrides


def _with_weight(weight: torch.Tensor, rows_in_int8: bool = False):
    def run(node, args: tuple, kwargs: dict):
        x = args[0]
        if rows_in_int8:
            levels, step = quantize_input_rows(x)
            x = (levels * step).to(x.dtype)
        return node.target(x, weight, *args[2:], **kwargs)
    return run


@dataclass
class Chain:
    """One chain of the ``DepthShrink`` layout: layers ``start``..``end - 1`` (global indices), their options."""

    shrink: object  # passes.depth_shrink.DepthShrink
    start: int
    end: int
    members: list[LayerOptions]

    @property
    def origins(self) -> list[str]:
        return [m.layer for m in self.members]

    def activation_s(self, profile, hints: dict) -> float:
        """The modelled latency of the activations inside the chain (the planner's fixed cost leaves them out)."""
        inside = self.shrink.layout.inside(self.start, self.end)
        return sum(concrete(kernels_latency(node_kernels(a), profile), hints) for a in inside)

    def dense_latency_s(self) -> float:
        return sum(m.dense.latency_s for m in self.members) + sum(self.shrink.kept[self.start + 1 : self.end])

    def items(self, sensitivity: dict[str, float], resource: str) -> list[Item]:
        """The chain's Pareto-optimal partitions in (cost, error), the all-dense one first."""
        shrink, n, base = self.shrink, len(self.members), self.start
        singles = [layer_items(m, sensitivity[m.layer]) for m in self.members]
        front: list[list[tuple]] = [[(0.0, 0, 0.0, ())]] + [[] for _ in range(n)]
        for j in range(1, n + 1):
            kept = shrink.kept[base + j] if j < n else 0.0
            candidates = []
            for i in range(j):
                if j == i + 1:
                    steps = [(it.latency_s + kept, it.bytes, it.value, ("layer", i, k)) for k, it in enumerate(singles[i])]
                else:
                    block = self._block(i, j)
                    if block is None:
                        continue
                    steps = [(block[0] + kept, block[1], block[2], ("merge", i, j))]
                for lat, size, value, part in steps:
                    candidates += [(a + lat, b + size, c + value, parts + (part,)) for a, b, c, parts in front[i]]
            front[j] = _pareto(candidates, resource)
        dense = tuple(("layer", i, 0) for i in range(n))
        dense_plan = (self.dense_latency_s(), sum(s[0].bytes for s in singles), 0.0, dense)
        return [self._item(p, singles) for p in [dense_plan, *(p for p in front[n] if p[3] != dense)]]

    def _block(self, i: int, j: int) -> tuple[float, int, float] | None:
        """(latency, bytes, importance) of merging local layers i..j-1, or None where that may not be done."""
        shrink, a, b = self.shrink, self.start + i, self.start + j
        error = shrink.importance[a][b]
        runs = shrink.runs[a][b]
        seconds = sum(shrink.merged[x][y] for x, y in runs)
        if not (math.isfinite(error) and math.isfinite(seconds)) or all(y - x == 1 for x, y in runs):
            return None  # not mergeable, or the fastest split merges nothing (then removing activations only loses)
        size = 0
        for x, y in runs:
            run = shrink.layout.layers[x:y]
            itemsize = shrink.program.tensor(run[0].args[1]).element_size()
            size += (merged_numel(run) if y - x > 1 else run[0].args[1].meta["val"].numel()) * itemsize
        return seconds, size, error

    def _item(self, plan: tuple, singles: list[list[Item]]) -> Item:
        lat, size, value, parts = plan
        layers: dict[str, Option] = {}
        overrides: list[Callable[[], dict]] = []
        blocks = []
        for kind, i, k in parts:
            if kind == "layer":
                item = singles[i][k]
                layers.update(item.layers)
                overrides.append(item.overrides)
                continue
            j = k
            a, b = self.start + i, self.start + j
            seconds, stored, error = self._block(i, j)
            merge = Merge(tuple(self.origins[i:j]))
            first = self.members[i]
            layers[first.layer] = Option(merge, math.sqrt(error), seconds, stored,
                                         f"{len(self.shrink.runs[a][b])} merged {first.kind}(s)")
            for member in self.members[i + 1 : j]:
                layers[member.layer] = Option(merge, 0.0, 0.0, 0, f"merged into {first.layer}")
            blocks.append(Block(a, b, self.shrink.runs[a][b], error, seconds))
            overrides.append(lambda a=a, b=b: self.shrink.overrides(a, self.shrink.runs[a][b]))
        return Item(lat, size, value, layers, lambda: {k: v for o in overrides for k, v in o().items()},
                    tuple(blocks))


def _pareto(candidates: list[tuple], resource: str, limit: int = 256) -> list[tuple]:
    """The candidates no other beats in both cost and value, cheapest first (thinned evenly beyond ``limit``)."""
    key = 1 if resource == "memory" else 0
    out, best = [], math.inf
    for c in sorted(candidates, key=lambda c: (c[key], c[2])):
        if c[2] < best:
            out.append(c)
            best = c[2]
    if len(out) > limit:
        step = (len(out) - 1) / (limit - 1)
        out = [out[round(i * step)] for i in range(limit)]
    return out
