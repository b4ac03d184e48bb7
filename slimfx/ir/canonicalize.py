"""Rewrite the many spellings of linear, conv and inference BatchNorm into one canonical ATen form.

Passes then match exactly three targets (``aten.linear``, ``aten.conv2d``, ``aten.batch_norm``) whatever the
front end (Dynamo's torch-level graph or export's ATen graph) or the model's coding style produced:
``F.linear``, ``addmm(b, x, W.t())``, ``x @ W.T``, HF's ``Conv1D`` (``addmm(b, x, W)`` with W stored in×out),
``F.conv2d`` with int or tuple arguments, ``F.batch_norm(training=False)`` and export's
``_native_batch_norm_legit_no_training``. Anything else is left as it is.
"""
from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .matcher import Matcher, rule
from .program import BATCH_NORM, CONV2D, LINEAR, Program

aten = torch.ops.aten
CF, CM = "call_function", "call_method"


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pair(value: Any) -> list[int] | None:
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return list(value)
    return None  # symbolic or string padding ("same"): leave the op alone


def _transposed_weight(program: Program, node: Any) -> fx.Node | None:
    """If ``node`` is W.t() (any spelling) of a 2-D weight W, return W."""
    if not isinstance(node, fx.Node):
        return None
    src = node.args[0] if node.args else None
    is_t = (
        (node.op == CF and node.target in (torch.t, aten.t.default, aten.numpy_T.default, torch.Tensor.t))
        or (node.op == CM and node.target == "t")
        or (node.op == CF and node.target is getattr and node.args[1:] == ("T",))
        or (node.op == CF and node.target == aten.permute.default and list(node.args[1]) == [1, 0])
        or (node.op in (CF, CM) and node.target in (aten.transpose.int, torch.transpose, "transpose")
            and sorted(x % 2 for x in node.args[1:3]) == [0, 1])
    )
    if is_t and program.is_weight(src) and program.tensor(src).dim() == 2:
        return src
    return None


def _linear_from_matmul(program: Program, x: fx.Node, rhs: Any, bias: Any) -> fx.Node | None:
    """x @ W.t() (+ b) -> linear(x, W, b); x @ W (+ b) with W stored in×out -> linear(x, W.T, b)."""
    weight = _transposed_weight(program, rhs)
    if weight is None and program.is_weight(rhs) and program.tensor(rhs).dim() == 2:
        dense = program.tensor(rhs)
        info = program.weights[rhs.target]
        weight = program.add_weight(f"{rhs.target}_T", dense.t(), info.origin, "canonicalize",
                                    "transposed view (no copy)", view=True)
        program.weights[weight.target].kind = info.kind
    if weight is None:
        return None
    if bias is not None and not (isinstance(bias, fx.Node) and _ndim(bias) == 1):
        return None
    return program.graph.call_function(LINEAR, (x, weight, bias))


def _ndim(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


@rule("linear", CF, F.linear)
def _linear(node: fx.Node, program: Program) -> fx.Node:
    x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    return program.graph.call_function(LINEAR, (x, w, b))


@rule("linear-from-matmul", CF, operator.matmul, torch.matmul, aten.matmul.default, aten.mm.default)
def _matmul(node: fx.Node, program: Program) -> fx.Node | None:
    if node.kwargs or _ndim(node.args[0]) is None:
        return None
    return _linear_from_matmul(program, node.args[0], node.args[1], None)


@rule("linear-from-addmm", CF, torch.addmm, aten.addmm.default)
def _addmm(node: fx.Node, program: Program) -> fx.Node | None:
    if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or len(node.args) != 3:
        return None
    bias, x, rhs = node.args
    return _linear_from_matmul(program, x, rhs, bias)


@rule("conv2d", CF, torch.conv2d)
def _conv2d(node: fx.Node, program: Program) -> fx.Node | None:
    stride = _pair(_arg(node, 3, "stride", 1))
    padding = _pair(_arg(node, 4, "padding", 0))
    dilation = _pair(_arg(node, 5, "dilation", 1))
    groups = _arg(node, 6, "groups", 1)
    if None in (stride, padding, dilation) or not isinstance(groups, int):
        return None
    x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    return program.graph.call_function(CONV2D, (x, w, b, stride, padding, dilation, groups))


@rule("conv2d-normalize-args", CF, aten.conv2d.default)
def _conv2d_args(node: fx.Node, program: Program) -> fx.Node | None:
    if len(node.args) == 7 and not node.kwargs:
        return None  # already canonical
    return _conv2d.fn(node, program)


@rule("batch-norm", CF, F.batch_norm)
def _batch_norm(node: fx.Node, program: Program) -> fx.Node | None:
    if _arg(node, 5, "training", False) is not False:
        return None  # training-mode BN uses batch statistics: not foldable, leave it
    x, mean, var = _arg(node, 0, "input"), _arg(node, 1, "running_mean"), _arg(node, 2, "running_var")
    w, b = _arg(node, 3, "weight"), _arg(node, 4, "bias")
    momentum, eps = _arg(node, 6, "momentum", 0.1), _arg(node, 7, "eps", 1e-5)
    return program.graph.call_function(BATCH_NORM, (x, w, b, mean, var, False, momentum, eps, False))


@rule("batch-norm-from-native", CF, operator.getitem)
def _native_bn(node: fx.Node, program: Program) -> fx.Node | None:
    src, index = node.args
    if index != 0 or not isinstance(src, fx.Node) or src.target != aten._native_batch_norm_legit_no_training.default:
        return None
    x, w, b, mean, var, momentum, eps = src.args
    return program.graph.call_function(BATCH_NORM, (x, w, b, mean, var, False, momentum, eps, False))


CANONICAL_RULES = Matcher([_linear, _matmul, _addmm, _conv2d, _conv2d_args, _batch_norm, _native_bn])


def canonicalize(program: Program) -> Counter:
    """Apply the canonical-form rules once; returns match counts per rule."""
    from .fake_prop import refresh_metadata

    counts = CANONICAL_RULES.rewrite(program)
    program.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or n.is_impure())
    program.drop_unused_weights()
    program.gm.recompile()
    refresh_metadata(program)
    return counts
