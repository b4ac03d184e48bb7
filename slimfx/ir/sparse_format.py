"""Compressed N:M weights: the kept values plus the position of each inside its group of m.

For every row and every group of m consecutive input weights, keep n values (in column order) and their in-group
indices. Indices take ceil(log2 m) bits, packed into bytes (2:4: four indices per byte, i.e. 4 bits of metadata
per group of 4 weights, the density of torch's semi-structured layout). So a 2:4 fp16 weight stores 50% of the
values and 6.25% extra metadata.
"""
from __future__ import annotations

import math

import torch


def index_bits(m: int) -> int:
    bits = max(1, math.ceil(math.log2(m)))
    return bits if bits in (1, 2, 4) else 8  # pack only when indices tile a byte exactly


def compress(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense weight [out, in] + boolean keep-mask with exactly n per group -> (values [out, in·n/m], packed idx)."""
    out_f, in_f = weight.shape
    groups = mask.reshape(out_f, in_f // m, m)
    if not bool((groups.sum(-1) == n).all()):
        raise ValueError(f"mask does not keep exactly {n} of every {m}")
    # positions of the kept entries, in column order within each group
    order = torch.argsort((~groups).to(torch.int8), dim=-1, stable=True)[..., :n]
    values = torch.gather(weight.reshape(out_f, in_f // m, m), -1, order).reshape(out_f, -1)
    return values.contiguous(), pack_indices(order.reshape(out_f, -1).to(torch.uint8), index_bits(m))


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return indices.contiguous()
    per_byte = 8 // bits
    rows, count = indices.shape
    padded = torch.zeros(rows, -(-count // per_byte) * per_byte, dtype=torch.uint8, device=indices.device)
    padded[:, :count] = indices
    shifted = padded.reshape(rows, -1, per_byte).to(torch.int32) << (torch.arange(per_byte, device=indices.device) * bits)
    return shifted.sum(-1).to(torch.uint8).contiguous()


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    if bits == 8:
        return packed[:, :count].long()
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device) * bits
    unpacked = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return unpacked.reshape(packed.shape[0], -1)[:, :count].long()


def decompress(values: torch.Tensor, packed: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    out_f = values.shape[0]
    idx = unpack_indices(packed, index_bits(m), values.shape[1]).reshape(out_f, in_features // m, n)
    dense = torch.zeros(out_f, in_features // m, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx, values.reshape(out_f, in_features // m, n))
    return dense.reshape(out_f, in_features)


def satisfies_pattern(weight: torch.Tensor, n: int, m: int) -> bool:
    """Every group of m consecutive input weights has at most n non-zeros."""
    out_f, in_f = weight.shape
    return bool(((weight.reshape(out_f, in_f // m, m) != 0).sum(-1) <= n).all())
