"""The planner: every layer's options from every lossy pass, one budgeted choice across all of them.

Data flows one way: statistics -> options per layer (``candidates``) -> the knapsack (``knapsack``) under the
budget -> optionally an evolutionary refinement scored end to end (``search``) -> a typed ``Plan``, which the
``plan`` pass hands to factorize, nm and quant-lowrank as their ``plan=`` option; they execute it as given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import BudgetError, PipelineError
from ..hw_profiles.op_costs import program_cost, size_hints
from ..ir.program import Program
from ..passes.distill import output_error, outputs_on
from . import knapsack
from .budget import Budget, Workload
from .chains import Chain, Item, layer_items
from .options import Int8, LayerOptions, LowRank, Option, Quant, Sparse


ROW_HEADS = ("layer", "decision", "kernel", "error", "latency us (dense)", "bytes (dense)")


@dataclass
class Plan:
    """One decision per layer (keyed by the weight's origin name: a weight read by several layers is decided once
    for all of them), with the predicted totals under ``workload`` on ``profile``."""

    budget: Budget
    workload: Workload
    profile: str
    tune: str
    layers: dict[str, Option]  # origin -> chosen option
    dense: dict[str, Option]  # origin -> the dense option (the baseline of each row)
    dense_latency_s: float
    latency_s: float
    dense_bytes: int
    bytes: int
    predicted_error: float  # sqrt of the summed squared layer errors, each weighed by its sensitivity (the proxy)
    measured_error: float | None = None  # relative output error of the planned model on calibration data
    frontier: list[tuple[float, float]] = field(default_factory=list)  # (resource ratio, predicted error)
    notes: list[str] = field(default_factory=list)

    @property
    def latency_ratio(self) -> float:
        return self.latency_s / self.dense_latency_s if self.dense_latency_s else 1.0

    @property
    def memory_ratio(self) -> float:
        return self.bytes / self.dense_bytes if self.dense_bytes else 1.0

    def decisions(self) -> dict[str, str]:
        return {layer: str(option.decision) for layer, option in self.layers.items()}

    def rows(self) -> list[tuple[str, ...]]:
        """Per layer, as text: layer, decision, kernel, error, latency us (dense's), bytes (dense's)."""
        out = []
        for layer, option in self.layers.items():
            dense = self.dense[layer]
            how = " measured" if option.measured else ""
            out.append((layer, str(option.decision), option.kernel, f"{option.error:.4f}",
                        f"{option.latency_s * 1e6:.1f} ({dense.latency_s * 1e6:.1f}){how}",
                        f"{option.bytes:,} ({dense.bytes:,})"))
        return out

    def table(self) -> str:
        """One row per layer: decision, kernel, predicted error, latency and bytes against the dense layer's."""
        rows = [ROW_HEADS, *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(ROW_HEADS))]
        return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)

    def __str__(self) -> str:
        err = f", measured error {self.measured_error:.4f}" if self.measured_error is not None else ""
        head = (f"plan for {self.budget} on {self.profile} ({self.workload}, tune={self.tune}): latency "
                f"{self.latency_ratio:.3f}x dense, weights {self.memory_ratio:.3f}x, predicted error "
                f"{self.predicted_error:.4f}{err}")
        return "\n".join([head, self.table(), *(f"  note: {n}" for n in self.notes)])

    def to_dict(self) -> dict:
        return {"budget": str(self.budget), "workload": str(self.workload), "profile": self.profile,
                "tune": self.tune, "latency_ratio": self.latency_ratio, "memory_ratio": self.memory_ratio,
                "dense_latency_s": self.dense_latency_s, "latency_s": self.latency_s, "dense_bytes": self.dense_bytes,
                "bytes": self.bytes, "predicted_error": self.predicted_error, "measured_error": self.measured_error,
                "layers": {k: {**v.to_dict(), "dense_latency_s": self.dense[k].latency_s,
                               "dense_bytes": self.dense[k].bytes} for k, v in self.layers.items()},
                "frontier": self.frontier, "notes": self.notes}


