"""Per-layer input statistics from calibration data, streamed batch by batch.

For every canonical linear/conv whose weight is a constant, accumulate over all input rows x (for a conv: its
unfolded patches) the Gram matrix XᵀX and Σ|x|. Memory is bounded by the layer width (in × in doubles), not by
the data. Statistics are keyed by the weight's origin name (``"blocks.0.qkv.weight"``), which both front ends
agree on, so statistics collected from an exported program serve a Dynamo graph of the same model too.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import CalibrationError
from ..ir.op_table import WEIGHTED_OPS, weighted_op
from ..ir.program import Program, is_input_guard


@dataclass
class LayerStats:
    gram: torch.Tensor  # XᵀX, [in, in], in the statistics' dtype (float32 unless float64 was asked for)
    abs_sum: torch.Tensor  # Σ|x| per input feature, [in]
    rows: int = 0
    cross: torch.Tensor | None = None  # sequential calibration: Σ x_original x_compressedᵀ, [in, in]
    # matrices made from these statistics, kept while layers reading this input are compressed (kind -> {key: ...}):
    # the inverse Hessian, the compensation, the whitening; cleared when the statistics change or are done with
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    def add(self, rows: torch.Tensor, original: torch.Tensor | None = None) -> None:
        """Accumulate a batch of input rows; ``original``: the same rows as the uncompressed model computes them
        (sequential calibration), for ``compensate``."""
        self.forget()  # what was derived no longer describes the statistics
        rows = rows.detach().to(self.gram.dtype)
        self.gram.addmm_(rows.T, rows)  # in place: no in x in temporary per batch
        self.abs_sum += rows.abs().sum(0)
        self.rows += rows.shape[0]
        if original is not None:
            if self.cross is None:
                self.cross = torch.zeros_like(self.gram)
            self.cross.addmm_(original.detach().to(self.gram.dtype).T, rows)

    def compensate(self, weight: torch.Tensor, damp: float = 0.1, rows_per_block: int = 4096) -> torch.Tensor:
        """The weight that, applied to the compressed model's inputs, best reproduces what ``weight`` computes on
        the original inputs: argmin ‖W X_o − W' X_c‖² = W + W (C − G)(G + λI)⁻¹ (C = X_oᵀX_c, G = X_cᵀX_c, λ a
        ``damp`` fraction of G's mean diagonal). Unchanged where both inputs agree (C = G) and in
        directions the calibration data does not reach, so a compressing method then fits the layer to the inputs
        it will actually see without chasing the errors of the blocks before (GPTAQ-style asymmetric calibration).
        Without cross statistics (one-shot) the weight itself. In the weight's dtype, at least float32."""
        dtype = torch.promote_types(weight.dtype, torch.float32)  # float64 weights stay float64
        if self.cross is None or torch.equal(self.cross, self.gram):
            return weight.detach().to(dtype)
        if 2 * weight.shape[0] < weight.shape[1] and damp not in self.derived.get("compensation", {}):
            # few rows (a down projection): solve for W's rows, W + [(G + λI)⁻¹ (C − G)ᵀ Wᵀ]ᵀ, instead of making
            # the n x n mix: n²·rows multiply-adds instead of n³
            factor = self._ridge_factor(damp)
            rows_t = weight.detach().to(self.gram.dtype).T
            rhs = torch.matmul(self.cross.T, rows_t).sub_(torch.matmul(self.gram, rows_t))  # (C − G)ᵀ Wᵀ, no n x n
            return weight.detach().to(dtype) + torch.cholesky_solve(rhs, factor).T.to(dtype)
        mix = self._compensation(damp)
        mix, out = mix.to(dtype), torch.empty(weight.shape, dtype=dtype, device=weight.device)
        for rows, block in zip(out.split(rows_per_block), weight.detach().split(rows_per_block)):
            torch.matmul(block.to(dtype), mix, out=rows)  # a block of rows at a time: no second copy of W
        return out

    def forget(self) -> None:
        """Drop the matrices derived from these statistics (made again when next asked for)."""
        self.derived.clear()

    def inverse_hessian(self, damp: float, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, dead, order) for the OBS solvers (SparseGPT, GPTQ): U the upper Cholesky factor of H⁻¹ with
        H = XᵀX/rows + λI over the input features taken in ``order`` (largest diagonal first when ``act_order``),
        λ a ``damp`` fraction of the mean diagonal; ``dead`` the features no calibration row reached. In the
        statistics' dtype (at least float32), as the reference implementations do, and made once per statistics
        object: q, k and v (gate and up) share it."""
        cache = self.derived.setdefault("inverse_hessian", {})
        key = (damp, act_order)
        if key not in cache:
            cache.clear()  # one factor per statistics object is kept alive
            dtype = torch.promote_types(self.gram.dtype, torch.float32)
            hessian = self.gram.to(dtype) / max(self.rows, 1)  # a new tensor: the statistics stay as they are
            dead = hessian.diagonal() == 0
            hessian.diagonal()[dead] = 1.0
            hessian.diagonal().add_(damp * float(hessian.diagonal().mean()))
            order = torch.argsort(hessian.diagonal(), descending=True) if act_order else \
                torch.arange(hessian.shape[0], device=hessian.device)
            if act_order:
                hessian = hessian[order][:, order]
            factor = torch.linalg.cholesky(hessian, out=hessian)  # in place, as is the last step
            inverse = torch.cholesky_inverse(factor)
            del factor, hessian
            cache[key] = (torch.linalg.cholesky(inverse, upper=True, out=inverse), dead, order)
        return cache[key]

    def _ridge_factor(self, damp: float, keep: bool = True) -> torch.Tensor:
        """The Cholesky factor of G + λI (λ a ``damp`` fraction of G's mean diagonal), kept for the next weight
        reading these statistics when ``keep``."""
        cache = self.derived.setdefault("ridge_factor", {})
        if damp in cache:
            return cache[damp]
        factor = self.gram.clone()
        factor.diagonal().add_(damp * float(self.gram.diagonal().mean()))
        torch.linalg.cholesky(factor, out=factor)  # in place: one in x in matrix, not two
        if keep:
            cache.clear()
            cache[damp] = factor
        return factor

    def _compensation(self, damp: float, columns: int = 1024) -> torch.Tensor:
        """I + (C − G)(G + λI)⁻¹, made once per statistics object (q, k and v share it); ``compensate`` asks only
        where there are cross statistics and both streams differ."""
        cache = self.derived.setdefault("compensation", {})
        if damp not in cache:  # in the statistics' dtype: the ridge keeps G + λI well conditioned, float32 suffices
            cache.clear()
            factor = self._ridge_factor(damp, keep=False)
            # (C − G)(G + λI)⁻¹ = [(G + λI)⁻¹ (Cᵀ − G)]ᵀ, solved a block of columns at a time
            mix_t = torch.empty_like(self.gram)
            for cols in range(0, mix_t.shape[1], columns):
                part = slice(cols, cols + columns)
                mix_t[:, part] = torch.cholesky_solve(self.cross[part].T - self.gram[:, part], factor)
            del factor
            mix = mix_t.T
            mix.diagonal().add_(1.0)
            cache[damp] = mix
        return cache[damp]


@dataclass
class ActivationStats:
    """What data-aware passes read: ``stats.get(weight origin, input width)`` -> LayerStats or None.

    Keyed by width too because a factorized layer's two halves share the origin of the weight they replace.
    """

    layers: dict[tuple[str, int], LayerStats] = field(default_factory=dict)
    batches: int = 0
    dtype: Any = None  # what they accumulate in: float32 (default) or float64
    _last: LayerStats | None = field(default=None, init=False, repr=False, compare=False)  # the last one read

    def __post_init__(self) -> None:
        self.dtype = self.dtype or torch.float32

    def get(self, origin: str, width: int) -> LayerStats | None:
        """A layer's statistics. What was derived from the previous layer's (an inverse Hessian, a compensation,
        a whitening: each as large as the statistics) is let go when the next layer reads another input; layers
        reading one input (q, k, v) come one after another and share it."""
        found = self.layers.get((origin, width))
        if self._last is not None and self._last is not found:
            self._last.forget()
        self._last = found
        return found

    def without(self, origins: set[str]) -> "ActivationStats":
        if not origins:
            return self
        return ActivationStats({k: v for k, v in self.layers.items() if k[0] not in origins}, self.batches,
                               self.dtype)


_SHARED_ROWS = WEIGHTED_OPS[torch.ops.aten.linear.default].rows  # a linear's rows are its input, reshaped


class Interpreter(fx.Interpreter):
    """An fx.Interpreter that can run a graph captured on one device on another: the device arguments the capture
    baked in (``arange(device=cpu)``, ``to(cpu)``, metadata asserts) are read through ``device_map``."""

    device_map: dict = {}

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        if self.device_map:
            args, kwargs = pytree.tree_map_only(torch.device, lambda d: self.device_map.get(d, d), (args, kwargs))
        return args, kwargs


class _Collector(Interpreter):
    def __init__(self, program: Program, stats: ActivationStats):
        super().__init__(program.gm)
        self.program, self.stats = program, stats
        self.shared: dict[tuple, LayerStats] = {}  # (input node, rows, width) -> the statistics its layers share
        self.added: set[int] = set()  # statistics already fed this batch
        self.original_rows: dict[tuple, torch.Tensor] | None = None  # sequential: (origin, width) -> original rows

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.added = set()
        return super().run(*args, **kwargs)

    def run_node(self, n: fx.Node) -> Any:
        if is_input_guard(n):
            return None  # export's shape guard: calibration batches may be larger than the example (e.g. batch 1)
        found = layer_rows(self.program, n, self.env)
        if found is not None:
            key, rows = found
            op = weighted_op(n)
            # layers reading one input the same way (q/k/v, gate/up) share one statistics object
            same_input = (n.args[0], op.rows, rows.shape[1]) if op.rows is _SHARED_ROWS else None
            if key not in self.stats.layers:
                shared = self.shared.get(same_input) if same_input is not None else None
                if shared is None:
                    width = rows.shape[1]
                    zeros = torch.zeros(width, dtype=self.stats.dtype, device=rows.device)  # with the activations
                    shared = LayerStats(zeros.new_zeros(width, width), zeros)
                    if same_input is not None:
                        self.shared[same_input] = shared
                self.stats.layers[key] = shared
            stats = self.stats.layers[key]
            if id(stats) not in self.added:  # once per batch, however many layers share it
                stats.add(rows, self.original_rows.get(key) if self.original_rows is not None else None)
                self.added.add(id(stats))
        return super().run_node(n)


def layer_rows(program: Program, node: fx.Node, env: dict) -> tuple[tuple[str, int], torch.Tensor] | None:
    """((weight origin, input width), the input rows) of a layer with a constant weight whose input is in
    ``env``; None for any other node."""
    op = weighted_op(node)
    if op is None or not program.is_weight(node.args[1]):
        return None
    x = env.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    rows = op.rows(node, x) if isinstance(x, torch.Tensor) else None
    if rows is None:
        return None
    return (program.weights[node.args[1].target].origin, rows.shape[1]), rows


CALIBRATION_FORM = ("an iterable of batches, each a full set of model inputs: a tuple of positional inputs or a "
                    "dict of keyword inputs, e.g. [(x1,), (x2,)] or [{'input_ids': ids, 'attention_mask': mask}]; "
                    "a DataLoader of such batches works")


def check_calibration(calibration: Any, where: str, raw_batches: bool = True) -> None:
    """Reject calibration data whose form is wrong before any work is done, saying what the form should be.

    ``raw_batches=False`` where only statistics can be used (the backend: a Dynamo graph's inputs are not the
    model's inputs, so batches cannot be run through it).
    """
    if calibration is None or isinstance(calibration, ActivationStats):
        return
    if isinstance(calibration, torch.Tensor):
        raise CalibrationError(f"calibration is one tensor of shape {tuple(calibration.shape)}; it must be "
                               f"{CALIBRATION_FORM}. To use this tensor as one batch, pass [(x,)]")
    if not raw_batches:
        raise CalibrationError(
            f"{where} takes calibration as statistics, not raw batches (a Dynamo graph's inputs are not the "
            "model's): pass options={'calibration': slimfx.collect_stats(model, batches)}")
    if not isinstance(calibration, Iterable) or isinstance(calibration, (str, bytes, dict)):
        raise CalibrationError(f"calibration must be {CALIBRATION_FORM}; got {type(calibration).__name__}")


def model_inputs(batch: Any, index: int) -> tuple[tuple, dict]:
    """One calibration batch as (args, kwargs). Nothing from the example inputs is added to it."""
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    form = f"(x,) for one input" if isinstance(batch, torch.Tensor) else "a tuple or a dict"
    raise CalibrationError(f"calibration batch {index} is a {type(batch).__name__}, not {form}; calibration must be "
                           f"{CALIBRATION_FORM}")


def describe_inputs(args: tuple, kwargs: dict | None = None) -> str:
    def one(v: Any) -> str:
        return f"{tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__

    parts = [one(v) for v in args] + [f"{k}={one(v)}" for k, v in (kwargs or {}).items()]
    return "(" + ", ".join(parts) + ")"


def _empty_calibration() -> CalibrationError:
    return CalibrationError("the calibration data is empty: pass at least one batch of model inputs")


class _Accumulator:
    """Feeds one program's calibration inputs through the statistics collector, checking their structure."""

    def __init__(self, program: Program, stats: ActivationStats):
        self.program, self.collector = program, _Collector(program, stats)
        self.example = describe_inputs(program.example_args, program.example_kwargs)
        self.spec = pytree.tree_flatten((program.example_args, program.example_kwargs))[1]

    def add(self, args: tuple, kwargs: dict, index: int) -> None:
        leaves = self.flatten(args, kwargs, index)
        try:
            with torch.no_grad():
                self.collector.run(*leaves)
        except Exception as exc:  # noqa: BLE001
            raise _does_not_fit(index, args, kwargs, exc, f", which was captured with {self.example}") from exc

    def flatten(self, args: tuple, kwargs: dict, index: int) -> list:
        """The batch as the graph's flat inputs, or a CalibrationError saying how it differs from the example."""
        example_kwargs = self.program.example_kwargs
        if set(kwargs) == set(example_kwargs):  # keyword order does not matter
            kwargs = {k: kwargs[k] for k in example_kwargs}
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.spec:
            if kwargs and not example_kwargs:
                hint = (": keyword batches need keyword example inputs too, e.g. "
                        "compress(model, (), {'input_ids': ids, 'attention_mask': mask}, calibration=...)")
            elif args and example_kwargs and not self.program.example_args:
                hint = ": the example inputs were given as keywords, so give each batch as a dict of the same keys"
            elif len(args) > len(self.program.example_args):
                hint = " (drop labels, e.g. ((x,) for x, _ in loader))"
            else:
                hint = ""
            raise CalibrationError(
                f"calibration batch {index} {describe_inputs(args, kwargs)} is not structured like the example inputs "
                f"{self.example}; each batch must be a full set of the model's inputs{hint}"
            )
        return leaves


def _does_not_fit(index: int, args: tuple, kwargs: dict, exc: Exception, captured: str = "") -> CalibrationError:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return CalibrationError(f"calibration batch {index} {describe_inputs(args, kwargs)} does not fit the model{captured}: "
                            f"{type(exc).__name__}: {first}")


def _batches(data: Iterable[Any], max_batches: int | None) -> Iterable[tuple[int, tuple, dict]]:
    from ..progress import progress

    total = len(data) if hasattr(data, "__len__") else None
    for index, batch in enumerate(progress(data, "calibration batches", total)):
        if max_batches is not None and index >= max_batches:
            break
        yield (index, *model_inputs(batch, index))


def collect_stats(program: Program, data: Iterable[Any], max_batches: int | None = None,
                  dtype: torch.dtype | None = None) -> ActivationStats:
    """Run ``program`` on each calibration batch (a full set of model inputs) and accumulate layer statistics
    (in ``dtype``: float32 by default)."""
    if program.frontend != "export":
        raise CalibrationError(
            "calibration data can only be run through a captured model; for torch.compile pass "
            "options={'calibration': slimfx.collect_stats(model, data)} instead of raw batches"
        )
    check_calibration(data, "slimfx.compress")
    stats = ActivationStats(dtype=dtype)
    accumulator = _Accumulator(program, stats)
    for index, args, kwargs in _batches(data, max_batches):
        accumulator.add(args, kwargs, index)
        stats.batches += 1
    if stats.batches == 0:
        raise _empty_calibration()
    warn_if_thin(stats)
    return stats


def warn_if_thin(stats: ActivationStats) -> None:
    """One warning when the calibration rows are fewer than a layer's input features: its Gram matrix then has
    rank below its width, and whitening or SparseGPT lean on damping. Names how many rows (tokens) would do."""
    thin = [(key, s.rows) for key, s in stats.layers.items() if s.rows < key[1]]
    if not thin:
        return
    (origin, width), rows = max(thin, key=lambda kv: kv[0][1])
    batches = max(stats.batches, 1)
    needed = -(-width * batches // max(rows, 1))
    warnings.warn(f"calibration gave {rows} rows (tokens, or positions of a conv) for {origin}, which reads {width} "
                  f"features: its statistics have rank at most {rows} ({len(thin)} layer(s) alike); pass at least "
                  f"{width} tokens, e.g. {needed} batches like these", stacklevel=3)


def calibration_inputs(program: Program, data: Iterable[Any], max_batches: int | None = None) -> list[list]:
    """Raw calibration batches as the program's flat graph inputs, checked like statistics collection checks them
    (for passes that run the program itself: importance measurement, distillation)."""
    check_calibration(data, "slimfx.compress")
    flattener = _Accumulator(program, ActivationStats())
    inputs = [flattener.flatten(args, kwargs, index) for index, args, kwargs in _batches(data, max_batches)]
    if not inputs:
        raise _empty_calibration()
    return inputs


def collect_part_stats(model: torch.nn.Module, parts: list, data: Iterable[Any],
                       max_batches: int | None = None) -> ActivationStats:
    """Statistics for a model captured part by part: run it eagerly, feeding each part's inputs to its collector."""
    from ..ir.partition import on_part_inputs

    check_calibration(data, "slimfx.compress")
    stats = ActivationStats()
    accumulators = {part.name: _Accumulator(part.program, stats) for part in parts}
    current = {"index": 0}
    handles = on_part_inputs(model, parts, lambda part, a, k: accumulators[part.name].add(a, k, current["index"]))
    was_training = model.training
    try:
        model.eval()
        for index, args, kwargs in _batches(data, max_batches):
            current["index"] = index
            try:
                with torch.no_grad():
                    model(*args, **kwargs)
            except CalibrationError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise _does_not_fit(index, args, kwargs, exc) from exc
            stats.batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if stats.batches == 0:
        raise _empty_calibration()
    return stats


def collect_model_stats(model: torch.nn.Module, data: Iterable[Any], example_inputs: Any = None,
                        max_batches: int | None = None) -> ActivationStats:
    """``slimfx.collect_stats(model, data)``: statistics for a model, usable by compress and by the backend.

    Keyed by the model's own weight names, so they serve ``compress`` and every Dynamo graph of the model alike.
    A model that does not capture as one graph is captured submodule by submodule, as ``compress`` does.
    """
    from ..errors import CaptureError, ModelInputError
    from ..ir.capture import _as_args, capture
    from ..ir.partition import partition

    check_calibration(data, "slimfx.collect_stats")
    batches = list(data)
    if not batches:
        raise _empty_calibration()
    args, kwargs = model_inputs(batches[0], 0) if example_inputs is None else (_as_args(example_inputs), {})
    try:
        program = capture(model, args, kwargs)
    except ModelInputError:
        raise
    except CaptureError:
        return collect_part_stats(model, partition(model, args, kwargs).parts, batches, max_batches)
    return collect_stats(program, batches, max_batches)


def resolve_stats(program: Program, ctx: Any) -> ActivationStats | None:
    """The context's calibration as statistics that describe the program as it is now, never a stale copy.

    From raw batches they are collected on the current program, again after any pass that rewrote it. Statistics
    given ready-made describe the original model: layers whose input an earlier pass changed (a permutation) are
    left out, so a pass finds none for them and declines.
    """
    calibration = ctx.calibration
    if ctx.block_stats is not None:  # calibrating sequentially: the current block's, from its compressed inputs
        return ctx.block_stats
    if calibration is None:
        return None
    if isinstance(calibration, ActivationStats):
        return calibration.without(ctx.inputs_changed)
    key = ("activation-stats", id(program), ctx.revision)
    if key not in ctx.cache:
        ctx.cache.clear()  # older statistics describe a program that no longer exists
        ctx.cache[key] = collect_stats(program, calibration, dtype=ctx.stats_dtype)
    return ctx.cache[key]


def require_stats(program: Program, ctx: Any, needed: bool, pass_text: str, data_free: str) -> ActivationStats | None:
    """The statistics a data-aware method needs, or a CalibrationError that says how to provide them."""
    stats = resolve_stats(program, ctx)
    if needed and stats is None:
        raise CalibrationError(
            f"{pass_text} needs calibration data: pass calibration= to slimfx.compress (an iterable of model-input "
            "tuples; a DataLoader works) or options={'calibration': slimfx.collect_stats(model, data)} to "
            f"torch.compile; or use {data_free}"
        )
    return stats
