"""N:M compressed-weight GEMM, load as sparse, compute as dense (Flash-LLM): Y = epilogue(X·Wᵀ + b).

Only the kept values (n of every m) and their packed in-group indices are read from memory
(``ir/sparse_format``). Each K step expands its [BK, BN] weight tile on chip: column k lies in group k // m at
position k % m, and takes the kept value whose index equals that position (one compare per kept slot). It pays
where the layer is memory-bound (decode) and cuSPARSELt's 2:4 kernels do not, and serves any n:m.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from ..ir.sparse_format import index_bits
from .epilogue import Epilogue
from .lowrank import _device_name, can_launch
from . import source
from .source import render
from .tuning import bucket, fitting, precision, run_tuned

TEMPLATE = '''import triton
import triton.language as tl


@triton.jit
def kernel(X, VALS, IDX, BIAS, Y, {EXTRA_PARAMS}M, N, K, KEPT, IDX_BYTES, sxm, sxk, sym, syn,
           KEEP: tl.constexpr, GROUP: tl.constexpr, IDX_BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
           PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        in_k = rk < K
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & in_k[None, :], other=0.0)
        w_mask = in_k[:, None] & (rn[None, :] < N)
        position = (rk % GROUP)[:, None]
        w = tl.zeros((BK, BN), dtype=tl.float32)
        for s in tl.static_range(KEEP):
            slot = (rk // GROUP) * KEEP + s  # the s-th kept value of column k's group
            value = tl.load(VALS + rn[None, :] * KEPT + slot[:, None], mask=w_mask, other=0.0)
            bit = slot * IDX_BITS
            byte = tl.load(IDX + rn[None, :] * IDX_BYTES + (bit // 8)[:, None], mask=w_mask, other=0).to(tl.int32)
            index = (byte >> (bit % 8)[:, None]) & ((1 << IDX_BITS) - 1)
            w = tl.where(index == position, value.to(tl.float32), w)
        acc += tl.dot(x, w.to(X.dtype.element_ty), input_precision=PRECISION)
    {EPILOGUE}
'''

CONFIGS = [{"BM": bm, "BN": bn, "BK": bk, "num_warps": w}
           for bm, bn, bk, w in ((16, 32, 64, 4), (16, 64, 64, 4), (32, 64, 64, 4), (64, 64, 64, 4), (64, 128, 32, 8))]


def reference(x, values, indices, bias, n, m, in_features, extras, epilogue):
    return Epilogue.parse(epilogue).apply(torch.ops.slimfx.nm_linear(x, values, indices, bias, n, m, in_features),
                                          list(extras))


@triton_op("slimfx::nm_fused", mutates_args={})
def nm_fused(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: Optional[torch.Tensor], n: int,
             m: int, in_features: int, extras: list[torch.Tensor], epilogue: str) -> torch.Tensor:
    """``slimfx.nm_linear`` plus an epilogue, in one kernel (the same math in torch where none can run)."""
    if not can_launch(x) or index_bits(m) == 8 and m > 256:
        return reference(x, values, indices, bias, n, m, in_features, extras, epilogue)
    spec = Epilogue.parse(epilogue)
    rendered = render("nm", TEMPLATE, spec)
    k, out_f = in_features, values.shape[0]
    x2, y, extra_args = source.as_rows(x, k, out_f, extras)
    rows = x2.shape[0]
    values, indices = values.contiguous(), indices.contiguous()
    configs = fitting(CONFIGS, rows)

    def launch(config):
        grid = (triton.cdiv(rows, config["BM"]), triton.cdiv(out_f, config["BN"]))
        wrap_triton(rendered.kernel)[grid](
            x2, values, indices, bias if bias is not None else y, y, *extra_args, rows, out_f, k, values.shape[1],
            indices.shape[1], x2.stride(0), x2.stride(1), y.stride(0), y.stride(1), KEEP=n, GROUP=m,
            IDX_BITS=index_bits(m), HAS_BIAS=bias is not None, PRECISION=precision(x), BM=config["BM"], BN=config["BN"], BK=config["BK"],
            num_warps=config["num_warps"])

    run_tuned(lambda: f"nm|{spec}|{n}:{m}|{x.dtype}|{bucket(rows)},{out_f},{k}|{_device_name(x)}", configs, launch,
              x)
    return y.reshape(*x.shape[:-1], out_f)


@nm_fused.register_fake
def _(x, values, indices, bias, n, m, in_features, extras, epilogue):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


NM_FUSED = torch.ops.slimfx.nm_fused.default
