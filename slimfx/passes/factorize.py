"""``factorize``: replace linear layers by a low-rank pair and convs by two thinner convs.

A linear W[out, in] becomes ``slimfx.lowrank_linear(x, V[r, in], U[out, r], b)``; a k×k conv becomes a k×k conv
to r channels plus a 1×1 conv (``conv=channel``) or a k×1 conv plus a 1×k conv (``conv=spatial``). Grouped and
depthwise convs are skipped with a note. The rank comes from ``keep`` (fraction of the layer's parameters),
``rank``, ``energy`` (fraction of output energy kept) or a per-layer ``plan``, and is rounded to the profile's
rank multiple. A layer is only rewritten if the result is smaller, and, given a profile, predicted faster.
``factor_bits=8`` (or a planned ``(rank, 8)``) stores a linear layer's two factors as int8 codes with a scale per
row: two ``slimfx.quant_linear`` ops, a quarter of the factors' bytes, at the error of both approximations.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.fx as fx

from ..errors import PipelineError
from ..hw_profiles.cost_model import conv2d as conv_kernels
from ..codegen.lowrank import MAX_RANK
from ..hw_profiles.cost_model import dense_linear, latency, lowrank_linear
from ..hw_profiles.op_costs import concrete, dtype_name, numel, shape, size_hints
from ..ir.op_table import DENSE_LAYERS
from ..ir.ops import LOWRANK_LINEAR, QUANT_LINEAR, quant_linear_args
from ..ir.quant_format import pack
from ..ir.program import CONV2D, LINEAR, Constraint, Program
from ..progress import progress
from .base import Pass, PassContext, claim_uses, first_use_of_each_weight, register, replace_each
from .calibration import require_stats
from .lowrank import LowRankFactors, factorize_matrix, spatial_factors
from .quant_lowrank import output_error
from .quantizers import quantize_factors


@dataclass
class Candidate:
    """One option for the planner: a rank with its predicted output error, latency and size."""

    rank: int
    rel_error: float
    latency_s: float | None
    params: int


@register
@dataclass
class Factorize(Pass):
    name = "factorize"
    summary = "low-rank factorization of linear and conv layers (activation-whitened by default)"

    method: Literal["whitened", "svd", "asvd"] = "whitened"
    keep: Optional[float] = None
    rank: Optional[int] = None
    energy: Optional[float] = None
    conv: Literal["channel", "spatial", "none"] = "channel"
    alpha: float = 0.5
    damp: float = 1e-6
    exclude: str = ""  # regex on weight names, e.g. "head|embed"
    factor_bits: Optional[int] = None  # 8: a linear layer's factors stored as int8 codes, a scale per row
    plan: Optional[dict] = None  # weight origin -> rank or (rank, factor bits), from the planner: only these layers

    def validate(self) -> None:
        given = [k for k in ("keep", "rank", "energy", "plan") if getattr(self, k) is not None]
        if len(given) > 1:
            raise PipelineError(f"factorize: give one of keep, rank, energy or plan, not {' and '.join(given)}")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise self.invalid("keep", "must be in (0, 1]: the fraction of each layer's parameters to keep")
        if self.rank is not None and self.rank < 1:
            raise self.invalid("rank", "must be >= 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise self.invalid("energy", "must be in (0, 1]: the fraction of output energy to keep")
        if not 0 < self.alpha <= 1:
            raise self.invalid("alpha", "must be in (0, 1]")
        if self.factor_bits not in (None, 8):
            raise self.invalid("factor_bits", "must be 8 (int8 factors, a scale per row) or left out (float factors)")
        for origin, planned in (self.plan or {}).items():
            if not isinstance(planned, int) and not (isinstance(planned, tuple) and len(planned) == 2
                                                     and planned[1] in (None, 8)):
                raise PipelineError(f"factorize: plan gives {origin} {planned!r}; a planned layer takes a rank, or "
                                    "(rank, factor bits) with factor bits 8 or None")
        self.check_regex("exclude")

    # -- choosing ----------------------------------------------------------------------------------------------
    def choose_rank(self, origin: str, factors: LowRankFactors, out_f: int, in_f: int, multiple: int) -> int:
        if self.plan is not None:
            rank = self.planned(origin)[0]
            if rank >= min(out_f, in_f):
                raise PipelineError(f"factorize: plan gives rank {rank} to {origin}, which is {out_f}x{in_f}: "
                                    f"the rank must be below {min(out_f, in_f)} to shrink it")
            return rank
        if self.rank is not None:
            return self.rank
        if self.energy is not None:
            rank = factors.rank_for_energy(self.energy)
        else:
            keep = 0.5 if self.keep is None else self.keep
            rank = int(keep * out_f * in_f / (out_f + in_f))
        if multiple > 1 and rank >= multiple:
            rank = max(multiple, round(rank / multiple) * multiple)
        return rank

    def planned(self, origin: str) -> tuple[int, Optional[int]]:
        """(rank, factor bits) the plan gives this layer."""
        planned = self.plan[origin]
        return planned if isinstance(planned, tuple) else (planned, self.factor_bits)

    @property
    def per_layer_statistics(self) -> bool:
        return self.method != "svd"

    def run(self, program: Program, ctx: PassContext) -> Counter:
        counts: Counter = Counter()
        stats = require_stats(program, ctx, self.method != "svd", f"factorize{{method={self.method}}}", "method=svd")
        multiple = ctx.profile.rank_multiple if ctx.profile is not None else 1
        hints = size_hints(program.graph)
        layers = first_use_of_each_weight(program, DENSE_LAYERS)  # decided once for all the layers reading it
        for node in progress(layers, "factorize layers"):
            target = node.args[1].target
            origin = program.weights[target].origin
            if (self.exclude and re.search(self.exclude, origin)) or (self.plan is not None and origin not in self.plan):
                continue
            if program.weights[target].derived_by == self.name:
                continue  # already one half of a factorized pair
            uses = claim_uses(self.name, program, node, ("nm-mask", "quantized"), ctx, counts)
            if uses is None:
                continue
            outcome = self._rewrite(program, uses, origin, stats, multiple, hints, ctx)
            counts[outcome] += 1
            if outcome.startswith("skipped"):
                ctx.skip(self.name, origin, outcome.removeprefix("skipped-"))
        if ctx.scope is None:  # (calibrating block by block, the whole run is checked once at its end)
            self.check_counts(counts)
        program.graph.eliminate_dead_code()
        program.drop_unused_weights()
        return counts

    def check_counts(self, counts: Counter) -> None:
        rewritten = ("linear", "linear-int-factors", "conv-channel", "conv-spatial")
        if self.rank is not None and not any(k in counts for k in rewritten) and counts.get("skipped-rank-too-large"):
            raise PipelineError(f"factorize: rank={self.rank} is >= min(out, in) of every layer, so nothing can "
                                "shrink; use a smaller rank, or keep= for a per-layer fraction")

    # -- rewriting ---------------------------------------------------------------------------------------------
    def _rewrite(self, program: Program, uses: list[fx.Node], origin: str, stats, multiple: int, hints: dict,
                 ctx: PassContext) -> str:
        node = uses[0]
        weight = program.tensor(node.args[1])
        is_conv = node.target == CONV2D
        if is_conv and any(use.args[6] != 1 for use in uses):
            return "skipped-grouped-conv"
        if is_conv and self.conv == "none":
            return "skipped-conv"
        spatial = is_conv and self.conv == "spatial" and weight.shape[2] > 1 and weight.shape[3] > 1
        if spatial:
            factors, _ = spatial_factors(weight)
            rows, cols = factors.a.shape[0], factors.b.shape[1]
        else:
            matrix = weight.reshape(weight.shape[0], -1)
            layer_stats = stats.get(origin, matrix.shape[1]) if stats is not None else None
            if self.method != "svd" and layer_stats is None:
                return "skipped-no-calibration-statistics"
            # the planner's decomposition of this weight on these statistics, if it made one: not a second SVD
            key = (origin, matrix.data_ptr(), matrix.shape[1], self.method)
            factors = ctx.cache.get("decompositions", {}).get(key) if layer_stats is not None and \
                layer_stats.cross is None and (self.alpha, self.damp) == (Factorize.alpha, Factorize.damp) else None
            if layer_stats is not None and layer_stats.cross is not None:  # sequential: fit to the compressed
                matrix = layer_stats.compensate(matrix)  # model's inputs, against the original's outputs
            if factors is None:
                factors = factorize_matrix(matrix, self.method, layer_stats, self.alpha, self.damp)
            rows, cols = matrix.shape
        rank = self.choose_rank(origin, factors, rows, cols, multiple)
        if rank < 1:
            return "skipped-rank-zero"
        if rank >= min(rows, cols) or rank * (rows + cols) >= rows * cols:
            return "skipped-rank-too-large"
        if ctx.profile is not None and self.plan is None:  # a planned rank was priced already: it is not overridden
            dense_s, factored_s = self._latencies(node, rank, spatial, ctx.profile, hints)
            if factored_s >= dense_s:
                return "skipped-slower-on-profile"
        bits = self.planned(origin)[1] if self.plan is not None else self.factor_bits
        if bits is not None and not is_conv:
            return self._rewrite_int(program, uses, origin, factors, rank, bits, matrix, layer_stats, ctx)
        a, b = factors.truncate(rank, weight.dtype)
        note = {"rank": rank, "pred_err": round(factors.rel_error(rank), 4)}
        ctx.layer_errors[origin] = factors.rel_error(rank)
        factorized = (Constraint("factorized", self.name, f"rank {rank}"),)
        with program.graph.inserting_before(node):  # the factors are made once, before the first use
            if not is_conv:
                first = program.add_weight(f"{origin}_V", b, origin, self.name, f"V of rank {rank}", factorized)
                second = program.add_weight(f"{origin}_U", a, origin, self.name, f"U of rank {rank}", factorized)
            else:
                first_w, second_w = self._conv_weights(a, b, rank, spatial, weight.shape)
                first = program.add_weight(f"{origin}_first", first_w, origin, self.name, f"rank {rank}, first conv",
                                           factorized)
                second = program.add_weight(f"{origin}_second", second_w, origin, self.name,
                                            f"rank {rank}, second conv", factorized)

        def build(use: fx.Node) -> fx.Node:
            if is_conv:
                return self._conv_pair(program, use, first, second, spatial)
            bias = use.args[2] if len(use.args) > 2 else None
            return program.graph.call_function(LOWRANK_LINEAR, (use.args[0], first, second, bias))

        replace_each(program, uses, build, note)
        if not is_conv:
            return "linear"
        return "conv-spatial" if spatial else "conv-channel"

    def _rewrite_int(self, program: Program, uses: list[fx.Node], origin: str, factors: LowRankFactors, rank: int,
                     bits: int, matrix: torch.Tensor, layer_stats, ctx: PassContext) -> str:
        """The pair as two quant_linear ops on int codes: x → V (rank outputs) → U (+ bias)."""
        quantized = quantize_factors(*factors.truncate(rank, torch.float64), bits)
        error = output_error(quantized.dense() - matrix.detach().to(torch.float64), matrix, layer_stats)
        ctx.layer_errors[origin] = error
        dtype = program.tensor(uses[0].args[1]).dtype  # the layer's (the compensated matrix is at least float32)
        kept = (Constraint("factorized", self.name, f"rank {rank}"),
                Constraint("quantized", self.name, f"int{bits} factors, a scale per row"))
        with program.graph.inserting_before(uses[0]):  # made once, before the first use
            stored = [[program.add_weight(f"{origin}_{name}_q{bits}", pack(codes, bits), origin, self.name,
                                          f"{name} of rank {rank}, int{bits} codes", kept),
                       program.add_weight(f"{origin}_{name}_scales", params.scales.to(dtype), origin, self.name,
                                          f"{name}'s scale per row", kept),
                       program.add_weight(f"{origin}_{name}_zeros", params.zeros.to(dtype), origin, self.name,
                                          f"{name}'s zero points", kept), codes.shape[1]]
                      for name, (codes, params) in (("V", quantized.v), ("U", quantized.u))]

        def build(use: fx.Node) -> fx.Node:
            bias = use.args[2] if len(use.args) > 2 else None
            (v, v_scales, v_zeros, v_width), (u, u_scales, u_zeros, u_width) = stored
            mid = program.graph.call_function(QUANT_LINEAR, quant_linear_args(
                use.args[0], v, v_scales, v_zeros, bits=bits, group=v_width, in_features=v_width))
            return program.graph.call_function(QUANT_LINEAR, quant_linear_args(
                mid, u, u_scales, u_zeros, bias=bias, bits=bits, group=u_width, in_features=u_width))

        replace_each(program, uses, build, {"rank": rank, "factor_bits": bits, "pred_err": round(error, 4)})
        return "linear-int-factors"

    @staticmethod
    def _conv_weights(a: torch.Tensor, b: torch.Tensor, rank: int, spatial: bool,
                      wshape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        cout, cin, kh, kw = wshape
        if spatial:  # a: [(cin, kh), r] -> vertical kh×1 filters; b: [r, (cout, kw)] -> horizontal 1×kw filters
            return (a.T.reshape(rank, cin, kh, 1).contiguous(),
                    b.reshape(rank, cout, kw).permute(1, 0, 2).reshape(cout, rank, 1, kw).contiguous())
        return b.reshape(rank, cin, kh, kw), a.reshape(cout, rank, 1, 1)  # k×k conv to r channels, then 1×1

    @staticmethod
    def _conv_pair(program: Program, node: fx.Node, w1: fx.Node, w2: fx.Node, spatial: bool) -> fx.Node:
        x, _, bias, stride, padding, dilation, _ = node.args
        if spatial:
            first_args = ([stride[0], 1], [padding[0], 0], [dilation[0], 1])
            second_args = ([1, stride[1]], [0, padding[1]], [1, dilation[1]])
        else:
            first_args = (stride, padding, dilation)
            second_args = ([1, 1], [0, 0], [1, 1])
        mid = program.graph.call_function(CONV2D, (x, w1, None, *first_args, 1))
        return program.graph.call_function(CONV2D, (mid, w2, bias, *second_args, 1))

    @staticmethod
    def _latencies(node: fx.Node, rank: int, spatial: bool, profile, hints: dict) -> tuple[float, float]:
        x = node.args[0]
        dtype, size = dtype_name(x), x.meta["val"].element_size()
        if node.target == LINEAR:
            out_f, in_f = shape(node.args[1])
            rows = numel(shape(x)[:-1])
            dense = latency(dense_linear(rows, out_f, in_f, size, dtype), profile)
            fused = profile.device == "cuda" and rank <= MAX_RANK  # what `lower` will run it as there
            factored = latency(lowrank_linear(rows, out_f, in_f, rank, size, dtype, fused=fused), profile)
        else:
            batch, cin, h_in, w_in = shape(x)
            cout, _, kh, kw = shape(node.args[1])
            _, _, h_out, w_out = shape(node)
            dense = latency(conv_kernels(batch, cin, cout, h_out, w_out, kh, kw, h_in, w_in, 1, size, dtype), profile)
            if spatial:
                first = conv_kernels(batch, cin, rank, h_out, w_in, kh, 1, h_in, w_in, 1, size, dtype)
                second = conv_kernels(batch, rank, cout, h_out, w_out, 1, kw, h_out, w_in, 1, size, dtype)
            else:
                first = conv_kernels(batch, cin, rank, h_out, w_out, kh, kw, h_in, w_in, 1, size, dtype)
                second = conv_kernels(batch, rank, cout, h_out, w_out, 1, 1, h_out, w_out, 1, size, dtype)
            factored = latency(first + second, profile)
        return concrete(dense, hints), concrete(factored, hints)


def layer_candidates(program: Program, node: fx.Node, method: str, stats=None, profile=None,
                     ranks: list[int] | None = None) -> list[Candidate]:
    """Every rank option of one linear layer with (predicted error, predicted latency): one SVD for all of them."""
    weight = program.tensor(node.args[1])
    matrix = weight.reshape(weight.shape[0], -1)
    origin = program.weights[node.args[1].target].origin
    layer_stats = stats.get(origin, matrix.shape[1]) if stats is not None else None
    factors = factorize_matrix(matrix, method, layer_stats)
    out_f, in_f = matrix.shape
    hints = size_hints(program.graph)
    options = []
    for rank in ranks or range(1, min(out_f, in_f)):
        seconds = None
        if profile is not None:
            seconds = Factorize._latencies(node, rank, False, profile, hints)[1]
        options.append(Candidate(rank, factors.rel_error(rank), seconds, rank * (out_f + in_f)))
    return options