def workload_hints(program: Program, workload: Workload) -> dict:
    """Size hints with the workload's batch and sequence length put on the first input's first two dims."""
    hints = size_hints(program.graph)
    wanted = {0: workload.batch, 1: workload.rows_seq}
    if all(v is None for v in wanted.values()):
        return hints
    first = next((n for n in program.graph.nodes if n.op == "placeholder" and not program.is_weight(n)
                  and isinstance(n.meta.get("val"), torch.Tensor)), None)
    if first is None:
        raise PipelineError("workload= needs a tensor input whose first dimensions are the batch and sequence")
    dims = first.meta["val"].shape
    chosen: dict = {}
    for dim, value in wanted.items():
        if value is None:
            continue
        if dim >= len(dims):
            raise PipelineError(f"workload sets dimension {dim} but the first input has shape {tuple(dims)}")
        size = dims[dim]
        if not isinstance(size, torch.SymInt) or not hasattr(size.node.expr, "name"):
            raise PipelineError(f"workload sets dimension {dim} of the first input, which was captured with the fixed "
                                f"size {int(size)}: pass example inputs of the workload's sizes instead")
        if size.node.expr in chosen and chosen[size.node.expr] != value:
            raise PipelineError(f"workload batch={workload.batch} and seq={workload.rows_seq} fall on one symbolic "
                                f"size of the first input {tuple(dims)}: capture with example inputs whose batch "
                                "and sequence length differ (e.g. 2 and 16)")
        chosen[size.node.expr] = value
        hints[size.node.expr] = value
    return hints


class Scorer:
    """End-to-end relative output error of a choice on calibration batches, without rewriting: each planned
    layer runs with the dense weight its decision stands for, each planned merge with its activations removed."""

    def __init__(self, program: Program, batches: list):
        self.program, self.batches = program, batches
        self.reference = outputs_on(program, batches)
        self.seen: dict[tuple, float] = {}

    def __call__(self, key: tuple, overrides: Callable[[], dict]) -> float:
        if key not in self.seen:
            self.seen[key] = math.sqrt(output_error(self.program, self.batches, self.reference, overrides()))
        return self.seen[key]


@dataclass
class Problem:
    """The knapsack the budget defines: per layer (cost, value) options and the capacity."""

    groups: list[list[tuple[float, float]]]
    capacity: float
    resource: str  # what cost is: "latency" | "memory" | "error" (squared)


PROBE_ERROR = 0.2  # the layer error at which each layer's end-to-end sensitivity is measured


