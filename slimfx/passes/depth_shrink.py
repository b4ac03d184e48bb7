"""Latency-aware activation removal: the lossy half of ``depth-merge`` (``depth-merge{latency=0.7}``).

Kim et al. (ICML 2023): replacing an activation by the identity lets the layers on either side merge into one.
Which activations to remove is a two-stage dynamic program (``depth_dp``) over two tables per chain
(``depth_spans``):

- T: the latency of every run of layers merged into one, from the profile's cost model or timed on this device;
- I: the importance of every block, the squared relative output error of the whole model on calibration data
  when that block's activations are removed (and its runs' padding moved to their first conv).

The chosen activations are removed, the model is distilled for a few hundred steps against the original's
outputs (``distill``), and then every planned run is merged exactly. Every block is also a candidate
(error, latency) that a planner can mix with other techniques (``span_candidates``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import BudgetError, CalibrationError, NumericalMismatchError
from ..hw_profiles.calibrate import measure
from ..hw_profiles.cost_model import latency as kernels_latency
from ..hw_profiles.op_costs import concrete, node_kernels, program_cost, size_hints
from ..hw_profiles.profiles import Profile, local_profile
from ..ir.fake_prop import refresh_metadata
from ..ir.program import CONV2D, Program
from ..timing import random_like
from .calibration import ActivationStats, calibration_inputs
from .depth_dp import INF, DepthPlan, fastest_runs, solve
from .depth_spans import (Chain, add_merged_layer, find_chains, grows, merged_args, merged_kernels, merged_weights,
                          moved_padding, run_mergeable)
from .distill import distill, output_error, outputs_on
from .manager import exact_tolerance

Tables = Literal["profile", "measure"]


@dataclass(frozen=True)
class SpanCandidate:
    """One block of one chain: its layers, the activations removing it drops, its error and latency."""

    layers: tuple[str, ...]  # weight origins, in order
    removed: tuple[str, ...]  # the activation nodes inside the block
    runs: tuple[tuple[int, int], ...]  # merged runs, as layer indices within ``layers``
    error: float  # squared relative output error on calibration data
    latency_s: float  # the block's runs (each merged run as one layer), plus the activation kept after it
    dense_latency_s: float  # the same layers and activations as they are


@dataclass
class _Layout:
    """Every chain's layers laid end to end, so one DP covers the whole model (blocks never cross chains)."""

    layers: list[fx.Node]
    chain_of: list[int]  # per global layer index
    activation_at: list[fx.Node | None]  # per global boundary

    @classmethod
    def of(cls, chains: list[Chain]) -> "_Layout":
        layers, chain_of, activation_at = [], [], []
        for c, chain in enumerate(chains):
            layers += chain.layers
            chain_of += [c] * len(chain.layers)
            activation_at += chain.activations[:-1]
        return cls(layers, chain_of, activation_at + [None])

    def same_chain(self, i: int, j: int) -> bool:
        return self.chain_of[i] == self.chain_of[j - 1]

    def inside(self, i: int, j: int) -> list[fx.Node]:
        return [a for a in self.activation_at[i + 1 : j] if a is not None]


class _Timer:
    """Latency of a run, an activation, or a program: from the profile, or timed here (eager, median)."""

    def __init__(self, program: Program, profile: Profile | None, tables: Tables, hints: dict | None = None):
        self.program, self.profile, self.tables = program, profile, tables
        self.hints = size_hints(program.graph) if hints is None else hints

    def run(self, run: list[fx.Node]) -> float:
        if self.tables == "profile":
            return concrete(kernels_latency(merged_kernels(run), self.profile), self.hints)
        x = random_like(run[0].args[0], self.hints)
        if len(run) == 1:
            weight, bias, args = self.program.tensor(run[0].args[1]), None, run[0].args[3:]
        else:
            weight, _ = merged_weights(self.program, run)
            weight, bias, args = weight.to(x.dtype), None, merged_args(run, None, None)[3:]
        fn = (lambda: F.conv2d(x, weight, bias, *args)) if run[0].target == CONV2D else (lambda: F.linear(x, weight))
        with torch.no_grad():
            return measure(fn, x.device.type, min_time=0.01, repeats=3)

    def activation(self, node: fx.Node | None) -> float:
        """A kept activation: a pass over memory of its own (Inductor on CPU runs it as a separate kernel
        between two extern convs), as the profile's cost model prices every elementwise op."""
        if node is None:
            return 0.0
        if self.tables == "profile":
            return concrete(kernels_latency(node_kernels(node), self.profile), self.hints)
        x = random_like(node.args[0], self.hints)
        with torch.no_grad():
            return measure(lambda: node.target(x, *node.args[1:], **node.kwargs), x.device.type, 0.01, 3)


