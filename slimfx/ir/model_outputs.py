"""Make a model's outputs something ``torch.export`` can carry, without changing what the model computes.

Hugging Face causal LMs return a ``DynamicCache`` (with ``use_cache=True``, their default), which export cannot
flatten. transformers ships the pytree registration for its cache classes; we call it when the model is a
transformers model. Where that is not available, ``capture`` retries with ``use_cache=False`` and says so.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any

import torch


def is_transformers_model(model: torch.nn.Module) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def register_output_types(model: torch.nn.Module) -> bool:
    """Register transformers' cache classes as pytree nodes (idempotent). True if a registration helper ran."""
    if "transformers" not in sys.modules or not is_transformers_model(model):
        return False
    try:  # transformers >= 5
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
    except ImportError:
        register_cache_pytrees_for_model = None
    if register_cache_pytrees_for_model is not None:
        register_cache_pytrees_for_model(model)
        return True
    try:  # transformers 4.5x
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:
        return False
    try:
        register_dynamic_cache_export_support()
    except ValueError:  # already registered
        pass
    return True


def unknown_output_type(exc: BaseException) -> bool:
    return "in output, which is not a known type" in str(exc)


def accepts_use_cache(model: torch.nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**kwargs, "use_cache": False}


def pytree_type_names(spec: Any) -> list[str]:
    """The importable names of the container types in a pytree spec that torch does not know by itself."""
    builtin = {tuple, list, dict, type(None)}
    names: list[str] = []
    stack = [spec]
    while stack:
        node = stack.pop()
        if node.is_leaf():
            continue
        kind = getattr(node, "type", None)
        if kind is not None and kind not in builtin and getattr(kind, "__module__", "builtins") != "builtins":
            name = f"{kind.__module__}.{kind.__qualname__}"
            if name not in names and not kind.__module__.startswith("collections"):
                names.append(name)
        stack.extend(node.children() if hasattr(node, "children") else getattr(node, "children_specs", []))
    return names


def ensure_pytree_types(names: list[str]) -> None:
    """Import the container types a saved program's inputs and outputs use, registering caches if needed."""
    import importlib

    from torch.utils import _pytree as pytree

    for name in names:
        module_name, _, qualname = name.rpartition(".")
        kind: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            kind = getattr(kind, part)
        if kind in pytree.SUPPORTED_NODES:
            continue
        try:
            from transformers.exporters.exporter_dynamo import register_pytree_node
        except ImportError:
            raise RuntimeError(f"the saved program returns a {name}, which is not registered as a pytree node; "
                               "install the transformers version it was saved with") from None
        register_pytree_node(kind)
