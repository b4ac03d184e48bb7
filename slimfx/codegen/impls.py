"""The implementations the ``lower`` pass chooses from, per compressed op and device.

CPU: aten forms that Inductor's C++ codegen fuses with the pointwise ops around them (a low-rank pair as two
linears; a dequantization or N:M expansion traced into aten ops and then one linear), and torch's own int4
weight-only kernel. CUDA: the generated Triton kernels (``lowrank``, ``quant``, ``nm``), which also absorb the
epilogue, torch's semi-structured 2:4 (cuSPARSELt/CUTLASS), and the same aten forms. ``dense-*`` forms expand the
compressed weight once, at lowering: they give the memory saving up for speed, so the pass offers them only when
asked (``lower{storage=any}``).
"""
from __future__ import annotations

import sympy
import torch
import torch.fx as fx

from ..hw_profiles.cost_model import (Kernel, _gemm_kind, dense_linear, int8_linear, lowrank_linear, nm_linear,
                                      quant_linear)
from ..hw_profiles.op_costs import COST_RULES, dtype_name, numel, shape, val
from ..ir.ops import INT8_LINEAR, LOWRANK_LINEAR, NM_LINEAR, QUANT_LINEAR
from ..ir.program import LINEAR, Program
from ..ir.quant_format import GroupParams, dequantize, unpack
from ..ir.sparse_format import decompress, index_bits
from .lowrank import LOWRANK_FUSED, MAX_RANK
from .nm import NM_FUSED
from .quant import QUANT_FUSED
from .registry import Impl, Region, inline, register

aten = torch.ops.aten


def _sizes(node: fx.Node) -> tuple:
    """(rows, itemsize, dtype name) of a compressed node's input."""
    x = node.args[0]
    return numel(shape(x)[:-1]), val(x).element_size(), dtype_name(x)


def _origin(program: Program, node: fx.Node) -> str:
    return program.weights[node.target].origin if program.is_weight(node) else node.name


def _derived(program: Program, like: fx.Node, hint: str, value: torch.Tensor, note: str) -> fx.Node:
    origin = _origin(program, like)
    return program.add_weight(f"{origin}_{hint}", value, origin, "lower", note,
                              program.weights[like.target].constraints)


def _call(program: Program, target, *args) -> fx.Node:
    return program.graph.call_function(target, tuple(args))


def _add_bias(program: Program, y: fx.Node, bias) -> fx.Node:
    return y if bias is None else _call(program, aten.add.Tensor, y, bias)


def _cast(program: Program, x: fx.Node, dtype: torch.dtype) -> fx.Node:
    return program.graph.call_function(aten._to_copy.default, (x,), {"dtype": dtype})


def _as_rows(program: Program, node: fx.Node, in_f: int) -> fx.Node:
    """The compressed node's input as a 2-D [rows, in_f] matrix (what torch's int kernels take)."""
    x = node.args[0]
    return x if val(node).dim() == 2 else _call(program, aten.reshape.default, x, [-1, in_f])


def _from_rows(program: Program, node: fx.Node, y: fx.Node, out_f: int) -> fx.Node:
    """``y`` [rows, out_f] back in the compressed node's leading sizes (symbolic ones read from its input)."""
    lead = list(val(node).shape[:-1])
    if len(lead) == 1:
        return y
    x = node.args[0]
    sizes = [d if isinstance(d, int) else _call(program, aten.sym_size.int, x, i) for i, d in enumerate(lead)]
    return _call(program, aten.reshape.default, y, [*sizes, out_f])


def _correction(program: Program, region: Region, y: fx.Node) -> fx.Node:
    """quant_linear's low-rank correction as two linears, int8 factors dequantized once into the input's dtype."""
    node = region.node
    x, a, b, a_scale, b_scale = node.args[0], node.args[4], node.args[5], node.args[6], node.args[7]
    if a is None or b is None:
        return y
    if a_scale is not None and b_scale is not None:  # int8 factors stay int8, dequantized on every call
        dtype = val(node).dtype  # (the input may be a node emitted just now, without metadata yet)

        def scaled(factor, scale):
            return factor.to(dtype) * scale[:, None].to(dtype)
        a, b = inline(program, scaled, [a, a_scale]), inline(program, scaled, [b, b_scale])
    return _call(program, aten.add.Tensor, y, _call(program, LINEAR, _call(program, LINEAR, x, b), a))


