"""``depth-merge``: merge two consecutive layers with nothing nonlinear between them into one. Exact.

- linear → linear: W = W₂W₁, b = W₂b₁ + b₂, also through reshapes, transposes and permutes that keep the last
  dimension's rows whole (they commute with a linear layer, and are replayed on the merged layer's input);
- conv → conv: the composite kernel is the full convolution of the two (k₁ + k₂ − 1 wide), b = ΣW₂·b₁ + b₂.
  Exact when the first conv has stride 1 and dilation 1, the second has dilation 1 and no padding (a padded border
  of the intermediate is zero, which no conv of the input reproduces), both are ungrouped, and, if the first
  has a bias, the second has no padding either. A 1×1 conv before or after a k×k conv is the common case.

A chain is merged only when the merged layer is smaller in multiply-adds (64→16→64 through a 1×1 bottleneck is
not: merging would raise FLOPs). Every chain considered is reported with what was done, or why not.
With ``latency=`` (a fraction of the dense latency) the pass also removes activations, lossily, where the merges
that this allows pay most for the least error: the two-stage DP of Kim et al. (2023), in ``depth_shrink``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.fx as fx

from ..hw_profiles.cost_model import conv2d, dense_linear, latency
from ..hw_profiles.op_costs import concrete, dtype_name, node_kernels, numel, shape, size_hints
from ..ir.fake_prop import refresh_metadata
from ..ir.program import CONV2D, LINEAR, Program
from .base import Pass, PassContext, register
from .depth_spans import add_merged_layer, compose, single_use_weight, ungrouped


def _bias(program: Program, layer: fx.Node, index: int) -> torch.Tensor | None | bool:
    """The layer's bias as a tensor, None if it has none, False if it is not a constant weight."""
    node = layer.args[index] if len(layer.args) > index else None
    if node is None:
        return None
    return program.tensor(node).detach().double() if program.is_weight(node) else False


aten = torch.ops.aten
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_SHAPE_OPS = {*_RESHAPES, aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.flatten.using_ints}


def _keeps_rows(node: fx.Node) -> bool:
    """Whether a shape op keeps every row of the last dimension whole and in place, so a linear layer commutes
    with it: linear(op(x)) = op'(linear(x)), where op' is op with the last size changed."""
    x, out = node.args[0].meta["val"], node.meta["val"]
    last = x.dim() - 1
    if node.target in _RESHAPES:
        return isinstance(out.shape[-1], int) and out.shape[-1] == x.shape[-1] and node.args[1][-1] in (-1, x.shape[-1])
    if node.target == aten.transpose.int:
        return last not in {d % x.dim() for d in node.args[1:3]}
    if node.target == aten.permute.default:
        return node.args[1][-1] % x.dim() == last
    if node.target == aten.unsqueeze.default:
        return node.args[1] % out.dim() != out.dim() - 1
    end = node.args[2] if len(node.args) > 2 else -1  # flatten(start, end)
    return end % x.dim() != last


def _shape_ops_before(second: fx.Node) -> list[fx.Node]:
    """Shape ops that commute with a linear layer between ``second`` and what feeds it, nearest first."""
    ops, source = [], second.args[0]
    while isinstance(source, fx.Node) and source.op == "call_function" and source.target in _SHAPE_OPS \
            and len(source.users) == 1 and _keeps_rows(source):
        ops.append(source)
        source = source.args[0]
    return ops


def _replay(program: Program, ops: list[fx.Node], x: fx.Node, width: int) -> fx.Node:
    """Apply the shape ops (nearest-first list) to ``x``, whose last dimension is ``width``."""
    for op in reversed(ops):
        args = list(op.args)
        args[0] = x
        target = op.target
        if target in _RESHAPES:  # x may not be contiguous where the original view's input was
            target = aten.reshape.default
            if args[1][-1] != -1:
                args[1] = [*args[1][:-1], width]
        x = program.graph.call_function(target, tuple(args))
    return x


