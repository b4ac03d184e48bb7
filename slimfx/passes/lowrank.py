"""Low-rank factorization of a weight matrix, one SVD for every rank.

All three methods factor ``W·T = U Σ Vᵀ`` for a transform T and set ``A = U Σ``, ``B = Vᵀ T⁻¹``, so that the
first r rows/columns give ``W ≈ A[:, :r] B[:r]``:

- ``svd``: T = I (the best approximation of the weights themselves);
- ``whitened`` (SVD-LLM): T = S with S Sᵀ = XᵀX, so truncation minimises the *output* error ||X(W - W_r)ᵀ||;
  S is the symmetric square root from an eigendecomposition (any square root gives the same truncation as
  SVD-LLM's Cholesky factor) with small eigenvalues floored, which handles rank-deficient XᵀX. Where the layer
  has no more outputs than inputs, the same truncation comes from the out × out matrix W·XᵀX·Wᵀ instead
  (``_whitened_from_outputs``), without S;
- ``asvd``: T = diag(mean|x|)^α, scaling columns by how large their inputs are.

The output error of dropping component i is σᵢ² · bᵢᵀ(XᵀX)bᵢ, and the cross terms vanish because U is
orthonormal, so ``rel_error(r)`` is exact on the calibration data for every method and every rank (to the
rounding of the products: the whitened method's run in the statistics' dtype, float32 unless float64 statistics
were asked for). The whitened method never runs an SVD of the weight: its singular vectors come from an
eigendecomposition of the smaller of (W S)ᵀ(W S) and W·XᵀX·Wᵀ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibration import LayerStats


@dataclass
class LowRankFactors:
    a: torch.Tensor  # [out, k] = U Σ (the output-side whitened route: U, with B = Uᵀ W)
    b: torch.Tensor  # [k, in]  = Vᵀ T⁻¹
    component_error: torch.Tensor  # [k] output error energy of each component
    total_energy: float  # ||X Wᵀ||² (or ||W||² without data)

    @property
    def max_rank(self) -> int:
        return self.a.shape[1]

    def rel_error(self, rank: int) -> float:
        """Relative output error ||X(W - W_r)ᵀ|| / ||X Wᵀ|| on the calibration data (weights if none)."""
        tail = float(self.component_error[rank:].sum())
        return (max(tail, 0.0) / self.total_energy) ** 0.5 if self.total_energy > 0 else 0.0

    def rank_for_energy(self, energy: float) -> int:
        """Smallest rank that keeps ``energy`` of the output energy."""
        tail = self.component_error.flip(0).cumsum(0).flip(0)  # tail[r] = error energy dropped at rank r
        kept = 1.0 - tail / self.total_energy
        ok = torch.nonzero(kept >= energy)
        return int(ok[0]) if len(ok) else self.max_rank

    def truncate(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:, :rank] and B[:rank], each in storage of its own: the first rows of B are contiguous already, and a
        view of them would keep the whole decomposition alive in the compressed model."""
        return _owned(self.a[:, :rank].to(dtype)), _owned(self.b[:rank].to(dtype))


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole else tensor.clone(memory_format=torch.contiguous_format)


