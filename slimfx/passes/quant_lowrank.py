"""``quant-lowrank{bits=4,group=128,rank=16,correction=lqer}``: W ≈ Q(W) + A·B.

Each linear weight is quantized group-wise (``quantizer=rtn`` or ``gptq``) and stored packed; a small
high-precision low-rank term corrects the quantization error ΔW = W − Q(W):

- ``lqer``: SVD of ΔW·S with S = diag(mean |x|) from calibration, mapped back by S⁻¹ (LQER);
- ``eora``: SVD of ΔW·QΛ^½ in the eigenspace of XᵀX = QΛQᵀ, mapped back by Λ^-½Qᵀ (EoRA): the rank-r term
  that minimises the output error ||X(ΔW − AB)ᵀ||;
- ``alternate``: re-quantize W − AB and refit AB for a few rounds (LQ-LoRA / LoftQ style);
- ``none`` (or ``rank=0``): plain quantization.

Both corrections are the activation-aware factorizations of ``lowrank.py`` applied to ΔW (``asvd`` with α = 1
is LQER's scaling; ``whitened`` is EoRA's eigenspace), so one SVD gives the exact output error of every rank.
The result is ``slimfx.quant_linear`` with the codes packed (eight codes in ``bits`` bytes).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.fx as fx

from ..errors import PipelineError
from ..hw_profiles.cost_model import latency, quant_linear
from ..hw_profiles.op_costs import concrete, dtype_name, numel, shape, size_hints
from ..ir.ops import QUANT_LINEAR, quant_linear_args
from ..ir.program import LINEAR, Constraint, Program
from ..ir.quant_format import BITS, GroupParams, dequantize, pack
from .base import Pass, PassContext, claimed_layers, register, replace_each
from .calibration import LayerStats, require_stats
from .lowrank import LowRankFactors, factorize_matrix, quadratic
from .quantizers import gptq, rtn

CORRECTION_METHOD = {"lqer": "asvd", "eora": "whitened"}  # the factorization of ΔW each correction is


@dataclass
class QuantCandidate:
    """One option for the planner: bits, group, correction and rank, with predicted error, latency and bytes."""

    bits: int
    group: int
    correction: str
    rank: int
    rel_error: float
    latency_s: float | None
    bytes: int


@dataclass
class QuantizedWeight:
    codes: torch.Tensor
    params: GroupParams
    a: torch.Tensor | None  # [out, r], in the weight's dtype, or int8 with ``a_scale`` per row
    b: torch.Tensor | None  # [r, in]
    rel_error: float
    a_scale: torch.Tensor | None = None
    b_scale: torch.Tensor | None = None


def int8_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (codes, scales) with matrix ≈ codes · scales[:, None]."""
    scales = matrix.abs().amax(1).clamp_min(1e-12) / 127
    return (matrix / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales


@register
@dataclass
class QuantLowRank(Pass):
    name = "quant-lowrank"
    summary = "group-wise int2/3/4/8 weights (rtn, gptq) with a low-rank error correction (lqer, eora, alternate)"

    bits: int = 4
    group: int = 128
    rank: int = 16
    correction: Literal["lqer", "eora", "alternate", "none"] = "lqer"
    quantizer: Literal["rtn", "gptq"] = "rtn"
    symmetric: bool = False
    act_order: bool = False
    rounds: int = 3  # alternate: re-quantize / refit rounds
    correction_int8: bool = False  # store A and B as int8 with per-row scales
    exclude: str = ""  # regex on weight names to leave in full precision
    plan: Optional[dict] = None  # weight origin -> (bits, group, rank), from the planner: only these layers

    def validate(self) -> None:
        if self.bits not in BITS:
            raise self.invalid("bits", f"must be one of {', '.join(map(str, BITS))}")
        if self.group < 1:
            raise self.invalid("group", "must be >= 1 (inputs sharing one scale and zero point)")
        if self.rank < 0:
            raise self.invalid("rank", "must be >= 0 (0: no correction)")
        if self.rounds < 1:
            raise self.invalid("rounds", "must be >= 1")
        self.check_regex("exclude")

    @property
    def needs_data(self) -> bool:
        return self.quantizer == "gptq" or (self.rank > 0 and self.correction in ("lqer", "eora"))

    @property
    def per_layer_statistics(self) -> bool:
        return self.needs_data

    def run(self, program: Program, ctx: PassContext) -> Counter:
        counts: Counter = Counter()
        stats = require_stats(program, ctx, self.needs_data, f"quant-lowrank{{quantizer={self.quantizer},"
                              f"correction={self.correction}}}", "quantizer=rtn with correction=none or alternate")
        hints = size_hints(program.graph)
        for node, origin, uses in claimed_layers(self, program, ctx, counts, (LINEAR,),
                                                 ("nm-mask", "quantized", "factorized"), "quant-lowrank layers"):
            weight = program.tensor(node.args[1])
            bits, group, rank = self._choice(origin, weight.shape)
            layer_stats = stats.get(origin, weight.shape[1]) if stats is not None else None
            if self.needs_data and layer_stats is None:
                counts["skipped-no-calibration-statistics"] += 1
                ctx.skip(self.name, origin, "no calibration statistics reached this layer")
                continue
            result = self.quantize(weight, layer_stats, bits, group, rank)
            ctx.layer_errors[origin] = result.rel_error
            self._rewrite(program, uses, origin, result, bits, group, rank, hints)
            counts["quantized"] += 1
        program.graph.eliminate_dead_code()
        program.drop_unused_weights()
        return counts

    def _choice(self, origin: str, shape_: torch.Size) -> tuple[int, int, int]:
        bits, group, rank = self.plan[origin] if self.plan is not None else (self.bits, self.group, self.rank)
        out_f, in_f = shape_
        if in_f % group:
            raise PipelineError(f"quant-lowrank: group={group} does not divide the {in_f} input features of {origin}; "
                                f"choose a group that divides every quantized layer's width, or exclude= this layer")
        if rank >= min(out_f, in_f):
            raise PipelineError(f"quant-lowrank: rank={rank} is not below min(out, in) = {min(out_f, in_f)} of "
                                f"{origin}; use a smaller rank (0 for plain quantization)")
        return bits, group, rank

    # -- the decomposition --------------------------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor, stats: LayerStats | None, bits: int, group: int,
                 rank: int) -> QuantizedWeight:
        w = (stats.compensate(weight) if stats is not None else weight.detach()).to(torch.float64)
        codes, params = self._quantize(w, stats, bits, group)
        a = b = None
        if rank > 0 and self.correction != "none":
            if self.correction == "alternate":
                for _ in range(self.rounds):
                    factors = self._correction_factors(w - self._dequant(codes, params, group), stats, "alternate")
                    a, b = factors.truncate(rank, torch.float64)
                    codes, params = self._quantize(w - a @ b, stats, bits, group)
            factors = self._correction_factors(w - self._dequant(codes, params, group), stats, self.correction)
            a, b = factors.truncate(rank, torch.float64)
        stored = GroupParams(params.scales.to(weight.dtype), params.zeros.to(weight.dtype))
        if a is None:
            approx = self._dequant(codes, stored, group)
            return QuantizedWeight(codes, stored, None, None, output_error(w - approx, w, stats))
        if self.correction_int8:
            (a8, a_scale), (b8, b_scale) = int8_rows(a), int8_rows(b)
            a_used, b_used = a8.double() * a_scale[:, None], b8.double() * b_scale[:, None]
            approx = self._dequant(codes, stored, group) + a_used @ b_used
            return QuantizedWeight(codes, stored, a8, b8, output_error(w - approx, w, stats),
                                   a_scale.to(weight.dtype), b_scale.to(weight.dtype))
        a, b = a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()
        approx = self._dequant(codes, stored, group) + a.double() @ b.double()
        return QuantizedWeight(codes, stored, a, b, output_error(w - approx, w, stats))

    def _quantize(self, w: torch.Tensor, stats: LayerStats | None, bits: int, group: int):
        if self.quantizer == "gptq":
            return gptq(w, stats, bits, group, self.symmetric, act_order=self.act_order)
        return rtn(w, bits, group, self.symmetric)

    @staticmethod
    def _dequant(codes: torch.Tensor, params: GroupParams, group: int) -> torch.Tensor:
        return dequantize(codes, GroupParams(params.scales.double(), params.zeros.double()), group, torch.float64)

    @staticmethod
    def _correction_factors(delta: torch.Tensor, stats: LayerStats | None, correction: str) -> LowRankFactors:
        if stats is None:  # alternate without data: plain SVD of the error
            return factorize_matrix(delta, "svd")
        method = CORRECTION_METHOD.get(correction, "whitened")
        return factorize_matrix(delta, method, stats, alpha=1.0)

    def _rewrite(self, program: Program, uses: list[fx.Node], origin: str, result: QuantizedWeight, bits: int,
                 group: int, rank: int, hints: dict) -> None:
        node = uses[0]
        in_f = program.tensor(node.args[1]).shape[1]
        kept = (Constraint("quantized", self.name, f"int{bits} group {group}" + (f" rank {rank}" if rank else "")),)
        with program.graph.inserting_before(node):  # made once, before the first use
            packed = program.add_weight(f"{origin}_q{bits}", pack(result.codes, bits), origin, self.name,
                                        f"int{bits} codes, packed", kept)
            scales = program.add_weight(f"{origin}_scales", result.params.scales, origin, self.name,
                                        f"scales, group {group}", kept)
            zeros = program.add_weight(f"{origin}_zeros", result.params.zeros, origin, self.name,
                                       f"zero points, group {group}", kept)
            a = b = a_scale = b_scale = None
            if result.a is not None:
                a = program.add_weight(f"{origin}_A", result.a, origin, self.name, f"correction A, rank {rank}", kept)
                b = program.add_weight(f"{origin}_B", result.b, origin, self.name, f"correction B, rank {rank}", kept)
            if result.a_scale is not None:
                a_scale = program.add_weight(f"{origin}_A_scale", result.a_scale, origin, self.name, "int8 scales", kept)
                b_scale = program.add_weight(f"{origin}_B_scale", result.b_scale, origin, self.name, "int8 scales", kept)
        note = {"bits": bits, "group": group, "rank": rank if a is not None else 0,
                "pred_err": round(result.rel_error, 4)}

        def build(use: fx.Node) -> fx.Node:
            bias = use.args[2] if len(use.args) > 2 else None
            return program.graph.call_function(QUANT_LINEAR, quant_linear_args(
                use.args[0], packed, scales, zeros, a=a, b=b, a_scale=a_scale, b_scale=b_scale, bias=bias, bits=bits,
                group=group, in_features=in_f))

        replace_each(program, uses, build, note)


