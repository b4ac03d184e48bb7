"""``depth-merge``: merge two consecutive layers with nothing nonlinear between them into one. Exact.

- linear → linear: W = W₂W₁, b = W₂b₁ + b₂;
- conv → conv: the composite kernel is the full convolution of the two (k₁ + k₂ − 1 wide), b = ΣW₂·b₁ + b₂.
  Exact when the first conv has stride 1 and dilation 1, the second has dilation 1 and no padding (a padded border
  of the intermediate is zero, which no conv of the input reproduces), both are ungrouped, and, if the first
  has a bias, the second has no padding either. A 1×1 conv before or after a k×k conv is the common case.

A chain is merged only when the merged layer is smaller in multiply-adds (64→16→64 through a 1×1 bottleneck is
not: merging would raise FLOPs). Every chain considered is reported with what was done, or why not.
Activation removal (the two-stage DP of Kim et al., 2023) is not part of this pass yet.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..hw_profiles.cost_model import conv2d, dense_linear, latency
from ..hw_profiles.op_costs import concrete, dtype_name, node_kernels, numel, shape, size_hints
from ..ir.fake_prop import refresh_metadata
from ..ir.program import CONV2D, LINEAR, Program
from .base import Pass, PassContext, register


def _single_weight_use(program: Program, layer: fx.Node) -> bool:
    return program.is_weight(layer.args[1]) and len(layer.args[1].users) == 1


def _bias(program: Program, layer: fx.Node, index: int) -> torch.Tensor | None | bool:
    """The layer's bias as a tensor, None if it has none, False if it is not a constant weight."""
    node = layer.args[index] if len(layer.args) > index else None
    if node is None:
        return None
    return program.tensor(node).detach().double() if program.is_weight(node) else False


def _chain(program: Program, second: fx.Node) -> fx.Node | str | None:
    """The first layer of a mergeable chain ending at ``second``; a reason if it is a chain that cannot merge."""
    first = second.args[0]
    if not isinstance(first, fx.Node) or first.op != "call_function" or first.target != second.target:
        return None
    if len(first.users) != 1:
        return "the intermediate is used elsewhere"
    if not (_single_weight_use(program, first) and _single_weight_use(program, second)):
        return "a weight is shared or not constant"
    return first


def _slower_on(profile, first: fx.Node, second: fx.Node, merged: list) -> str | None:
    """With a profile, the merge must also be predicted faster there (a merge can raise FLOPs on a target whose
    small layers are launch- or memory-bound the other way round)."""
    if profile is None:
        return None
    hints = size_hints(first.graph)
    separate = concrete(latency(node_kernels(first) + node_kernels(second), profile), hints)
    together = concrete(latency(merged, profile), hints)
    if together >= separate:
        return f"predicted slower on {profile.name} ({together * 1e6:.1f} us vs {separate * 1e6:.1f} us)"
    return None


Merged = tuple  # (the replacement node, the other node it absorbs)


def merge_linear(program: Program, second: fx.Node, profile=None) -> Merged | str | None:
    first = _chain(program, second)
    if not isinstance(first, fx.Node):
        return first
    w1, w2 = program.tensor(first.args[1]).detach().double(), program.tensor(second.args[1]).detach().double()
    b1, b2 = _bias(program, first, 2), _bias(program, second, 2)
    if b1 is False or b2 is False:
        return "a bias is not a constant weight"
    (mid, k), n = w1.shape, w2.shape[0]
    if n * k >= mid * (n + k):
        return f"merging {k}->{mid}->{n} would not reduce multiply-adds ({n * k} vs {mid * (n + k)} per row)"
    x = first.args[0]
    slower = profile is not None and _slower_on(profile, first, second, dense_linear(
        numel(shape(x)[:-1]), n, k, x.meta["val"].element_size(), dtype_name(x)))
    if slower:
        return slower
    weight = w2 @ w1
    bias = (w2 @ b1 if b1 is not None else 0) + (b2 if b2 is not None else 0)
    return _replace(program, first, second, weight, bias if (b1 is not None or b2 is not None) else None,
                    lambda w, b: (first.args[0], w, b)), first


