"""Every layer's options from every lossy pass, each with its predicted error, lowered latency and bytes.

One decomposition per layer and technique gives the error of every option (one SVD for every rank, one
round-to-nearest and one SVD of its error for every correction rank), as the passes themselves compute it, so a
planned layer's predicted error is the one the pass then reports. Latency is priced for the kernel ``lower`` would
give the option on the target: the compressed op is built on a one-node trial graph (zero weights of the right
shapes) and handed to ``Lower.rank``, which prices it on the profile or times it on this device (``tune=measure``).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ..codegen.epilogue import Epilogue
from ..codegen.registry import Region
from ..hw_profiles.cost_model import latency
from ..hw_profiles.op_costs import concrete, concrete_shape, node_kernels
from ..ir.op_table import DENSE_LAYERS
from ..ir.ops import INT8_LINEAR, LOWRANK_LINEAR, NM_LINEAR, QUANT_LINEAR, quant_linear_args
from ..ir.program import CONV2D, Program, WeightInfo
from ..ir.quant_format import GroupParams, dequantize, pack
from ..ir.sparse_format import compress
from ..passes.calibration import ActivationStats
from ..passes.base import first_use_of_each_weight, layer_uses, refusal
from ..passes.factorize import Factorize
from ..passes.lower import Lower, _measured
from ..passes.lowrank import factorize_matrix, quadratic
from ..passes.nm_masks import sparsegpt, wanda_mask
from ..passes.quant_lowrank import QuantLowRank, output_error, quant_candidates
from ..passes.quantizers import quantize_factors
from ..progress import progress
from .options import Decision, Dense, Int8, LayerOptions, LowRank, Option, Quant, Sparse


@dataclass(frozen=True)
class Grid:
    """Which options each technique offers a layer."""

    techniques: tuple[str, ...] = ("lowrank", "nm", "quant", "int8")
    keep: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # low-rank: fractions of the params
    patterns: tuple[tuple[int, int], ...] = ((2, 4), (4, 8))
    nm_method: str = "wanda"
    bits: tuple[int, ...] = (3, 4, 8)
    groups: tuple[int, ...] = (32, 64, 128)
    ranks: tuple[int, ...] = (0, 8, 16, 32)  # quantization error corrections
    correction: str = "eora"
    factor_bits: tuple[int, ...] = (8,)  # low-rank factors as int codes (with "lowrank" and "quant" both on)


@dataclass
class Pricing:
    """Where and how options are priced: the target device and profile, the sizes (hints), and whether
    compressed weights must stay compressed when lowered (memory budgets)."""

    device: str
    profile: object
    hints: dict
    tune: str = "model"  # or "measure"
    keep_storage: bool = False

    def dense(self, program: Program, use: fx.Node) -> tuple[float, bool]:
        if self.tune == "measure":
            return _measured(program, Region(use, Epilogue(), (), ()), None, self.hints), True
        trial, node = _trial(use, lambda g, x, w: (use.target, (x, *(w(torch.empty_like(program.tensor(a),
                                                                                          device="meta"))
                                                                    if program.is_weight(a) else a
                                                                    for a in use.args[1:]))), self)
        return concrete(latency(node_kernels(node) or [], self.profile), {}), False

    def concrete_like(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like ``value`` at the workload's sizes: on the meta device when only priced, real
        (uninitialised) where it will be timed. Concrete sizes let the cost rules tell a GEMV from a GEMM."""
        return torch.empty(concrete_shape(value, self.hints), dtype=value.dtype, device=value.device if self.tune == "measure" else "meta")

    def lowered(self, trial: Program, node: fx.Node) -> tuple[float, str, bool]:
        """(seconds, kernel, runs dense) of a compressed node on a trial graph, as ``lower`` would run it."""
        lower = Lower(tune=self.tune, storage="compressed" if self.keep_storage else "auto")
        priced, refused, runs_dense = lower.rank(trial, Region(node, Epilogue(), (), ()), self.device, self.profile,
                                                 self.hints, self.keep_storage)
        if not priced:
            return float("inf"), "none: " + "; ".join(f"{i.name}: {why}" for i, why in refused), False
        return priced[0][0], priced[0][1].name, runs_dense


