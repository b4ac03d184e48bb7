"""Group-wise weight quantizers: round-to-nearest, and GPTQ (second order, error-compensating).

Both return the codes and the group parameters of one weight W[out, in]; ``dequantize`` of them is Q(W).
GPTQ (Frantar et al., 2022) quantizes columns in order and spreads each column's rounding error over the columns
not yet quantized, weighted by the inverse Hessian H = XᵀX of the layer's inputs. Updates are lazy: within a
block of columns the error is propagated column by column, and to the rest of the matrix once per block, as one
matrix product. ``act_order`` visits columns by decreasing H_jj (the most-used inputs first); group parameters
are fixed from the original weights ("static groups"), so the packed layout keeps the natural column order.
"""
from __future__ import annotations

import torch

from ..ir.quant_format import GroupParams, group_params, quantize_with
from .calibration import LayerStats


def rtn(weight: torch.Tensor, bits: int, group: int, symmetric: bool) -> tuple[torch.Tensor, GroupParams]:
    params = group_params(weight, bits, group, symmetric)
    return quantize_with(weight, params, bits, group), params


def gptq(weight: torch.Tensor, stats: LayerStats, bits: int, group: int, symmetric: bool, block: int = 128,
         damp: float = 0.01, act_order: bool = False) -> tuple[torch.Tensor, GroupParams]:
    w = weight.detach().to(torch.float64).clone()
    out_f, in_f = w.shape
    params = group_params(w, bits, group, symmetric)
    scales = params.scales.repeat_interleave(group, dim=1)
    zeros = params.zeros.repeat_interleave(group, dim=1)
    levels = 2**bits - 1
    hessian = stats.gram.to(torch.float64).clone() / max(stats.rows, 1)
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    hessian += torch.eye(in_f, dtype=torch.float64, device=hessian.device) * damp * hessian.diagonal().mean()
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else \
        torch.arange(in_f, device=hessian.device)
    w, hessian, scales, zeros = w[:, order], hessian[order][:, order], scales[:, order], zeros[:, order]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    codes = torch.zeros_like(w)
    for start in range(0, in_f, block):
        end = min(start + block, in_f)
        w_block, err_block = w[:, start:end].clone(), torch.zeros(out_f, end - start, dtype=w.dtype, device=w.device)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            column, s, z = w_block[:, i], scales[:, start + i], zeros[:, start + i]
            code = (column / s + z).round().clamp(0, levels)
            codes[:, start + i] = code
            err = (column - (code - z) * s) / hinv_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            err_block[:, i] = err
        w[:, end:] -= err_block @ hinv[start:end, end:]  # the lazy update: once per block
    codes = codes[:, torch.argsort(order)]
    return codes.to(torch.uint8), GroupParams(params.scales.to(weight.dtype), params.zeros.to(weight.dtype))
