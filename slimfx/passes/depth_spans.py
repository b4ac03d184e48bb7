"""Chains of layers that depth merging may shorten, found with networkx, and the arithmetic of merging a run.

A chain is a path of layers of one kind (conv2d, or linear) in which each layer feeds the next directly or
through one activation, and nothing else reads the values in between. A branch (an output read twice, as at a
residual's fork) or a join (an add) cuts a chain, so every chain is a straight line of the data-flow graph and
any of its boundaries may be cut. Boundary b sits before layer b; ``activations[b]`` is the activation there.

A run of layers merges into one. Convs merge when only the last is strided and none is dilated; the padding of
the run is moved to its first conv (the merged conv pads the input once, by the sum). Where a later conv of the
run pads, that move changes the border, so a lossy merge measures it, and an exact merge refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..hw_profiles.cost_model import Kernel, conv2d, dense_linear
from ..hw_profiles.op_costs import dtype_name, node_kernels, numel, shape
from ..ir.op_table import ACTIVATIONS, op_name
from ..ir.program import CONV2D, LINEAR, Program


@dataclass
class Chain:
    layers: list[fx.Node]  # n layers of one kind, in order
    activations: list[fx.Node | None]  # n + 1 entries: the activation at each boundary (0 and n: none)


def single_use_weight(program: Program, node) -> bool:
    """A constant weight that only this one layer reads (so merging may replace it)."""
    return program.is_weight(node) and len(node.users) == 1


def _is_layer(program: Program, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in (CONV2D, LINEAR) or len(node.args) < 2:
        return False
    weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else None
    return single_use_weight(program, weight) and weight.meta["val"].is_floating_point() \
        and (bias is None or single_use_weight(program, bias))


def find_chains(program: Program) -> list[Chain]:
    """Every chain of two or more layers, in graph order."""
    flow = nx.DiGraph()
    for node in program.graph.nodes:
        is_act = op_name(node) in ACTIVATIONS
        if is_act or _is_layer(program, node):
            flow.add_node(node, layer=not is_act)
    for node in list(flow.nodes):
        source = node.args[0]
        if source not in flow or len(source.users) != 1:
            continue
        src_layer, dst_layer = flow.nodes[source]["layer"], flow.nodes[node]["layer"]
        if src_layer and not dst_layer:  # layer -> activation
            flow.add_edge(source, node)
        elif dst_layer and (source.args[0].target if not src_layer else source.target) == node.target:
            flow.add_edge(source, node)  # layer -> layer, or activation -> layer, of one kind
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    chains = []
    for component in nx.weakly_connected_components(flow):
        path = list(nx.topological_sort(flow.subgraph(component)))
        layers = [n for n in path if flow.nodes[n]["layer"]]
        if len(layers) < 2:
            continue
        activations: list[fx.Node | None] = [None] * (len(layers) + 1)
        for node in path:
            if not flow.nodes[node]["layer"] and node.args[0] in layers[:-1]:  # between two layers
                activations[layers.index(node.args[0]) + 1] = node
        chains.append(Chain(layers, activations))
    return sorted(chains, key=lambda c: order[c.layers[0]])


# -- one run of layers as one layer -----------------------------------------------------------------------------

def run_mergeable(run: list[fx.Node]) -> str | None:
    """Why this run cannot become one layer, or None."""
    if run[0].target == LINEAR or len(run) == 1:
        return None
    for conv in run:
        if list(conv.args[5]) != [1, 1]:
            return "a conv is dilated"
    if any(list(conv.args[3]) != [1, 1] for conv in run[:-1]):
        return "a conv before the last is strided"
    return None


def moved_padding(run: list[fx.Node]) -> dict[fx.Node, list[int]]:
    """The padding each conv of a run gets when the run's padding moves to its first conv (empty if none moves)."""
    if run[0].target != CONV2D or not any(any(c.args[4]) for c in run[1:]):
        return {}
    total = [sum(c.args[4][d] for c in run) for d in (0, 1)]
    return {conv: (total if conv is run[0] else [0, 0]) for conv in run}


def ungrouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's weight [out, in/groups, kh, kw] as the dense [out, in, kh, kw] it equals (block-diagonal)."""
    if groups == 1:
        return weight
    out_c, in_per, kh, kw = weight.shape
    dense = weight.new_zeros(out_c, in_per * groups, kh, kw)
    out_per = out_c // groups
    for g in range(groups):
        dense[g * out_per : (g + 1) * out_per, g * in_per : (g + 1) * in_per] = weight[g * out_per : (g + 1) * out_per]
    return dense