def _chain(program: Program, second: fx.Node, skip: int = 0) -> fx.Node | str | None:
    """The first layer of a mergeable chain ending at ``second``; a reason if it is a chain that cannot merge.
    ``skip`` shape ops between them are stepped over."""
    first = second.args[0]
    for _ in range(skip):
        first = first.args[0]
    if not isinstance(first, fx.Node) or first.op != "call_function" or first.target != second.target:
        return None
    if len(first.users) != 1:
        return "the intermediate is used elsewhere"
    if not (single_use_weight(program, first.args[1]) and single_use_weight(program, second.args[1])):
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


Merged = tuple  # (the replacement node, the other node it absorbs, or a list of them to erase in order)


def merge_linear(program: Program, second: fx.Node, profile=None) -> Merged | str | None:
    shape_ops = _shape_ops_before(second)
    first = _chain(program, second, len(shape_ops))
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
    weight, bias = compose("linear", w1, b1, w2, b2)
    x = _replay(program, shape_ops, first.args[0], k)
    return add_merged_layer(program, [first, second], weight, bias, lambda w, b: (x, w, b)), [*shape_ops, first]


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
    w1 = ungrouped(program.tensor(first.args[1]).detach().double(), groups1)  # a depthwise conv included
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
    composite, bias = compose("conv", w1, b1, w2, b2)
    return add_merged_layer(program, [first, second], composite, bias,
                    lambda w, b: (first.args[0], w, b, list(stride2), list(pad1), [1, 1], 1)), first


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
    channels = torch.arange(cout, device=weight.device)
    identity[channels, channels, kh // 2, kw // 2] = 1
    origin = program.weights[conv.args[1].target].origin
    new_weight = program.add_weight(f"{origin}_residual", weight + identity, origin, "depth-merge",
                                    "residual identity folded in (centred delta kernel)")
    args = list(conv.args)
    args[1] = new_weight
    return program.graph.call_function(CONV2D, tuple(args)), conv


MERGES = {LINEAR: merge_linear, CONV2D: merge_conv, torch.ops.aten.add.Tensor: fold_residual}


@register
@dataclass
class DepthMerge(Pass):
    name = "depth-merge"
    summary = ("merge consecutive linear or conv layers with nothing nonlinear between them; with latency=, also "
               "remove the activations whose removal pays most (lossy, two-stage DP)")

    latency: Optional[float] = None  # a fraction of the dense latency; None: exact merges only
    steps: int = 300  # distillation steps after removing activations
    lr: float = 3e-3
    tables: Literal["profile", "measure"] = "profile"  # where the latency of each merged run comes from

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return self.latency is None

    def validate(self) -> None:
        if self.latency is not None and not 0 < self.latency <= 1:
            raise self.invalid("latency", "must be in (0, 1]: the target latency as a fraction of the dense model's")
        if self.steps < 0:
            raise self.invalid("steps", "must be >= 0 (0: no distillation)")
        if not self.lr > 0:
            raise self.invalid("lr", "must be > 0")

    def run(self, program: Program, ctx: PassContext) -> Counter:
        counts: Counter = Counter()
        if self.latency is not None:
            self._shrink(program, ctx, counts)
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
                for dead in absorbed if isinstance(absorbed, list) else [absorbed]:
                    program.graph.erase_node(dead)
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

    def _shrink(self, program: Program, ctx: PassContext, counts: Counter) -> None:
        from .depth_shrink import DepthShrink

        shrink = DepthShrink(program, ctx, self.tables)
        plan = shrink.plan(self.latency)
        rest = shrink.total_s - shrink.dense_chain_s
        ctx.note(f"depth-merge: planned {(rest + plan.latency_s) / shrink.total_s:.3f}x dense latency on "
                 f"{shrink.target} "
                 f"(budget {self.latency:g}x), predicted output error {plan.error ** 0.5:.4f} before distillation")
        shrink.apply(plan, self.steps, self.lr, counts)
