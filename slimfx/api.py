"""``slimfx.compress``: capture, run a pipeline, and return a new module that owns the compressed weights."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch

from .backend import DEFAULT_PIPELINE, slimfx_backend
from .errors import CaptureError
from .hw_profiles.profiles import resolve_profile
from .ir.capture import _as_args, capture, check_model_runs, require_module
from .ir.program import Program
from .passes import PassContext, PassManager, Report, relative_error
from .passes.pipeline import PipelineSpec


class CompressedModule(torch.nn.Module):
    """The result of ``compress``: call it like the original model. ``.report`` says what changed.

    When the model could be captured as one graph (the usual case) this owns only the compressed weights.
    Otherwise (``.program is None``) it runs a compiled copy of the model whose subgraphs were compressed.
    """

    def __init__(self, runner: torch.nn.Module, report: Report, program: Program | None):
        super().__init__()
        self.runner = runner
        self.report = report
        self.program = program

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.runner(*args, **kwargs)

    def print_ir(self) -> str:
        if self.program is None:
            return "(compiled through torch.compile around graph breaks: no single IR to print)"
        return self.program.print()


def compress(
    model: torch.nn.Module,
    example_inputs: Any,
    example_kwargs: dict | None = None,
    *,
    pipeline: PipelineSpec = DEFAULT_PIPELINE,
    profile: Any = None,
    calibration: Any = None,
    check: bool = True,
    dynamic: bool = True,
    on_pass: Callable | None = None,
) -> CompressedModule:
    """Compress ``model`` with ``pipeline`` (text like ``"fold-bn,factorize{keep=0.5}"`` or Pass objects).

    The user's model is not modified. ``report.final_rel_error`` is the output error against the original
    model on the example inputs. If the model cannot be captured as one graph it is compiled around its graph
    breaks instead, with a warning.
    """
    manager = PassManager(pipeline, check=check, on_pass=on_pass)  # fail fast on a bad pipeline
    ctx = PassContext(profile=resolve_profile(profile), calibration=calibration)
    args, kwargs = _as_args(example_inputs), dict(example_kwargs or {})
    require_module(model)
    reference = _eval_outputs(model, args, kwargs)  # also rejects inputs the model does not accept
    try:
        program = capture(model, args, kwargs, dynamic=dynamic, check_inputs=False)
    except CaptureError as exc:
        if "does not run on the example inputs" in str(exc):
            raise
        warnings.warn(f"{exc} Falling back to compressing each Dynamo subgraph.", stacklevel=2)
        return _compress_around_graph_breaks(model, args, kwargs, manager, ctx)
    report = manager.run(program, ctx)
    result = CompressedModule(program.gm, report, program)
    with torch.no_grad():
        report.final_rel_error = relative_error(reference, result(*args, **kwargs))
    return result


def _eval_outputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    was_training = model.training
    try:
        return check_model_runs(model.eval(), args, kwargs)
    finally:
        model.train(was_training)


def _compress_around_graph_breaks(model: torch.nn.Module, args: tuple, kwargs: dict, manager: PassManager,
                                  ctx: PassContext) -> CompressedModule:
    model_copy = copy.deepcopy(model).eval()
    report = Report(pipeline=",".join(str(p) for p in manager.passes))
    options = {"pipeline": manager.passes, "profile": ctx.profile, "calibration": ctx.calibration,
               "inductor": False, "check": manager.check, "report": report}
    compiled = torch.compile(model_copy, backend=lambda gm, inputs: slimfx_backend(gm, inputs, options))
    with torch.no_grad():
        reference = check_model_runs(model_copy, args, kwargs)
        report.final_rel_error = relative_error(reference, compiled(*args, **kwargs))
    report.notes.append("captured around graph breaks: the module keeps a copy of the dense weights")
    return CompressedModule(compiled, report, None)