# -- low-rank ---------------------------------------------------------------------------------------------------

def _lowrank_cost(fused: bool):
    def cost(node: fx.Node) -> list[Kernel]:
        rows, itemsize, dtype = _sizes(node)
        rank, in_f = shape(node.args[1])
        return lowrank_linear(rows, shape(node.args[2])[0], in_f, rank, itemsize, dtype, fused=fused)
    return cost


def _emit_two_linears(program: Program, region: Region) -> fx.Node:
    x, v, u, bias = region.node.args
    return _call(program, LINEAR, _call(program, LINEAR, x, v), u, bias)


def _emit_fused(target, weights: slice):
    def emit(program: Program, region: Region) -> fx.Node:
        args = region.node.args
        return _call(program, target, *args[weights], list(region.extras), str(region.epilogue))
    return emit


for device in ("cpu", "cuda"):
    register(Impl("aten-two-linears", LOWRANK_LINEAR, device, False, True, lambda p, n: None, _lowrank_cost(False),
                  _emit_two_linears, "x·Vᵀ then ·Uᵀ as two aten linears (Inductor fuses the bias and epilogue)"))

def _emit_dense_product(program: Program, region: Region) -> fx.Node:
    x, v, u, bias = region.node.args
    product = (program.tensor(u).double() @ program.tensor(v).double()).to(program.tensor(v).dtype)
    return _call(program, LINEAR, x, _derived(program, u, "dense", product, "U·V multiplied out at lowering"), bias)


for device in ("cpu", "cuda"):
    register(Impl("dense-product", LOWRANK_LINEAR, device, False, False, lambda p, n: None,
                  lambda n: dense_linear(*_sizes(n)[:1], shape(n.args[2])[0], shape(n.args[1])[1], *_sizes(n)[1:]),
                  _emit_dense_product, "U·V multiplied out once at lowering: a dense linear"))

register(Impl(
    "triton-lowrank", LOWRANK_LINEAR, "cuda", True, True,
    lambda p, n: None if val(n.args[1]).shape[0] <= MAX_RANK else f"rank above {MAX_RANK}", _lowrank_cost(True),
    _emit_fused(LOWRANK_FUSED, slice(0, 4)), "generated Triton kernel: the rank-r intermediate stays on chip"))


# -- quantized ---------------------------------------------------------------------------------------------------

def _quant_cost(fused: bool, dequant_each_call: bool = False):
    def cost(node: fx.Node) -> list[Kernel]:
        rows, itemsize, dtype = _sizes(node)
        a, bits, group, in_f = node.args[4], node.args[9], node.args[10], node.args[11]
        out_f, rank = shape(node.args[1])[0], (shape(a)[1] if isinstance(a, fx.Node) else 0)
        k = sympy.Integer(in_f)
        if dequant_each_call:  # unpack to a dense weight, then a dense GEMM
            packed = out_f * k * sympy.Rational(bits, 8)
            kernels = [Kernel(out_f * k, packed + out_f * k * itemsize, dtype, "elementwise"),
                       *dense_linear(rows, out_f, k, itemsize, dtype)]
            return kernels + (lowrank_linear(rows, out_f, k, rank, itemsize, dtype) if rank else [])
        kernels = quant_linear(rows, out_f, k, bits, group, 0, itemsize, dtype)
        if rank and fused:  # one more [M,r]·[r,N] product inside the same kernel, and the factors' bytes
            main = kernels[0]
            extra = 2 * rows * rank * (k + out_f)
            return [Kernel(main.flops + extra, main.bytes + rank * (k + out_f) * itemsize, main.dtype, main.kind,
                           main.weight_elems)]
        return kernels + (lowrank_linear(rows, out_f, k, rank, itemsize, dtype) if rank else [])
    return cost


def _dequantized(node: fx.Node):
    bits, group, in_f = node.args[9], node.args[10], node.args[11]
    dtype = val(node).dtype

    def weight(packed, scales, zeros):
        return dequantize(unpack(packed, bits, in_f), GroupParams(scales, zeros), group, dtype)
    return weight


