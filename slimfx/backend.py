"""``torch.compile(model, backend="slimfx", options={...})``.

Dynamo hands each captured graph here (one per region between graph breaks). We bind its weights, run the
pipeline, and pass the rewritten graph to Inductor so everything slimfx does not touch is still compiled.
Weights are frozen into the compiled graph (the compressed ones must be): later in-place updates to the
model's parameters are not seen, exactly as with Inductor's freezing.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .errors import CONFIGURATION_ERRORS, PipelineError, SlimfxError, one_line
from .ir.capture import from_dynamo
from .passes import PassContext, PassManager, Report
from .passes.calibration import check_calibration

DEFAULT_PIPELINE = "dead-code,fold-bn"


@dataclass
class BackendOptions:
    pipeline: Any = DEFAULT_PIPELINE
    profile: Any = None
    calibration: Any = None
    inductor: bool = True  # False: run the rewritten graph as is (eager), e.g. to debug a pass
    lower: bool = True  # end the pipeline with the lower stage (kernels for the profile's device)
    check: bool = False  # compare each pass against the original on the first call's inputs
    budget: Any = None  # plan the lossy passes for this budget, e.g. {"latency": 0.5} (see slimfx.compress)
    workload: Any = None  # the sizes the plan is priced at, e.g. {"batch": 1, "seq": 1, "phase": "decode"}
    tune: str = "model"  # "measure": time the plan's options and the kernels on this device
    report: Report | None = None  # pass a Report to collect what happened to every subgraph
    on_pass: Callable | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, options: dict | None) -> "BackendOptions":
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise PipelineError(f"unknown slimfx backend option(s) {unknown}; known options: {sorted(known)}")
        result = cls(**options)
        from .passes.plan import with_budget

        # parse now: a bad pipeline or budget fails at the first call with a clear message
        result.pipeline = with_budget(result.pipeline, result.budget, result.workload, result.tune)
        PassManager(result.pipeline)
        check_calibration(result.calibration, "torch.compile(..., backend='slimfx')", raw_batches=False)
        return result


def _concrete(value: Any) -> Any:
    if isinstance(value, torch.SymInt):
        return value.node.hint if value.node.hint is not None else value
    return value


def slimfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
                   mode: str | None = None) -> Callable:
    """Run the pipeline on one Dynamo graph, then hand the result to Inductor (or run it eagerly).

    A configuration mistake (pipeline, profile, calibration) raises, exactly as ``compress`` does. Trouble with
    the graph itself (an op slimfx cannot capture, a failing rewrite) warns in one line and returns the graph
    exactly as Dynamo gave it: ``from_dynamo`` works on a copy, so nothing is left half rewritten.
    """
    opts = BackendOptions.parse(options)
    from .hw_profiles.profiles import resolve_profile

    ctx = PassContext(profile=resolve_profile(opts.profile, default_local=True), calibration=opts.calibration)
    manager = PassManager(opts.pipeline, check=opts.check, on_pass=opts.on_pass, lower=opts.lower)
    inputs = [_concrete(v) for v in example_inputs]
    try:
        program = from_dynamo(gm, inputs)
        report = manager.run(program, ctx)
    except CONFIGURATION_ERRORS:
        raise
    except SlimfxError as exc:
        warnings.warn(f"slimfx left a graph untouched: {one_line(exc)}", stacklevel=2)
        return _finish(gm, example_inputs, opts)
    if opts.report is not None:
        opts.report.pipeline = report.pipeline
        opts.report.merge(report)
    return _finish(program.gm, example_inputs, opts)


def _finish(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions) -> Callable:
    if not opts.inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    if gm.meta.get("slimfx_fake_mode") is not None:
        # A fresh module: Dynamo's bookkeeping (param name -> source) does not know the weights passes added,
        # and Inductor would reject them. The new module owns them as plain constants.
        gm = fx.GraphModule(gm, gm.graph)
    return compile_fx(gm, list(example_inputs))


def _register() -> None:
    """Register the name for copies of slimfx that are not pip-installed.

    An installed copy declares a ``torch_dynamo_backends`` entry point, and torch registers the name itself when it
    loads that entry point (which imports this module). Registering here as well would make torch's own
    registration fail with "duplicate name: slimfx" in a process that has not imported slimfx first.
    """
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if any(ep.name == "slimfx" for ep in entry_points(group="torch_dynamo_backends")):
        return
    if "slimfx" not in registry._COMPILER_FNS:
        registry.register_backend(slimfx_backend, name="slimfx")


_register()
