"""Roofline latency of kernels on a ``Profile``, as sympy expressions over shape symbols.

Per kernel: ``latency = Max(compute, memory) + launch`` with ``memory = bytes / sustained_bandwidth`` and
``compute = (flops + knee + pack * weight_elems) / sustained_peak``. The knee is a fixed FLOP-equivalent cost
(small GEMMs do not fill the machine); ``pack`` is a per-weight-element cost that GEMM libraries pay to pack the
weight panel on every call and only large batches amortize. A single-row product (M = 1) is a GEMV: no
packing, no knee, usually memory-bound. Convs run at ``conv`` times the GEMM rate. Every term stays linear in the
sizes, so the expressions can be solved.
Because everything stays symbolic, questions like "up to which rank does a factorized layer pay?" are answered
by solving (``break_even``), and Dynamo's symbolic sizes flow through unchanged.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable

import sympy

from .profiles import Profile

M, N, K, r = sympy.symbols("M N K r", positive=True)


@dataclass(frozen=True)
class Kernel:
    """One launched kernel. ``kind``: gemm | gemv | conv | sparse_gemm | quant_gemm | elementwise | view."""

    flops: sympy.Expr
    bytes: sympy.Expr
    dtype: str = "fp32"
    kind: str = "gemm"
    weight_elems: sympy.Expr = sympy.Integer(0)
    fallback: tuple["Kernel", ...] = ()  # what runs instead where the target lacks this kind (e.g. no 2:4 units)


def kernel_latency(kernel: Kernel, profile: Profile) -> sympy.Expr:
    if kernel.kind == "view":
        return sympy.Integer(0)
    launch = profile.launch_overhead_us * 1e-6
    memory = sympy.sympify(kernel.bytes) / profile.bandwidth
    if kernel.kind == "elementwise":
        return memory + launch
    peak = profile.peak_flops(kernel.dtype)
    if kernel.kind == "sparse_gemm":
        if not profile.supports_2_4(kernel.dtype):
            if kernel.fallback:
                return latency(kernel.fallback, profile)
            raise ValueError(f"{profile.name} has no 2:4 sparse kernels for {kernel.dtype}")
        peak *= profile.sparse_speedup
        launch += profile.sparse_extra_overhead_us * 1e-6
    elif kernel.kind in ("quant_gemm", "quant_gemv"):
        peak /= profile.dequant_overhead
    elif kernel.kind == "conv":
        peak *= profile.conv_efficiency
    if kernel.kind in ("gemv", "quant_gemv"):  # one row: no GEMM tile to fill, bandwidth decides
        compute = sympy.sympify(kernel.flops) / peak
    else:
        fixed = profile.knee_gflop * 1e9 + profile.pack_flops_per_weight * sympy.sympify(kernel.weight_elems)
        compute = (sympy.sympify(kernel.flops) + fixed) / peak
    return sympy.Max(compute, memory) + launch


def latency(kernels: Iterable[Kernel], profile: Profile) -> sympy.Expr:
    return sympy.Add(*(kernel_latency(k, profile) for k in kernels))


# -- kernels of the canonical linear family: x[M,K] -> y[M,N] -----------------------------------------------

def _gemm_kind(m) -> str:
    return "gemv" if sympy.sympify(m) == 1 else "gemm"


def dense_linear(m=M, n=N, k=K, itemsize: int = 4, dtype: str = "fp32") -> list[Kernel]:
    return [Kernel(2 * m * n * k, (m * k + n * k + m * n) * itemsize, dtype, _gemm_kind(m), n * k)]


def lowrank_linear(m=M, n=N, k=K, rank=r, itemsize: int = 4, dtype: str = "fp32", fused: bool = False) -> list[Kernel]:
    """x·Vᵀ (K→r) then ·Uᵀ (r→N). Fused: one kernel, the [M,r] intermediate never leaves the chip."""
    kind = _gemm_kind(m)
    first = Kernel(2 * m * rank * k, (m * k + rank * k + m * rank) * itemsize, dtype, kind, rank * k)
    second = Kernel(2 * m * n * rank, (m * rank + n * rank + m * n) * itemsize, dtype, kind, n * rank)
    if fused:
        return [Kernel(first.flops + second.flops, (m * k + rank * (k + n) + m * n) * itemsize, dtype, kind,
                       rank * (k + n))]
    return [first, second]


def nm_linear(m=M, n=N, k=K, keep: int = 2, group: int = 4, itemsize: int = 4, dtype: str = "fp16") -> list[Kernel]:
    """N:M sparse weights on sparse tensor cores: values keep/group of the weight, plus packed in-group indices.

    Only 2:4 has hardware kernels; elsewhere (and on targets without them) the weight is decompressed and
    multiplied densely, which is what the fallback prices.
    """
    from ..ir.sparse_format import index_bits

    kept = n * k * sympy.Rational(keep, group)
    values, meta = kept * itemsize, kept * sympy.Rational(index_bits(group), 8)
    decompress = Kernel(n * k, values + meta + n * k * itemsize, dtype, "elementwise")
    fallback = (decompress, *dense_linear(m, n, k, itemsize, dtype))
    if (keep, group) != (2, 4):
        return list(fallback)
    return [Kernel(2 * m * n * k, m * k * itemsize + values + meta + m * n * itemsize, dtype, "sparse_gemm", kept,
                   fallback)]


def quant_linear(m=M, n=N, k=K, bits: int = 4, group_size: int = 128, rank=0, itemsize: int = 2,
                 dtype: str = "fp16") -> list[Kernel]:
    """Weight-only int4/int8 GEMM with per-group scales (+ a rank-r correction A·B when rank > 0)."""
    weight = n * k * sympy.Rational(bits, 8) + n * k * sympy.Rational(2 * itemsize, group_size)  # scale + zero
    kind = "quant_gemv" if sympy.sympify(m) == 1 else "quant_gemm"
    kernels = [Kernel(2 * m * n * k, m * k * itemsize + weight + m * n * itemsize, dtype, kind, n * k)]
    if rank:
        kernels += lowrank_linear(m, n, k, rank, itemsize, dtype)
    return kernels


def int8_linear(m=M, n=N, k=K, itemsize: int = 4, dtype: str = "fp32", int_mm: bool = True) -> list[Kernel]:
    """W8A8: the input quantized per row (a pass over it, int8 out), then an int8 GEMM at the int8 rate, or, where
    the target has no int8 GEMM kernel (``int_mm=False``), a float GEMM on the integer levels (codes widened)."""
    quantize = Kernel(3 * m * k, m * k * (itemsize + 1) + m * itemsize, dtype, "elementwise")
    if not int_mm:
        widen = Kernel(n * k, n * k * (1 + itemsize), dtype, "elementwise")
        return [quantize, widen, *dense_linear(m, n, k, itemsize, dtype)]
    return [quantize, Kernel(2 * m * n * k, m * k + n * k + m * n * itemsize, "int8", _gemm_kind(m), n * k)]


def conv2d(batch, cin, cout, h_out, w_out, kh, kw, h_in, w_in, groups: int = 1, itemsize: int = 4,
           dtype: str = "fp32") -> list[Kernel]:
    """Implicit GEMM: M = batch·h_out·w_out, N = cout, K = cin/groups·kh·kw."""
    macs = batch * h_out * w_out * cout * (cin / groups) * kh * kw
    moved = (batch * cin * h_in * w_in + cout * (cin / groups) * kh * kw + batch * cout * h_out * w_out) * itemsize
    return [Kernel(2 * macs, moved, dtype, "conv")]


# -- solving ------------------------------------------------------------------------------------------------

def _branches(expr: sympy.Expr) -> Iterable[sympy.Expr]:
    """Every way of resolving the expression's Max() terms to one of their arguments."""
    maxes = sorted(expr.atoms(sympy.Max), key=sympy.default_sort_key)
    for choice in itertools.product(*(m.args for m in maxes)):
        yield expr.xreplace(dict(zip(maxes, choice)))


