"""Fused low-rank linear: Y = epilogue((X·Vᵀ)·Uᵀ + b) in one kernel (FlashSVD style).

Each program takes a block of rows, computes its rank-r intermediate T = X·Vᵀ once into registers, and then
walks its share of the output columns, T·Uᵀ per tile: T is never written to memory. Programs split the columns
between them where there are few row blocks (decode), at the price of recomputing T once per split.
``slimfx::lowrank_fused`` is a ``torch.library.triton_op``, so Inductor sees the kernel and compiles around it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from .epilogue import Epilogue
from . import source
from .source import interpreting, render
from .tuning import bucket, fitting, precision, run_tuned

MAX_RANK = 256  # the intermediate lives in registers: [BM, rank] per program
PROGRAMS = 64  # where row blocks are fewer, the columns are shared out between programs (decode)

TEMPLATE = '''import triton
import triton.language as tl


@triton.jit
def kernel(X, V, U, BIAS, Y, {EXTRA_PARAMS}M, N, K, R, sxm, sxk, svr, svk, sun, sur, sym, syn,
           HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
           TILES: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    t = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        vt = tl.load(V + rr[None, :] * svr + rk[:, None] * svk, mask=(rk[:, None] < K) & (rr[None, :] < R), other=0.0)
        t += tl.dot(x, vt, input_precision=PRECISION)
    t = t.to(X.dtype.element_ty)  # rounded like the two-GEMM path's intermediate
    for tile in range(TILES):
        rn = (pid_n * TILES + tile) * BN + tl.arange(0, BN)
        ut = tl.load(U + rn[None, :] * sun + rr[:, None] * sur, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(t, ut, input_precision=PRECISION)
        {EPILOGUE}
'''

CONFIGS = [{"BM": bm, "BN": bn, "BK": bk, "num_warps": w}
           for bm, bn, bk, w in ((16, 64, 64, 4), (32, 64, 64, 4), (64, 64, 32, 4), (64, 128, 32, 8), (128, 64, 32, 8))]


def _device_name(x: torch.Tensor) -> str:
    return torch.cuda.get_device_name(x.device) if x.is_cuda else "cpu"


def can_launch(x: torch.Tensor) -> bool:
    return x.is_cuda or (interpreting() and x.device.type == "cpu")


def reference(x, v, u, bias, extras, epilogue: str) -> torch.Tensor:
    return Epilogue.parse(epilogue).apply(torch.nn.functional.linear(torch.nn.functional.linear(x, v), u, bias),
                                          list(extras))


@triton_op("slimfx::lowrank_fused", mutates_args={})
def lowrank_fused(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor],
                  extras: list[torch.Tensor], epilogue: str) -> torch.Tensor:
    """epilogue((x·vᵀ)·uᵀ + bias) in one kernel; where no kernel can run (a CPU tensor without the interpreter),
    the same math in torch."""
    if not can_launch(x) or v.shape[0] > MAX_RANK:
        return reference(x, v, u, bias, extras, epilogue)
    spec = Epilogue.parse(epilogue)
    rendered = render("lowrank", TEMPLATE, spec)
    k, n, r = x.shape[-1], u.shape[0], v.shape[0]
    x2, y, extra_args = source.as_rows(x, k, n, extras)
    m = x2.shape[0]
    block_r = max(16, triton.next_power_of_2(r))
    configs = fitting(CONFIGS, m)

    def launch(config):
        tiles_n = triton.cdiv(n, config["BN"])
        row_blocks = triton.cdiv(m, config["BM"])
        splits = min(tiles_n, max(1, PROGRAMS // row_blocks))  # few row blocks: share the columns out
        tiles = triton.cdiv(tiles_n, splits)
        wrap_triton(rendered.kernel)[(row_blocks, triton.cdiv(tiles_n, tiles))](
            x2, v, u, bias if bias is not None else y, y, *extra_args, m, n, k, r, x2.stride(0), x2.stride(1),
            v.stride(0), v.stride(1), u.stride(0), u.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, PRECISION=precision(x), BM=config["BM"], BN=config["BN"], BK=config["BK"], BR=block_r, TILES=tiles,
            num_warps=config["num_warps"])

    run_tuned(lambda: f"lowrank|{spec}|{x.dtype}|{bucket(m)},{n},{k},{r}|{_device_name(x)}", configs, launch, x)
    return y.reshape(*x.shape[:-1], n)


@lowrank_fused.register_fake
def _(x, v, u, bias, extras, epilogue):
    return x.new_empty((*x.shape[:-1], u.shape[0]))


LOWRANK_FUSED = torch.ops.slimfx.lowrank_fused.default
