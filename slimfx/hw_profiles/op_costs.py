"""The kernels each graph node launches, with FLOPs and bytes as sympy expressions over its (possibly symbolic)
sizes, and the whole-program cost on a profile.

One table (``COST_RULES``), keyed by op target, so the report, the planner and the passes count the same way.
A pass that introduces a new op registers its rule next to the op's definition.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx

from ..ir.ops import INT8_LINEAR, LOWRANK_LINEAR, NM_LINEAR, QUANT_LINEAR
from ..ir.program import BATCH_NORM, CONV2D, LINEAR
from .cost_model import Kernel, conv2d, dense_linear, int8_linear, kernel_latency, lowrank_linear, nm_linear, quant_linear
from .profiles import Profile

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "int8",
                torch.float8_e4m3fn: "fp8"}


def sym(size: Any) -> sympy.Expr:
    """A tensor size (int or torch.SymInt) as a sympy expression."""
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))


def val(node: Any) -> torch.Tensor:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{node} has no tensor metadata")
    return value


def shape(node: Any) -> list[sympy.Expr]:
    return [sym(s) for s in val(node).shape]


def numel(dims: list[sympy.Expr]) -> sympy.Expr:
    return sympy.Mul(*dims) if dims else sympy.Integer(1)


def dtype_name(node: fx.Node) -> str:
    return _DTYPE_NAMES.get(val(node).dtype, "fp32")


def _linear(node: fx.Node) -> list[Kernel]:
    x, w = node.args[0], node.args[1]
    out_f, in_f = shape(w)
    return dense_linear(numel(shape(x)[:-1]), out_f, in_f, val(x).element_size(), dtype_name(x))


def _lowrank_linear(node: fx.Node) -> list[Kernel]:
    """Priced as the reference runs it (two GEMMs); a fused kernel changes this rule, not the passes."""
    x, v, u = node.args[0], node.args[1], node.args[2]
    rank, in_f = shape(v)
    out_f = shape(u)[0]
    return lowrank_linear(numel(shape(x)[:-1]), out_f, in_f, rank, val(x).element_size(), dtype_name(x))


def _nm_linear(node: fx.Node) -> list[Kernel]:
    x, values = node.args[0], node.args[1]
    n, m, in_f = node.args[4], node.args[5], node.args[6]
    out_f = shape(values)[0]
    return nm_linear(numel(shape(x)[:-1]), out_f, sympy.Integer(in_f), n, m, val(x).element_size(), dtype_name(x))


def _quant_linear(node: fx.Node) -> list[Kernel]:
    x, a = node.args[0], node.args[4]
    bits, group, in_f = node.args[9], node.args[10], node.args[11]
    out_f = shape(node.args[1])[0]
    rank = shape(a)[1] if isinstance(a, fx.Node) else 0
    return quant_linear(numel(shape(x)[:-1]), out_f, sympy.Integer(in_f), bits, group, rank, val(x).element_size(),
                        dtype_name(x))


def _int8_linear(node: fx.Node) -> list[Kernel]:
    x, codes = node.args[0], node.args[1]
    out_f, in_f = shape(codes)
    return int8_linear(numel(shape(x)[:-1]), out_f, in_f, val(x).element_size(), dtype_name(x))


def _conv2d(node: fx.Node) -> list[Kernel]:
    x, w = node.args[0], node.args[1]
    batch, cin, h_in, w_in = shape(x)
    cout, _, kh, kw = shape(w)
    _, _, h_out, w_out = shape(node)
    return conv2d(batch, cin, cout, h_out, w_out, kh, kw, h_in, w_in, node.args[6], val(x).element_size(),
                  dtype_name(x))


def _elementwise(node: fx.Node) -> list[Kernel]:
    """Unmodelled ops: memory-bound, reading their tensor inputs and writing their output once."""
    moved = numel(shape(node)) * val(node).element_size()
    for arg in node.all_input_nodes:
        if isinstance(arg.meta.get("val"), torch.Tensor):
            moved += numel(shape(arg)) * val(arg).element_size()
    return [Kernel(numel(shape(node)), moved, dtype_name(node), "elementwise")]


COST_RULES: dict[Any, Callable[[fx.Node], list[Kernel]]] = {
    LINEAR: _linear, CONV2D: _conv2d, BATCH_NORM: _elementwise, LOWRANK_LINEAR: _lowrank_linear,
    NM_LINEAR: _nm_linear, QUANT_LINEAR: _quant_linear, INT8_LINEAR: _int8_linear,
}

_VIEW_NAMES = {"view", "reshape", "flatten", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand",
               "getitem", "select", "slice", "split", "unflatten", "unbind", "chunk", "alias", "detach",
               "numpy_T", "contiguous", "_unsafe_view", "size", "dim"}


def _base_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def node_kernels(node: fx.Node) -> list[Kernel] | None:
    """Kernels for a node, or None for nodes that launch nothing (inputs, weights, non-tensor results)."""
    if node.op not in ("call_function", "call_method") or not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    if "slimfx_lowered_cost" in node.meta:  # the result of a lowered layer: priced as the kernel lower chose
        return node.meta["slimfx_lowered_cost"]
    if "slimfx_lowered_as" in node.meta:  # ... whose other ops that price covers
        return [Kernel(sympy.Integer(0), sympy.Integer(0), "fp32", "view")]
    rule = COST_RULES.get(node.target) if node.op == "call_function" else None
    if rule is not None and all(isinstance(a.meta.get("val"), torch.Tensor) for a in node.all_input_nodes):
        return rule(node)
    if node.target is operator.getitem or _base_name(node) in _VIEW_NAMES:
        return [Kernel(sympy.Integer(0), sympy.Integer(0), "fp32", "view")]
    return _elementwise(node)


def size_hints(graph: fx.Graph) -> dict:
    """symbol -> example value, from the fake tensors' shape environment."""
    for node in graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and getattr(value, "fake_mode", None) is not None:
            env = value.fake_mode.shape_env
            if env is not None:
                return dict(env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val)
    return {}