def _emit_dequant_linear(program: Program, region: Region) -> fx.Node:
    node = region.node
    weight = inline(program, _dequantized(node), list(node.args[1:4]))
    return _add_bias(program, _correction(program, region, _call(program, LINEAR, node.args[0], weight)),
                     node.args[8])


def _int4pack_why_not(program: Program, node: fx.Node) -> str | None:
    bits, group, in_f = node.args[9], node.args[10], node.args[11]
    if bits != 4:
        return f"torch's CPU weight-only kernel is int4 only (this layer is int{bits})"
    if group not in (32, 64, 128, 256):
        return f"group {group}: torch's int4 kernel takes groups of 32, 64, 128 or 256"
    if val(node.args[0]).dtype not in (torch.float32, torch.float16, torch.bfloat16) or in_f % 32:
        return "input dtype or width not supported by torch's int4 kernel"
    if program.tensor(node.args[1]).shape[0] % 16:
        return "torch's int4 kernel packs output features in 16s"
    if program.tensor(node.args[1]).device.type != "cpu":
        return "the weights are not on the CPU"
    return None


def _emit_int4pack(program: Program, region: Region) -> fx.Node:
    node = region.node
    x, packed, scales, zeros = node.args[:4]
    group, in_f = node.args[10], node.args[11]
    codes = unpack(program.tensor(packed), 4, in_f).to(torch.int32)
    dtype = val(node).dtype
    s, z = program.tensor(scales).to(dtype), program.tensor(zeros).to(dtype)
    # slimfx: (c - z)·s; torch: (c - 8)·s + z' with z' = (8 - z)·s, laid out [in/group, out, 2]
    scales_and_zeros = torch.stack([s, (8 - z) * s], -1).transpose(0, 1).contiguous()
    weight = _derived(program, packed, "int4pack", aten._convert_weight_to_int4pack_for_cpu(codes, 2),
                      "torch int4 CPU layout")
    sz = _derived(program, scales, "int4pack_sz", scales_and_zeros, "torch int4 scales and zero points")
    flat = program.graph.call_function(aten.clone.default, (_as_rows(program, node, in_f),),
                                       {"memory_format": torch.contiguous_format})
    y = _call(program, aten._weight_int4pack_mm_for_cpu.default, flat, weight, group, sz)
    y = _from_rows(program, node, y, val(packed).shape[0])
    return _add_bias(program, _correction(program, region, y), node.args[8])


def _emit_dense_quant(program: Program, region: Region) -> fx.Node:
    """deq(Q) + A·B as one dense weight: the correction folded in, so the layer costs exactly a dense linear."""
    node = region.node
    weight = _dequantized(node)(*(program.tensor(a) for a in node.args[1:4]))
    a, b, a_scale, b_scale = (program.tensor(t) if t is not None else None for t in node.args[4:8])
    if a is not None and b is not None:
        if a_scale is not None and b_scale is not None:
            a, b = a.double() * a_scale[:, None].double(), b.double() * b_scale[:, None].double()
        weight = (weight.double() + a.double() @ b.double()).to(weight.dtype)
    w = _derived(program, node.args[1], "dense", weight, "dequantized once at lowering, correction folded in")
    return _call(program, LINEAR, node.args[0], w, node.args[8])


for device in ("cpu", "cuda"):
    register(Impl("aten-dequant-linear", QUANT_LINEAR, device, False, True, lambda p, n: None,
                  _quant_cost(False, dequant_each_call=True), _emit_dequant_linear,
                  "unpack and dequantize in aten ops on every call (Inductor fuses them), then a dense linear"))
    register(Impl("dense-dequantized", QUANT_LINEAR, device, False, False, lambda p, n: None,
                  lambda n: _quant_cost(False, True)(n)[1:2], _emit_dense_quant,
                  "the weight dequantized once at lowering, its correction folded in: a dense linear"))
register(Impl("torch-int4pack", QUANT_LINEAR, "cpu", False, True, _int4pack_why_not, _quant_cost(False),
              _emit_int4pack, "torch's int4 weight-only CPU kernel (_weight_int4pack_mm_for_cpu)"))