def compose(kind: str, w1: torch.Tensor, b1, w2: torch.Tensor, b2):
    """Weight and bias of layer 2 applied after layer 1 (None for no bias); convs as a full convolution."""
    if kind == "linear":
        weight = w2 @ w1
        summed = w2 @ b1 if b1 is not None else None
    else:  # treat w1 as a batch of cin images with mid channels and convolve it with the flipped w2
        k2h, k2w = w2.shape[2:]
        weight = F.conv2d(w1.permute(1, 0, 2, 3), w2.flip(2, 3), padding=(k2h - 1, k2w - 1)).permute(1, 0, 2, 3)
        summed = w2.sum((2, 3)) @ b1 if b1 is not None else None
    if summed is None:
        return weight, b2
    return weight, summed + b2 if b2 is not None else summed


def merged_weights(program: Program, run: list[fx.Node]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The run's composite weight and bias, in float64."""
    def weight(layer):
        w = program.tensor(layer.args[1]).detach().double()
        return ungrouped(w, layer.args[6]) if layer.target == CONV2D else w

    def bias(layer):
        node = layer.args[2] if len(layer.args) > 2 else None
        return program.tensor(node).detach().double() if node is not None else None

    kind = "conv" if run[0].target == CONV2D else "linear"
    w, b = weight(run[0]), bias(run[0])
    for layer in run[1:]:
        w, b = compose(kind, w, b, weight(layer), bias(layer))
    return w, b


def merged_args(run: list[fx.Node], weight: fx.Node, bias: fx.Node | None) -> tuple:
    """The merged layer's arguments: the run's input, stride of its last conv, padding moved to the front."""
    first, last = run[0], run[-1]
    if first.target == LINEAR:
        return (first.args[0], weight, bias)
    padding = [sum(c.args[4][d] for c in run) for d in (0, 1)]
    return (first.args[0], weight, bias, list(last.args[3]), padding, [1, 1], 1)


def _numel(node: fx.Node) -> int:
    return node.meta["val"].numel()


def merged_numel(run: list[fx.Node]) -> int:
    """Elements of the weight the run merges into (a grouped first conv counts as the dense conv it becomes)."""
    first, last = run[0], run[-1]
    out_f, in_f = last.args[1].meta["val"].shape[0], first.args[1].meta["val"].shape[1] * (
        first.args[6] if first.target == CONV2D else 1)
    kh = kw = 1
    if first.target == CONV2D:
        kh = sum(c.args[1].meta["val"].shape[2] - 1 for c in run) + 1
        kw = sum(c.args[1].meta["val"].shape[3] - 1 for c in run) + 1
    return out_f * in_f * kh * kw


def grows(run: list[fx.Node]) -> bool:
    """Whether the merged layer would hold more weights than the run does (an expand 1×1 and a depthwise conv
    become a dense conv): the pass must not make the model bigger."""
    return len(run) > 1 and merged_numel(run) > sum(_numel(layer.args[1]) for layer in run)


def add_merged_layer(program: Program, run: list[fx.Node], weight: torch.Tensor, bias, build) -> fx.Node:
    """A new layer (of the run's kind, at the insert point) with the merged weight and bias in the dtype of the
    last layer's weight; ``build(weight_node, bias_node)`` gives its arguments."""
    last = run[-1]
    like = program.tensor(last.args[1])
    origin = program.weights[last.args[1].target].origin
    note = "merged with " + ", ".join(program.weights[layer.args[1].target].origin for layer in run[:-1])
    w = program.add_weight(f"{origin}_merged", weight.to(like.dtype), origin, "depth-merge", note)
    b = None
    if bias is not None:
        b = program.add_weight(f"{origin}_merged_bias", bias.to(like.dtype), origin, "depth-merge",
                               note)
    return program.graph.call_function(last.target, build(w, b))


def merged_kernels(run: list[fx.Node]) -> list[Kernel]:
    """What the merged layer launches, for the cost model (a single layer: its own kernels)."""
    if len(run) == 1:
        return node_kernels(run[0])
    first, last = run[0], run[-1]
    x = first.args[0]
    itemsize, dtype = x.meta["val"].element_size(), dtype_name(x)
    if first.target == LINEAR:
        n, k = shape(last.args[1])[0], shape(first.args[1])[1]
        return dense_linear(numel(shape(x)[:-1]), n, k, itemsize, dtype)
    batch, cin, h_in, w_in = shape(x)
    _, cout, h_out, w_out = shape(last)
    kh = sum(shape(c.args[1])[2] - 1 for c in run) + 1
    kw = sum(shape(c.args[1])[3] - 1 for c in run) + 1
    return conv2d(batch, cin, cout, h_out, w_out, kh, kw, h_in, w_in, 1, itemsize, dtype)
