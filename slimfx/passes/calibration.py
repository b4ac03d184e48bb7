"""Per-layer input statistics from calibration data, streamed batch by batch.

For every canonical linear/conv whose weight is a constant, accumulate over all input rows x (for a conv: its
unfolded patches) the Gram matrix XᵀX and Σ|x|. Memory is bounded by the layer width (in × in doubles), not by
the data. Statistics are keyed by the weight's origin name (``"blocks.0.qkv.weight"``), which both front ends
agree on, so statistics collected from an exported program serve a Dynamo graph of the same model too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from ..errors import CalibrationError
from ..ir.program import CONV2D, LINEAR, Program


@dataclass
class LayerStats:
    gram: torch.Tensor  # XᵀX, float64, [in, in]
    abs_sum: torch.Tensor  # Σ|x| per input feature, float64, [in]
    rows: int = 0

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)
        self.gram += rows.T @ rows
        self.abs_sum += rows.abs().sum(0)
        self.rows += rows.shape[0]


@dataclass
class ActivationStats:
    """What data-aware passes read: ``stats.get(weight origin, input width)`` -> LayerStats or None.

    Keyed by width too because a factorized layer's two halves share the origin of the weight they replace.
    """

    layers: dict[tuple[str, int], LayerStats] = field(default_factory=dict)
    batches: int = 0

    def get(self, origin: str, width: int) -> LayerStats | None:
        return self.layers.get((origin, width))


def layer_rows(node: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its reduction dimension: [rows, in] (convs: unfolded patches)."""
    if node.target == LINEAR:
        return x.reshape(-1, x.shape[-1])
    weight_shape = node.args[1].meta["val"].shape
    _, _, stride, padding, dilation, groups = node.args[1:7]
    if groups != 1:
        raise ValueError("grouped conv")
    patches = F.unfold(x, tuple(weight_shape[2:]), dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


class _Collector(fx.Interpreter):
    def __init__(self, program: Program, stats: ActivationStats):
        super().__init__(program.gm)
        self.program, self.stats = program, stats

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_module" and not n.users:
            return None  # export's shape guard: calibration batches may be larger than the example (e.g. batch 1)
        if n.op == "call_function" and n.target in (LINEAR, CONV2D) and self.program.is_weight(n.args[1]):
            x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
            origin = self.program.weights[n.args[1].target].origin
            if isinstance(x, torch.Tensor):
                try:
                    rows = layer_rows(n, x)
                except ValueError:
                    rows = None
                if rows is not None:
                    key = (origin, rows.shape[1])
                    if key not in self.stats.layers:
                        width = rows.shape[1]
                        self.stats.layers[key] = LayerStats(
                            torch.zeros(width, width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64))
                    self.stats.layers[key].add(rows)
        return super().run_node(n)


def _as_batch(batch: Any) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise CalibrationError(f"a calibration batch must be a tensor or a tuple of model inputs, got {type(batch).__name__}")


def _describe(values: Iterable[Any]) -> str:
    return "(" + ", ".join(f"{tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__ for v in values) + ")"


def collect_stats(program: Program, data: Iterable[Any], max_batches: int | None = None) -> ActivationStats:
    """Run ``program`` on each calibration batch (a tuple of model inputs) and accumulate layer statistics."""
    if program.frontend != "export":
        raise CalibrationError(
            "calibration data can only be run through a captured model; for torch.compile pass "
            "options={'calibration': slimfx.collect_stats(model, data)} instead of raw batches"
        )
    stats = ActivationStats()
    expected = len(program.example_args)
    collector = _Collector(program, stats)
    flat_spec = pytree.tree_flatten((program.example_args, program.example_kwargs))[1]
    for index, batch in enumerate(data):
        if max_batches is not None and index >= max_batches:
            break
        args = _as_batch(batch)
        if len(args) != expected:
            raise CalibrationError(
                f"calibration batch {index} has {len(args)} elements but the model takes {expected} input(s) "
                f"like {_describe(program.example_args)}; yield tuples of model inputs only (drop labels, "
                "e.g. ((x,) for x, _ in loader))"
            )
        leaves, spec = pytree.tree_flatten((args, program.example_kwargs))
        if spec != flat_spec:
            raise CalibrationError(f"calibration batch {index} is structured differently from the example inputs")
        try:
            with torch.no_grad():
                collector.run(*leaves)
        except Exception as exc:  # noqa: BLE001
            raise CalibrationError(
                f"calibration batch {index} {_describe(args)} does not fit the model, which was captured with "
                f"{_describe(program.example_args)}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        stats.batches += 1
    if stats.batches == 0:
        raise CalibrationError("the calibration data is empty: pass at least one batch of model inputs")
    return stats


def collect_model_stats(model: torch.nn.Module, data: Iterable[Any], example_inputs: Any = None,
                        max_batches: int | None = None) -> ActivationStats:
    """``slimfx.collect_stats(model, data)``: statistics for a model, usable by compress and by the backend."""
    from ..ir.capture import capture

    batches = list(data) if example_inputs is None else data
    if example_inputs is None:
        if not batches:
            raise CalibrationError("the calibration data is empty: pass at least one batch of model inputs")
        example_inputs = _as_batch(batches[0])
    return collect_stats(capture(model, example_inputs), batches, max_batches)


def resolve_stats(program: Program, calibration: Any, cache: dict) -> ActivationStats | None:
    """The context's calibration as statistics (collected once per program and cached for later passes)."""
    if calibration is None:
        return None
    if isinstance(calibration, ActivationStats):
        return calibration
    key = ("activation-stats", id(program))
    if key not in cache:
        cache[key] = collect_stats(program, calibration)
    return cache[key]


def require_stats(program: Program, ctx: Any, needed: bool, pass_text: str, data_free: str) -> ActivationStats | None:
    """The statistics a data-aware method needs, or a CalibrationError that says how to provide them."""
    stats = resolve_stats(program, ctx.calibration, ctx.cache)
    if needed and stats is None:
        raise CalibrationError(
            f"{pass_text} needs calibration data: pass calibration= to slimfx.compress (an iterable of model-input "
            "tuples; a DataLoader works) or options={'calibration': slimfx.collect_stats(model, data)} to "
            f"torch.compile; or use {data_free}"
        )
    return stats
