"""Dequantizing GEMM with the low-rank correction in the same kernel: Y = epilogue(X·deq(Q)ᵀ + (X·Bᵀ)·Aᵀ + b).

The weight stays packed in memory (``ir/quant_format``: 8 codes to ``bits`` bytes per row, any of 2/3/4/8 bits):
each K step loads the bytes under its tile, unpacks the codes on chip (code k of a row starts at bit bits·k, so
two neighbouring bytes always hold it), dequantizes with the group's scale and zero point, and multiplies. The
same K loop accumulates X·Bᵀ, so the correction costs one [BM, r]·[r, BN] product at the end instead of two
more GEMMs (unfused, about +57% over the W4 GEMM). The int8 form of the correction (per-row scales) is
dequantized as it is loaded. Decode shapes (M ≤ 16) are memory-bound and give too few programs to fill a GPU, so
they split K between programs (split-K), whose fp32 shares are summed before the bias and the epilogue.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from .epilogue import Epilogue
from .lowrank import MAX_RANK, _device_name, can_launch
from . import source
from .source import render
from .tuning import bucket, fitting, precision, run_tuned

TEMPLATE = '''import triton
import triton.language as tl


@triton.jit
def kernel(X, P, S, Z, A, B, AS, BS, BIAS, Y, WS, {EXTRA_PARAMS}M, N, K, R, ROW_BYTES, GROUPS, sxm, sxk, sym, syn,
           K_SPLIT, SPLIT: tl.constexpr,
           BITS: tl.constexpr, GROUP: tl.constexpr, HAS_LR: tl.constexpr, LR_INT8: tl.constexpr,
           HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)  # split-K (decode): each program sums its share of K; the shares are added after
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    t = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(pid_k * K_SPLIT, pid_k * K_SPLIT + K_SPLIT, BK):
        rk = k0 + tl.arange(0, BK)
        in_k = rk < K
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & in_k[None, :], other=0.0)
        bit = rk * BITS
        where = rn[None, :] * ROW_BYTES + (bit // 8)[:, None]  # [BK, BN]: the byte holding code k of row n
        w_mask = in_k[:, None] & (rn[None, :] < N)
        low = tl.load(P + where, mask=w_mask, other=0).to(tl.int32)
        high = tl.load(P + where + 1, mask=w_mask & ((bit // 8 + 1)[:, None] < ROW_BYTES), other=0).to(tl.int32)
        code = ((low | (high << 8)) >> (bit % 8)[:, None]) & ((1 << BITS) - 1)
        g = rn[None, :] * GROUPS + (rk // GROUP)[:, None]
        scale = tl.load(S + g, mask=w_mask, other=0.0).to(tl.float32)
        zero = tl.load(Z + g, mask=w_mask, other=0.0).to(tl.float32)
        w = ((code.to(tl.float32) - zero) * scale).to(X.dtype.element_ty)
        acc += tl.dot(x, w, input_precision=PRECISION)
        if HAS_LR:
            bt = tl.load(B + rr[None, :] * K + rk[:, None], mask=in_k[:, None] & (rr[None, :] < R), other=0.0)
            if LR_INT8:
                bt = (bt.to(tl.float32) * tl.load(BS + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :])
            t += tl.dot(x, bt.to(X.dtype.element_ty), input_precision=PRECISION)
    if HAS_LR:
        at = tl.load(A + rn[None, :] * R + rr[:, None], mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        if LR_INT8:
            at = at.to(tl.float32) * tl.load(AS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        acc += tl.dot(t.to(X.dtype.element_ty), at.to(X.dtype.element_ty), input_precision=PRECISION)
    if SPLIT == 1:
        {EPILOGUE}
    else:  # the correction is linear in t, so each share adds its own part of it
        tl.store(WS + pid_k * M * N + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))
'''

DECODE_ROWS = 16  # at most this many rows: memory-bound, so K is split between programs to fill the device
PROGRAMS = 128

CONFIGS = [{"BM": bm, "BN": bn, "BK": bk, "num_warps": w}
           for bm, bn, bk, w in ((16, 32, 64, 4), (16, 64, 128, 4), (32, 64, 64, 4), (64, 64, 64, 4), (64, 128, 32, 8),
                                 (128, 128, 32, 8))]


def reference(x, packed, scales, zeros, a, b, a_scale, b_scale, bias, bits, group, in_features, extras, epilogue):
    y = torch.ops.slimfx.quant_linear(x, packed, scales, zeros, a, b, a_scale, b_scale, bias, bits, group, in_features)
    return Epilogue.parse(epilogue).apply(y, list(extras))


@triton_op("slimfx::quant_fused", mutates_args={})
def quant_fused(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                a: Optional[torch.Tensor], b: Optional[torch.Tensor], a_scale: Optional[torch.Tensor],
                b_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int, group: int,
                in_features: int, extras: list[torch.Tensor], epilogue: str) -> torch.Tensor:
    """``slimfx.quant_linear`` plus an epilogue, in one kernel (the same math in torch where none can run)."""
    rank = a.shape[1] if a is not None and b is not None else 0
    if not can_launch(x) or rank > MAX_RANK:
        return reference(x, packed, scales, zeros, a, b, a_scale, b_scale, bias, bits, group, in_features, extras,
                         epilogue)
    spec = Epilogue.parse(epilogue)
    rendered = render("quant", TEMPLATE, spec)
    k, n = in_features, packed.shape[0]
    x2, y, extra_args = source.as_rows(x, k, n, extras)
    m = x2.shape[0]
    packed, scales, zeros = packed.contiguous(), scales.contiguous(), zeros.contiguous()
    lr_int8 = rank > 0 and a_scale is not None and b_scale is not None
    dummy = y
    a_, b_ = (a.contiguous(), b.contiguous()) if rank else (dummy, dummy)
    configs = fitting(CONFIGS, m)

    def launch(config):
        grid_n = triton.cdiv(n, config["BN"])
        split = splits(m, grid_n, k, config["BK"])
        k_split = triton.cdiv(triton.cdiv(k, split), config["BK"]) * config["BK"]
        partial = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else dummy
        grid = (triton.cdiv(m, config["BM"]), grid_n, split)
        wrap_triton(rendered.kernel)[grid](
            x2, packed, scales, zeros, a_, b_, a_scale if lr_int8 else dummy, b_scale if lr_int8 else dummy,
            bias if bias is not None else dummy, y, partial, *extra_args, m, n, k, rank, packed.shape[1],
            scales.shape[1], x2.stride(0), x2.stride(1), y.stride(0), y.stride(1), k_split, SPLIT=split,
            BITS=bits, GROUP=group, HAS_LR=rank > 0,
            LR_INT8=lr_int8, HAS_BIAS=bias is not None, PRECISION=precision(x), BM=config["BM"], BN=config["BN"], BK=config["BK"],
            BR=max(16, triton.next_power_of_2(max(rank, 1))), num_warps=config["num_warps"])

        if split > 1:  # add the shares, then the bias and the epilogue (Inductor fuses these under compile)
            total = partial.sum(0) + (bias.float() if bias is not None else 0)
            y.copy_(spec.apply(total, [e.reshape(m, n).float() for e in extras]))

    run_tuned(lambda: f"quant|{spec}|{bits}b g{group} r{rank}|{x.dtype}|{bucket(m)},{n},{k}|{_device_name(x)}",
              configs, launch, x)
    return y.reshape(*x.shape[:-1], n)


def splits(rows, column_programs: int, k: int, block_k: int) -> int:
    """How many shares of K for a decode-shaped product (1 otherwise): enough programs to fill the device."""
    if not isinstance(rows, int) or rows > DECODE_ROWS:
        return 1
    return max(1, min(8, PROGRAMS // max(column_programs, 1), triton.cdiv(k, block_k)))


@quant_fused.register_fake
def _(x, packed, scales, zeros, a, b, a_scale, b_scale, bias, bits, group, in_features, extras, epilogue):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


QUANT_FUSED = torch.ops.slimfx.quant_fused.default
