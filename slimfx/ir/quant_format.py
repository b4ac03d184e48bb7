"""Group-wise integer weights, packed: ``bits`` ∈ {2, 3, 4, 8} per code, scales and zero points per group.

A weight W[out, in] is split into groups of ``group`` consecutive inputs; each group has a scale s and a zero
point z, and stores codes c ∈ [0, 2^bits) with W ≈ (c - z)·s. Codes are packed as a bit stream, eight codes to
``bits`` bytes (so int3 really takes 3/8 of a byte per weight), row by row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)


@dataclass
class GroupParams:
    scales: torch.Tensor  # [out, in / group]
    zeros: torch.Tensor  # [out, in / group], integer-valued


def group_params(weight: torch.Tensor, bits: int, group: int, symmetric: bool) -> GroupParams:
    """Scales and zero points that cover each group's range (round to nearest inside it)."""
    out_f, in_f = weight.shape
    g = weight.reshape(out_f, in_f // group, group)
    levels = 2**bits - 1
    if symmetric:  # codes centred on 2^(bits-1): [-(2^(bits-1) - 1), 2^(bits-1) - 1] around zero
        half = 2 ** (bits - 1) - 1
        scales = g.abs().amax(-1).clamp_min(1e-12) / max(half, 1)
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    else:
        low, high = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scales = ((high - low) / levels).clamp_min(1e-12)
        zeros = (-low / scales).round().clamp(0, levels)
    return GroupParams(scales, zeros)


def quantize_with(weight: torch.Tensor, params: GroupParams, bits: int, group: int) -> torch.Tensor:
    """Codes (uint8, unpacked) of ``weight`` under fixed group parameters."""
    out_f, in_f = weight.shape
    scales = params.scales.repeat_interleave(group, dim=1)
    zeros = params.zeros.repeat_interleave(group, dim=1)
    return (weight / scales + zeros).round().clamp(0, 2**bits - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, params: GroupParams, group: int, dtype: torch.dtype) -> torch.Tensor:
    scales = params.scales.repeat_interleave(group, dim=1)
    zeros = params.zeros.repeat_interleave(group, dim=1)
    return ((codes.to(scales.dtype) - zeros) * scales).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[out, in] codes -> [out, ceil(in / 8) * bits] bytes: each run of eight codes becomes ``bits`` bytes."""
    out_f, in_f = codes.shape
    padded = torch.zeros(out_f, -(-in_f // 8) * 8, dtype=torch.int64, device=codes.device)
    padded[:, :in_f] = codes.to(torch.int64)
    shifts = torch.arange(8, device=codes.device) * bits
    words = (padded.reshape(out_f, -1, 8) << shifts).sum(-1)  # 8·bits <= 64 bits per word
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(out_f, -1)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    out_f = packed.shape[0]
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    words = (packed.reshape(out_f, -1, bits).to(torch.int64) << byte_shifts).sum(-1)
    shifts = torch.arange(8, device=packed.device) * bits
    codes = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(out_f, -1)[:, :in_features].to(torch.uint8)
