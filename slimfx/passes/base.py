"""A pass is a small dataclass: a registered name, typed options, and ``run`` that rewrites a Program.

Options are dataclass fields; their type hints drive parsing from pipeline text and validation, so
``factorize{keep=0.5}`` and ``Factorize(keep=0.5)`` are the same thing and fail the same way.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

from ..errors import PipelineError
from ..ir.program import Program

PASSES: dict[str, type["Pass"]] = {}


@dataclass
class PassContext:
    """What a pass may consult besides the program: the hardware profile, calibration data, and the report."""

    profile: Any = None  # a slimfx.hw_profiles Profile, or None for "no cost gating"
    calibration: Any = None  # iterable of input tuples, or None
    notes: list[str] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)  # shared analyses (e.g. activation statistics)
    skipped: list[Skip] = field(default_factory=list)
    layer_errors: dict[str, float] = field(default_factory=dict)  # weight origin -> predicted relative error
    inputs_changed: set[str] = field(default_factory=set)  # layers whose input a pass changed (stats now stale)
    revision: int = 0  # bumped by the manager after every pass that rewrote the program
    plans: list = field(default_factory=list)  # the planner's Plans (slimfx.plan.Plan), one per planned graph
    reference: Any = None  # (calibration batches, the original's outputs on them), for passes that need them
    heal_errors: tuple[float, float] | None = None  # output error before and after healing
    planned_kernels: dict[str, frozenset] = field(default_factory=dict)  # weight origin -> kernels its plan priced
    calibration_mode: str = "sequential"  # data-aware passes: "sequential" (block by block) or "one-shot"
    stats_dtype: Any = None  # what statistics accumulate in (None: float32)
    scope: set[str] | None = None  # while calibrating sequentially: the weight origins of the current block
    block_stats: Any = None  # ... and their statistics, from the inputs the compressed blocks before produce
    compute_device: Any = None  # sequential calibration: run each block here, its weights moved in and back out

    def note(self, message: str) -> None:
        self.notes.append(message)

    def skip(self, pass_name: str, layer: str, reason: str) -> None:
        """A layer a pass left alone, and why (the report groups these by reason)."""
        self.skipped.append(Skip(pass_name, reason, layer))


@dataclass(frozen=True)
class Skip:
    pass_name: str
    reason: str
    layer: str


def first_use_of_each_weight(program: Program, targets: tuple) -> list:
    """The first layer (op in ``targets``) reading each weight, in graph order: one entry per weight."""
    first: dict[str, Any] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in targets and program.is_weight(node.args[1]):
            first.setdefault(node.args[1].target, node)
    return list(first.values())


def layer_uses(program: Program, layer: Any) -> list | None:
    """Every layer that reads this layer's weight, in graph order, so the weight is decided once for all of them
    (a layer applied twice); None if the weight is also read by something else (an lm_head tied to an
    embedding), which a lossy pass must leave dense: rewriting only some uses would keep the dense tensor alive
    as well, and the model would grow."""
    users = list(layer.args[1].users)
    if any(u.op != "call_function" or u.target != layer.target or u.args[1] is not layer.args[1] for u in users):
        return None
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    return sorted(users, key=order.__getitem__)


def replace_each(program: Program, uses: list, build: Any, note: dict) -> None:
    """Replace every use of a decided weight by ``build(use)`` (built just before it), annotated with ``note``."""
    for use in uses:
        with program.graph.inserting_before(use):
            new = build(use)
        program.annotations(new).update(note)
        if "val" in use.meta:  # same value, same shape: a later layer reading it is priced before refresh
            new.meta.setdefault("val", use.meta["val"])
        use.replace_all_uses_with(new)
        program.graph.erase_node(use)


def claim_uses(pass_name: str, program: Program, layer: Any, kinds: tuple[str, ...], ctx: "PassContext",
               counts: Counter) -> list | None:
    """Every layer reading this layer's weight, if the pass may rewrite it; otherwise the skip is recorded (count
    and reason) and None is returned."""
    if ctx.scope is not None and program.weights[layer.args[1].target].origin not in ctx.scope:
        return None  # calibrating sequentially: another block's layer, rewritten in its own turn
    uses = layer_uses(program, layer)
    why = "the weight is also read by another kind of op (tied)" if uses is None else refusal(program, layer, kinds)
    if why is None:
        return uses
    counts["skipped-shared-weight" if uses is None else "skipped-constrained"] += 1
    ctx.skip(pass_name, program.weights[layer.args[1].target].origin, why)
    return None


def claimed_layers(pass_: Any, program: Program, ctx: "PassContext", counts: Counter, targets: tuple,
                   kinds: tuple[str, ...], describe: str = "") -> typing.Iterator[tuple[Any, str, list]]:
    """(layer, origin, uses) for each weight a lossy pass may rewrite: the first layer reading it among ``targets``,
    not matching the pass's ``exclude``, in its ``plan`` when the planner gave one, and claimable (``claim_uses``
    records why not). ``describe``: a progress bar's label."""
    from ..progress import progress

    layers = first_use_of_each_weight(program, targets)
    for node in progress(layers, describe) if describe else layers:
        origin = program.weights[node.args[1].target].origin
        if (pass_.exclude and re.search(pass_.exclude, origin)) or (pass_.plan is not None and origin not in pass_.plan):
            continue
        uses = claim_uses(pass_.name, program, node, kinds, ctx, counts)
        if uses is not None:
            yield node, origin, uses