def merge_conv(program: Program, second: fx.Node, profile=None) -> Merged | str | None:
    first = _chain(program, second)
    if not isinstance(first, fx.Node):
        return first
    _, _, _, stride1, pad1, dil1, groups1 = first.args
    _, _, _, stride2, pad2, dil2, groups2 = second.args
    if groups2 != 1:
        return "the second conv is grouped: the merged conv would not be one grouped conv"
    if list(stride1) != [1, 1] or list(dil1) != [1, 1] or list(dil2) != [1, 1]:
        return "the first conv is strided or either is dilated"
    if any(pad2):
        return "the second conv pads the intermediate with zeros, which is not zero-equivalent after merging"
    w1 = _ungrouped(program.tensor(first.args[1]).detach().double(), groups1)  # a depthwise conv included
    w2 = program.tensor(second.args[1]).detach().double()
    b1, b2 = _bias(program, first, 2), _bias(program, second, 2)
    if b1 is False or b2 is False:
        return "a bias is not a constant weight"
    (mid, cin, k1h, k1w), (cout, _, k2h, k2w) = w1.shape, w2.shape
    kh, kw = k1h + k2h - 1, k1w + k2w - 1
    s = stride2[0] * stride2[1]
    first_params = mid * (cin // groups1) * k1h * k1w  # what the first conv really costs (depthwise: cin/groups)
    separate = first_params * s + cout * mid * k2h * k2w  # multiply-adds per output position of the second conv
    merged = cout * cin * kh * kw
    if merged >= separate or merged > first_params + cout * mid * k2h * k2w:
        return (f"merging would not reduce multiply-adds and size ({merged} vs {separate} per output "
                f"position: {cin}->{mid}->{cout}, kernels {k1h}x{k1w} then {k2h}x{k2w})")
    if profile is not None:
        x = first.args[0]
        batch, _, h_in, w_in = shape(x)
        _, _, h_out, w_out = shape(second)
        slower = _slower_on(profile, first, second, conv2d(batch, cin, cout, h_out, w_out, kh, kw, h_in, w_in, 1,
                                                           x.meta["val"].element_size(), dtype_name(x)))
        if slower:
            return slower
    # full convolution of the kernels: treat w1 as a batch of cin images with mid channels
    composite = F.conv2d(w1.permute(1, 0, 2, 3), w2.flip(2, 3), padding=(k2h - 1, k2w - 1)).permute(1, 0, 2, 3)
    bias = None
    if b1 is not None or b2 is not None:
        bias = (w2.sum((2, 3)) @ b1 if b1 is not None else 0) + (b2 if b2 is not None else 0)
    return _replace(program, first, second, composite, bias,
                    lambda w, b: (first.args[0], w, b, list(stride2), list(pad1), [1, 1], 1)), first


def _ungrouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's weight [out, in/groups, kh, kw] as the dense [out, in, kh, kw] it equals (block-diagonal)."""
    if groups == 1:
        return weight
    out_c, in_per, kh, kw = weight.shape
    dense = weight.new_zeros(out_c, in_per * groups, kh, kw)
    out_per = out_c // groups
    for g in range(groups):
        dense[g * out_per : (g + 1) * out_per, g * in_per : (g + 1) * in_per] = weight[g * out_per : (g + 1) * out_per]
    return dense


def fold_residual(program: Program, add: fx.Node, profile=None) -> Merged | str | None:
    """conv(x) + x -> conv'(x) with W' = W + a centred identity kernel: one op fewer, the same multiply-adds."""
    if len(add.args) != 2 or add.kwargs:
        return None
    for conv, skip in (add.args, add.args[::-1]):
        if isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target == CONV2D and conv.args[0] is skip:
            break
    else:
        return None
    _, _, _, stride, padding, dilation, groups = conv.args
    weight = program.tensor(conv.args[1]) if program.is_weight(conv.args[1]) else None
    if weight is None or len(conv.users) != 1 or len(conv.args[1].users) != 1:
        return "the conv's output or weight is used elsewhere"
    cout, cin_per, kh, kw = weight.shape
    if groups != 1 or cout != cin_per or list(stride) != [1, 1] or list(dilation) != [1, 1] \
            or kh % 2 == 0 or kw % 2 == 0 or list(padding) != [kh // 2, kw // 2]:
        return "the residual's shape differs from the conv's output, or the conv is strided, dilated or grouped"
    identity = torch.zeros_like(weight)
    identity[torch.arange(cout), torch.arange(cout), kh // 2, kw // 2] = 1
    origin = program.weights[conv.args[1].target].origin
    new_weight = program.add_weight(f"{origin}_residual", weight + identity, origin, "depth-merge",
                                    "residual identity folded in (centred delta kernel)")
    args = list(conv.args)
    args[1] = new_weight
    return program.graph.call_function(CONV2D, tuple(args)), conv


def _replace(program: Program, first: fx.Node, second: fx.Node, weight: torch.Tensor, bias, build) -> fx.Node:
    like = program.tensor(second.args[1])
    origin = program.weights[second.args[1].target].origin
    first_origin = program.weights[first.args[1].target].origin
    note = f"merged with {first_origin}"
    w = program.add_weight(f"{origin}_merged", weight.to(like.dtype), origin, "depth-merge", note)
    b = None
    if bias is not None:
        b = program.add_weight(f"{origin}_merged_bias", torch.as_tensor(bias).to(like.dtype), origin, "depth-merge",
                               note)
    return program.graph.call_function(second.target, build(w, b))


MERGES = {LINEAR: merge_linear, CONV2D: merge_conv, torch.ops.aten.add.Tensor: fold_residual}


@register
@dataclass
class DepthMerge(Pass):
    name = "depth-merge"
    summary = "merge consecutive linear or conv layers with nothing nonlinear between them (exact merges only)"
    exact = True

    def run(self, program: Program, ctx: PassContext) -> Counter:
        counts: Counter = Counter()
        refused: dict[str, str] = {}  # layer -> why, as of the last sweep
        changed = True
        while changed:  # a merged layer may merge again with the next one
            changed = False
            for node in list(program.graph.nodes):
                if node.graph is not program.graph or node.op != "call_function" or node.target not in MERGES:
                    continue
                with program.graph.inserting_before(node):
                    outcome = MERGES[node.target](program, node, ctx.profile)
                if outcome is None:
                    continue
                weight = node.args[1] if node.target != torch.ops.aten.add.Tensor else None
                origin = program.weights[weight.target].origin if program.is_weight(weight) else node.name
                if isinstance(outcome, str):
                    refused[origin] = outcome
                    continue
                refused.pop(origin, None)
                replacement, absorbed = outcome
                node.replace_all_uses_with(replacement)
                program.graph.erase_node(node)
                program.graph.erase_node(absorbed)
                kind = {LINEAR: "linear", CONV2D: "conv"}.get(node.target, "residual")
                counts[kind] += 1
                info = program.weights[replacement.args[1].target]
                ctx.note(f"depth-merge: {info.origin}: {info.note}")
                changed = True
                break  # the merged layer has no shapes yet: re-derive them, then sweep again
            if changed:
                program.gm.recompile()
                refresh_metadata(program)
        for origin, reason in refused.items():
            counts["refused"] += 1
            ctx.skip(self.name, origin, reason)
        program.graph.eliminate_dead_code()
        program.drop_unused_weights()
        return counts
