"""``lower``: the last stage. For each compressed node, choose how it runs on the target, and emit that.

The passes before it rewrite into canonical compressed ops (``slimfx.lowrank_linear``, ``quant_linear``,
``nm_linear``); this pass alone knows the target. It reads the device (the profile's, else the weights'), takes
the implementations the registry (``slimfx/codegen``) has for the op there, prices each on the profile
(``tune=model``) or times it on this machine (``tune=measure``), and emits the cheapest. A kernel that fuses the
pointwise ops after the layer (bias, activation, residual add, scale, gate) absorbs them, and is priced with
them; one that does not leaves them to Inductor. Each layer's choice and reason go into the report and the
node's annotations. Forms that expand compressed weights to dense ones give the memory saving up, so they are
offered only with ``storage=any``.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from ..codegen import impls as _impls  # noqa: F401 - registers the implementations
from ..codegen.epilogue import find_epilogue
from ..codegen.registry import Impl, Region, impls_for
from ..hw_profiles.cost_model import latency
from ..hw_profiles.op_costs import concrete, node_kernels, size_hints
from ..ir.ops import INT8_LINEAR, LOWRANK_LINEAR, NM_LINEAR, QUANT_LINEAR
from ..ir.program import Program
from .base import Pass, PassContext, register

COMPRESSED = (LOWRANK_LINEAR, QUANT_LINEAR, NM_LINEAR, INT8_LINEAR)


@register
@dataclass
class Lower(Pass):
    name = "lower"
    summary = "choose, per compressed layer and target, the kernel it runs: generated Triton (CUDA), aten or torch int kernels (CPU)"
    exact = True  # every implementation computes the op's math; only rounding differs

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the profile's device, else the weights'
    tune: Literal["model", "measure"] = "model"
    # auto: with a profile (a target to be fast on), keep the compressed weights unless every form that keeps them
    # is slower there than the dense layer, which then runs dense; without one, keep them (what was asked for).
    # compressed: always keep them; any: the cheapest form
    storage: Literal["auto", "compressed", "any"] = "auto"
    prefer: str = ""  # kernel names (a|b) to take wherever they apply, whatever they cost (benchmarks, debugging)

    def validate(self) -> None:
        from ..codegen.registry import IMPLS

        known = {impl.name for impl in IMPLS}
        unknown = [name for name in self.prefer.split("|") if name and name not in known]
        if unknown:
            raise self.invalid("prefer", f"names unknown kernels {unknown}; kernels: {', '.join(sorted(known))}")

    def run(self, program: Program, ctx: PassContext) -> Counter:
        counts: Counter = Counter()
        device = self._device(program, ctx)
        profile = ctx.profile if ctx.profile is not None else _default_profile(device)
        hints = size_hints(program.graph)
        decisions = []  # priced first, while every node has its metadata; emitted after
        claimed: set = set()  # epilogue nodes a fusing kernel already absorbs (a gate multiply has two layers)
        runs_dense: list[str] = []
        keep_storage = self.storage == "compressed" or (self.storage == "auto" and ctx.profile is None)
        preferred = set(filter(None, self.prefer.split("|")))
        where = "measured here" if self.tune == "measure" else f"on {profile.name}" + (
            "" if ctx.profile is not None else ", the built-in profile for this device")
        for node in [n for n in program.graph.nodes if n.op == "call_function" and n.target in COMPRESSED]:
            region = _region(node, claimed)
            origin = _origin(program, node)
            planned = set(ctx.planned_kernels.get(origin, ()))
            priced, refused, dense = self.rank(program, region, device, profile, hints, keep_storage,
                                               preferred | planned)
            if not priced:
                counts["reference"] += 1
                ctx.skip(self.name, origin, "no kernel applies, the reference op stays: "
                         + "; ".join(f"{i.name}: {why}" for i, why in refused))
                continue
            if dense:
                runs_dense.append(origin)
            decisions.append((region, priced))
            seconds, chosen = priced[0]
            if chosen.fuses_epilogue:
                claimed.update(region.chain)
            others = ", ".join(f"{impl.name} {s * 1e6:.1f} us" for s, impl in priced[1:])
            fused = f", fusing {region.epilogue}" if chosen.fuses_epilogue and region.epilogue.steps else ""
            ctx.note(f"lower: {origin}: {chosen.name} ({seconds * 1e6:.1f} us {where}{fused}"
                     f"{'; vs ' + others if others else ''})")
        if runs_dense:
            ctx.note(f"lower: {len(runs_dense)} compressed layer(s) run dense, because every form that keeps them "
                     f"compressed is predicted slower than dense on {profile.name}: {', '.join(runs_dense)}. Their "
                     "compression then saves memory only in the canonical model (compress(..., lower=False)); "
                     "lower{storage=compressed} keeps it at that speed")
        replaced: dict = {}  # node -> what now computes its value (an extra may be an earlier layer's output)
        chosen_costs = {region.node: priced[0][1].cost(region.node) for region, priced in decisions}  # (all
        for region, priced in decisions:  # nodes still have their metadata here)
            region = dataclasses.replace(region, extras=tuple(replaced.get(e, e) for e in region.extras))
            old, new = self._emit(program, region, priced[0][1], chosen_costs[region.node])
            replaced[old] = new
            counts[priced[0][1].name] += 1
        program.graph.eliminate_dead_code()
        program.drop_unused_weights()
        return counts

    def rank(self, program: Program, region: Region, device: str, profile, hints: dict, keep_storage: bool,
             preferred: set[str] = frozenset()) -> tuple[list[tuple[float, Impl]], list[tuple[Impl, str]], bool]:
        """The kernels that can run ``region`` on ``device``, cheapest (as this pass would choose) first, with the
        refused ones and why, and whether the choice runs the layer dense (``storage=auto``: every form that
        keeps the compressed weights is slower there than the dense one). The planner prices its options here."""
        options, refused = [], []
        for impl in impls_for(region.node.target, device):
            why = impl.why_not(program, region.node) or (
                "expands the compressed weights" if not impl.keeps_storage and keep_storage else None)
            (refused if why else options).append((impl, why))
        priced = sorted(((self._price(program, region, impl, profile, hints), impl) for impl, _ in options),
                        key=lambda pair: (pair[1].name not in preferred, pair[0]))
        runs_dense = False
        if priced and self.storage == "auto" and priced[0][1].name not in preferred:
            kept = [pair for pair in priced if pair[1].keeps_storage]
            dense = [pair for pair in priced if not pair[1].keeps_storage]
            if kept and dense and kept[0][0] > dense[0][0]:
                runs_dense = True
                priced = dense[:1] + [pair for pair in priced if pair is not dense[0]]
            elif kept:
                priced = kept[:1] + [pair for pair in priced if pair is not kept[0]]
        return priced, refused, runs_dense

    def _device(self, program: Program, ctx: PassContext) -> str:
        if self.device != "auto":
            return self.device
        if ctx.profile is not None:
            return ctx.profile.device
        devices = {program.tensor(n).device.type for n in program.graph.nodes if program.is_weight(n)}
        return "cuda" if "cuda" in devices else "cpu"

    def _price(self, program: Program, region: Region, impl: Impl, profile, hints: dict) -> float:
        if self.tune == "measure":
            return _measured(program, region, impl, hints)
        kernels = list(impl.cost(region.node))
        if not impl.fuses_epilogue:  # the epilogue's ops run separately (Inductor may fuse some of them)
            for node in region.chain:
                kernels += node_kernels(node) or []
        return concrete(latency(kernels, profile), hints)

    @staticmethod
    def _emit(program: Program, region: Region, impl: Impl, kernels: list) -> tuple[fx.Node, fx.Node]:
        replaced = region.last if impl.fuses_epilogue else region.node
        anchor = replaced.prev
        with program.graph.inserting_before(replaced):
            new = impl.emit(program, region)
        program.annotations(new).update({**program.annotations(region.node), "kernel": impl.name})
        # the report prices the emitted ops as the kernel they were chosen as (Inductor fuses a dozen pointwise
        # aten ops around an int8 GEMM into one pass; priced one by one they would cost a launch each)
        node = anchor.next
        while node is not replaced:  # what emit inserted, and only that
            if node.op == "call_function":
                node.meta["slimfx_lowered_as"] = impl.name
            node = node.next
        new.meta["slimfx_lowered_cost"] = kernels
        replaced.replace_all_uses_with(new)
        for node in reversed(region.chain if impl.fuses_epilogue else ()):
            program.graph.erase_node(node)
        program.graph.erase_node(region.node)
        return replaced, new


def device_key(device: str) -> str:
    """Names the machine a measurement belongs to (measurements are cached per device)."""
    import platform

    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu:{platform.machine()}:{platform.processor() or 'cpu'}:{torch.get_num_threads()}threads"


class _MeasuredCache:
    """Seconds per (kernel, epilogue, sizes) on one device, kept in ``$SLIMFX_CACHE/measured.json``."""

    def __init__(self) -> None:
        self.entries: dict[str, float] | None = None

    def _path(self):
        from ..models import cache_dir

        return cache_dir() / "measured.json"

    def get(self, key: str, time_it) -> float:
        import json

        if self.entries is None:
            try:
                self.entries = json.loads(self._path().read_text())
            except (OSError, ValueError):
                self.entries = {}
        if key not in self.entries:
            self.entries[key] = time_it()
            try:
                self._path().parent.mkdir(parents=True, exist_ok=True)
                self._path().write_text(json.dumps(self.entries, indent=0, sort_keys=True))
            except OSError:
                pass  # a read-only cache only costs re-measuring
        return self.entries[key]


MEASURED = _MeasuredCache()


def _measured(program: Program, region: Region, impl: Impl | None, hints: dict | None = None) -> float:
    """The region lowered by ``impl`` (None: as it is, e.g. a dense layer), alone, compiled by torch.compile and
    timed on its example sizes (or ``hints``'); cached per device."""
    from ..hw_profiles.calibrate import measure

    sub, sub_region, inputs = _alone(program, region, hints)
    device = inputs[0].device.type
    shapes = [tuple(t.shape) for t in inputs] + [tuple(program.tensor(a).shape) for a in region.node.all_input_nodes
                                                 if program.is_weight(a)]
    key = "|".join(map(str, (device_key(device), impl.name if impl else f"as-is:{region.node.target}",
                             region.epilogue, inputs[0].dtype, shapes, [a for a in region.node.args[2:] if not isinstance(a, fx.Node)])))

    def time_it() -> float:
        if impl is not None:
            Lower._emit(sub, sub_region, impl, [])
        sub.gm.recompile()
        compiled = torch.compile(sub.gm, dynamic=False)
        with torch.no_grad():
            return measure(lambda: compiled(*inputs), device, 0.02, 5)
    return MEASURED.get(key, time_it)


def _alone(program: Program, region: Region, hints: dict | None = None) -> tuple[Program, Region, list]:
    """A program holding only the region: its inputs as placeholders (random, at the example sizes), its weights."""
    from ..ir.program import WeightInfo
    from ..timing import random_like

    graph, holder, weights, inputs, env = fx.Graph(), torch.nn.Module(), {}, [], {}
    nodes = [region.node, *region.chain]
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg in env or arg in nodes:
                continue
            if program.is_weight(arg):
                name = f"w{len(weights)}"
                holder.register_buffer(name, program.tensor(arg))
                info = program.weights[arg.target]
                weights[name] = WeightInfo(info.origin, info.derived_by, info.note, info.kind, info.constraints)
                env[arg] = graph.get_attr(name)
            else:
                env[arg] = graph.placeholder(f"input{len(inputs)}")
                inputs.append(random_like(arg, hints))
            env[arg].meta = dict(arg.meta)
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[nodes[-1]])
    sub = Program(fx.GraphModule(holder, graph), weights, tuple(inputs))
    sub_region = Region(env[region.node], region.epilogue, tuple(env[e] for e in region.extras),
                        tuple(env[c] for c in region.chain))
    return sub, sub_region, inputs


def _region(node, claimed: set) -> Region:
    """The node's epilogue, cut before the first op another kernel has absorbed."""
    epilogue, extras, chain = find_epilogue(node)
    keep = next((i for i, n in enumerate(chain) if n in claimed), len(chain))
    if keep < len(chain):
        epilogue, extras, chain = find_epilogue(node, limit=keep)
    return Region(node, epilogue, tuple(extras), tuple(chain))


def _origin(program: Program, node: fx.Node) -> str:
    weight = node.args[1]
    return program.weights[weight.target].origin if program.is_weight(weight) else node.name


def _default_profile(device: str):
    from ..hw_profiles.profiles import load_profile, local_profile

    return local_profile() if device == ("cuda" if torch.cuda.is_available() else "cpu") else load_profile(
        "h100" if device == "cuda" else "cpu-generic")
