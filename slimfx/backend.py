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

from .errors import PipelineError, SlimfxError
from .ir.capture import from_dynamo
from .passes import PassContext, PassManager, Report

DEFAULT_PIPELINE = "dead-code,fold-bn"


@dataclass
class BackendOptions:
    pipeline: Any = DEFAULT_PIPELINE
    profile: Any = None
    calibration: Any = None
    inductor: bool = True  # False: run the rewritten graph as is (eager), e.g. to debug a pass
    check: bool = False  # compare each pass against the original on the first call's inputs
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
        PassManager(result.pipeline)  # parse now: a bad pipeline fails at the first call with a clear message
        return result


def _concrete(value: Any) -> Any:
    if isinstance(value, torch.SymInt):
        return value.node.hint if value.node.hint is not None else value
    return value


def slimfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
                   mode: str | None = None) -> Callable:
    opts = BackendOptions.parse(options)
    inputs = [_concrete(v) for v in example_inputs]
    try:
        program = from_dynamo(gm, inputs)
        from .hw_profiles.profiles import resolve_profile

        ctx = PassContext(profile=resolve_profile(opts.profile), calibration=opts.calibration)
        report = PassManager(opts.pipeline, check=opts.check, on_pass=opts.on_pass).run(program, ctx)
    except PipelineError:
        raise
    except SlimfxError as exc:
        warnings.warn(f"slimfx left a graph untouched: {exc}", stacklevel=2)
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
    """Make the name work even when slimfx was not pip-installed (the entry point covers installed copies)."""
    from torch._dynamo.backends import registry

    if "slimfx" not in registry._COMPILER_FNS:
        registry.register_backend(slimfx_backend, name="slimfx")


_register()
