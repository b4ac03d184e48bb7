"""``slimfx.compress``: capture, run a pipeline, and return a new module holding the compressed weights."""
from __future__ import annotations

import copy
import types
import warnings
from typing import Any, Callable

import torch

from .backend import DEFAULT_PIPELINE
from .errors import CaptureError, ModelInputError, ShapePropagationError, one_line
from .hw_profiles.profiles import resolve_profile
from .ir.capture import _as_args, capture, check_model_runs, require_module
from .ir.partition import Part, describe_cause, partition, replace_submodule
from .ir.program import Program
from .passes import PassContext, PassManager, Report, relative_error
from .passes.manager import CHECK_ELEMENTS
from .passes.calibration import ActivationStats, check_calibration, collect_part_stats
from .passes.pipeline import PipelineSpec


BROKEN_ERROR = 0.8  # a relative output error this close to 1 means the outputs have little left of the original


class CompressedModule(torch.nn.Module):
    """The result of ``compress``: call it like the original model. ``.report`` says what changed.

    Usually the whole model was captured as one graph (``.program``), and this module holds only the weights that
    graph reads: new tensors for rewritten layers, the unchanged ones shared with the original model (not
    copied). A model that does not capture as one graph keeps its eager top-level code, with the submodules that
    did capture replaced by their compressed graphs (``.parts``); it keeps no dense copy of what they replaced.
    """

    def __init__(self, runner: torch.nn.Module, report: Report, program: Program | None,
                 parts: list[Part] | None = None):
        super().__init__()
        self.runner = runner
        self.report = report
        self.program = program
        self.parts = parts or []
        # Dynamo caches compiled code per code object, at most 8 entries each: with one shared forward, the ninth
        # compressed model torch.compile'd in a process would silently run eagerly. Each instance gets its own copy.
        method = CompressedModule.forward
        own = types.FunctionType(method.__code__.replace(), method.__globals__, method.__name__, method.__defaults__,
                                 method.__closure__)
        self.forward = types.MethodType(own, self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.program is None:  # eager top-level code: its errors are the model's own
            return self.runner(*args, **kwargs)
        try:
            return self.runner(*args, **kwargs)
        except (TypeError, ValueError, RuntimeError, AssertionError) as exc:  # torch names internal arguments
            from .passes.calibration import describe_inputs

            example = describe_inputs(self.program.example_args, self.program.example_kwargs)
            raise ModelInputError(
                f"the compressed model does not take these inputs ({type(exc).__name__}: {one_line(exc)}); it was "
                f"captured with {example}: pass inputs of the same structure, positional or keyword as there "
                "(sizes may vary where the model allows, ranks and dtypes may not)") from exc

    def print_ir(self) -> str:
        if self.program is not None:
            return self.program.print()
        return "\n\n".join(f"== {part.name} ==\n{part.program.print()}" for part in self.parts)


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
    lower: bool = True,
    budget: Any = None,
    workload: Any = None,
    tune: str = "model",
    heal: Any = 0,
    calibration_mode: str = "sequential",
    stats_dtype: torch.dtype = torch.float32,
    check_elements: int = CHECK_ELEMENTS,
    compute_device: Any = None,
) -> CompressedModule:
    """Compress ``model`` with ``pipeline`` (text like ``"fold-bn,factorize{keep=0.5}"`` or Pass objects).

    The user's model is not modified. ``profile`` names the target (a built-in name such as ``"h100"``, a TOML
    path, or a Profile); without one it is this machine (the profile ``slimfx profile calibrate --save`` cached,
    else the built-in one for its device), and ``profile="none"`` turns cost gating off. ``calibration`` is an
    iterable of batches, each a full set of model
    inputs (a tuple, or a dict of keyword inputs). ``report.final_rel_error`` is the output error against the
    original model on the example inputs; above ``BROKEN_ERROR`` a warning names the layers most to blame.
    The pipeline ends with the ``lower`` stage (kernels for ``profile``'s device) unless it names it itself, or
    ``lower=False`` keeps the canonical compressed ops (to inspect them, or to save a target-neutral model).

    ``budget={"latency": 0.5}`` (or ``{"memory": "2GB"}``, ``{"max_error": 0.01}``, text ``"latency=0.5"``) plans
    the lossy passes instead of a hand-written pipeline: the ``plan`` pass chooses each layer's technique and
    setting for ``profile`` (this machine's built-in profile without one) at ``workload``
    (``{"batch": 1, "seq": 512, "phase": "decode"}``; the example inputs' sizes by default), priced by the cost
    model or, with ``tune="measure"``, timed here. ``heal=200`` then distils the compressed layers for 200 steps
    against the original's outputs on the calibration batches (``heal="steps=1000,loss=kl,batches=32"`` or a
    dict sets heal's other options: KL on logits, how many calibration batches it trains on). ``report.plans``
    holds the plan.

    Data-aware passes (whitened factorize, Wanda/SparseGPT nm, GPTQ or corrected quant-lowrank) calibrate a model
    built from repeated blocks block by block (``calibration_mode="sequential"``, see ``passes/sequential.py``):
    each block's statistics come from its inputs as the compressed blocks before it produce them.
    ``calibration_mode="one-shot"`` takes every layer's statistics from the model before the pass. Statistics
    accumulate in ``stats_dtype`` (float32, or float64). The check after every pass compares at most
    ``check_elements`` elements of each output (an evenly strided sample). ``compute_device="cuda"`` compresses
    a model that stays on the CPU (or memory-mapped from disk: its weights are never copied): sequential
    calibration moves one block's weights at a time to that device, compresses the block there, and moves the
    compressed block back to where the model is.
    """
    from .passes.plan import with_budget

    pipeline = with_budget(pipeline, budget, workload, tune, heal)
    manager = PassManager(pipeline, check=check, on_pass=on_pass, lower=lower,  # fail fast on a bad pipeline
                          check_elements=check_elements)
    ctx = PassContext(profile=resolve_profile(profile, default_local=True), calibration=calibration,
                      **calibration_options(calibration_mode, stats_dtype, compute_device))
    check_calibration(calibration, "slimfx.compress")
    args, kwargs = _as_args(example_inputs), dict(example_kwargs or {})
    require_module(model)
    reference = _eval_outputs(model, args, kwargs)  # also rejects inputs the model does not accept
    try:
        program = _capture(model, args, kwargs, dynamic)
    except ModelInputError:
        raise
    except CaptureError as exc:
        return _compress_parts(model, args, kwargs, manager, ctx, dynamic, reference, exc)
    report = manager.run(program, ctx)
    report.notes[:0] = program.notes + _default_target_note(profile, ctx)
    result = CompressedModule(program.gm, report, program)
    _finish_report(report, reference, result, args, kwargs, calibration is not None)
    return result