def output_error(error: torch.Tensor, weight: torch.Tensor, stats: LayerStats | None,
                 energy: float | None = None) -> float:
    """||X Eᵀ|| / ||X Wᵀ|| on the calibration data, or ||E|| / ||W|| without it. ``energy``: ||X Wᵀ||², where the
    caller scores many errors of one weight (it costs as much as the error's own term)."""
    if stats is None:
        return float(error.norm() / weight.norm().clamp_min(1e-30))
    energy = quadratic(weight, stats.gram) if energy is None else energy
    return (max(quadratic(error, stats.gram), 0.0) / max(energy, 1e-30)) ** 0.5


def quant_candidates(program: Program, node: fx.Node, stats=None, profile=None, bits=(2, 3, 4, 8),
                     groups=(32, 64, 128), ranks=(0, 8, 16, 32), correction: str = "eora") -> list[QuantCandidate]:
    """Every (bits, group, rank) option of one linear layer with predicted error, latency and bytes.

    One round-to-nearest quantization per (bits, group) and one SVD of its error give the exact output error of
    every correction rank, as factorize's candidates do."""
    weight = program.tensor(node.args[1]).detach().to(torch.float64)
    out_f, in_f = weight.shape
    origin = program.weights[node.args[1].target].origin
    layer_stats = stats.get(origin, in_f) if stats is not None else None
    hints, x = size_hints(program.graph), node.args[0]
    itemsize, dtype = x.meta["val"].element_size(), dtype_name(x)
    options = []
    energy = quadratic(weight, layer_stats.gram) if layer_stats is not None else None
    for b in bits:
        for g in groups:
            if in_f % g:
                continue
            codes, params = rtn(weight, b, g, symmetric=False)
            delta = weight - QuantLowRank._dequant(codes, params, g)
            factors = QuantLowRank._correction_factors(delta, layer_stats, correction)
            scale = output_error(delta, weight, layer_stats, energy)  # the uncorrected error, relative to W
            for r in ranks:
                if r >= min(out_f, in_f):
                    continue
                error = scale * (factors.rel_error(r) if r else 1.0)
                stored = -(-in_f // 8) * b * out_f + 2 * (in_f // g) * out_f * itemsize + r * (out_f + in_f) * itemsize
                seconds = None
                if profile is not None:
                    rows = numel(shape(x)[:-1])
                    seconds = concrete(latency(quant_linear(rows, out_f, in_f, b, g, r, itemsize, dtype), profile), hints)
                options.append(QuantCandidate(b, g, correction, r, error, seconds, stored))
    return options
