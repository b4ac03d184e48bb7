"""``int8-dynamic``: linear layers in int8 on both sides (W8A8, as in LLM.int8 without its outlier split, or
torchao's dynamic-activation int8): weights per output channel once, each input row on every call (symmetric, by
its absolute maximum). Where the target multiplies int8 faster than float (an int8 GEMM with VNNI, AMX or tensor
cores) the layer gets faster, not just smaller; the cost model prices that at the profile's int8 rate, and a layer
is left dense where the target would run it slower.

Predicted error (``predicted_error``, the planner's option error too; relative to the layer's output on the
calibration data): the
weights' rounding exactly, ||X ΔWᵀ||, plus a bound on the inputs' rounding: a row's step is at most its norm/127,
so the rounding adds at most tr(XᵀX)·||W||²/(12·127²) to the squared error (an upper bound: rows with outliers come
close to it, evenly spread rows stay far below).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ..hw_profiles.cost_model import dense_linear, int8_linear, latency
from ..hw_profiles.op_costs import concrete, dtype_name, numel, shape, size_hints
from ..ir.ops import INT8_LINEAR
from ..ir.program import LINEAR, Constraint, Program
from .base import Pass, PassContext, claimed_layers, register, replace_each
from .calibration import LayerStats, require_stats
from .lowrank import quadratic


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, scales in the weight's dtype): symmetric per output channel, by each row's absolute maximum."""
    scales = weight.detach().abs().amax(1).clamp_min(1e-12) / 127
    codes = torch.round(weight.detach() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales.to(weight.dtype)


def predicted_error(weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, stats: LayerStats | None,
                    energy: float | None = None) -> float:
    """Weights' rounding exactly plus the bound on the inputs' (module docstring); ||ΔW||/||W|| without data.
    ``energy``: ||X Wᵀ||², where the caller has it already."""
    w = weight.detach().double()
    delta = codes.double() * scales.double()[:, None] - w
    if stats is None:
        return float(delta.norm() / w.norm().clamp_min(1e-30))
    energy = max(quadratic(w, stats.gram) if energy is None else energy, 1e-30)
    inputs = float(stats.gram.diagonal().sum()) * float(w.pow(2).sum()) / (12 * 127**2)
    return math.sqrt((max(quadratic(delta, stats.gram), 0.0) + inputs) / energy)


def layer_latencies(node: fx.Node, profile, hints: dict) -> tuple[float, float]:
    """(dense, W8A8) seconds of one linear on the profile, W8A8 as ``lower`` can run it there: an int8 GEMM on a
    CPU, a float GEMM on the integer levels elsewhere (no int8 kernel is registered for CUDA yet)."""
    x, (out_f, in_f) = node.args[0], shape(node.args[1])
    rows, itemsize, dtype = numel(shape(x)[:-1]), x.meta["val"].element_size(), dtype_name(x)
    dense = latency(dense_linear(rows, out_f, in_f, itemsize, dtype), profile)
    int8 = latency(int8_linear(rows, out_f, in_f, itemsize, dtype, int_mm=profile.device == "cpu"), profile)
    return concrete(dense, hints), concrete(int8, hints)


@register
@dataclass
class Int8Dynamic(Pass):
    name = "int8-dynamic"
    summary = "linears in int8 weights x int8 inputs quantized per row on each call (W8A8), where the target's int8 GEMM pays"

    exclude: str = ""  # regex on weight names to leave in float, e.g. "lm_head"
    plan: Optional[list] = None  # weight origins the planner chose for int8: only these, and not re-priced

    def validate(self) -> None:
        self.check_regex("exclude")
        if self.plan is not None and not isinstance(self.plan, (list, tuple, set)):
            raise self.invalid("plan", "is the planner's list of layers (compress(..., budget=...)); to choose "
                                       "layers in a pipeline, use exclude=")

    def run(self, program: Program, ctx: PassContext) -> Counter:
        counts: Counter = Counter()
        stats = require_stats(program, ctx, False, "int8-dynamic", "")
        hints = size_hints(program.graph)
        for node, origin, uses in claimed_layers(self, program, ctx, counts, (LINEAR,),
                                                 ("nm-mask", "quantized", "factorized")):
            if ctx.profile is not None and self.plan is None:  # a planned choice was priced already
                dense_s, int8_s = layer_latencies(node, ctx.profile, hints)
                if int8_s >= dense_s:
                    counts["skipped-slower-on-profile"] += 1
                    ctx.skip(self.name, origin, f"int8 is not faster on {ctx.profile.name} ({int8_s * 1e6:.1f} us "
                                                f"against {dense_s * 1e6:.1f} us dense)")
                    continue
            weight = program.tensor(node.args[1])
            codes, scales = quantize_rows(weight)
            layer_stats = stats.get(origin, weight.shape[1]) if stats is not None else None
            error = predicted_error(weight, codes, scales, layer_stats)
            ctx.layer_errors[origin] = error
            kept = (Constraint("quantized", self.name, "int8 per channel, inputs int8 per row"),)
            with program.graph.inserting_before(node):  # made once, before the first use
                codes_node = program.add_weight(f"{origin}_int8", codes, origin, self.name, "int8 codes", kept)
                scales_node = program.add_weight(f"{origin}_int8_scales", scales, origin, self.name,
                                                 "per-channel scales", kept)

            def build(use: fx.Node) -> fx.Node:
                bias = use.args[2] if len(use.args) > 2 else None
                return program.graph.call_function(INT8_LINEAR, (use.args[0], codes_node, scales_node, bias))

            replace_each(program, uses, build, {"int8": "W8A8", "pred_err": round(error, 4)})
            counts["linear"] += 1
        program.graph.eliminate_dead_code()
        program.drop_unused_weights()
        return counts