def concrete(expr: Any, hints: dict | None = None) -> float:
    """Evaluate an expression with symbolic sizes at their example values."""
    expr = sympy.sympify(expr)
    if expr.free_symbols:
        expr = expr.subs(hints or {})
    return float(expr)


def concrete_shape(value: torch.Tensor, hints: dict) -> list[int]:
    """A tensor's sizes with its symbolic ones evaluated at ``hints`` (symbol -> size)."""
    return [int(concrete(d.node.expr, hints)) if isinstance(d, torch.SymInt) else int(d) for d in value.shape]


def program_flops(graph: fx.Graph) -> float:
    """FLOPs of the GEMM-like ops (linear, conv and their compressed forms) at the example sizes."""
    total = sympy.Integer(0)
    for node in graph.nodes:
        kernels = node_kernels(node)
        for kernel in kernels or ():
            if kernel.kind not in ("elementwise", "view"):
                total += kernel.flops
    return concrete(total, size_hints(graph))


@dataclass
class NodeCost:
    node: str
    op: str
    latency_s: float
    flops: float
    bytes: float
    bound: str  # "compute" | "memory" | "launch"


@dataclass
class ProgramCost:
    profile: str
    total_s: float
    nodes: list[NodeCost]

    def table(self, top: int = 10) -> str:
        rows = sorted(self.nodes, key=lambda c: -c.latency_s)[:top]
        lines = [f"predicted latency on {self.profile}: {self.total_s * 1e6:.1f} us ({len(self.nodes)} ops)"]
        for c in rows:
            lines.append(f"  {c.node:<24} {c.op:<22} {c.latency_s * 1e6:>9.2f} us  {c.bound}")
        return "\n".join(lines)


def program_cost(graph: fx.Graph, profile: Profile, hints: dict | None = None) -> ProgramCost:
    """Sum of per-node roofline latencies at the example sizes (or ``hints``: symbol -> size), with the breakdown."""
    from ..ir.printer import op_name

    hints = size_hints(graph) if hints is None else hints
    rows = []
    for node in graph.nodes:
        kernels = node_kernels(node)
        if not kernels or all(k.kind == "view" for k in kernels):
            continue
        seconds = sum(concrete(kernel_latency(k, profile), hints) for k in kernels)
        flops = sum(concrete(k.flops, hints) for k in kernels)
        moved = sum(concrete(k.bytes, hints) for k in kernels)
        knee = sum(profile.knee_gflop * 1e9 for k in kernels if k.kind.endswith("gemm"))
        compute = (flops + knee) / profile.peak_flops(kernels[0].dtype)
        memory = moved / profile.bandwidth
        launch = profile.launch_overhead_us * 1e-6 * len(kernels)
        bound = "launch" if launch >= max(compute, memory) else "compute" if compute >= memory else "memory"
        rows.append(NodeCost(node.name, op_name(node), seconds, flops, moved, bound))
    return ProgramCost(profile.name, sum(r.latency_s for r in rows), rows)