def calibration_options(mode: str, dtype: Any, compute_device: Any = None) -> dict:
    """The context's calibration settings, or a PipelineError saying what to pass instead."""
    from .errors import PipelineError

    if mode not in ("sequential", "one-shot"):
        raise PipelineError(f"calibration_mode={mode!r} must be 'sequential' (block by block, from the compressed "
                            "blocks' outputs) or 'one-shot' (every layer's statistics from the original model)")
    if dtype not in (torch.float32, torch.float64):
        raise PipelineError(f"stats_dtype={dtype!r} must be torch.float32 or torch.float64")
    if compute_device is not None:
        try:
            compute_device = torch.device(compute_device)
        except (RuntimeError, TypeError) as exc:
            raise PipelineError(f"compute_device={compute_device!r} is not a torch device ({exc}); pass e.g. "
                                "'cuda' or 'cuda:1', or leave it out to compress where the model is") from None
        if compute_device.type == "cuda" and not torch.cuda.is_available():
            raise PipelineError(f"compute_device={str(compute_device)!r}, but this torch sees no CUDA device; leave "
                                "it out to compress where the model is")
        if compute_device.type == "cuda" and (compute_device.index or 0) >= torch.cuda.device_count():
            raise PipelineError(f"compute_device={str(compute_device)!r}, but this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s); pass 'cuda:0'..'cuda:"
                                f"{torch.cuda.device_count() - 1}'")
        if mode != "sequential":
            raise PipelineError("compute_device= moves one block at a time to the device, which needs "
                                "calibration_mode='sequential'; or move the whole model there yourself")
    return {"calibration_mode": mode, "stats_dtype": dtype, "compute_device": compute_device}


