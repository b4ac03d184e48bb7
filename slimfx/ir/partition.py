"""Capture a model that does not trace as one graph, one submodule at a time.

When export cannot trace a model (Python branching on tensor values, an untraceable call), its submodules usually
still trace: the trouble sits in the top-level glue. ``partition`` tries each submodule that holds weights, top
down, and keeps the largest ones that capture; everything else stays eager Python. Each part is an ordinary
``Program``, so it is compressed and returned standalone, and the dense weights it replaced are really gone
(unlike compiling around graph breaks, which keeps the original module and its weights alive).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import CaptureError, one_line
from .capture import capture, check_model_runs
from .program import Program


@dataclass
class Part:
    name: str  # qualified name in the model
    program: Program


@dataclass
class Partition:
    parts: list[Part]
    notes: list[str]

    def names(self) -> list[str]:
        return [p.name for p in self.parts]


def record_first_calls(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """Run the model once; return each submodule's first call (args, kwargs) and how often it was called."""
    first: dict[torch.nn.Module, tuple[tuple, dict]] = {}
    count: dict[torch.nn.Module, int] = {}

    def hook(module: torch.nn.Module, a: tuple, k: dict) -> None:
        count[module] = count.get(module, 0) + 1
        first.setdefault(module, (a, k))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if m is not model]
    was_training = model.training
    try:
        check_model_runs(model.eval(), args, kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return first, count


def _owners(model: torch.nn.Module) -> dict[int, set[str]]:
    """Parameter/buffer id -> the qualified names of the modules that hold it."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            owners.setdefault(id(t), set()).add(name)
    return owners


def partition(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool = True) -> Partition:
    """The largest submodules of ``model`` that capture on their own (``model`` is not modified)."""
    first, count = record_first_calls(model, args, kwargs)
    owners = _owners(model)
    parts: list[Part] = []
    notes: list[str] = []

    def inside(prefix: str, names: set[str]) -> bool:
        return all(n == prefix or n.startswith(prefix + ".") for n in names)

    def visit(prefix: str, module: torch.nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            tensors = [*child.parameters(), *child.buffers()]
            if not tensors:
                continue  # nothing to compress
            if child not in first:
                notes.append(f"{name} did not run on the example inputs: left as it was")
                continue
            shared = any(not inside(name, owners[id(t)]) for t in tensors)
            if shared or count[child] > 1:
                notes.append(f"{name} is {'shared with other modules' if shared else 'called more than once'}: "
                             "looking inside it instead")
                visit(name, child)
                continue
            child_args, child_kwargs = first[child]
            try:
                program = capture(child, child_args, child_kwargs, dynamic=dynamic, check_inputs=False,
                                  origin_prefix=name + ".")
            except CaptureError:
                visit(name, child)
                continue
            parts.append(Part(name, program))

    visit("", model)
    return Partition(parts, notes)


def replace_submodule(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def on_part_inputs(model: torch.nn.Module, parts: list[Part], fn: Callable[[Part, tuple, dict], Any]) -> list:
    """Call ``fn(part, args, kwargs)`` whenever a part's submodule runs; returns the hook handles to remove."""
    handles = []
    for part in parts:
        module = model.get_submodule(part.name)
        handles.append(module.register_forward_pre_hook(
            lambda m, a, k, part=part: fn(part, a, k), with_kwargs=True))
    return handles


_USER_LINE = re.compile(r"# File: (\S+):(\d+) in \w+, code: (.*)")


def describe_cause(exc: BaseException) -> str:
    """Why export failed, in one line, with the user's source line where export's message names it."""
    original = exc.__cause__ or exc
    text = str(original)
    graph = f"{getattr(original, 'partial_fx_graph', '')}\n{text}"
    lines = [m for m in _USER_LINE.finditer(graph) if f"{os.sep}torch{os.sep}" not in m.group(1)]
    message = "\n".join(line for line in text.splitlines() if line and not line.startswith((" ", "def ")))
    where = f" at {os.path.basename(lines[-1].group(1))}:{lines[-1].group(2)}: {lines[-1].group(3).strip()}" if lines else ""
    return one_line(message or original) + where