register(Impl(
    "triton-quant", QUANT_LINEAR, "cuda", True, True,
    lambda p, n: None if not isinstance(n.args[4], fx.Node) or val(n.args[4]).shape[1] <= MAX_RANK
    else f"correction rank above {MAX_RANK}", _quant_cost(True), _emit_fused(QUANT_FUSED, slice(0, 12)),
    "generated Triton kernel: codes unpacked on chip, the low-rank correction in the same K loop"))


# -- N:M ----------------------------------------------------------------------------------------------------------

def _nm_cost(kind: str):
    def cost(node: fx.Node) -> list[Kernel]:
        rows, itemsize, dtype = _sizes(node)
        n, m, in_f = node.args[4], node.args[5], node.args[6]
        out_f, k = shape(node.args[1])[0], sympy.Integer(in_f)
        if kind == "cusparselt":
            return nm_linear(rows, out_f, k, n, m, itemsize, dtype)
        if kind == "load-as-sparse":
            kept = out_f * k * sympy.Rational(n, m)
            stored = kept * itemsize + kept * sympy.Rational(index_bits(m), 8)
            expand = 2 * n * out_f * k * sympy.ceiling(rows / 64)  # one compare-select per kept slot, per row tile
            return [Kernel(2 * rows * out_f * k + expand, rows * k * itemsize + stored + rows * out_f * itemsize,
                           dtype, _gemm_kind(rows), out_f * k)]
        dense = dense_linear(rows, out_f, k, itemsize, dtype)
        if kind == "dense":
            return dense
        return [Kernel(out_f * k, out_f * k * itemsize * 2, dtype, "elementwise"), *dense]
    return cost


def _expanded(node: fx.Node):
    n, m, in_f = node.args[4], node.args[5], node.args[6]
    return lambda values, indices: decompress(values, indices, n, m, in_f)


def _emit_decompress_linear(program: Program, region: Region) -> fx.Node:
    node = region.node
    return _call(program, LINEAR, node.args[0], inline(program, _expanded(node), list(node.args[1:3])), node.args[3])


def _emit_dense_nm(program: Program, region: Region) -> fx.Node:
    node = region.node
    weight = _expanded(node)(*(program.tensor(a) for a in node.args[1:3]))
    w = _derived(program, node.args[1], "dense", weight, "N:M weight expanded once at lowering (masked, dense)")
    return _call(program, LINEAR, node.args[0], w, node.args[3])


def _semi_structured_why_not(program: Program, node: fx.Node) -> str | None:
    if (node.args[4], node.args[5]) != (2, 4):
        return "cuSPARSELt runs 2:4 only"
    if val(node.args[0]).dtype not in (torch.float16, torch.bfloat16):
        return "cuSPARSELt needs fp16 or bf16"
    if not program.tensor(node.args[1]).is_cuda:
        return "the weights are not on a CUDA device here, so the semi-structured tensor cannot be built"
    return None


def _emit_semi_structured(program: Program, region: Region) -> fx.Node:
    from torch.sparse import to_sparse_semi_structured

    node = region.node
    weight = _expanded(node)(*(program.tensor(a) for a in node.args[1:3]))
    w = _derived(program, node.args[1], "2of4", to_sparse_semi_structured(weight), "2:4 semi-structured (CUDA)")
    return _call(program, LINEAR, node.args[0], w, node.args[3])


for device in ("cpu", "cuda"):
    register(Impl("aten-decompress-linear", NM_LINEAR, device, False, True, lambda p, n: None,
                  _nm_cost("decompress"), _emit_decompress_linear,
                  "N:M values scattered into a dense weight in aten ops on every call, then a dense linear"))
    register(Impl("dense-masked", NM_LINEAR, device, False, False, lambda p, n: None, _nm_cost("dense"),
                  _emit_dense_nm, "the masked weight expanded once at lowering: a dense linear"))
register(Impl("cusparselt-2:4", NM_LINEAR, "cuda", False, True, _semi_structured_why_not, _nm_cost("cusparselt"),
              _emit_semi_structured, "torch's semi-structured 2:4 sparse tensor (cuSPARSELt/CUTLASS)"))
