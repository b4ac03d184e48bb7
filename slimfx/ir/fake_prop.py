"""Recompute ``node.meta["val"]`` (fake tensors, possibly with symbolic sizes) after a rewrite.

Passes only build graph structure; shapes and dtypes are re-derived here in one place so they can never drift.
Placeholders keep the fake values the front end gave them (Dynamo's or export's, symbolic sizes included), so
a graph captured with dynamic shapes stays symbolic through every pass.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ..errors import ShapePropagationError, one_line
from .program import is_input_guard

if TYPE_CHECKING:
    from .program import Program


def fake_mode_of(program: "Program") -> FakeTensorMode | None:
    cached = program.gm.meta.get("slimfx_fake_mode")
    if cached is not None:
        return cached
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, FakeTensor):
            program.gm.meta["slimfx_fake_mode"] = val.fake_mode
            return val.fake_mode
    return None


class _FakeInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode):
        super().__init__(gm, garbage_collect_values=True)
        self.mode = mode
        self._fakes: dict[int, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            return n.meta["val"]
        if is_input_guard(n):
            return None  # export's input guard module: a check, not a value
        try:
            result = super().run_node(n)
        except Exception as exc:  # noqa: BLE001 - named by op, so the user knows what to report or rewrite
            raise ShapePropagationError(
                f"shape propagation failed at %{n.name} ({n.target}): {type(exc).__name__}: {one_line(exc)}"
            ) from exc
        if n.op != "output":
            n.meta["val"] = result
        return result

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        real = super().get_attr(target, args, kwargs)
        if not isinstance(real, torch.Tensor) or isinstance(real, FakeTensor):
            return real
        key = id(real)
        if key not in self._fakes:
            self._fakes[key] = self.mode.from_tensor(real, static_shapes=True)
        return self._fakes[key]


def size_one_stays_dynamic() -> Any:
    """Export specializes sizes of 1 (a batch of 1 would fix the batch size forever) unless told otherwise.

    Capture and every later shape propagation run under the same setting: symbolic reasoning about a size whose
    hint is 1 is both wrong and very slow otherwise (minutes for GPT-2 at batch 1).
    """
    try:
        from torch.fx.experimental import _config as config
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return config.patch(backed_size_oblivious=True)


def refresh_metadata(program: "Program") -> None:
    """Re-run the graph on fake tensors and store every node's result in ``meta["val"]``."""
    mode = fake_mode_of(program)
    if mode is None:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        program.gm.meta["slimfx_fake_mode"] = mode
        for node, value in zip(_placeholders(program.graph), program.example_args):
            node.meta["val"] = mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
    with mode, enable_python_dispatcher(), size_one_stays_dynamic(), torch.no_grad():  # symbolic-size ops (pad, interpolate) need it
        _FakeInterpreter(program.gm, mode).run()


def _placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]
