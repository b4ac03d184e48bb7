"""``plan{latency=0.5}``: one budgeted plan across factorize, nm and quant-lowrank, then executed.

The planner (``slimfx/plan``) collects every layer's options from the three lossy passes, each with its predicted
error on the calibration data and its latency and bytes for the kernel ``lower`` would give it on the target;
solves the multiple-choice knapsack for the budget; optionally refines the choice by an evolutionary search scored
end to end (``search`` generations); and hands each pass its layers' decisions (``plan=``). The passes execute them
as given; a planned layer a pass does not rewrite is an error, not a silent change of plan. On a model built from
repeated blocks, with calibration batches, they execute it block by block (sequential calibration, the default of
``compress``): each planned layer, at its planned rank, pattern or bits, is fitted to the inputs the compressed
blocks before it produce. The plan itself is made from one-shot statistics. Without a profile the plan is for
this machine's built-in one. ``compress(..., budget=...)`` adds this pass.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

from ..errors import BudgetError, CalibrationError, PipelineError
from ..ir.program import Program
from .base import Pass, PassContext, register
from .calibration import ActivationStats, calibration_inputs, require_stats
from .sequential import find_segments, run_pass

TECHNIQUES = ("lowrank", "nm", "quant", "int8", "depth")


@register
@dataclass
class PlanPass(Pass):
    name = "plan"
    summary = "one budgeted plan across factorize, nm and quant-lowrank per layer (knapsack DP, optional search)"

    latency: Optional[float] = None  # fraction of the dense latency
    memory: Optional[str] = None  # bytes ("2GB") or a fraction of the dense weights ("0.3")
    max_error: Optional[float] = None  # relative output error on the calibration data
    batch: Optional[int] = None  # workload: the first input's first dimension (default: the example's)
    seq: Optional[int] = None  # workload: its second dimension
    phase: Literal["prefill", "decode"] = "prefill"
    tune: Literal["model", "measure"] = "model"
    techniques: str = "lowrank|nm|quant|int8|depth"
    search: int = 0  # generations of the end-to-end evolutionary refinement (0: the knapsack's plan)
    nm_method: Literal["wanda", "sparsegpt"] = "wanda"
    exclude: str = ""  # regex on weight names to leave dense
    allow_slower: bool = False  # allow options predicted slower than dense (memory budgets)
    score_batches: int = 4  # calibration batches the end-to-end error is measured on

    def validate(self) -> None:
        if self.has_budget:  # plan{search=10} in a pipeline may take its budget from compress(budget=...)
            self.budget()
        self.workload()
        unknown = [t for t in self.techniques.split("|") if t not in TECHNIQUES]
        if unknown or not self.techniques:
            raise self.invalid("techniques", f"must name some of {', '.join(TECHNIQUES)} joined by |")
        if self.search < 0:
            raise self.invalid("search", "must be >= 0")
        if self.score_batches < 1:
            raise self.invalid("score_batches", "must be >= 1")
        self.check_regex("exclude")

    @property
    def has_budget(self) -> bool:
        return any(getattr(self, k) is not None for k in ("latency", "memory", "max_error"))

    def budget(self):
        from ..plan.budget import Budget

        return Budget.parse({k: v for k, v in (("latency", self.latency), ("memory", self.memory),
                                               ("max_error", self.max_error)) if v is not None})

    def workload(self):
        from ..plan.budget import Workload

        return Workload(self.batch, self.seq, self.phase)

    def run(self, program: Program, ctx: PassContext) -> Counter:
        from ..hw_profiles.profiles import local_profile
        from ..plan.candidates import Grid, Pricing, layer_options
        from ..plan.planner import Planner, Scorer, plan_passes, workload_hints

        if not self.has_budget:
            raise PipelineError("plan needs a budget: plan{latency=0.5}, plan{memory=2GB}, plan{max_error=0.01}, or "
                                "compress(..., budget={'latency': 0.5})")
        budget, workload = self.budget(), self.workload()
        hints = workload_hints(program, workload)
        stats = require_stats(program, ctx, True, "plan", "a pipeline of data-free passes instead of a budget")
        profile = ctx.profile
        if profile is None:
            profile = local_profile()
            ctx.note(f"plan: no profile given; planned for {profile.name}, the built-in profile for this device")
        pricing = Pricing(profile.device, profile, hints, self.tune, keep_storage=budget.resource == "memory")
        grid = Grid(techniques=tuple(self.techniques.split("|")), nm_method=self.nm_method)
        missing: list[str] = []
        layers = layer_options(program, stats, pricing, grid, self.exclude, missing,
                               ctx.cache.setdefault("decompositions", {}))
        for origin in missing:
            ctx.skip(self.name, origin, "no calibration statistics describe its input (statistics given ready-made "
                                        "describe the original model, not layers an earlier pass merged or changed)")
        if not layers:
            raise PipelineError("plan: no layer can be compressed (none is a trained, unshared linear or conv with "
                                "calibration statistics); nothing to plan")
        scorer, chains, batches = None, [], None
        if not isinstance(ctx.calibration, ActivationStats):
            batches = calibration_inputs(program, ctx.calibration, self.score_batches)
            scorer = Scorer(program, batches)
        elif self.search or self.max_error is not None:
            ctx.note("plan: calibration given as statistics, so the end-to-end error is not measured: no search, "
                     "and max_error is checked against the predicted (summed) error")
        if "depth" in grid.techniques:
            chains = self._chains(program, ctx, layers, pricing, hints, batches)
        planner = Planner(program, layers, budget, workload, profile, hints, self.tune, self.allow_slower, chains)
        try:
            plan = planner.plan(scorer, self.search)
        except BudgetError as exc:
            if missing:
                exc.args = (f"{exc.args[0]}; {len(missing)} layer(s) had no calibration statistics and stayed out "
                            f"of the plan ({', '.join(missing[:4])}): pass raw calibration batches to "
                            "slimfx.compress, or collect the statistics after the exact passes",)
            raise
        ctx.plans.append(plan)
        for layer in layers:  # the options' dense approximations (and the decompositions they hold) are done with
            layer.approximate = None
        del scorer
        if ctx.calibration_mode == "sequential" and batches is not None and not isinstance(find_segments(program), str):
            ctx.cache.pop("decompositions", None)  # executed block by block, each layer is fitted (and decomposed) anew
        # lower runs each planned layer on the kernel its plan was priced for (at the workload's sizes, keeping the
        # storage a memory budget counted on), where that kernel applies
        ctx.planned_kernels.update({k: o.kernels for k, o in plan.layers.items()
                                    if o.decision.technique not in ("dense", "depth")})
        counts: Counter = Counter()
        if planner.blocks:  # merges first: the layers they keep are then rewritten by origin as planned
            from ..passes.depth_dp import DepthPlan

            chains[0].shrink.apply(DepthPlan(planner.blocks, 0.0, 0.0), 0, 0.0, counts)
            counts["depth"] = len(planner.blocks)
            for origin, option in plan.layers.items():  # a block's error is end to end, on its first layer
                if option.decision.technique == "depth":
                    ctx.layer_errors[origin] = option.error
        expected = Counter(o.decision.technique for o in plan.layers.values() if o.decision.technique != "dense")
        for pass_ in plan_passes(plan, self.nm_method, grid.correction):
            done = run_pass(pass_, program, ctx)  # block by block where the model has blocks (sequential calibration)
            rewritten = sum(v for k, v in done.items() if not k.startswith("skipped") and k != "permuted")
            technique = {"factorize": "lowrank", "nm": "nm", "quant-lowrank": "quant", "int8-dynamic": "int8"}[pass_.name]
            if rewritten != expected[technique]:
                skipped = [f"{s.layer}: {s.reason}" for s in ctx.skipped if s.pass_name == pass_.name]
                raise PipelineError(f"plan: {pass_.name} rewrote {rewritten} of the {expected[technique]} layers "
                                    f"planned for it ({'; '.join(skipped) or 'no reason recorded'}); this is a slimfx "
                                    "bug, please report it")
            counts[technique] += rewritten
        counts["dense"] = sum(1 for o in plan.layers.values() if o.decision.technique == "dense")
        counts.pop("activation-removed", None)
        ctx.note(f"plan: {plan.budget} on {plan.profile}: predicted latency {plan.latency_ratio:.3f}x, weights "
                 f"{plan.memory_ratio:.3f}x of dense, predicted error {plan.predicted_error:.4f}"
                 + (f", measured {plan.measured_error:.4f}" if plan.measured_error is not None else ""))
        return counts


    def _chains(self, program: Program, ctx: PassContext, layers: list, pricing, hints: dict,
                batches: list | None) -> list:
        """The chains depth merging may shorten, as units of the plan, where no layer of theirs is excluded and the
        end-to-end error of removing activations can be measured (otherwise none, with a note why). A chain's
        layer no other technique shrinks (a depthwise conv) joins ``layers`` with its dense option alone."""
        import re

        from ..passes.depth_shrink import DepthShrink
        from ..passes.depth_spans import find_chains
        from ..plan.candidates import dense_only
        from ..plan.chains import Chain

        found = find_chains(program)
        if not found:
            return []
        if batches is None or program.frontend != "export":
            ctx.note("plan: depth-merge spans left out: measuring what removing an activation costs needs a captured "
                     "model (slimfx.compress) and calibration batches")
            return []
        by_origin = {l.layer: l for l in layers}
        shrink = DepthShrink(program, ctx, "measure" if self.tune == "measure" else "profile", pricing.profile, hints,
                             batches)
        chains, start = [], 0
        for chain in found:
            origins = [program.weights[n.args[1].target].origin for n in chain.layers]
            if not (self.exclude and any(re.search(self.exclude, o) for o in origins)):
                for node, origin in zip(chain.layers, origins):
                    if origin not in by_origin:
                        by_origin[origin] = dense_only(program, node, origin, pricing)
                        layers.append(by_origin[origin])
                chains.append(Chain(shrink, start, start + len(origins), [by_origin[o] for o in origins]))
            start += len(origins)
        order = {n.name: i for i, n in enumerate(program.graph.nodes)}
        layers.sort(key=lambda l: order[l.uses[0].name])
        return chains


def require_batches(ctx: PassContext, what: str) -> None:
    if ctx.calibration is None or isinstance(ctx.calibration, ActivationStats):
        raise CalibrationError(f"{what} runs the model on calibration batches: pass calibration= to slimfx.compress "
                               "as an iterable of model-input tuples (statistics alone are not enough)")


LOSSY_PLANNED = ("factorize", "nm", "quant-lowrank")


def heal_pass(heal: Any) -> Pass | None:
    """The ``heal`` pass an entry point's ``heal=`` asks for: a number of steps (0 or None: none), option text
    (``"steps=1000,loss=kl"``), a mapping of options, or a Heal pass."""
    import numbers

    from .base import make_pass
    from .heal import Heal
    from .pipeline import parse_pipeline

    if heal is None:
        return None
    if isinstance(heal, str):
        try:
            heal = int(heal.strip())
        except ValueError:
            if not heal.strip():
                raise PipelineError("heal='' is empty: give a number of steps (0: no healing) or options like "
                                    "'steps=1000,loss=kl'") from None
    if isinstance(heal, bool):
        raise PipelineError(f"heal={heal!r}: give a number of steps (0: no healing), option text like "
                            "'steps=1000,loss=kl', or a dict of heal's options")
    if isinstance(heal, numbers.Integral):
        heal = make_pass("heal", {"steps": int(heal)})
    elif isinstance(heal, str):
        heal = parse_pipeline(f"heal{{{heal}}}")[0]
    elif isinstance(heal, Mapping):
        heal = make_pass("heal", heal)
    elif not isinstance(heal, Heal):
        raise PipelineError(f"heal= takes a number of steps, option text or a dict, got {type(heal).__name__}")
    return heal if heal.steps else None


def with_budget(pipeline, budget=None, workload=None, tune: str = "model", heal: Any = 0) -> list[Pass]:
    """The pipeline the entry points run for ``budget=``: its exact passes, then ``plan`` (given the budget,
    workload and tune), then ``heal`` when asked, then ``lower`` (measuring too with ``tune="measure"``)."""
    from ..plan.budget import Budget, Workload
    from .lower import Lower
    from .pipeline import parse_pipeline

    passes = parse_pipeline(pipeline)
    healing = heal_pass(heal)
    if tune not in ("model", "measure"):
        raise PipelineError(f"tune={tune!r} must be 'model' (priced on the profile) or 'measure' (timed here)")
    if budget is None:
        if workload is not None:
            raise PipelineError("workload= prices a plan: give budget= too (or plan{batch=...,seq=...} in the pipeline)")
        return passes + ([healing] if healing else [])
    parsed, load = Budget.parse(budget), Workload.parse(workload)
    lossy = [p.name for p in passes if p.name in LOSSY_PLANNED]
    if lossy:
        raise PipelineError(f"budget= plans the lossy passes itself: remove {', '.join(lossy)} from the pipeline, or "
                            "drop budget= and keep the pipeline as it is")
    options = {"latency": parsed.latency, "max_error": parsed.max_error, "batch": load.batch, "seq": load.seq,
               "phase": load.phase, "tune": tune,
               "memory": None if parsed.memory is None else repr(parsed.memory)}
    planned = [i for i, p in enumerate(passes) if p.name == "plan"]
    if planned:
        if passes[planned[0]].has_budget:
            raise PipelineError("the budget is given twice: in budget= and in the pipeline's plan{...}; keep one")
        passes[planned[0]] = dataclasses.replace(passes[planned[0]], **options)  # the caller's pass stays as it was
    else:
        passes.append(PlanPass(**options))
    if healing:
        passes.append(healing)
    if tune == "measure" and not any(p.name == "lower" for p in passes):
        passes.append(Lower(tune="measure"))
    return passes