class Planner:
    """Chooses one option per unit (a layer, or a chain that depth merging may shorten) under the budget."""

    def __init__(self, program: Program, layers: list[LayerOptions], budget: Budget, workload: Workload,
                 profile: Any, hints: dict, tune: str, allow_slower: bool = False, chains: list[Chain] = ()):
        self.program, self.budget, self.workload, self.profile, self.tune = program, budget, workload, profile, tune
        self.notes: list[str] = []
        for layer in layers:  # an option no kernel runs (infinite latency) is no option
            layer.options = [layer.options[0]] + [o for o in layer.options[1:] if math.isfinite(o.latency_s)]
        if not allow_slower:  # never plan a rewrite the target runs slower than the dense layer
            dropped = 0
            for layer in layers:
                kept = [o for o in layer.options if o.latency_s <= layer.dense.latency_s * (1 + 1e-9)]
                dropped += len(layer.options) - len(kept)
                layer.options = kept
            if dropped:
                self.notes.append(f"{dropped} option(s) {'measured' if tune == 'measure' else 'predicted'} slower "
                                  "than their dense layer left out (plan{allow_slower=true} keeps them)")
        self.layers, self.chains, self.allow_slower = layers, list(chains), allow_slower
        modelled = program_cost(program.graph, profile, hints).total_s
        modelled_chosen = (sum(_modelled_dense(l, profile, hints) for l in layers)
                           + sum(c.activation_s(profile, hints) for c in self.chains))
        self.fixed_s = max(modelled - modelled_chosen, 0.0)  # everything the plan does not choose for
        in_chains = {m.layer for c in self.chains for m in c.members}
        self.dense_latency_s = (self.fixed_s + sum(l.dense.latency_s for l in layers if l.layer not in in_chains)
                                + sum(c.dense_latency_s() for c in self.chains))
        self.dense_bytes = program.weight_bytes()
        self.fixed_bytes = self.dense_bytes - sum(l.dense.bytes for l in layers)
        self.sensitivity = {l.layer: 1.0 for l in layers}  # end-to-end squared error per unit of a layer's own
        self.units: list[list[Item]] = []
        self.scorer: Scorer | None = None
        self.blocks: tuple = ()  # the chosen plan's merged blocks (for DepthShrink.apply)

    def calibrate(self, scorer: Scorer) -> None:
        """Weigh each layer's error by what it does to the model's output: change that layer alone to the option
        whose own error is nearest ``PROBE_ERROR`` and measure the output error end to end. A layer feeding the
        logits counts for more than one inside a residual branch, which summed layer errors cannot know."""
        for layer in self.layers:
            lossy = [(abs(o.error - PROBE_ERROR), i) for i, o in enumerate(layer.options) if o.error > 0]
            if not lossy:
                continue
            probe = layer.options[min(lossy)[1]]
            item = layer_items(layer, 1.0)[layer.options.index(probe)]
            weight = scorer(("probe", layer.layer), item.overrides) ** 2 / probe.error ** 2
            # a layer whose change does not reach the outputs at all still counts a little, so that a max_error
            # budget can tell its options apart; a non-finite measurement falls back to the layer's own error
            self.sensitivity[layer.layer] = max(weight, 1e-3) if math.isfinite(weight) else 1.0

    def _units(self) -> list[list[Item]]:
        """The knapsack's groups in graph order: each chain once (at its first layer), every other layer alone."""
        chain_at = {c.members[0].layer: c for c in self.chains}
        in_chains = {m.layer for c in self.chains for m in c.members}
        resource = "memory" if self.budget.resource == "memory" else "latency"
        units = []
        for layer in self.layers:
            if layer.layer in chain_at:
                units.append(chain_at[layer.layer].items(self.sensitivity, resource))
            elif layer.layer not in in_chains:
                units.append(layer_items(layer, self.sensitivity[layer.layer]))
        return units

    def score(self, choice: list[int]) -> float:
        """The end-to-end error of ``choice`` (one item per unit) on the calibration batches."""
        items = [unit[i] for unit, i in zip(self.units, choice)]
        return self.scorer(("plan", tuple(choice)), lambda: {k: v for it in items for k, v in it.overrides().items()})

    # -- the knapsack ---------------------------------------------------------------------------------------------
    def problem(self, error_cap: float | None = None) -> Problem:
        if self.budget.resource == "memory" and self.budget.memory is not None:
            cap = self.budget.memory * (self.dense_bytes if self.budget.memory <= 1 else 1) - self.fixed_bytes
            return Problem([[(it.bytes, it.value) for it in unit] for unit in self.units], cap, "memory")
        if self.budget.latency is not None:
            cap = self.budget.latency * self.dense_latency_s - self.fixed_s
            return Problem([[(it.latency_s, it.value) for it in unit] for unit in self.units], cap, "latency")
        cap = (error_cap if error_cap is not None else self.budget.max_error) ** 2
        return Problem([[(it.value, it.latency_s) for it in unit] for unit in self.units], cap, "error")

    def solve(self, problem: Problem) -> list[int]:
        least = knapsack.least_cost(problem.groups)
        if problem.capacity < 0 or least > problem.capacity * (1 + 1e-9):
            raise self._infeasible(problem)
        # discretise only what the budget leaves above every layer's cheapest option (rounding then costs less)
        floors = [min(c for c, _ in g) for g in problem.groups]
        shifted = [[(c - f, v) for c, v in g] for g, f in zip(problem.groups, floors)]
        solution = knapsack.solve(shifted, problem.capacity - least) if problem.capacity > least else None
        if solution is None:  # the budget is (within rounding) the least cost: the cheapest option everywhere
            return [min(range(len(g)), key=lambda i: (g[i][0], g[i][1])) for g in problem.groups]
        return solution.choice

    def _infeasible(self, problem: Problem) -> BudgetError:
        least = knapsack.least_cost(problem.groups)
        if problem.resource == "latency":
            best = (self.fixed_s + least) / self.dense_latency_s
            return BudgetError(f"no plan reaches latency={self.budget.latency:g} of dense on {self.profile.name}: the "
                               f"lowest achievable is {best:.3f}x with these options; raise latency to at least "
                               f"{best:.3f}, or allow more techniques", best)
        if problem.resource == "memory":
            best_bytes = self.fixed_bytes + least
            which = "these options" if self.allow_slower else \
                "options that are not slower than dense (plan{allow_slower=true} admits slower ones)"
            return BudgetError(f"no plan fits memory={self.budget.memory:g}: the smallest achievable weights are "
                               f"{best_bytes:,} bytes ({best_bytes / self.dense_bytes:.3f} of dense) with {which}; "
                               "raise the memory budget", best_bytes)
        return BudgetError("max_error below zero", 0.0)

    def plan(self, scorer: Scorer | None = None, generations: int = 0, seed: int = 0) -> Plan:
        self.scorer = scorer
        if scorer is not None:
            self.calibrate(scorer)
        self.units = self._units()
        problem = self.problem()
        choice = self.solve(problem)
        measured = self.score(choice) if scorer is not None else None
        if problem.resource == "error" and scorer is not None:  # the proxy adds layer errors; check end to end
            cap = problem.capacity
            for _ in range(5):
                if measured <= self.budget.max_error:
                    break
                cap *= (self.budget.max_error / measured) ** 2 * 0.9
                choice = self.solve(self.problem(math.sqrt(cap)))
                measured = self.score(choice)
            if measured > self.budget.max_error:
                raise BudgetError(f"no plan keeps the output error within max_error={self.budget.max_error:g} on the "
                                  f"calibration data (dense layers only: {self.score([0] * len(self.units)):.3g}); "
                                  "raise max_error", measured)
        if generations and scorer is not None and problem.resource != "error":
            from .search import refine

            choice, measured = refine(problem, choice, self.score, generations, seed)
        plan = self._plan(choice, measured)
        if self.budget.max_error is not None and problem.resource != "error":
            achieved = measured if measured is not None else plan.predicted_error
            if achieved > self.budget.max_error:
                raise BudgetError(
                    f"within {self.budget} the least output error is {achieved:.4f} "
                    f"({'measured on calibration data' if measured is not None else 'predicted'}), above "
                    f"max_error={self.budget.max_error:g}: relax the {problem.resource} budget or raise max_error",
                    achieved)
        plan.frontier = self._frontier()
        return plan

    def _plan(self, choice: list[int], measured: float | None) -> Plan:
        items = [unit[i] for unit, i in zip(self.units, choice)]
        chosen = {k: v for it in items for k, v in it.layers.items()}
        self.blocks = tuple(b for it in items for b in it.blocks)
        return Plan(self.budget, self.workload, self.profile.name, self.tune, chosen,
                    {l.layer: l.dense for l in self.layers}, self.dense_latency_s,
                    self.fixed_s + sum(it.latency_s for it in items), self.dense_bytes,
                    self.fixed_bytes + sum(it.bytes for it in items),
                    math.sqrt(sum(it.value for it in items)), measured, notes=list(self.notes))

    def _frontier(self) -> list[tuple[float, float]]:
        """(latency or memory ratio, predicted error) at every budget up to dense: the Pareto plot's curve."""
        memory = self.budget.resource == "memory"
        groups = [[(it.bytes if memory else it.latency_s, it.value) for it in unit] for unit in self.units]
        dense = sum(g[0][0] for g in groups)
        fixed, total = (self.fixed_bytes, self.dense_bytes) if memory else (self.fixed_s, self.dense_latency_s)
        return [((fixed + c) / total, math.sqrt(v)) for c, v in knapsack.frontier(groups, dense)]


