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
    """Returns (updated weight with pruned entries exactly zero, keep-mask)."""
    w = weight.detach().to(torch.float64).clone()
    out_f, in_f = w.shape
    hessian = stats.gram.to(torch.float64) / max(stats.rows, 1)
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    w[:, dead] = 0.0
    hessian += torch.eye(in_f, dtype=torch.float64, device=hessian.device) * damp * hessian.diagonal().mean()
    # upper Cholesky factor of H⁻¹: row i holds the coefficients of the OBS update for column i
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    keep = torch.zeros(out_f, in_f, dtype=torch.bool, device=w.device)
    block = max(m, block - block % m)
    for start in range(0, in_f, block):
        end = min(start + block, in_f)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            if i % m == 0:  # choose the group's survivors by OBS saliency w² / [H⁻¹]_jj²
                saliency = w_block[:, i : i + m] ** 2 / hinv_block.diagonal()[i : i + m] ** 2
                keep[:, start + i : start + i + m] = _top_n_mask(saliency, n, m)
            column = w_block[:, i]
            pruned = torch.where(keep[:, start + i], column, torch.zeros_like(column))
            err = (column - pruned) / hinv_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            w_block[:, i] = pruned
            err_block[:, i] = err
        w[:, start:end] = w_block
        w[:, end:] -= err_block @ hinv[start:end, end:]
    w[~keep] = 0.0
    return w.to(weight.dtype), keep
