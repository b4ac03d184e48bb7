"""Front ends: a user's ``nn.Module`` (through non-strict export) or a Dynamo graph, into one ``Program``.

``capture`` uses ``torch.export(strict=False)`` because its result must stand alone: a module that owns its
(later compressed) weights and keeps the model's input/output pytree, so dense weights can really be dropped.
``from_dynamo`` takes the graph a ``torch.compile`` backend receives: weights arrive there as placeholders and
are bound to the real parameters by identity (the example inputs *are* the module's parameter objects).
Both then bind weights as ``get_attr`` nodes and canonicalize, so passes see one IR.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import CaptureError
from .canonicalize import canonicalize
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
        raise CaptureError(
            f"{type(model).__name__} does not run on the example inputs {shapes}: {type(exc).__name__}: {exc}. "
            "Pass example inputs with the shapes and dtypes the model's forward expects."
        ) from exc


def _dynamic_shapes(args: tuple, dynamic: bool) -> Any:
    if not dynamic:
        return None
    auto = torch.export.Dim.AUTO  # sizes 0/1 would be specialized anyway (with a warning): leave them static
    return pytree.tree_map(lambda t: {i: auto for i in range(t.dim()) if t.shape[i] > 1} if isinstance(t, torch.Tensor) else None, args)


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    example_kwargs: dict | None = None,
    *,
    dynamic: bool = True,
    check_inputs: bool = True,
) -> Program:
    """Trace ``model`` into a canonical ``Program``. The model is never modified (its mode is restored).

    ``dynamic=True`` keeps sizes symbolic where the model allows, so the result accepts other batch sizes and
    sequence lengths. ``check_inputs=False`` skips the eager validation run (for callers that just did it).
    """
    args, kwargs = _as_args(example_inputs), dict(example_kwargs or {})
    require_module(model)
    was_training = model.training
    try:
        model.eval()
        if check_inputs:
            check_model_runs(model, args, kwargs)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exported = torch.export.export(
                    model, args, kwargs, dynamic_shapes=_dynamic_shapes(args, dynamic and not kwargs), strict=False
                )
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptureError(
                f"could not trace {type(model).__name__} into one graph with torch.export(strict=False): {first}. "
                "Make forward traceable (no Python branching on tensor values; outputs made of tensors, tuples, "
                "lists, dicts or dataclasses, e.g. use_cache=False for Hugging Face models), or use "
                "torch.compile(model, backend='slimfx'), which compresses each subgraph around graph breaks."
            ) from exc
    finally:
        model.train(was_training)
    gm = exported.module()
    names = {id(t): n for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}
    weights = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                weights[node.target] = WeightInfo(origin=names.get(id(value), f"constant:{node.target}"))
    program = Program(gm, weights, args, kwargs, frontend="export")
    canonicalize(program)
    verify(program)
    return program


_SOURCE_KEY = re.compile(r"_(?:modules|parameters|buffers)\['([^']+)'\]")


def _weight_origin(node: fx.Node, value: Any, flat_to_fqn: dict) -> str | None:
    """A placeholder is a weight if Dynamo sourced it from a module's parameters or buffers."""
    grapharg = node.meta.get("grapharg")
    src = getattr(grapharg, "source", None)
    name = getattr(src, "name", "")
    source = name() if callable(name) else str(name or "")
    if "_parameters[" in source or "_buffers[" in source:
        return ".".join(_SOURCE_KEY.findall(source)) or source
    if isinstance(value, torch.nn.Parameter):
        return flat_to_fqn.get(node.target, node.target)
    return None


def from_dynamo(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Program:
    """Bind a Dynamo graph's weight placeholders to the real tensors (by identity) and canonicalize.

    The placeholders stay (they are the compiled function's calling convention); their uses move to
    ``get_attr`` nodes holding the same tensors, so passes can replace weights freely.
    """
    flat_to_fqn = gm.meta.get("dynamo_flat_name_to_original_fqn", {})
    program = Program(gm, {}, tuple(example_inputs), frontend="dynamo", keep_signature=True)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for node in gm.graph.nodes:  # Dynamo records fake values as "example_value"; the IR's key is "val"
        if "example_value" in node.meta:
            node.meta.setdefault("val", node.meta["example_value"])
    for node, value in zip(placeholders, example_inputs):
        origin = _weight_origin(node, value, flat_to_fqn) if isinstance(value, torch.Tensor) else None
        if origin is None or not node.users:
            continue
        name = "w_" + re.sub(r"[^0-9a-zA-Z_]", "_", origin)
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, value.detach())  # shares storage: nothing is copied or changed
        program.weights[name] = WeightInfo(origin=origin)
        with gm.graph.inserting_before(first_op):
            attr = gm.graph.get_attr(name)
        attr.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(attr)
        node.meta["slimfx_weight_placeholder"] = origin
    canonicalize(program)
    verify(program)
    return program