def refusal(program: Program, layer: Any, kinds: tuple[str, ...]) -> str | None:
    """Why a lossy pass must not touch this layer's weight, or None: it is not a trained weight, or an earlier
    pass gave it a property (``kinds`` of constraints) this pass would destroy."""
    info = program.weights[layer.args[1].target]
    if not info.compressible:
        return f"not a trained weight ({info.kind})"
    for constraint in info.constraints:
        if constraint.kind in kinds:
            return f"keeps {constraint}"
    return None


@dataclass
class Pass:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = False  # promises the outputs do not change (checked by the manager)

    def check_counts(self, counts: Counter) -> None:
        """Raise if a whole run's rewrite counts show the options cannot work (called once per run, also when the
        run went block by block)."""

    @property
    def per_layer_statistics(self) -> bool:
        """Whether this pass, as configured, reads each layer's input statistics and decides each layer from its
        own (so it can be calibrated block by block: ``sequential``)."""
        return False

    def validate(self) -> None:
        """Raise PipelineError naming the option to change. Called on construction."""

    def __post_init__(self) -> None:
        self.validate()

    def run(self, program: Program, ctx: PassContext) -> Counter:  # pragma: no cover - interface
        raise NotImplementedError

    def __str__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return f"{self.name}{{{','.join(changed)}}}" if changed else self.name

    def invalid(self, option: str, message: str) -> PipelineError:
        return PipelineError(f"{self.name}: option {option}={getattr(self, option)!r} {message}")

    def check_regex(self, *options: str) -> None:
        for option in options:
            try:
                re.compile(getattr(self, option))
            except re.error as exc:
                raise self.invalid(option, f"is not a valid regex: {exc}") from None


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in PASSES:
        raise ValueError(f"pass name {cls.name!r} is empty or taken")
    PASSES[cls.name] = cls
    return cls


def options_of(cls: type[Pass]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def describe_options(cls: type[Pass]) -> str:
    parts = []
    for f in dataclasses.fields(cls):
        parts.append(f"{f.name}: {_type_name(options_of(cls)[f.name])} = {f.default!r}")
    return ", ".join(parts) or "(no options)"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    if args:
        return " | ".join(_type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, text: Any, where: str) -> Any:
    """Convert an option value (text from a pipeline string, or a Python value) to the declared type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        for choice in args:
            if str(choice) == str(text):
                return choice
        raise PipelineError(f"{where} must be one of {', '.join(map(repr, args))}, got {text!r}")
    if args and type(None) in args:  # Optional[X]
        if text is None or (isinstance(text, str) and text.lower() in ("none", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for candidate in inner:
            try:
                return convert(candidate, text, where)
            except PipelineError as exc:
                errors.append(str(exc))
        raise PipelineError(errors[-1])
    try:
        if tp is bool:
            if isinstance(text, bool):
                return text
            if str(text).lower() in ("true", "1", "yes"):
                return True
            if str(text).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(text, float) and not text.is_integer():
                raise ValueError
            return int(str(text)) if not isinstance(text, (int, float)) else int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return str(text)
    except (TypeError, ValueError):
        raise PipelineError(f"{where} expects {_type_name(tp)}, got {text!r}") from None
    return text


def make_pass(name: str, options: Mapping[str, Any]) -> Pass:
    cls = PASSES.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, PASSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PipelineError(f"unknown pass {name!r}.{hint} Known passes: {', '.join(sorted(PASSES))}")
    declared = options_of(cls)
    values = {}
    for key, raw in options.items():
        if key not in declared:
            close = difflib.get_close_matches(key, declared, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PipelineError(f"pass {name!r} has no option {key!r}.{hint} Its options are: {describe_options(cls)}")
        values[key] = convert(declared[key], raw, f"{name}: option {key}")
    return cls(**values)
