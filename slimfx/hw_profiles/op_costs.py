"""FLOPs and bytes moved by each canonical op, as sympy expressions over the node's (possibly symbolic) sizes.

One table, keyed by op target, so the report, the roofline cost model and the passes count the same way.
A pass that introduces a new op registers its cost here next to the op's definition.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx

from ..ir.program import BATCH_NORM, CONV2D, LINEAR


@dataclass(frozen=True)
class OpCost:
    """``flops`` are multiply-adds × 2; bytes split so a profile can price weights and activations apart."""

    flops: sympy.Expr
    weight_bytes: sympy.Expr
    act_bytes: sympy.Expr
    kind: str  # which throughput row of a profile applies: "dense", "lowrank", "nm", "quant", "elementwise"

    @property
    def bytes(self) -> sympy.Expr:
        return self.weight_bytes + self.act_bytes


def sym(size: Any) -> sympy.Expr:
    """A tensor size (int or torch.SymInt) as a sympy expression."""
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))


def shape(node: Any) -> list[sympy.Expr]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"{node} has no tensor metadata")
    return [sym(s) for s in val.shape]


def itemsize(node: fx.Node) -> int:
    return node.meta["val"].element_size()


def numel(dims: list[sympy.Expr]) -> sympy.Expr:
    return sympy.Mul(*dims) if dims else sympy.Integer(1)


def _linear(node: fx.Node) -> OpCost:
    x, w = node.args[0], node.args[1]
    out_f, in_f = shape(w)
    rows = numel(shape(x)[:-1])
    wbytes = (out_f * in_f + (out_f if len(node.args) > 2 and node.args[2] is not None else 0)) * itemsize(w)
    return OpCost(2 * rows * out_f * in_f, wbytes, rows * (in_f + out_f) * itemsize(x), "dense")


def _conv2d(node: fx.Node) -> OpCost:
    x, w = node.args[0], node.args[1]
    cout, cin_g, kh, kw = shape(w)
    out = shape(node)
    macs = numel(out) * cin_g * kh * kw
    wbytes = numel(shape(w)) * itemsize(w)
    return OpCost(2 * macs, wbytes, (numel(shape(x)) + numel(out)) * itemsize(x), "dense")


def _batch_norm(node: fx.Node) -> OpCost:
    n = numel(shape(node))
    return OpCost(2 * n, 4 * shape(node)[1] * itemsize(node), 2 * n * itemsize(node), "elementwise")


COST_RULES: dict[Any, Callable[[fx.Node], OpCost]] = {LINEAR: _linear, CONV2D: _conv2d, BATCH_NORM: _batch_norm}


def node_cost(node: fx.Node) -> OpCost | None:
    """Cost of a canonical op, or None for ops slimfx does not model (they are not rewritten either)."""
    fn = COST_RULES.get(node.target) if node.op == "call_function" else None
    if fn is None or not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    if node.target == LINEAR and not isinstance(node.args[1].meta.get("val"), torch.Tensor):
        return None
    return fn(node)


def concrete(expr: sympy.Expr, hints: dict | None = None) -> float:
    """Evaluate a cost with symbolic sizes at their example values (Dynamo/export record a hint per symbol)."""
    expr = sympy.sympify(expr)
    if expr.free_symbols:
        expr = expr.subs(hints or {})
    return float(expr)


def size_hints(graph: fx.Graph) -> dict:
    """symbol -> example value, from the fake tensors' shape environment."""
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode") and val.fake_mode.shape_env is not None:
            env = val.fake_mode.shape_env
            return dict(env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val)
    return {}


def program_flops(graph: fx.Graph) -> float:
    hints = size_hints(graph)
    total = sympy.Integer(0)
    for node in graph.nodes:
        cost = node_cost(node)
        if cost is not None:
            total += cost.flops
    return concrete(total, hints)
