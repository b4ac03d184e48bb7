"""Runs passes in order; after each one: recompile, re-derive metadata, verify, measure, and check numerics."""
from __future__ import annotations

import time
from collections import Counter
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..errors import NumericalMismatchError, PipelineError, SlimfxError
from ..hw_profiles.op_costs import program_cost, program_flops
from ..ir.fake_prop import refresh_metadata
from ..ir.program import Program
from ..ir.verify import verify
from .base import Pass, PassContext, Skip
from .pipeline import PipelineSpec, parse_pipeline


@dataclass
class PassRecord:
    name: str
    rewrites: dict[str, int]
    params_before: int
    params_after: int
    flops_before: float
    flops_after: float
    weight_bytes_after: int
    seconds: float
    rel_error: float | None = None  # max relative L2 error of outputs vs the original, on the check inputs
    latency_before_s: float | None = None  # predicted on the context's profile, at the example sizes
    latency_after_s: float | None = None


@dataclass
class Report:
    pipeline: str
    passes: list[PassRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: float = 0.0
    flops_after: float = 0.0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    cost: Any = None  # ProgramCost of the result, when a profile is given
    latency_before_s: float | None = None
    latency_after_s: float | None = None
    final_rel_error: float | None = None  # compressed vs original model on the example inputs
    skipped: list[Skip] = field(default_factory=list)  # layers a pass left alone, with the reason
    layer_errors: dict[str, float] = field(default_factory=dict)  # weight origin -> predicted relative error
    plans: list = field(default_factory=list)  # the planner's decisions (slimfx.plan.Plan), one per planned graph
    heal_errors: tuple[float, float] | None = None  # output error on calibration data before and after healing

    def rewrites(self, name: str) -> dict[str, int]:
        """Rewrite counts of the first pass called ``name`` (e.g. ``report.rewrites("fold-bn")``)."""
        for record in self.passes:
            if record.name.split("{")[0] == name:
                return record.rewrites
        raise KeyError(f"no pass {name!r} ran; ran: {[r.name for r in self.passes]}")

    def merge(self, other: "Report") -> None:
        """Fold another graph's report in (one per Dynamo subgraph)."""
        self.passes.extend(other.passes)
        self.notes.extend(other.notes)
        self.skipped.extend(other.skipped)
        self.layer_errors.update(other.layer_errors)
        self.plans.extend(other.plans)
        self.heal_errors = self.heal_errors or other.heal_errors
        for key in ("params_before", "params_after", "flops_before", "flops_after",
                    "weight_bytes_before", "weight_bytes_after", "latency_before_s", "latency_after_s"):
            mine, theirs = getattr(self, key), getattr(other, key)
            setattr(self, key, theirs if mine is None else mine if theirs is None else mine + theirs)
        self.cost = other.cost if self.cost is None else self.cost

    def to_dict(self) -> dict:
        plans = [plan.to_dict() for plan in self.plans]
        result = asdict(dataclasses.replace(self, plans=[]))
        result["plans"] = plans
        return result

    def summary(self) -> str:
        lines = [f"pipeline: {self.pipeline or '(empty)'}"]
        rewrites = [", ".join(f"{k}={v}" for k, v in sorted(r.rewrites.items())) or "-" for r in self.passes]
        name_w = max([len(r.name) for r in self.passes] + [4])
        rw_w = max([len(rw) for rw in rewrites] + [8])
        lines.append(f"  {'pass':<{name_w}}  {'rewrites':<{rw_w}}  {'params':^21}  {'MFLOPs':^19}  {'rel err':>9}")
        for r, rw in zip(self.passes, rewrites):
            err = f"{r.rel_error:.2e}" if r.rel_error is not None else "-"
            lines.append(
                f"  {r.name:<{name_w}}  {rw:<{rw_w}}  {r.params_before:>10,}->{r.params_after:<10,}"
                f" {r.flops_before / 1e6:>9.3f}->{r.flops_after / 1e6:<9.3f}  {err:>9}"
            )
        ratio = self.weight_bytes_after / self.weight_bytes_before if self.weight_bytes_before else 1.0
        lines.append(
            f"  total: params {self.params_before:,} -> {self.params_after:,}, weight bytes "
            f"{self.weight_bytes_before:,} -> {self.weight_bytes_after:,} ({ratio:.1%}), "
            f"MFLOPs {self.flops_before / 1e6:.3f} -> {self.flops_after / 1e6:.3f}"
        )
        if self.latency_before_s is not None and self.latency_after_s is not None and self.cost is not None:
            lines.append(f"  predicted latency on {self.cost.profile}: {self.latency_before_s * 1e6:.1f} us -> "
                         f"{self.latency_after_s * 1e6:.1f} us ({self.latency_before_s / self.latency_after_s:.2f}x)")
        if self.final_rel_error is not None:
            lines.append(f"  output error vs original (relative L2): {self.final_rel_error:.3e}")
        if self.heal_errors is not None:
            lines.append(f"  healing: output error on calibration data {self.heal_errors[0]:.4f} -> "
                         f"{self.heal_errors[1]:.4f}")
        for plan in self.plans:
            lines.extend("  " + line for line in str(plan).splitlines())
        lines.extend(f"  note: {n}" for n in self.grouped_notes())
        return "\n".join(lines)

    def grouped_notes(self) -> list[str]:
        """Notes with repeats merged (``x17``), and skipped layers grouped by pass and reason."""
        counts = Counter(self.notes)
        lines = [f"{n} (x{counts[n]})" if counts[n] > 1 else n for n in dict.fromkeys(self.notes)]
        groups: dict[tuple[str, str], list[str]] = {}
        for skip in self.skipped:
            groups.setdefault((skip.pass_name, skip.reason), []).append(skip.layer)
        for (pass_name, reason), layers in groups.items():
            shown = ", ".join(layers[:4]) + (f", ... (+{len(layers) - 4})" if len(layers) > 4 else "")
            count = f"{len(layers)} layers" if len(layers) > 1 else "1 layer"
            lines.append(f"{pass_name}: {count} left as they were: {reason}: {shown}")
        return lines

    def worst_layers(self, count: int = 3) -> list[tuple[str, float]]:
        """The layers with the largest predicted error: where to look first when the result is broken."""
        return sorted(self.layer_errors.items(), key=lambda kv: -kv[1])[:count]


CHECK_ELEMENTS = 1 << 20  # per output tensor, in the manager's check after every pass


def sample(tensor: torch.Tensor, limit: int) -> torch.Tensor:
    """A detached copy of ``tensor``, or of an evenly strided sample of ``limit`` of its elements if it is larger
    (the same elements every time, so two samples compare)."""
    tensor = tensor.detach()
    if tensor.numel() <= limit or not tensor.is_floating_point():
        return tensor.clone()
    flat = tensor.reshape(-1)
    return flat[:: -(-flat.numel() // limit)].clone()


def relative_error(reference: Any, actual: Any) -> float:
    """Max over output tensors of ||actual - reference|| / ||reference||."""
    ref_leaves = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
    act_leaves = [t for t in pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)]
    if len(ref_leaves) != len(act_leaves):
        return float("inf")
    worst = 0.0
    for r, a in zip(ref_leaves, act_leaves):
        if r.shape != a.shape:
            return float("inf")
        if not r.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(r, a) else float("inf"))
            continue
        denom = r.double().norm().item() or 1.0
        worst = max(worst, (a.double() - r.double()).norm().item() / denom)
    return worst


def exact_tolerance(outputs: Any, base: float = 1e-5) -> float:
    """How far an exact rewrite may move outputs: ``base`` in float32, a few roundings of the coarsest dtype below.

    Folding and merging round the new weights once in the model's dtype; in bf16 that alone is ~0.4% per layer.
    """
    eps = max((torch.finfo(t.dtype).eps for t in pytree.tree_leaves(outputs)
               if isinstance(t, torch.Tensor) and t.is_floating_point()), default=0.0)
    return max(base, 4 * eps)


class PassManager:
    """``PassManager("dead-code,fold-bn").run(program)``.

    ``check=True`` runs the program on its example inputs after every pass and records the error against the
    original; an ``exact`` pass whose error exceeds its tolerance raises, naming the pass. The tolerance is
    ``exact_rtol`` for float32 outputs and grows with the rounding of lower-precision outputs (``exact_tolerance``).
    ``on_pass(pass_, program)`` is called after each pass (``slimfx explain`` prints the IR there).
    """

    def __init__(self, pipeline: PipelineSpec, *, check: bool = True, exact_rtol: float = 1e-5,
                 on_pass: Callable[[Pass, Program], None] | None = None, lower: bool = False,
                 check_elements: int = CHECK_ELEMENTS):
        self.passes = parse_pipeline(pipeline)
        if lower and not any(p.name == "lower" for p in self.passes):  # the entry points end every pipeline so
            self.passes.append(parse_pipeline("lower")[0])  # (a pipeline that names it keeps its options)
        self.check = check
        if check_elements < 1:
            raise PipelineError(f"check_elements={check_elements} must be >= 1 (elements of each output compared)")
        self.check_elements = check_elements
        self.exact_rtol = exact_rtol
        self.on_pass = on_pass

    def run(self, program: Program, ctx: PassContext | None = None) -> Report:
        ctx = ctx or PassContext()
        report = Report(pipeline=",".join(str(p) for p in self.passes))
        report.params_before = program.parameter_count()
        report.weight_bytes_before = program.weight_bytes()
        report.flops_before = program_flops(program.graph)
        reference = previous = self._outputs(program) if self.check else None
        tolerance = exact_tolerance(reference, self.exact_rtol)
        latency = self._latency(program, ctx)
        report.latency_before_s = latency
        self._keep_reference(program, ctx)
        for pass_ in self.passes:
            params, flops = program.parameter_count(), program_flops(program.graph)
            start = time.perf_counter()
            shape_before = (len(program.graph.nodes), tuple(program.weights))
            try:
                with torch.no_grad():
                    counts = self._run(pass_, program, ctx)
            except SlimfxError as exc:  # name the pass; the type (and so how callers treat it) is kept
                exc.args = (f"pass {pass_} failed: {exc}", *exc.args[1:])
                raise
            if (len(program.graph.nodes), tuple(program.weights)) != shape_before:
                ctx.revision += 1  # the program changed: statistics collected before describe another one
            program.gm.recompile()
            refresh_metadata(program)
            verify(program)
            record = PassRecord(
                name=str(pass_), rewrites=dict(counts), params_before=params,
                params_after=program.parameter_count(), flops_before=flops,
                flops_after=program_flops(program.graph), weight_bytes_after=program.weight_bytes(),
                seconds=time.perf_counter() - start, latency_before_s=latency,
            )
            latency = record.latency_after_s = self._latency(program, ctx)
            if reference is not None:
                outputs = self._outputs(program)
                record.rel_error = relative_error(reference, outputs)
                step = relative_error(previous, outputs)  # what this pass alone changed
                if pass_.exact and step > tolerance:
                    raise NumericalMismatchError(
                        f"pass {pass_} promises exact results but changed the outputs by {step:.3g} "
                        f"(relative, tolerance {tolerance:g}); this is a slimfx bug, please report it with the model"
                    )
                previous = outputs
            report.passes.append(record)
            if self.on_pass is not None:
                self.on_pass(pass_, program)
        report.notes.extend(ctx.notes)
        report.skipped.extend(ctx.skipped)
        report.layer_errors.update(ctx.layer_errors)
        report.plans.extend(ctx.plans)
        report.heal_errors = ctx.heal_errors
        report.params_after = program.parameter_count()
        report.weight_bytes_after = program.weight_bytes()
        report.flops_after = program_flops(program.graph)
        report.latency_after_s = latency
        if ctx.profile is not None:
            report.cost = program_cost(program.graph, ctx.profile)
        return report

    @staticmethod
    def _run(pass_: Pass, program: Program, ctx: PassContext) -> Counter:
        from .sequential import run_pass

        return run_pass(pass_, program, ctx)

    def _keep_reference(self, program: Program, ctx: PassContext) -> None:
        """The original's outputs on calibration batches, for passes that train against them (heal)."""
        wanting = [p for p in self.passes if getattr(p, "needs_reference", False)]
        if not wanting or ctx.reference is not None or ctx.calibration is None:
            return
        from .calibration import ActivationStats, calibration_inputs
        from .distill import outputs_on

        if isinstance(ctx.calibration, ActivationStats):
            return  # the pass says what it needs
        batches = calibration_inputs(program, ctx.calibration, max(p.batches for p in wanting))
        ctx.reference = (batches, outputs_on(program, batches))

    @staticmethod
    def _latency(program: Program, ctx: PassContext) -> float | None:
        return program_cost(program.graph, ctx.profile).total_s if ctx.profile is not None else None

    def _outputs(self, program: Program) -> Any:
        """The example's outputs, each float tensor cut to an evenly strided sample of at most ``check_elements``
        (an LLM's logits need not be kept, or compared in float64, whole)."""
        with torch.no_grad():
            return pytree.tree_map(lambda t: sample(t, self.check_elements) if isinstance(t, torch.Tensor) else t,
                                   program.run_example())
