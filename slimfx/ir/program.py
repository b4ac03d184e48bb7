"""The one IR: an ``fx.GraphModule`` plus side tables. The rules it obeys are in ``README.md`` here."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx

# Canonical dense ops: every spelling in the captured graph is rewritten to one of these (see canonicalize.py).
LINEAR = torch.ops.aten.linear.default
CONV2D = torch.ops.aten.conv2d.default
BATCH_NORM = torch.ops.aten.batch_norm.default


@dataclass
class WeightInfo:
    """Where a weight tensor came from: a parameter/buffer of the user's model, or a pass that derived it."""

    origin: str  # qualified name in the user's model; a derived tensor keeps the name of the one it replaces
    derived_by: str | None = None  # the pass that made it
    note: str = ""  # how, e.g. "folded with bn1" or "V of rank 16"
    kind: str = "derived"  # "parameter" | "buffer" | "constant" (the user's) or "derived" (a pass's)
    constraints: tuple[Constraint, ...] = ()  # what later passes must respect, e.g. an N:M mask

    @property
    def compressible(self) -> bool:
        """Only trained weights are compressed: a buffer (a fixed rotation, a mask) or a constant is not."""
        return self.kind in ("parameter", "derived")


@dataclass(frozen=True)
class Constraint:
    """A property a pass gave a weight, which a later pass must keep or decline to touch."""

    kind: str  # "nm-mask" | "factorized" | "quantized"
    set_by: str  # the pass
    detail: str = ""  # e.g. "2:4"

    def __str__(self) -> str:
        return f"{self.kind}{' ' + self.detail if self.detail else ''} (set by {self.set_by})"


@dataclass
class Program:
    """A captured model: the graph, its weights (``get_attr`` targets) and how to call it.

    ``example_args``/``example_kwargs`` call ``gm`` directly. ``keep_signature`` is set for Dynamo graphs,
    whose placeholders (weights included) are the calling convention and must never be removed.
    """

    gm: fx.GraphModule
    weights: dict[str, WeightInfo]
    example_args: tuple
    example_kwargs: dict = field(default_factory=dict)
    frontend: str = "export"
    keep_signature: bool = False
    notes: list[str] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=itertools.count, repr=False)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.gm(*args, **kwargs)

    def run_example(self) -> Any:
        return self.gm(*self.example_args, **self.example_kwargs)

    # -- weights -------------------------------------------------------------------------------------------
    def is_weight(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node.op == "get_attr" and node.target in self.weights

    def tensor(self, node: fx.Node) -> torch.Tensor:
        """The real tensor behind a weight node."""
        if not self.is_weight(node):
            raise KeyError(f"{node} is not a weight of this program")
        return fetch_attr(self.gm, node.target)

    def add_weight(self, hint: str, value: torch.Tensor, origin: str, pass_name: str, note: str = "",
                   constraints: tuple[Constraint, ...] = (), view: bool = False) -> fx.Node:
        """Register a new (derived) weight and return a ``get_attr`` node for it, inserted at the insert point.

        ``view=True`` keeps ``value`` as given (e.g. a transposed view that shares the original's storage).
        """
        base = re.sub(r"[^0-9a-zA-Z_]", "_", hint)
        name = base if base[:1].isalpha() else f"w{base}"
        while hasattr(self.gm, name):
            name = f"{base}_{next(self._ids)}"
        value = value.detach()
        if type(value) is torch.Tensor and not view:  # subclasses (e.g. 2:4 semi-structured) keep their own layout
            value = value.contiguous()
        self.gm.register_buffer(name, value, persistent=True)
        self.weights[name] = WeightInfo(origin=origin, derived_by=pass_name, note=note, constraints=constraints)
        node = self.graph.get_attr(name)
        node.meta["val"] = _fake_like(self, value)
        return node

    def place(self, target: str, value: torch.Tensor) -> None:
        """Put ``value`` (the same tensor on another device) behind ``target``. The attribute is replaced, never
        written into, so a tensor shared with the user's model stays as it is; get_attr nodes' metadata follow."""
        prefix, _, name = target.rpartition(".")
        owner = self.gm.get_submodule(prefix) if prefix else self.gm
        if name in owner._parameters:
            owner._parameters[name] = value if isinstance(value, torch.nn.Parameter) else \
                torch.nn.Parameter(value, requires_grad=False)
        elif name in owner._buffers:
            owner._buffers[name] = value
        else:
            setattr(owner, name, value)
        fake = _fake_like(self, value)
        for node in self.graph.nodes:
            if node.op == "get_attr" and node.target == target:
                node.meta["val"] = fake

    def drop_unused_weights(self) -> int:
        """Erase unused weight nodes, then free every registered weight no ``get_attr`` refers to."""
        for node in list(self.graph.nodes):
            if self.is_weight(node) and not node.users:
                self.graph.erase_node(node)
        used = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        stale = [t for t in self.weights if t not in used]
        for target in stale:
            _delete_attr(self.gm, target)
            del self.weights[target]
        return len(stale)

    def parameter_count(self) -> int:
        """Elements held by weights that the graph uses (what would ship in a checkpoint)."""
        seen = {n.target for n in self.graph.nodes if self.is_weight(n)}
        return sum(fetch_attr(self.gm, t).numel() for t in seen)

    def weight_bytes(self) -> int:
        seen = {n.target for n in self.graph.nodes if self.is_weight(n)}
        total = 0
        for t in seen:
            value = fetch_attr(self.gm, t)
            total += value.numel() * value.element_size()
        return total

    def annotations(self, node: fx.Node) -> dict:
        """Per-node side table that passes write their decisions into (printed by ``print``)."""
        return node.meta.setdefault("slimfx", {})

    def print(self, file: Any = None) -> str:
        from .printer import format_program

        text = format_program(self)
        if file is not None:
            print(text, file=file)
        return text

    __str__ = print


def is_input_guard(node: fx.Node) -> bool:
    """export's ``_guards_fn`` call: a check of the inputs' sizes, not part of the computation (interpreters that
    run other batch sizes than the example skip it)."""
    return node.op == "call_module" and not node.users


def fetch_attr(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def _delete_attr(module: torch.nn.Module, target: str) -> None:
    *path, leaf = target.split(".")
    owner = fetch_attr(module, ".".join(path)) if path else module
    delattr(owner, leaf)


def _fake_like(program: Program, value: torch.Tensor) -> Any:
    from .fake_prop import fake_mode_of

    mode = fake_mode_of(program)
    return mode.from_tensor(value, static_shapes=True) if mode is not None else value
