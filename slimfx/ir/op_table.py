"""One table of the ops that carry weights: which arguments are weights, and what a layer's input rows are.

Passes, the statistics collector and the cost model read this table instead of each naming linear and conv.
HF's ``Conv1D`` is a linear after canonicalization; the compressed ops carry their weights too, so statistics are
collected for them and a later pass can read them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from .ops import INT8_LINEAR, LOWRANK_LINEAR, NM_LINEAR, QUANT_LINEAR
from .program import CONV2D, LINEAR


# Elementwise activations, by aten op name: depth-merge may remove them, nm's permutation passes through them.
ACTIVATIONS = frozenset({"relu", "relu_", "gelu", "silu", "silu_", "hardswish", "hardswish_", "hardtanh",
                         "hardtanh_", "leaky_relu", "elu", "mish", "sigmoid", "tanh"})


def op_name(node: fx.Node) -> str:
    """An aten op's name without overload ("relu" for aten.relu.default); "" for anything else."""
    target = node.target
    return target._opname if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) else ""


def _feature_rows(node: fx.Node, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _patch_rows(node: fx.Node, x: torch.Tensor) -> torch.Tensor | None:
    weight_shape = node.args[1].meta["val"].shape
    _, _, stride, padding, dilation, groups = node.args[1:7]
    if groups != 1:
        return None  # each group reads its own channels: no one row space
    patches = F.unfold(x, tuple(weight_shape[2:]), dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@dataclass(frozen=True)
class WeightedOp:
    name: str
    target: object
    weights: tuple[int, ...]  # argument positions that hold weights (the first is the one a layer is named by)
    bias: int | None
    rows: Callable[[fx.Node, torch.Tensor], torch.Tensor | None]  # the input as rows of the reduced dimension
    dense: bool  # a dense weight a lossy pass may rewrite (the compressed forms are its results)


WEIGHTED_OPS = {op.target: op for op in (
    WeightedOp("linear", LINEAR, (1,), 2, _feature_rows, dense=True),
    WeightedOp("conv2d", CONV2D, (1,), 2, _patch_rows, dense=True),
    WeightedOp("lowrank_linear", LOWRANK_LINEAR, (1, 2), 3, _feature_rows, dense=False),
    WeightedOp("nm_linear", NM_LINEAR, (1, 2), 3, _feature_rows, dense=False),
    WeightedOp("quant_linear", QUANT_LINEAR, (1, 2, 3, 4, 5, 6, 7), 8, _feature_rows, dense=False),
    WeightedOp("int8_linear", INT8_LINEAR, (1, 2), 3, _feature_rows, dense=False),
)}
DENSE_LAYERS = tuple(t for t, op in WEIGHTED_OPS.items() if op.dense)


def weighted_op(node: fx.Node) -> WeightedOp | None:
    return WEIGHTED_OPS.get(node.target) if node.op == "call_function" else None
