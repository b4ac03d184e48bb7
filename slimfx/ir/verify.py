"""``verify(program)``: check the IR rules written in ``README.md``. Runs after capture and after every pass.

Each failure names its rule (``[V3]``) so a pass author can find the contract they broke.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from ..errors import VerificationError
from .program import BATCH_NORM, CONV2D, LINEAR, Program, fetch_attr


def _fail(rule: str, message: str, node: fx.Node | None = None) -> None:
    where = f" (node %{node.name})" if node is not None else ""
    raise VerificationError(f"[{rule}] {message}{where}")


def _shape(node: object) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def verify(program: Program) -> None:
    graph = program.graph
    try:
        graph.lint()
    except Exception as exc:  # noqa: BLE001
        _fail("V1", f"graph is malformed: {exc}")

    for target in program.weights:  # V2: the weight table and the module agree
        try:
            value = fetch_attr(program.gm, target)
        except AttributeError:
            _fail("V2", f"weight {target!r} is in the weight table but not on the module")
        if not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor):
            _fail("V2", f"weight {target!r} must be a real tensor, got {type(value).__name__}")

    _check_devices(program)
    placeholders = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            placeholders += 1
            if node.meta.get("slimfx_weight_placeholder") and node.users:
                _fail("V4", "a weight placeholder still has users; weights must be read through get_attr", node)
        if node.op == "get_attr":
            value = fetch_attr(program.gm, node.target)
            if isinstance(value, torch.Tensor) and node.target not in program.weights:
                _fail("V2", f"tensor attribute {node.target!r} is not in the weight table", node)
        if node.op in ("call_function", "call_method", "get_attr", "placeholder") and "val" not in node.meta:
            _fail("V3", "node has no meta['val'] (run refresh_metadata after rewriting)", node)
        if node.op == "call_function":
            _check_canonical(program, node)

    if program.keep_signature and placeholders != len(program.example_args):
        _fail("V6", f"graph has {placeholders} inputs but its calling convention has {len(program.example_args)}")


def _check_devices(program: Program) -> None:
    """V7: a weight a pass made lives on a device the model's own weights live on (never a default device)."""
    own = {fetch_attr(program.gm, t).device for t, info in program.weights.items() if info.derived_by is None}
    for target, info in program.weights.items():
        device = fetch_attr(program.gm, target).device
        if info.derived_by is not None and own and device not in own:
            _fail("V7", f"weight {target!r} made by {info.derived_by} is on {device}, but the model's weights are on "
                        f"{', '.join(sorted(map(str, own)))}: create new tensors with device= of the tensor they replace")


def _check_canonical(program: Program, node: fx.Node) -> None:
    """V5: canonical ops carry exactly the arguments and shapes the passes rely on."""
    if node.target == LINEAR:
        x, w, *rest = node.args
        ws, xs = _shape(w), _shape(x)
        if ws is None or len(ws) != 2:
            _fail("V5", f"linear weight must be 2-D, got {ws}", node)
        if xs is not None and len(xs) and _static(xs[-1]) and xs[-1] != ws[1]:
            _fail("V5", f"linear input features {xs[-1]} != weight in-features {ws[1]}", node)
        bias = rest[0] if rest else None
        if bias is not None and _shape(bias) != (ws[0],):
            _fail("V5", f"linear bias shape {_shape(bias)} != ({ws[0]},)", node)
    elif node.target == CONV2D:
        if len(node.args) != 7 or node.kwargs:
            _fail("V5", "conv2d must have its 7 arguments positional (x, w, b, stride, padding, dilation, groups)", node)
        if _shape(node.args[1]) is None or len(_shape(node.args[1])) != 4:
            _fail("V5", "conv2d weight must be 4-D", node)
    elif node.target == BATCH_NORM and (len(node.args) != 9 or node.kwargs):
        _fail("V5", "batch_norm must have its 9 arguments positional", node)


def _static(size: object) -> bool:
    return isinstance(size, int)