register(Impl("triton-nm", NM_LINEAR, "cuda", True, True, lambda p, n: None, _nm_cost("load-as-sparse"),
              _emit_fused(NM_FUSED, slice(0, 7)),
              "generated Triton kernel: loads the kept values and indices, expands them on chip"))


# -- W8A8 ---------------------------------------------------------------------------------------------------------

def _int8_cost(int_mm: bool):
    def cost(node: fx.Node) -> list[Kernel]:
        rows, itemsize, dtype = _sizes(node)
        out_f, in_f = shape(node.args[1])
        return int8_linear(rows, out_f, in_f, itemsize, dtype, int_mm)
    return cost


def _emit_int8(int_mm: bool):
    """The op's math in aten ops, so Inductor fuses the row quantization and the rescale around the GEMM: with
    ``int_mm`` an int8 x int8 -> int32 product (aten._int_mm), else a float GEMM on the integer levels. In float32
    like the reference, the result cast back to the input's dtype."""
    def emit(program: Program, region: Region) -> fx.Node:
        node = region.node
        codes, scales, bias = node.args[1:]
        out_f, in_f = val(codes).shape
        flat = _cast(program, _as_rows(program, node, in_f), torch.float32)
        amax = _call(program, aten.amax.default, _call(program, aten.abs.default, flat), [-1], True)
        step = _call(program, aten.div.Tensor, _call(program, aten.clamp_min.default, amax, 1e-12), 127.0)
        levels = _call(program, aten.clamp.default, _call(program, aten.round.default,
                                                          _call(program, aten.div.Tensor, flat, step)), -127.0, 127.0)
        if int_mm:  # the codes read through a transposed view: one stored copy, however many layers share them
            product = _call(program, aten._int_mm.default, _cast(program, levels, torch.int8),
                            _call(program, aten.t.default, codes))
            product = _cast(program, product, torch.float32)
        else:
            product = _call(program, LINEAR, levels, inline(program, lambda c: c.float(), [codes]))
        y = _call(program, aten.mul.Tensor, product,
                  _call(program, aten.mul.Tensor, step, inline(program, lambda s: s.float(), [scales])))
        y = _from_rows(program, node, _cast(program, y, val(node).dtype), out_f)
        return _add_bias(program, y, bias)
    return emit


def _int_mm_why_not(program: Program, node: fx.Node) -> str | None:
    if program.tensor(node.args[1]).device.type != "cpu":
        return "the weights are not on the CPU"
    return None


register(Impl("aten-int8-mm", INT8_LINEAR, "cpu", False, True, _int_mm_why_not, _int8_cost(True), _emit_int8(True),
              "rows quantized in aten ops (Inductor fuses them), an int8 x int8 GEMM (aten._int_mm), rescaled"))
for device in ("cpu", "cuda"):
    register(Impl("aten-int8-float-gemm", INT8_LINEAR, device, False, True, lambda p, n: None, _int8_cost(False),
                  _emit_int8(False), "the same math with a float GEMM on the integer levels (codes widened per call)"))


# -- cost rules of the ops the implementations emit (so the report and the planner price lowered graphs) ------

def _int4pack_mm(node: fx.Node) -> list[Kernel]:
    x, group, scales_and_zeros = node.args[0], node.args[2], node.args[3]
    rows, itemsize, dtype = numel(shape(x)[:-1]), val(x).element_size(), dtype_name(x)
    return quant_linear(rows, shape(scales_and_zeros)[1], shape(x)[-1], 4, group, 0, itemsize, dtype)


def _int_mm(node: fx.Node) -> list[Kernel]:
    (m, k), n = shape(node.args[0]), shape(node.args[1])[1]
    return [Kernel(2 * m * n * k, m * k + k * n + 4 * m * n, "int8", _gemm_kind(m), k * n)]


COST_RULES.update({LOWRANK_FUSED: _lowrank_cost(True), QUANT_FUSED: _quant_cost(True), NM_FUSED: _nm_cost("load-as-sparse"),
                   aten._weight_int4pack_mm_for_cpu.default: _int4pack_mm, aten._int_mm.default: _int_mm})
