"""Epilogues: the pointwise ops after a compressed layer that its kernel applies before the one store.

An epilogue is a short sequence of steps, in order, read off the graph (``find_epilogue``):

| step | graph | kernel |
|---|---|---|
| ``relu``, ``gelu``, ``gelu_tanh``, ``silu`` | the activation of the layer's output | on the accumulator |
| ``add`` | ``y + r``, ``r`` of y's shape (a residual) | loads r's tile |
| ``mul`` | ``y * g``, ``g`` of y's shape (SwiGLU's gate) | loads g's tile |
| ``scale=s`` | ``y * s`` for a number s | multiplies |

Its text form (``"silu,mul"``, ``"add,scale=0.5"``) is part of the kernel's name and of its cache key, and is the
string argument of the kernel ops. ``apply`` is the reference; ``render`` writes the Triton lines.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..ir.op_table import op_name

ACTIVATION_STEPS = ("relu", "gelu", "gelu_tanh", "silu")


@dataclass(frozen=True)
class Epilogue:
    steps: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Epilogue":
        steps = tuple(s for s in text.split(",") if s)
        for step in steps:
            if step not in ACTIVATION_STEPS + ("add", "mul") and not step.startswith("scale="):
                raise ValueError(f"unknown epilogue step {step!r}; steps are {', '.join(ACTIVATION_STEPS)}, add, mul, "
                                 "scale=<number>")
        return cls(steps)

    def __str__(self) -> str:
        return ",".join(self.steps)

    @property
    def extras(self) -> int:
        """How many tensors it reads besides the accumulator."""
        return sum(step in ("add", "mul") for step in self.steps)

    def apply(self, y: torch.Tensor, extras: list[torch.Tensor]) -> torch.Tensor:
        """The reference, in the order of the graph it came from."""
        loaded = iter(extras)
        for step in self.steps:
            if step == "relu":
                y = torch.relu(y)
            elif step == "gelu":
                y = F.gelu(y)
            elif step == "gelu_tanh":
                y = F.gelu(y, approximate="tanh")
            elif step == "silu":
                y = F.silu(y)
            elif step == "add":
                y = y + next(loaded)
            elif step == "mul":
                y = y * next(loaded)
            else:
                y = y * float(step.split("=", 1)[1])
        return y

    def render(self, indent: str = "") -> str:
        """Triton lines transforming the fp32 tile ``acc`` (rows ``rm``, columns ``rn``, in-bounds ``mask``);
        extra tensor i is ``E{i}`` with strides ``se{i}m``, ``se{i}n``."""
        lines, extra = [], 0
        for step in self.steps:
            if step == "relu":
                lines.append("acc = tl.maximum(acc, 0.0)")
            elif step == "gelu":
                lines.append("acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))")
            elif step == "gelu_tanh":
                lines.append("inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)")
                lines.append("acc = 0.5 * acc * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))")  # tanh, no overflow
            elif step == "silu":
                lines.append("acc = acc * tl.sigmoid(acc)")
            elif step in ("add", "mul"):
                load = (f"tl.load(E{extra} + rm[:, None] * se{extra}m + rn[None, :] * se{extra}n, mask=mask, "
                        "other=0.0).to(tl.float32)")
                lines.append(f"acc = acc {'+' if step == 'add' else '*'} {load}")
                extra += 1
            else:
                lines.append(f"acc = acc * {float(step.split('=', 1)[1])!r}")
        return "\n".join(indent + line for line in lines) if lines else indent + "pass"


_ACTIVATION_OPS = {"relu": "relu", "silu": "silu"}


def _step(node: fx.Node, value: fx.Node) -> tuple[str, fx.Node | None] | None:
    """The epilogue step that ``node`` applies to ``value`` (and the tensor it reads), or None."""
    name = op_name(node)
    if name in _ACTIVATION_OPS and node.args[0] is value:
        return _ACTIVATION_OPS[name], None
    if name == "gelu" and node.args[0] is value:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return ("gelu_tanh" if approximate == "tanh" else "gelu"), None
    if name in ("add", "mul") and len(node.args) == 2 and not node.kwargs:
        other = node.args[1] if node.args[0] is value else node.args[0] if node.args[1] is value else None
        if other is None or other is value:
            return None
        if isinstance(other, (int, float)) and name == "mul":
            return f"scale={float(other)!r}", None
        if isinstance(other, fx.Node) and _same_tile(other, value):
            return name, other
    return None


def _same_tile(other: fx.Node, value: fx.Node) -> bool:
    a, b = other.meta.get("val"), value.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
        and a.shape == b.shape and a.device == b.device


def find_epilogue(layer: fx.Node, limit: int = 64) -> tuple[Epilogue, list[fx.Node], list[fx.Node]]:
    """The pointwise ops (at most ``limit``) that follow ``layer`` one after another, each the only user of the one
    before: the epilogue, the tensors it reads, and its nodes in order."""
    steps, extras, chain, last = [], [], [], layer
    while len(last.users) == 1 and len(chain) < limit:
        user = next(iter(last.users))
        step = _step(user, last)
        if step is None or (step[1] is not None and _depends_on(step[1], layer)):
            break
        steps.append(step[0])
        if step[1] is not None:
            extras.append(step[1])
        chain.append(user)
        last = user
    return Epilogue(tuple(steps)), extras, chain


def _depends_on(node: fx.Node, layer: fx.Node, limit: int = 2000) -> bool:
    """Whether ``node`` is computed from ``layer`` (then it cannot be an input of the layer's fused kernel)."""
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        current = stack.pop()
        if current is layer:
            return True
        if current in seen:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return len(seen) >= limit