def _measured_conv_pair(program: Program, use: fx.Node, rank: int, hints: dict) -> float:
    """Seconds of the conv ``use`` as ``factorize`` writes it at ``rank`` (a k×k conv to ``rank`` channels, then a
    1×1 conv), compiled alone and timed at the workload's sizes on its device; cached per device with the other
    measured kernels (the dense conv is timed as every dense layer is, ``Pricing.dense``). Narrow convs run far
    below the GEMM rate on a CPU, so the roofline's FLOP count alone would call a factorization faster that is
    not."""
    from ..hw_profiles.calibrate import measure
    from ..passes.lower import MEASURED, device_key
    from ..timing import random_like

    x = random_like(use.args[0], hints)
    weight = program.tensor(use.args[1])
    bias_node = use.args[2]
    bias = (program.tensor(bias_node) if program.is_weight(bias_node) else random_like(bias_node, hints)) \
        if isinstance(bias_node, fx.Node) else None
    stride, padding, dilation = (tuple(a) for a in use.args[3:6])  # plain tuples: Dynamo cannot trace fx's lists
    cout, cin, kh, kw = weight.shape
    key = "|".join(map(str, (device_key(x.device.type), f"conv2d-pair-r{rank}", x.dtype, weight.dtype,
                             tuple(x.shape), tuple(weight.shape), bias is not None, stride, padding, dilation)))

    def time_it() -> float:
        like = dict(dtype=weight.dtype, device=weight.device)
        module = _ConvPair(torch.randn(rank, cin, kh, kw, **like), torch.randn(cout, rank, 1, 1, **like), bias,
                           stride, padding, dilation)
        # a GraphModule of its own per measurement: its own code object, so no measurement counts as a
        # recompile of another's (past Dynamo's limit it would be timed eagerly, and cached so)
        compiled = torch.compile(fx.symbolic_trace(module), dynamic=False)
        with torch.no_grad():
            return measure(lambda: compiled(x), x.device.type, 0.02, 5)
    return MEASURED.get(key, time_it)


class _ConvPair(torch.nn.Module):
    """A k×k conv followed by a 1×1 conv, for timing."""

    def __init__(self, first, second, bias, stride, padding, dilation):
        super().__init__()
        self.first, self.second, self.bias = first, second, bias
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x):
        conv = torch.nn.functional.conv2d
        return conv(conv(x, self.first, None, self.stride, self.padding, self.dilation), self.second, self.bias)


def layer_options(program: Program, stats, pricing: Pricing, grid: Grid, exclude: str = "",
                  without_stats: list[str] | None = None, decompositions: dict | None = None) -> list[LayerOptions]:
    """Options for every weight a lossy pass may rewrite (trained, unconstrained, not shared with another kind of
    op, not ``exclude``d); the rest stay as they are and count as fixed cost. Layers no calibration statistics
    reached are named in ``without_stats``. Each layer's whitened decomposition is left in ``decompositions``
    (keyed by origin, storage, width and method), where ``factorize`` executing the plan takes it instead of a second SVD."""
    layers = []
    for node in progress(first_use_of_each_weight(program, DENSE_LAYERS), "planner: layer options"):
        origin = program.weights[node.args[1].target].origin
        uses = layer_uses(program, node)
        if (exclude and re.search(exclude, origin)) or uses is None or refusal(program, node, (
                "nm-mask", "quantized", "factorized")):
            continue
        if node.target == CONV2D and any(u.args[6] != 1 for u in uses):
            continue  # grouped and depthwise convs: nothing here shrinks them
        layer_stats = stats.get(origin, _matrix(program, node).shape[1]) if stats is not None else None
        if layer_stats is None:
            if without_stats is not None:
                without_stats.append(origin)
            continue
        layers.append(_options(program, node, uses, origin, layer_stats, pricing, grid,
                               decompositions if decompositions is not None else {}))
    return layers


def dense_only(program: Program, node: fx.Node, origin: str, pricing: Pricing) -> LayerOptions:
    """A layer with its dense option alone (a depthwise conv in a chain: only merging can shrink it)."""
    weight = program.tensor(node.args[1]).detach()
    uses = layer_uses(program, node) or [node]
    seconds = [dataclasses.replace(pricing, tune="model").dense(program, u)[0] for u in uses]
    dense = Option(Dense(), 0.0, sum(seconds), weight.numel() * weight.element_size(), "dense")
    return LayerOptions(origin, "conv" if node.target == CONV2D else "linear", tuple(weight.shape), uses, [dense],
                        lambda decision: weight)


