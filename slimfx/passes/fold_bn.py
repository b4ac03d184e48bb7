"""``fold-bn``: fold inference BatchNorm into the conv or linear that feeds it. Exact up to rounding.

BN(y) = (y - mean) * g / sqrt(var + eps) + beta, per output channel, so scaling W's output channels by
s = g / sqrt(var + eps) and setting b' = (b - mean) * s + beta gives the same result with one op fewer.
Declines (leaving BN in place) when the producer's output has other users, the BN normalizes a dimension
other than the producer's output channels, or any statistic is not a constant weight.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ir.matcher import Matcher, rule
from ..ir.program import BATCH_NORM, CONV2D, LINEAR, Program
from .base import Pass, PassContext, register


def _constant(program: Program, node: object, default: torch.Tensor) -> torch.Tensor | None:
    if node is None:
        return default
    return program.tensor(node).double() if program.is_weight(node) else None


@rule("conv-bn", "call_function", BATCH_NORM)
def fold_into_producer(bn: fx.Node, program: Program) -> fx.Node | None:
    producer, gamma, beta, mean, var, training, _momentum, eps, _cudnn = bn.args
    if training or not isinstance(producer, fx.Node) or producer.target not in (CONV2D, LINEAR):
        return None
    if len(producer.users) != 1 or not program.is_weight(producer.args[1]):
        return None
    if producer.target == LINEAR and producer.meta["val"].dim() != 2:
        return None  # BatchNorm1d on (N, C, L) normalizes dim 1, not the linear's output features
    weight = program.tensor(producer.args[1])
    channels = weight.shape[0]
    bias_node = producer.args[2] if len(producer.args) > 2 else None
    zeros = torch.zeros(channels, dtype=torch.float64, device=weight.device)  # defaults live with the weight
    ones = torch.ones_like(zeros)
    stats = [_constant(program, n, d) for n, d in ((gamma, ones), (beta, zeros), (mean, None), (var, None))]
    bias = _constant(program, bias_node, zeros)
    if any(s is None for s in stats) or bias is None:
        return None
    g, b, mu, v = stats
    scale = g / torch.sqrt(v + eps)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    new_weight = (weight.double() * scale.reshape(shape)).to(weight.dtype)
    new_bias = ((bias - mu) * scale + b).to(weight.dtype)
    origin = program.weights[producer.args[1].target].origin
    bn_origin = program.weights[mean.target].origin.rsplit(".", 1)[0]
    w_node = program.add_weight(f"{origin}_folded", new_weight, origin, "fold-bn", f"folded with {bn_origin}")
    b_node = program.add_weight(f"{origin}_folded_bias", new_bias, origin.rsplit(".", 1)[0] + ".bias", "fold-bn",
                                f"folded with {bn_origin}")
    args = list(producer.args)
    args[1] = w_node
    if len(args) > 2:
        args[2] = b_node
    else:
        args.append(b_node)
    return program.graph.call_function(producer.target, tuple(args))


FOLD_BN = Matcher([fold_into_producer])


@register
@dataclass
class FoldBatchNorm(Pass):
    name = "fold-bn"
    summary = "fold inference BatchNorm into the preceding conv/linear"
    exact = True

    def run(self, program: Program, ctx: PassContext) -> Counter:
        counts = FOLD_BN.rewrite(program)
        program.graph.eliminate_dead_code()
        program.drop_unused_weights()
        return counts