def _whitening(stats: LayerStats, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """S, S⁻¹ with S Sᵀ = XᵀX (small eigenvalues floored), made once per statistics object: q, k and v (gate
    and up) share their input's statistics, and so this eigendecomposition."""
    cache = stats.derived.setdefault("whitening", {})
    if damp not in cache:
        evals, evecs = torch.linalg.eigh(stats.gram.to(torch.float64))
        floor = max(float(evals.max()), 1e-30) * damp
        root = evals.clamp_min(floor).sqrt()
        cache.clear()  # one root per statistics object is kept alive
        cache[damp] = (evecs * root, (evecs / root).T)
    return cache[damp]


def quadratic(matrix: torch.Tensor, gram: torch.Tensor, rows: int = 2048) -> float:
    """Σ over rows m of m·G·mᵀ (= ‖X Mᵀ‖² for G = XᵀX): products in the statistics' dtype (at least float32),
    each block's sum in float64; a block of rows at a time, so a wide layer (an LM head) needs no second copy."""
    dtype = torch.promote_types(gram.dtype, torch.float32)
    gram = gram.to(dtype)
    total = 0.0
    for block in matrix.detach().split(rows):
        block = block.to(dtype)
        total += float(((block @ gram) * block).sum(dtype=torch.float64))
    return total


def factorize_matrix(weight: torch.Tensor, method: str, stats: LayerStats | None = None, alpha: float = 0.5,
                     damp: float = 1e-6) -> LowRankFactors:
    if method == "whitened":
        # products in the statistics' precision (float32 by default, float64 when asked), decompositions in float64
        dtype = torch.promote_types(torch.promote_types(weight.dtype, stats.gram.dtype), torch.float32)
        if weight.shape[0] <= weight.shape[1]:  # (square too: one eigendecomposition instead of two)
            return _whitened_from_outputs(weight.detach().to(dtype), stats.gram.to(dtype))
        return _whitened_from_inputs(weight.detach(), stats.gram.to(torch.float64), *_whitening(stats, damp),
                                     dtype=dtype)
    w = weight.detach().to(torch.float64)
    if method == "svd":
        transform, inverse = None, None
    elif method == "asvd":  # T = diag(s): a column scale, never a dense diagonal matrix
        scale = (stats.mean_abs.clamp_min(1e-8) ** alpha).to(torch.float64)
        transform, inverse = scale, 1.0 / scale
    else:
        raise ValueError(f"unknown factorization method {method!r}")
    target = w if transform is None else w * transform
    u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    a = u * sigma
    b = vh if inverse is None else vh * inverse
    if stats is None:
        component_error = sigma**2 * (b * b).sum(1)
        total = float((w * w).sum())
    else:
        gram = stats.gram.to(torch.float64)
        component_error = sigma**2 * ((b @ gram) * b).sum(1)
        total = quadratic(w, gram)
    return LowRankFactors(a, b, component_error, total)


def _whitened_from_inputs(w: torch.Tensor, gram: torch.Tensor, root: torch.Tensor, inverse: torch.Tensor,
                          dtype: torch.dtype = torch.float64, rows: int = 4096) -> LowRankFactors:
    """SVD-LLM's truncation for a layer with more outputs than inputs, without an SVD of the out × in matrix W·S:
    the in × in matrix (W S)ᵀ(W S) = V Σ² Vᵀ gives its right singular vectors and values, then A = W S V (= U Σ)
    and B = Vᵀ S⁻¹. An eigendecomposition of in × in and three products, instead of a full SVD of out × in (five
    times the work for an LM head). The products run in ``dtype`` a block of rows at a time, so no float64 copy of
    W or of W S is held beside A; the eigendecompositions in float64."""
    root_d = root.to(dtype)
    kernel = sum((block.to(dtype) @ root_d).T @ (block.to(dtype) @ root_d) for block in w.split(rows))
    kernel = kernel.to(torch.float64)
    total = float(kernel.trace())  # ‖W S‖² = ‖X Wᵀ‖² (to the floor on XᵀX's smallest eigenvalues)
    evals, evecs = torch.linalg.eigh(kernel)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    mixed = (root @ evecs).to(dtype)  # A = W (S V), a block of rows at a time
    a = torch.empty(w.shape, dtype=dtype, device=w.device)
    for out, block in zip(a.split(rows), w.split(rows)):
        torch.matmul(block.to(dtype), mixed, out=out)
    b = evecs.T @ inverse
    component_error = evals * ((b @ gram) * b).sum(1)
    return LowRankFactors(a, b, component_error, total)


def _whitened_from_outputs(w: torch.Tensor, gram: torch.Tensor) -> LowRankFactors:
    """Whitened factorization through the output side: W·XᵀX·Wᵀ = U Λ Uᵀ (out × out) gives the left singular
    vectors and values of W·S for any S with S Sᵀ = XᵀX, so truncating to A = U_r, B = U_rᵀ W is the SVD-LLM
    truncation, with the exact output error Σ_{i≥r} λᵢ, and neither S nor its inverse is formed. For a layer
    wider in than out (an MLP's down projection) that is an eigendecomposition of out × out instead of in × in,
    and A has orthonormal columns (no small factor to overflow in half precision). Products in ``w``'s dtype,
    the eigendecomposition in float64."""
    projected = ((w @ gram) @ w.T).to(torch.float64)
    evals, evecs = torch.linalg.eigh((projected + projected.T) / 2)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    return LowRankFactors(evecs, evecs.T.to(w.dtype) @ w, evals, float(evals.sum()))


def spatial_factors(weight: torch.Tensor) -> tuple[LowRankFactors, tuple[int, ...]]:
    """k×k conv -> (k×1 conv to r channels) then (1×k conv): SVD of W arranged as [(cin, kh), (cout, kw)]."""
    cout, cin, kh, kw = weight.shape
    matrix = weight.detach().to(torch.float64).permute(1, 2, 0, 3).reshape(cin * kh, cout * kw)
    return factorize_matrix(matrix, "svd"), (cout, cin, kh, kw)
