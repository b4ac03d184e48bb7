"""Front ends: a user's ``nn.Module`` (through non-strict export) or a Dynamo graph, into one ``Program``.

``capture`` uses ``torch.export(strict=False)`` because its result must stand alone: a module that owns its
(later compressed) weights and keeps the model's input/output pytree, so dense weights can really be dropped.
``from_dynamo`` takes the graph a ``torch.compile`` backend receives: weights arrive there as placeholders and
are bound to the real parameters by identity (the example inputs *are* the module's parameter objects).
Both then bind weights as ``get_attr`` nodes and canonicalize, so passes see one IR.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import CaptureError, ModelInputError, one_line
from .canonicalize import canonicalize
from .fake_prop import size_one_stays_dynamic
from .model_outputs import accepts_use_cache, register_output_types, unknown_output_type, without_cache
from .program import Program, WeightInfo, fetch_attr
from .verify import verify


def _as_args(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise CaptureError(
            f"example_inputs must be a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}; "
            "wrap a single input as (x,) and pass keyword inputs through example_kwargs"
        )
    return example_inputs


def require_module(model: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")


def check_model_runs(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """Run the model eagerly once; a failure here means the model and the inputs disagree."""
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported with the shapes that caused it
        shapes = pytree.tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t, (args, kwargs))
        raise ModelInputError(
            f"{type(model).__name__} does not run on the example inputs {shapes}: {type(exc).__name__}: {exc}. "
            "Pass example inputs with the shapes and dtypes the model's forward expects."
        ) from exc


def every_dim_may_vary(value: Any) -> Any:
    """An export ``dynamic_shapes`` entry for a pytree of inputs: every tensor dimension ``Dim.AUTO`` (export keeps
    one static where the model requires it)."""
    auto = torch.export.Dim.AUTO
    return pytree.tree_map(lambda t: {i: auto for i in range(t.dim())} if isinstance(t, torch.Tensor) else None, value)


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> Any:
    """``every_dim_may_vary`` for each argument of the model's forward, keyed by its name."""
    if not dynamic:
        return None
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return None if kwargs else every_dim_may_vary(args)
    return {name: every_dim_may_vary(value) for name, value in bound.arguments.items()}


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """A failed trace is reported once, by us, in one line; torch's own log lines (and the partial graph it prints
    to stderr) would repeat it at length."""
    loggers = [logging.getLogger(name) for name in ("torch.fx.experimental.symbolic_shapes", "torch._export",
                                                      "torch.export", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool, notes: list[str]) -> tuple[Any, dict]:
    """torch.export(strict=False) with the model's output types registered; returns (exported, kwargs used)."""
    register_output_types(model)
    for attempt in range(2):
        try:
            with warnings.catch_warnings(), size_one_stays_dynamic(), _quiet_torch_logs():
                warnings.simplefilter("ignore")
                exported = torch.export.export(model, args, kwargs,
                                               dynamic_shapes=_dynamic_shapes(model, args, kwargs, dynamic),
                                               strict=False)
            return exported, kwargs
        except Exception as exc:  # noqa: BLE001
            if attempt == 0 and unknown_output_type(exc) and accepts_use_cache(model) and kwargs.get("use_cache") is not False:
                kwargs = without_cache(kwargs)
                notes.append(f"{type(model).__name__} returns a cache type export cannot carry: captured with "
                             "use_cache=False, so the compressed module returns no past_key_values")
                continue
            raise CaptureError(
                f"could not trace {type(model).__name__} into one graph with torch.export(strict=False): "
                f"{one_line(exc)} Make forward traceable (no Python branching on tensor values; outputs made of "
                "tensors, tuples, lists, dicts or dataclasses), or use torch.compile(model, backend='slimfx')."
            ) from exc
    raise AssertionError("unreachable")


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    example_kwargs: dict | None = None,
    *,
    dynamic: bool = True,
    check_inputs: bool = True,
    origin_prefix: str = "",
) -> Program:
    """Trace ``model`` into a canonical ``Program``. The model is never modified (its mode is restored).

    ``dynamic=True`` keeps sizes symbolic where the model allows, so the result accepts other batch sizes and
    sequence lengths. ``check_inputs=False`` skips the eager validation run (for callers that just did it).
    ``origin_prefix`` names weights as in an enclosing model when a submodule is captured on its own.
    """
    args, kwargs = _as_args(example_inputs), dict(example_kwargs or {})
    require_module(model)
    was_training = model.training
    try:
        model.eval()
        if check_inputs:
            check_model_runs(model, args, kwargs)
        notes: list[str] = []
        exported, kwargs = _export(model, args, kwargs, dynamic, notes)
    finally:
        model.train(was_training)
    gm = exported.module()
    names: dict[int, str] = {}
    kinds: dict[int, str] = {}
    for kind, named in (("parameter", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            names.setdefault(id(tensor), name)  # a tied weight keeps the name of its first owner
            kinds.setdefault(id(tensor), kind)
    weights = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                known = id(value) in names
                weights[node.target] = WeightInfo(
                    origin=origin_prefix + names[id(value)] if known else f"constant:{origin_prefix}{node.target}",
                    kind=kinds[id(value)] if known else "constant")
    program = Program(gm, weights, args, kwargs, frontend="export", notes=notes)
    canonicalize(program)
    verify(program)
    return program


_SOURCE_KEY = re.compile(r"_(?:modules|parameters|buffers)\['([^']+)'\]")


def _weight_origin(node: fx.Node, value: Any, flat_to_fqn: dict) -> tuple[str, str] | None:
    """(origin, kind) if Dynamo sourced the placeholder from a module's parameters or buffers, else None."""
    grapharg = node.meta.get("grapharg")
    src = getattr(grapharg, "source", None)
    name = getattr(src, "name", "")
    source = name() if callable(name) else str(name or "")
    kind = "parameter" if isinstance(value, torch.nn.Parameter) or "_parameters[" in source else "buffer"
    if "_parameters[" in source or "_buffers[" in source:
        return ".".join(_SOURCE_KEY.findall(source)) or source, kind
    if isinstance(value, torch.nn.Parameter):
        return flat_to_fqn.get(node.target, node.target), kind
    return None


def from_dynamo(dynamo_gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Program:
    """Bind a Dynamo graph's weight placeholders to the real tensors (by identity) and canonicalize.

    Works on a copy of the graph (node metadata shared, tensors not copied), so the graph Dynamo gave stays as it
    was whatever a pass does later: the backend can always fall back to it. The placeholders stay (they are the
    compiled function's calling convention); their uses move to ``get_attr`` nodes holding the same tensors, so
    passes can replace weights freely.
    """
    gm = _copy_graph_module(dynamo_gm)
    flat_to_fqn = gm.meta.get("dynamo_flat_name_to_original_fqn", {})
    program = Program(gm, {}, tuple(example_inputs), frontend="dynamo", keep_signature=True)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for node in gm.graph.nodes:  # Dynamo records fake values as "example_value"; the IR's key is "val"
        if "example_value" in node.meta:
            node.meta.setdefault("val", node.meta["example_value"])
    for node, value in zip(placeholders, example_inputs):
        found = _weight_origin(node, value, flat_to_fqn) if isinstance(value, torch.Tensor) else None
        if found is None or not node.users:
            continue
        origin, kind = found
        name = "w_" + re.sub(r"[^0-9a-zA-Z_]", "_", origin)
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, value.detach())  # shares storage: nothing is copied or changed
        program.weights[name] = WeightInfo(origin=origin, kind=kind)
        with gm.graph.inserting_before(first_op):
            attr = gm.graph.get_attr(name)
        attr.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(attr)
        node.meta["slimfx_weight_placeholder"] = origin
    canonicalize(program)
    verify(program)
    return program


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    copied: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:  # node_copy keeps names and (shallow-copied) meta
        copied[node] = graph.node_copy(node, copied.__getitem__)
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy
