"""Group-wise weight quantizers: round-to-nearest, and GPTQ (second order, error-compensating).

Both return the codes and the group parameters of one weight W[out, in]; ``dequantize`` of them is Q(W).
GPTQ (Frantar et al., 2022) quantizes columns in order and spreads each column's rounding error over the columns
not yet quantized, weighted by the inverse Hessian H = XᵀX of the layer's inputs. Updates are lazy: within a
block of columns the error is propagated column by column, and to the rest of the matrix once per block, as one
matrix product. ``act_order`` visits columns by decreasing H_jj (the most-used inputs first); group parameters
are fixed from the original weights ("static groups"), so the packed layout keeps the natural column order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.quant_format import GroupParams, dequantize, group_params, quantize_with
from .calibration import LayerStats


def rtn(weight: torch.Tensor, bits: int, group: int, symmetric: bool) -> tuple[torch.Tensor, GroupParams]:
    params = group_params(weight, bits, group, symmetric)
    return quantize_with(weight, params, bits, group), params


def gptq(weight: torch.Tensor, stats: LayerStats, bits: int, group: int, symmetric: bool, block: int = 128,
         damp: float = 0.01, act_order: bool = False) -> tuple[torch.Tensor, GroupParams]:
    hinv, _, order = stats.inverse_hessian(damp, act_order)  # in the statistics' dtype, shared per input
    w = weight.detach().to(hinv.dtype)
    in_f = w.shape[1]
    params = group_params(w, bits, group, symmetric)
    scales = params.scales.repeat_interleave(group, dim=1)
    zeros = params.zeros.repeat_interleave(group, dim=1)
    levels = 2**bits - 1
    # on Wᵀ (a column of W a contiguous row): each step one in-place rank-1 update, as in ``sparsegpt``
    wt, scales, zeros = w.T[order].contiguous(), scales.T[order].contiguous(), zeros.T[order].contiguous()
    codes = torch.empty_like(wt)
    for start in range(0, in_f, block):
        end = min(start + block, in_f)
        w_block, hinv_block = wt[start:end], hinv[start:end, start:end]
        err_block = torch.empty_like(w_block)
        for i in range(end - start):
            row, s, z = w_block[i], scales[start + i], zeros[start + i]
            code = torch.div(row, s, out=codes[start + i]).add_(z).round_().clamp_(0, levels)
            err = torch.sub(row, (code - z) * s, out=err_block[i]).div_(hinv_block[i, i])
            w_block[i:].addr_(hinv_block[i, i:], err, alpha=-1)
        if end < in_f:
            wt[end:].addmm_(hinv[start:end, end:].T, err_block, alpha=-1)  # the lazy update: once per block
    codes = codes[torch.argsort(order)].T.contiguous()
    return codes.to(torch.uint8), GroupParams(params.scales.to(weight.dtype), params.zeros.to(weight.dtype))


@dataclass
class IntFactors:
    """A low-rank pair W ≈ U·V with both factors as integer codes, one symmetric scale per row (``group`` = the
    row's width): the combination of ``factorize`` and quantization on one layer."""

    v: tuple[torch.Tensor, GroupParams]  # codes [r, in] and their parameters
    u: tuple[torch.Tensor, GroupParams]  # codes [out, r]
    bits: int

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """U·V as the quantized op computes it."""
        (v_codes, v_params), (u_codes, u_params) = self.v, self.u
        return dequantize(u_codes, u_params, u_codes.shape[1], dtype) @ dequantize(v_codes, v_params,
                                                                                     v_codes.shape[1], dtype)


def quantize_factors(u: torch.Tensor, v: torch.Tensor, bits: int) -> IntFactors:
    """Codes for U[out, r]·V[r, in]. Each component's magnitude first moves from U's column into V's row (U·V is
    unchanged; V's rows have a scale each anyway), so one scale per row of U fits all r of its components instead
    of the largest singular value's drowning the rest."""
    magnitude = u.abs().amax(0).clamp_min(1e-30)
    u, v = u / magnitude, v * magnitude[:, None]
    return IntFactors(rtn(v, bits, v.shape[1], True), rtn(u, bits, u.shape[1], True), bits)
