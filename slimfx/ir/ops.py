"""Canonical compressed ops: ``torch.ops.slimfx.*`` custom ops with a CPU reference implementation.

The reference runs everywhere (and under Dynamo, export and Inductor, which see the op through its fake
implementation); codegen registers faster kernels for the same op where a GPU is present.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _lowrank_linear_reference(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = (x · vᵀ) · uᵀ + bias, with v: [r, in] and u: [out, r]. Reference: two GEMMs."""
    return F.linear(F.linear(x, v), u, bias)


lowrank_linear = torch.library.custom_op("slimfx::lowrank_linear", mutates_args=())(_lowrank_linear_reference)


@lowrank_linear.register_fake
def _(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    torch._check(x.shape[-1] == v.shape[1], lambda: f"lowrank_linear: x has {x.shape[-1]} features, v expects {v.shape[1]}")
    torch._check(u.shape[1] == v.shape[0], lambda: "lowrank_linear: u and v ranks differ")
    return x.new_empty((*x.shape[:-1], u.shape[0]))


LOWRANK_LINEAR = torch.ops.slimfx.lowrank_linear.default


def _nm_linear_reference(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: Optional[torch.Tensor], n: int,
              m: int, in_features: int) -> torch.Tensor:
    """y = x · W_sparseᵀ + bias, W stored as N:M values + packed indices. Reference: decompress, then GEMM."""
    from .sparse_format import decompress

    return F.linear(x, decompress(values, indices, n, m, in_features), bias)


nm_linear = torch.library.custom_op("slimfx::nm_linear", mutates_args=())(_nm_linear_reference)


@nm_linear.register_fake
def _(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: Optional[torch.Tensor], n: int, m: int,
      in_features: int) -> torch.Tensor:
    torch._check(x.shape[-1] == in_features, lambda: f"nm_linear: x has {x.shape[-1]} features, expected {in_features}")
    torch._check(values.shape[1] * m == in_features * n, lambda: "nm_linear: values do not match n:m")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


NM_LINEAR = torch.ops.slimfx.nm_linear.default


def _quant_linear_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 a: Optional[torch.Tensor], b: Optional[torch.Tensor], a_scale: Optional[torch.Tensor],
                 b_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int, group: int,
                 in_features: int) -> torch.Tensor:
    """y = x · deq(W)ᵀ + (x · bᵀ) · aᵀ + bias: packed group-wise integer weights plus an optional low-rank
    correction a[out, r]·b[r, in], itself int8 with per-row scales when ``a_scale``/``b_scale`` are given.
    Reference: unpack, dequantize, GEMM (the weights stay packed in memory)."""
    from .quant_format import GroupParams, dequantize, unpack

    weight = dequantize(unpack(packed, bits, in_features), GroupParams(scales, zeros), group, x.dtype)
    y = F.linear(x, weight, bias)
    if a is not None and b is not None:
        if a_scale is not None and b_scale is not None:
            a, b = a.to(x.dtype) * a_scale[:, None].to(x.dtype), b.to(x.dtype) * b_scale[:, None].to(x.dtype)
        y = y + F.linear(F.linear(x, b), a)
    return y


quant_linear = torch.library.custom_op("slimfx::quant_linear", mutates_args=())(_quant_linear_reference)


@quant_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, a: Optional[torch.Tensor],
      b: Optional[torch.Tensor], a_scale: Optional[torch.Tensor], b_scale: Optional[torch.Tensor],
      bias: Optional[torch.Tensor], bits: int, group: int, in_features: int) -> torch.Tensor:
    torch._check(x.shape[-1] == in_features, lambda: f"quant_linear: x has {x.shape[-1]} features, expected {in_features}")
    torch._check(scales.shape[1] * group == in_features, lambda: "quant_linear: scales do not match the group size")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


QUANT_LINEAR = torch.ops.slimfx.quant_linear.default


def quant_linear_args(x, packed, scales, zeros, *, bits: int, group: int, in_features: int, bias=None, a=None,
                      b=None, a_scale=None, b_scale=None) -> tuple:
    """QUANT_LINEAR's twelve positional arguments (graph nodes or tensors), named once here so that a pass or a
    pricing helper cannot put the correction where the bias goes."""
    return (x, packed, scales, zeros, a, b, a_scale, b_scale, bias, bits, group, in_features)


def quantize_input_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer levels in [-127, 127], step per row), in float32 whatever x's dtype: each row of x by its absolute
    maximum. Rounding passes gradients straight through, so healing can train the layers around it."""
    x = x.float()
    step = x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    scaled = x / step
    return scaled + (torch.round(scaled).clamp(-127, 127) - scaled).detach(), step


def _int8_linear_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                           bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = deq(Q(x)) · deq(W)ᵀ + bias, int8 on both sides (W8A8): each row of x is quantized on every call
    (symmetric, by its absolute maximum), W per output channel (``codes`` int8 [out, in], ``scales`` [out]).
    Computed in float32 (half precision would overflow on the integer products), returned in x's dtype; the
    integer products are exact in float32 up to 1,040 input features. Reference: quantize, GEMM, rescale."""
    levels, step = quantize_input_rows(x)
    y = (F.linear(levels, codes.float()) * (step * scales.float())).to(x.dtype)
    return y if bias is None else y + bias


int8_linear = torch.library.custom_op("slimfx::int8_linear", mutates_args=())(_int8_linear_reference)


@int8_linear.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    torch._check(x.shape[-1] == codes.shape[1], lambda: f"int8_linear: x has {x.shape[-1]} features, codes expect "
                                                        f"{codes.shape[1]}")
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


INT8_LINEAR = torch.ops.slimfx.int8_linear.default

# The ops' math as plain differentiable torch functions (the custom ops have no autograd formula): healing runs
# compressed layers through these to train their factors and kept values.
REFERENCE = {LOWRANK_LINEAR: _lowrank_linear_reference, NM_LINEAR: _nm_linear_reference,
             QUANT_LINEAR: _quant_linear_reference, INT8_LINEAR: _int8_linear_reference}
