"""The kernel registry: every way a compressed op can run, per device, each with a cost rule.

An ``Impl`` says which op it runs, on which device, whether it applies to a node (and why not), what it costs
(kernels for the roofline, on the node's sizes, the epilogue included when it fuses it), and how to emit it
into the graph. The ``lower`` pass prices the applicable impls of each node on the profile, or times them
(``tune=measure``), and emits the cheapest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import make_fx

from ..hw_profiles.cost_model import Kernel
from ..ir.program import Program
from .epilogue import Epilogue


@dataclass(frozen=True)
class Region:
    """A compressed node and the epilogue after it (the ops a fusing kernel absorbs)."""

    node: fx.Node
    epilogue: Epilogue
    extras: tuple[fx.Node, ...]
    chain: tuple[fx.Node, ...]  # the epilogue's nodes, in order

    @property
    def last(self) -> fx.Node:
        """The node a fusing kernel replaces (``node`` itself when the epilogue is empty)."""
        return self.chain[-1] if self.chain else self.node


@dataclass(frozen=True)
class Impl:
    name: str
    op: Any  # the compressed op it runs
    device: str  # "cpu" | "cuda"
    fuses_epilogue: bool
    keeps_storage: bool  # False: it expands the compressed weights to dense ones (memory given up for speed)
    why_not: Callable[[Program, fx.Node], str | None]  # None if it runs this node
    cost: Callable[[fx.Node], list[Kernel]]  # on the node's sizes; the epilogue is priced by the pass
    emit: Callable[[Program, Region], fx.Node]  # the replacement of region.last (or of region.node)
    summary: str = ""


IMPLS: list[Impl] = []


def register(impl: Impl) -> Impl:
    IMPLS.append(impl)
    return impl


def impls_for(op: Any, device: str) -> list[Impl]:
    return [impl for impl in IMPLS if impl.op == op and impl.device == device]


def inline(program: Program, fn: Callable, weights: list[fx.Node]) -> fx.Node:
    """Trace ``fn`` on the weights' real tensors into aten ops and insert them at the insert point, reading the
    weight nodes; the node of its (one tensor) result. So a decomposition written in torch lands in the IR as
    plain aten ops, which Inductor fuses."""
    with unset_fake_temporarily():
        traced = make_fx(fn)(*[program.tensor(w) for w in weights])
    env: dict[fx.Node, Any] = {}
    placeholders = iter(weights)
    result = None
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "output":
            result = env[node.args[0]]
        elif node.op == "get_attr":  # a constant the trace made (none expected): keep it as a derived weight
            value = getattr(traced, node.target)
            env[node] = program.add_weight(f"lowered_{node.target}", value, node.target, "lower", "traced constant")
        else:
            env[node] = program.graph.node_copy(node, lambda arg: env[arg])
    return result