def _matrix(program: Program, node: fx.Node) -> torch.Tensor:
    weight = program.tensor(node.args[1])
    return weight.reshape(weight.shape[0], -1)


def _options(program: Program, node: fx.Node, uses: list, origin: str, layer_stats, pricing: Pricing,
             grid: Grid, decompositions: dict) -> LayerOptions:
    weight = program.tensor(node.args[1]).detach()
    matrix = weight.reshape(weight.shape[0], -1)
    out_f, in_f = matrix.shape
    is_conv = node.target == CONV2D
    itemsize = weight.element_size()
    measuring = pricing.tune == "measure"
    dense_s = [pricing.dense(program, u) for u in uses]
    options = [Option(Dense(), 0.0, sum(s for s, _ in dense_s), weight.numel() * itemsize, "dense",
                      any(m for _, m in dense_s))]
    approximations: dict[Decision, Callable[[], torch.Tensor]] = {}
    energy_of: list[float] = []  # ||X Wᵀ||², every scored option's denominator: made once, where one is scored

    def energy() -> float | None:
        if layer_stats is not None and not energy_of:
            energy_of.append(quadratic(matrix, layer_stats.gram))
        return energy_of[0] if energy_of else None

    if "lowrank" in grid.techniques:
        factors = factorize_matrix(matrix, "whitened", layer_stats)
        decompositions[(origin, matrix.data_ptr(), in_f, "whitened")] = factors
        most = (out_f * in_f - 1) // (out_f + in_f)
        multiple = getattr(pricing.profile, "rank_multiple", 1)
        ranks = set()
        for keep in grid.keep:
            rank = max(1, int(keep * most))
            if multiple > 1 and rank >= multiple:
                rank = max(multiple, rank // multiple * multiple)
            if rank <= most and rank < min(out_f, in_f):
                ranks.add(rank)
        for rank in sorted(ranks):
            if is_conv:
                seconds = sum(_measured_conv_pair(program, u, rank, pricing.hints) if measuring else
                              Factorize._latencies(u, rank, False, pricing.profile, pricing.hints)[1] for u in uses)
                kernel, stored = "two convs", rank * (out_f + in_f) * itemsize
            else:
                seconds, kernel, dense_form = _price_lowrank(uses, weight, rank, pricing)
                stored = weight.numel() * itemsize if dense_form else rank * (out_f + in_f) * itemsize
            options.append(Option(LowRank(rank), factors.rel_error(rank), seconds, stored, kernel, measuring))
            approximations[LowRank(rank)] = (lambda r=rank: _product(factors, r))
            for bits in grid.factor_bits if "quant" in grid.techniques and not is_conv else ():
                coded = quantize_factors(*factors.truncate(rank, torch.float64), bits)  # codes: small to keep
                error = output_error(coded.dense() - matrix.to(torch.float64), matrix, layer_stats, energy())
                seconds, kernel, dense_form, stored = _price_int_lowrank(uses, weight, rank, bits, pricing)
                options.append(Option(LowRank(rank, bits), error, seconds,
                                      rank * (out_f + in_f) * itemsize if dense_form else stored, kernel,
                                      measuring))
                approximations[LowRank(rank, bits)] = coded.dense

    if "nm" in grid.techniques and not is_conv:
        for n, m in grid.patterns:
            if in_f % m:
                continue
            if grid.nm_method == "sparsegpt":
                pruned, _ = sparsegpt(weight, layer_stats, n, m)
            else:
                pruned = weight * wanda_mask(weight, layer_stats, n, m)
            error = output_error(pruned - weight, weight, layer_stats, energy())
            seconds, kernel, dense_form, stored = _price_nm(uses, weight, n, m, pricing)
            options.append(Option(Sparse(n, m), error, seconds, weight.numel() * itemsize if dense_form else stored,
                                  kernel, measuring))
            approximations[Sparse(n, m)] = (lambda p=pruned: p)

    if "quant" in grid.techniques and not is_conv:
        one = ActivationStats({(origin, in_f): layer_stats})
        for cand in quant_candidates(program, node, one, None, grid.bits, grid.groups, grid.ranks, grid.correction):
            seconds, kernel, dense_form = _price_quant(uses, weight, cand.bits, cand.group, cand.rank,
                                                       pricing)
            decision = Quant(cand.bits, cand.group, cand.rank)
            options.append(Option(decision, cand.rel_error, seconds,
                                  weight.numel() * itemsize if dense_form else cand.bytes, kernel, measuring))
            approximations[decision] = (lambda d=decision: _dequantized(weight, layer_stats, d, grid.correction))

    # W8A8 adds a pass over the inputs to the GEMM: where int8 multiplies no faster than float it cannot pay
    int8_pays = pricing.profile.peak_flops("int8") > pricing.profile.peak_flops("fp32")
    if "int8" in grid.techniques and not is_conv and (int8_pays or measuring):
        from ..passes.int8_dynamic import predicted_error, quantize_rows

        codes, scales = quantize_rows(weight)
        seconds, kernel, dense_form = _price_int8(uses, weight, pricing)
        stored = codes.numel() + scales.numel() * scales.element_size()
        options.append(Option(Int8(), predicted_error(weight, codes, scales, layer_stats, energy()), seconds,
                              weight.numel() * itemsize if dense_form else stored, kernel, measuring))
        # scored end to end with the inputs rounded as well (plan.chains._with_weight)
        approximations[Int8()] = (lambda c=codes, s=scales: c.double() * s.double()[:, None])

    cache: dict[Decision, torch.Tensor] = {}

    def approximate(decision: Decision) -> torch.Tensor:
        if isinstance(decision, Dense):
            return weight
        if decision not in cache:
            cache[decision] = approximations[decision]().reshape(weight.shape).to(weight.dtype)
        return cache[decision]

    shape = tuple(weight.shape)
    return LayerOptions(origin, "conv" if is_conv else "linear", shape, uses, options, approximate)


def _product(factors, rank: int) -> torch.Tensor:
    a, b = factors.truncate(rank, torch.float64)
    return a @ b


def _dequantized(weight: torch.Tensor, layer_stats, decision: Quant, correction: str) -> torch.Tensor:
    quantizer = QuantLowRank(bits=decision.bits, group=decision.group, rank=decision.rank, correction=correction
                             if decision.rank else "none", quantizer="rtn")
    result = quantizer.quantize(weight, layer_stats, decision.bits, decision.group, decision.rank)
    approx = dequantize(result.codes, GroupParams(result.params.scales.double(), result.params.zeros.double()),
                        decision.group, torch.float64)
    if result.a is not None:
        approx = approx + result.a.double() @ result.b.double()
    return approx


# -- trial graphs: the compressed op alone, on zero weights of the right shapes -------------------------------------

def _trial(use: fx.Node, build: Callable[[fx.Graph, fx.Node, Callable], tuple], pricing: Pricing,
           in_width: int | None = None, out_width: int | None = None) -> tuple[Program, fx.Node]:
    """``use``'s input and output sizes, the last dimensions replaced by ``in_width``/``out_width`` if given (one
    stage of a layer split in two)."""
    graph, holder, weights = fx.Graph(), torch.nn.Module(), {}
    x = graph.placeholder("x")
    x.meta = {"val": _width(pricing.concrete_like(use.args[0].meta["val"]), in_width)}

    def weight(value: torch.Tensor | None) -> fx.Node | None:
        if value is None:
            return None
        name = f"w{len(weights)}"
        holder.register_buffer(name, value)
        weights[name] = WeightInfo(name, "plan", "trial weight")
        node = graph.get_attr(name)
        node.meta["val"] = value
        return node

    op, args = build(graph, x, weight)
    node = graph.call_function(op, tuple(args))
    node.meta["val"] = _width(pricing.concrete_like(use.meta["val"]), out_width)
    graph.output(node)
    return Program(fx.GraphModule(holder, graph), weights, ()), node


def _width(value: torch.Tensor, width: int | None) -> torch.Tensor:
    return value if width is None else value.new_empty((*value.shape[:-1], width))


def _bias(use: fx.Node, weight: torch.Tensor) -> torch.Tensor | None:
    has_bias = len(use.args) > 2 and use.args[2] is not None
    return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if has_bias else None


def _sum_over_uses(uses: list, price: Callable[[fx.Node], tuple[float, str, bool]]) -> tuple[float, str, bool]:
    results = [price(u) for u in uses]
    return sum(r[0] for r in results), results[0][1], any(r[2] for r in results)


def _price_lowrank(uses: list, weight: torch.Tensor, rank: int, pricing: Pricing):
    out_f, in_f = weight.shape
    zeros = dict(dtype=weight.dtype, device=weight.device)

    def price(use: fx.Node):
        trial, node = _trial(use, lambda g, x, w: (LOWRANK_LINEAR, (x, w(torch.zeros(rank, in_f, **zeros)),
                                                                 w(torch.zeros(out_f, rank, **zeros)),
                                                                 w(_bias(use, weight)))), pricing)
        return pricing.lowered(trial, node)
    return _sum_over_uses(uses, price)


def _price_nm(uses: list, weight: torch.Tensor, n: int, m: int, pricing: Pricing):
    out_f, in_f = weight.shape
    mask = (torch.arange(in_f, device=weight.device) % m < n).expand(out_f, in_f)
    values, indices = compress(torch.zeros_like(weight), mask, n, m)
    stored = values.numel() * values.element_size() + indices.numel() * indices.element_size()

    def price(use: fx.Node):
        trial, node = _trial(use, lambda g, x, w: (NM_LINEAR, (x, w(values), w(indices), w(_bias(use, weight)),
                                                             n, m, in_f)), pricing)
        return pricing.lowered(trial, node)
    return (*_sum_over_uses(uses, price), stored)


def _price_quant(uses: list, weight: torch.Tensor, bits: int, group: int, rank: int,
                 pricing: Pricing):
    out_f, in_f = weight.shape
    like = dict(dtype=weight.dtype, device=weight.device)
    packed = pack(torch.zeros(out_f, in_f, dtype=torch.uint8, device=weight.device), bits)
    scales = torch.ones(out_f, in_f // group, **like)

    def price(use: fx.Node):
        def build(g, x, w):
            a = w(torch.zeros(out_f, rank, **like)) if rank else None
            b = w(torch.zeros(rank, in_f, **like)) if rank else None
            return QUANT_LINEAR, quant_linear_args(x, w(packed), w(scales), w(torch.zeros_like(scales)), a=a, b=b,
                                                   bias=w(_bias(use, weight)), bits=bits, group=group,
                                                   in_features=in_f)
        trial, node = _trial(use, build, pricing)
        return pricing.lowered(trial, node)
    return _sum_over_uses(uses, price)


def _price_int8(uses: list, weight: torch.Tensor, pricing: Pricing):
    out_f, in_f = weight.shape
    codes = torch.zeros(out_f, in_f, dtype=torch.int8, device=weight.device)
    scales = torch.ones(out_f, dtype=weight.dtype, device=weight.device)

    def price(use: fx.Node):
        trial, node = _trial(use, lambda g, x, w: (INT8_LINEAR, (x, w(codes), w(scales), w(_bias(use, weight)))),
                             pricing)
        return pricing.lowered(trial, node)
    return _sum_over_uses(uses, price)


def _price_int_lowrank(uses: list, weight: torch.Tensor, rank: int, bits: int, pricing: Pricing):
    """A factorized layer with int factors as ``factorize`` writes it: x → quant_linear(V) → quant_linear(U)."""
    out_f, in_f = weight.shape
    like = dict(dtype=weight.dtype, device=weight.device)

    def stage(use: fx.Node, rows: int, width: int, bias, first: bool):
        packed = pack(torch.zeros(rows, width, dtype=torch.uint8, device=weight.device), bits)
        scales = torch.ones(rows, 1, **like)
        trial, node = _trial(use, lambda g, x, w: (QUANT_LINEAR, quant_linear_args(
            x, w(packed), w(scales), w(torch.zeros_like(scales)), bias=w(bias), bits=bits, group=width,
            in_features=width)), pricing, None if first else rank, rank if first else None)
        return pricing.lowered(trial, node)

    def price(use: fx.Node):
        first_s, first_kernel, first_dense = stage(use, rank, in_f, None, True)
        second_s, second_kernel, second_dense = stage(use, out_f, rank, _bias(use, weight), False)
        kernel = first_kernel if first_kernel == second_kernel else f"{first_kernel} + {second_kernel}"
        return first_s + second_s, kernel, first_dense or second_dense

    codes = rank * -(-in_f // 8) * bits + out_f * -(-rank // 8) * bits  # packed bytes of V and U
    return (*_sum_over_uses(uses, price), codes + 2 * (rank + out_f) * weight.element_size())