def _identity(node: fx.Node, args: tuple, kwargs: dict):
    return args[0]


def _padded(padding: list[int]):
    def conv(node: fx.Node, args: tuple, kwargs: dict):
        args = list(args)
        args[4] = padding
        return node.target(*args, **kwargs)
    return conv


def _overrides(layout: _Layout, i: int, runs: tuple) -> dict:
    """What block (i, j) with these runs changes: its activations become identities, its runs' padding moves."""
    j = runs[-1][1]
    changes = {a: _identity for a in layout.inside(i, j)}
    for a, b in runs:
        for conv, padding in moved_padding(layout.layers[a:b]).items():
            changes[conv] = _padded(padding)
    return changes


class DepthShrink:
    """Plans and applies activation removal for one program (used by the ``depth-merge`` pass)."""

    def __init__(self, program: Program, ctx, tables: Tables = "profile", profile: Profile | None = None,
                 hints: dict | None = None, batches: list | None = None):
        """``profile`` (default: the context's, else this machine's), ``hints`` (the sizes latencies are priced
        at; default: the example's) and ``batches`` (default: every calibration batch) are the planner's to set."""
        if ctx.calibration is None or isinstance(ctx.calibration, ActivationStats):
            raise CalibrationError("depth-merge{latency=...} removes activations and measures the error of each "
                                   "removal on calibration batches: pass calibration= to slimfx.compress (an "
                                   "iterable of model-input tuples), or leave latency unset for exact merges only")
        if program.frontend != "export":
            raise CalibrationError("depth-merge{latency=...} runs the model on calibration batches, which needs a "
                                   "captured model (slimfx.compress); under torch.compile use exact merges only")
        self.program, self.ctx = program, ctx
        self.profile = (profile or ctx.profile or local_profile()) if tables == "profile" else None
        self.timer = _Timer(program, self.profile, tables, hints)
        self.batches = batches if batches is not None else calibration_inputs(program, ctx.calibration)
        self.reference = outputs_on(program, self.batches)
        self.layout = _Layout.of(find_chains(program))
        self._tables()

    def _tables(self) -> None:
        layout, n = self.layout, len(self.layout.layers)
        merged = [[INF] * (n + 1) for _ in range(n + 1)]
        for i in range(n):
            for j in range(i + 1, n + 1):
                run = layout.layers[i:j]
                if layout.same_chain(i, j) and run_mergeable(run) is None and not grows(run):
                    merged[i][j] = self.timer.run(run)
        self.merged = merged
        self.kept = [self.timer.activation(a) for a in layout.activation_at]
        _, self.runs = fastest_runs(merged)
        self.importance = [[INF] * (n + 1) for _ in range(n + 1)]
        for i in range(n):
            for j in range(i + 1, n + 1):
                if layout.same_chain(i, j):
                    changes = _overrides(layout, i, self.runs[i][j])
                    self.importance[i][j] = (output_error(self.program, self.batches, self.reference, changes)
                                             if changes else 0.0)
        self.dense_chain_s = sum(merged[i][i + 1] for i in range(n)) + sum(self.kept)
        self.total_s = self._program_latency()

    def _program_latency(self) -> float:
        if self.timer.tables == "profile":
            return program_cost(self.program.graph, self.profile, self.timer.hints).total_s
        device = next((w.device.type for w in self.program.gm.buffers()), "cpu")
        with torch.no_grad():  # at the example's sizes, like every layer's timing
            return measure(self.program.run_example, device, 0.02, 3)

    def overrides(self, start: int, runs: tuple) -> dict:
        """What removing block (start, runs[-1][1]) changes, to score it without rewriting."""
        return _overrides(self.layout, start, runs)

    @property
    def target(self) -> str:
        return self.profile.name if self.profile is not None else "this device (measured)"

    def candidates(self) -> list[SpanCandidate]:
        layout, n, out = self.layout, len(self.layout.layers), []
        for i in range(n):
            for j in range(i + 1, n + 1):
                if not layout.same_chain(i, j):
                    continue
                runs = self.runs[i][j]
                kept = self.kept[j] if j < n else 0.0
                origins = tuple(self.program.weights[l.args[1].target].origin for l in layout.layers[i:j])
                out.append(SpanCandidate(
                    origins, tuple(a.name for a in layout.inside(i, j)), tuple((a - i, b - i) for a, b in runs),
                    self.importance[i][j], sum(self.merged[a][b] for a, b in runs) + kept,
                    sum(self.merged[k][k + 1] for k in range(i, j)) + sum(self.kept[i + 1 : j + 1])))
        return out

    def plan(self, latency: float) -> DepthPlan:
        rest = self.total_s - self.dense_chain_s  # everything outside the chains stays as it is
        try:
            return solve(self.merged, self.importance, self.kept, latency * self.total_s - rest)
        except BudgetError as exc:
            lowest = (rest + exc.best) / self.total_s
            raise BudgetError(
                f"depth-merge{{latency={latency:g}}} cannot be met on {self.target}: the lowest achievable "
                f"latency is {lowest:.3f}x dense ({(rest + exc.best) * 1e6:.1f} us of {self.total_s * 1e6:.1f} us, "
                f"every removable activation removed); raise latency to at least {lowest:.3f}", lowest) from exc

    def apply(self, plan: DepthPlan, steps: int, lr: float, counts: Counter) -> None:
        """Remove the planned activations, distill, then merge every planned run exactly."""
        program, layout = self.program, self.layout
        changed = False
        for block in plan.blocks:
            for conv, padding in (p for a, b in block.runs for p in moved_padding(layout.layers[a:b]).items()):
                args = list(conv.args)
                args[4] = padding
                conv.args = tuple(args)
                changed = True
            for activation in layout.inside(block.start, block.end):
                activation.replace_all_uses_with(activation.args[0])
                program.graph.erase_node(activation)
                counts["activation-removed"] += 1
                changed = True
        if changed:
            program.gm.recompile()
            refresh_metadata(program)
        if changed and steps:
            before, after = distill(program, self.batches, self.reference, steps, lr)
            self.ctx.note(f"depth-merge: distilled {steps} steps: output error {before ** 0.5:.4f} -> "
                          f"{after ** 0.5:.4f} (relative, on calibration data)")
        distilled = outputs_on(program, self.batches)
        for block in plan.blocks:
            for a, b in block.runs:
                if b - a > 1:
                    self._merge(layout.layers[a:b])
                    counts["run-merged"] += 1
                    counts["layers-removed"] += b - a - 1
        program.gm.recompile()
        refresh_metadata(program)
        drift = output_error(program, self.batches, distilled) ** 0.5
        if drift > 10 * exact_tolerance(distilled):  # a merge rounds its weights once in the model's dtype
            raise NumericalMismatchError(f"depth-merge: merging the planned runs changed the outputs by {drift:.3g} "
                                         "(relative); this is a slimfx bug, please report it with the model")

    def _merge(self, run: list[fx.Node]) -> None:
        program, last = self.program, run[-1]
        weight, bias = merged_weights(program, run)
        with program.graph.inserting_before(last):
            merged = add_merged_layer(program, run, weight, bias, lambda w, b: merged_args(run, w, b))
        last.replace_all_uses_with(merged)
        for layer in reversed(run):
            program.graph.erase_node(layer)
        info = program.weights[merged.args[1].target]
        self.ctx.note(f"depth-merge: {info.origin}: {info.note}")


def span_candidates(program: Program, ctx, tables: Tables = "profile") -> list[SpanCandidate]:
    """Every block of every chain as an option (error, latency) for a planner, priced on ``ctx.profile`` (or this
    machine's built-in profile) and scored on ``ctx.calibration``."""
    return DepthShrink(program, ctx, tables).candidates()