def _default_target_note(profile: Any, ctx: PassContext) -> list[str]:
    if profile is not None or ctx.profile is None:
        return []
    from .hw_profiles.profiles import calibrated_path

    kind = "calibrated" if ctx.profile.source == str(calibrated_path(ctx.profile.device)) else "built-in"
    return [f"no profile given: priced for {ctx.profile.name}, this machine's {kind} profile (profile='none' "
            "turns cost gating off)"]


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> Program:
    """Capture with symbolic sizes; if shape propagation fails on them, once more with the example's sizes."""
    try:
        return capture(model, args, kwargs, dynamic=dynamic, check_inputs=False)
    except ShapePropagationError as exc:
        if not dynamic:
            raise
        program = capture(model, args, kwargs, dynamic=False, check_inputs=False)
        program.notes.append(f"captured with the example's fixed sizes: with symbolic sizes, {one_line(exc)}")
        return program


def _eval_outputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    was_training = model.training
    try:
        return check_model_runs(model.eval(), args, kwargs)
    finally:
        model.train(was_training)


def _finish_report(report: Report, reference: Any, result: torch.nn.Module, args: tuple, kwargs: dict,
                   had_calibration: bool) -> None:
    with torch.no_grad():
        report.final_rel_error = relative_error(reference, result(*args, **kwargs))
    if report.final_rel_error > BROKEN_ERROR:
        worst = ", ".join(f"{name} ({err:.2f})" for name, err in report.worst_layers()) or "none recorded"
        warnings.warn(
            f"the compressed model's output error is {report.final_rel_error:.2f} relative to the original: it is "
            f"probably broken. Largest predicted layer errors: {worst}. Keep more (e.g. a higher keep=) or exclude "
            f"those layers (exclude=...){'' if had_calibration else ', or pass calibration data for a data-aware method'}.",
            stacklevel=3)


def _compress_parts(model: torch.nn.Module, args: tuple, kwargs: dict, manager: PassManager, ctx: PassContext,
                    dynamic: bool, reference: Any, cause: CaptureError) -> CompressedModule:
    """Compress every submodule that captures on its own; the rest of the model stays eager Python."""
    runner = copy.deepcopy(model).eval()
    split = partition(runner, args, kwargs, dynamic)
    if not split.parts:
        raise CaptureError(f"{type(model).__name__} cannot be captured, and none of its submodules can either: "
                           f"{describe_cause(cause)}") from cause
    warnings.warn(f"{type(model).__name__} is not one graph ({describe_cause(cause)}); compressing its "
                  f"{len(split.parts)} capturable submodules separately", stacklevel=3)
    calibration = ctx.calibration
    if calibration is not None and not isinstance(calibration, ActivationStats):
        calibration = collect_part_stats(runner, split.parts, calibration)
    report = Report(pipeline=",".join(str(p) for p in manager.passes))
    report.notes.append(f"captured as {len(split.parts)} parts around untraceable code: {', '.join(split.names())}")
    report.notes.extend(split.notes)
    for part in split.parts:
        part_ctx = PassContext(profile=ctx.profile, calibration=calibration)
        report.merge(manager.run(part.program, part_ctx))
        report.notes.extend(part.program.notes)
        replace_submodule(runner, part.name, part.program.gm)
    report.pipeline = ",".join(str(p) for p in manager.passes)
    result = CompressedModule(runner, report, None, split.parts)
    _finish_report(report, reference, result, args, kwargs, ctx.calibration is not None)
    return result