def _modelled_dense(layer: LayerOptions, profile: Any, hints: dict) -> float:
    from ..hw_profiles.cost_model import latency
    from ..hw_profiles.op_costs import concrete, node_kernels

    return sum(concrete(latency(node_kernels(u) or [], profile), hints) for u in layer.uses)


def plan_passes(plan: Plan, nm_method: str, correction: str) -> list:
    """The passes that execute ``plan``, each given its layers' decisions (``plan=``)."""
    from ..passes.factorize import Factorize
    from ..passes.int8_dynamic import Int8Dynamic
    from ..passes.nm_sparsity import NMSparsity
    from ..passes.quant_lowrank import QuantLowRank

    ranks = {k: (o.decision.rank, o.decision.bits) for k, o in plan.layers.items() if isinstance(o.decision, LowRank)}
    patterns = {k: (o.decision.n, o.decision.m) for k, o in plan.layers.items() if isinstance(o.decision, Sparse)}
    quants = {k: (o.decision.bits, o.decision.group, o.decision.rank) for k, o in plan.layers.items()
              if isinstance(o.decision, Quant)}
    passes = []
    if ranks:
        passes.append(Factorize(method="whitened", plan=ranks))
    if patterns:
        passes.append(NMSparsity(method=nm_method, plan=patterns))
    if quants:
        passes.append(QuantLowRank(quantizer="rtn", correction=correction, plan=quants))
    int8 = sorted(k for k, o in plan.layers.items() if isinstance(o.decision, Int8))
    if int8:
        passes.append(Int8Dynamic(plan=int8))
    return passes