def break_even(lhs: sympy.Expr, rhs: sympy.Expr, symbol: sympy.Symbol, lo: float, hi: float) -> float | None:
    """The largest ``symbol`` in [lo, hi] where lhs == rhs, solving each roofline branch with sympy.

    Roots of a branch are kept only if they satisfy the original (Max) equation, so the answer is exact for the
    piecewise-linear model. None when the two sides never meet in the interval.
    """
    roots = []
    for branch in _branches(sympy.Add(lhs, -rhs)):
        for root in sympy.solve(sympy.Eq(branch, 0), symbol):
            if root.is_real and lo <= float(root) <= hi:
                residual = (lhs - rhs).subs(symbol, root)
                if abs(float(residual)) <= 1e-9 * max(1.0, abs(float(rhs.subs(symbol, root)))):
                    roots.append(float(root))
    return max(roots) if roots else None


def break_even_rank(profile: Profile, m: int, n: int, k: int, dtype: str = "fp32", itemsize: int = 4,
                    fused: bool = False) -> float:
    """Rank below which a factorized linear is predicted faster than the dense one (0: never)."""
    dense = latency(dense_linear(m, n, k, itemsize, dtype), profile)
    factored = latency(lowrank_linear(m, n, k, r, itemsize, dtype, fused), profile)
    root = break_even(factored, dense, r, 0.0, float(min(n, k)))
    if root is not None:
        return root
    return float(min(n, k)) if float(factored.subs(r, 1)) < float(dense) else 0.0
