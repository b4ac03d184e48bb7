"""N:M masks: which n of every m consecutive input weights of a row to keep.

- ``magnitude``: keep the largest |W|.
- ``wanda``: keep the largest |W|·‖x_j‖ (Sun et al. 2023): a weight matters as much as the inputs it multiplies.
- ``sparsegpt``: second-order (Frantar & Alistarh 2023). Columns are pruned left to right with the inverse Hessian
  H⁻¹ = (XᵀX + λI)⁻¹; each pruned weight's error is pushed onto the not-yet-visited columns (the OBS update), so
  the weights that survive compensate for the ones removed. Processed in column blocks so memory stays at one
  [out, block] slab plus the [in, in] Hessian.
"""
from __future__ import annotations

import torch

from .calibration import LayerStats


def _top_n_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out_f, in_f = score.shape
    groups = score.reshape(out_f, in_f // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(out_f, in_f)


def magnitude_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return _top_n_mask(weight.abs(), n, m)


def wanda_mask(weight: torch.Tensor, stats: LayerStats, n: int, m: int) -> torch.Tensor:
    input_norm = stats.gram.diagonal().clamp_min(0).sqrt().to(weight.dtype)
    return _top_n_mask(weight.abs() * input_norm, n, m)


def sparsegpt(weight: torch.Tensor, stats: LayerStats, n: int, m: int, block: int = 128,
              damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (updated weight with pruned entries exactly zero, keep-mask). In the statistics' dtype.

    Works on Wᵀ, so a column of W is a contiguous row: each OBS step is one in-place rank-1 update (BLAS ger)
    over the block's remaining rows, and the lazy update after a block one in-place matmul."""
    # upper Cholesky factor of H⁻¹: row i holds the coefficients of the OBS update for column i
    hinv, dead, _ = stats.inverse_hessian(damp)
    # [in, out], always a copy: .T.contiguous() of a transposed view (GPT-2's Conv1D) is the user's own storage
    wt = weight.detach().to(hinv.dtype).T.clone(memory_format=torch.contiguous_format)
    in_f, out_f = wt.shape
    wt[dead] = 0.0
    keep = torch.zeros(in_f, out_f, dtype=torch.bool, device=wt.device)
    block = max(m, block - block % m)
    for start in range(0, in_f, block):
        end = min(start + block, in_f)
        w_block, hinv_block = wt[start:end], hinv[start:end, start:end]
        diagonal, err_block = hinv_block.diagonal(), torch.empty_like(w_block)
        for i in range(end - start):
            if i % m == 0:  # choose the group's survivors by OBS saliency w² / [H⁻¹]_jj²
                saliency = w_block[i : i + m] ** 2 / diagonal[i : i + m, None] ** 2
                keep[start + i : start + i + m].scatter_(0, saliency.topk(n, dim=0).indices, True)
            row, kept = w_block[i], keep[start + i]
            err = torch.mul(row, ~kept, out=err_block[i]).div_(hinv_block[i, i])
            w_block[i:].addr_(hinv_block[i, i:], err, alpha=-1)  # pushes the pruned part onto later columns
            row.mul_(kept)
        if end < in_f:
            wt[end:].addmm_(hinv[start:end, end:].T, err_block, alpha=-1)
    return wt.T.to(weight.dtype, memory_format=torch.contiguous_format), keep.T.contiguous()
