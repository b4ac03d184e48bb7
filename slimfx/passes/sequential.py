"""Sequential calibration: a data-aware pass compresses a model built from repeated blocks one block at a time.

As the GPTQ and SparseGPT reference implementations do: the calibration inputs run through the model segment by
segment (what comes before the first block, each block, what follows the last). Each segment's layer statistics
come from its inputs as the already-compressed segments before it produce them; the pass rewrites that segment's
layers alone; the rewritten segment then runs once more to produce the next segment's inputs. Only one segment's
statistics are alive at a time, and between segments only the values later nodes read (the residual stream, a
mask, rotary tables) are kept, in the model's dtype.

Blocks are found from ``nn_module_stack``: the container whose numbered children (``model.layers.0``, ``h.1``)
hold the most layers. A model without one falls back to one-shot statistics, with a note.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import re
import time
from collections import Counter
from dataclasses import dataclass
import torch
import torch.fx as fx

from ..ir.op_table import DENSE_LAYERS
from ..ir.program import Program, fetch_attr, is_input_guard
from ..progress import progress
from .base import Pass, PassContext
from .calibration import ActivationStats, Interpreter, _Collector, calibration_inputs, layer_rows, warn_if_thin

_NUMBERED = re.compile(r"^(.*)\.(\d+)$")


@dataclass
class Segments:
    """The graph's nodes cut into segments in graph order: [before the blocks, block 0, ..., after the blocks]."""

    container: str  # the module path whose numbered children are the blocks (e.g. "model.layers")
    nodes: list[list[fx.Node]]

    @property
    def blocks(self) -> int:
        return len(self.nodes) - 2


def _block_of(node: fx.Node, container: str) -> int | None:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        match = _NUMBERED.match(path)
        if match and match.group(1) == container:
            return int(match.group(2))
    return None


def find_segments(program: Program) -> Segments | str:
    """The segments, or why the model has no block structure to calibrate sequentially."""
    counts: Counter = Counter()
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in DENSE_LAYERS:
            seen = set()
            for path, _ in (node.meta.get("nn_module_stack") or {}).values():
                match = _NUMBERED.match(path)
                if match and match.group(1) not in seen:
                    seen.add(match.group(1))
                    counts[(match.group(1), int(match.group(2)))] += 1
    containers = Counter(c for c, _ in counts)
    repeated = [c for c, n in containers.items() if n >= 2]
    if not repeated:
        return "no repeated blocks (numbered children of one module, such as model.layers.0, .1, ...) hold its layers"
    layers_in = {c: sum(n for (k, _), n in counts.items() if k == c) for c in repeated}
    container = max(repeated, key=lambda c: (layers_in[c], -len(c)))
    indices = sorted(i for c, i in counts if c == container)
    position = {index: k + 1 for k, index in enumerate(indices)}
    order = list(program.graph.nodes)
    last = max(i for i, n in enumerate(order) if _block_of(n, container) == indices[-1])
    nodes: list[list[fx.Node]] = [[] for _ in range(len(indices) + 2)]
    current = 0
    for i, node in enumerate(order):
        if node.op in ("placeholder", "get_attr"):
            nodes[0].append(node)  # inputs and weights: read by every segment
            continue
        block = _block_of(node, container)
        if i > last:
            current = len(nodes) - 1  # after the last block: the final norm, the head, the output
        elif block in position:
            if position[block] < current:
                return f"the blocks of {container} interleave in the graph (block {block} after a later one)"
            current = position[block]
        nodes[current].append(node)  # a node between blocks (outside any) goes with the block before it
    return Segments(container, nodes)


class _Runner(Interpreter):
    """Runs chosen nodes on an environment of live values (one calibration batch's). With ``stats`` it collects
    the statistics of the layers it passes through; with ``record`` it keeps each layer's input rows."""

    def __init__(self, program: Program, stats: ActivationStats | None = None, record: bool = False,
                 device_map: dict | None = None):
        super().__init__(program.gm)
        self.program = program
        self.collector = _Collector(program, stats) if stats is not None else None
        self.rows: dict[tuple, torch.Tensor] | None = {} if record else None
        self.device_map = device_map or {}
        if self.collector is not None:
            self.collector.device_map = self.device_map

    def run_nodes(self, nodes: list[fx.Node], env: dict, original_rows: dict | None = None) -> dict:
        runner = self.collector or self
        runner.env = env
        if self.collector is not None:
            self.collector.added, self.collector.original_rows = set(), original_rows
        if self.rows is not None:
            self.rows = {}
        # weights are read from the program each time, never carried between segments: offloading moves them
        env.update({a: fetch_attr(self.program.gm, a.target) for n in nodes for a in n.all_input_nodes
                    if a.op == "get_attr"})
        for node in nodes:
            if node.op in ("output", "get_attr") or node in env:
                continue
            if is_input_guard(node):
                env[node] = None
                continue
            if self.rows is not None:
                self._record(node, env)
            env[node] = runner.run_node(node) if self.collector is not None else super().run_node(node)
        return env

    def _record(self, node: fx.Node, env: dict) -> None:
        found = layer_rows(self.program, node, env)
        if found is not None:
            self.rows.setdefault(*found)


def run_pass(pass_: Pass, program: Program, ctx: PassContext) -> Counter:
    """A data-aware pass on raw calibration batches runs block by block (``sequential``) unless the context asks
    for one-shot statistics; everything else runs on the whole program at once. The manager runs every pass
    through here, and the plan pass each pass that executes its plan."""
    if (ctx.calibration_mode == "sequential" and pass_.per_layer_statistics and ctx.calibration is not None
            and not isinstance(ctx.calibration, ActivationStats) and program.frontend == "export"):
        return run_sequentially(pass_, program, ctx)
    return pass_.run(program, ctx)


def run_sequentially(pass_: Pass, program: Program, ctx: PassContext) -> Counter:
    """Run a data-aware pass segment by segment (see the module docstring); one-shot where that cannot be done.

    Two streams of values advance together: the original model's and the compressed one's. Each layer's
    statistics hold the compressed stream's Gram matrix and its cross term with the original stream, so the pass
    fits the layer to the inputs it will see, against the outputs the original computed (``LayerStats.compensate``).
    """
    segments = find_segments(program)
    if isinstance(segments, str):
        ctx.note(f"{pass_.name}: calibrated one-shot (all statistics from the model before the pass): {segments}"
                 + (f"; compute_device={ctx.compute_device} not used: the model runs where it is"
                    if ctx.compute_device is not None else ""))
        return pass_.run(program, ctx)
    batches = calibration_inputs(program, ctx.calibration)
    placement = Placement(program, ctx.compute_device) if ctx.compute_device is not None else None
    if placement is not None:
        batches = [placement.inputs(batch) for batch in batches]
    device_map = placement.device_map if placement is not None else None
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    compressed = [dict(zip(placeholders, batch)) for batch in batches]
    original = [dict(env) for env in compressed]
    counts: Counter = Counter()
    started = time.perf_counter()
    segment_nodes, warned = segments.nodes, False
    try:
        for index in progress(range(len(segment_nodes)), f"{pass_.name}: blocks of {segments.container}"):
            alive = set(program.graph.nodes)
            nodes = [n for n in segment_nodes[index] if n in alive]
            later = {a for rest in segment_nodes[index + 1 :] for n in rest if n in alive for a in n.all_input_nodes}
            scope = _origins(program, nodes)
            if placement is not None:
                placement.move_in(nodes)
            stats = ActivationStats(dtype=ctx.stats_dtype)
            collector = _Runner(program, stats, device_map=device_map)
            recorder = _Runner(program, record=bool(scope), device_map=device_map)
            for k in range(len(batches)):  # the original stream passes the segment as it was; statistics meanwhile
                advanced = recorder.run_nodes(nodes, dict(original[k]))
                original[k] = _carried(advanced, later)
                if scope:
                    collector.run_nodes(nodes, dict(compressed[k]), recorder.rows)
                    stats.batches += 1
            if scope:
                if not warned:
                    warn_if_thin(stats)
                    warned = True
                ctx.block_stats, ctx.scope = stats, scope
                counts.update(pass_.run(program, ctx))
                ctx.block_stats, ctx.scope = None, None
                program.gm.recompile()
                ours = set(nodes) | (set(program.graph.nodes) - alive)  # what the pass added is this segment's
                nodes = segment_nodes[index] = [n for n in program.graph.nodes if n in ours]
            del stats, collector, recorder
            release_memory()
            alive = set(program.graph.nodes)
            later = {a for rest in segment_nodes[index + 1 :] for n in rest if n in alive for a in n.all_input_nodes}
            runner = _Runner(program, device_map=device_map)
            for k in range(len(batches)):
                env = runner.run_nodes(nodes, compressed[k])
                compressed[k] = _carried(env, later)
                # a value the rewrite renamed (a segment ending in a rewritten layer) follows the compressed stream
                original[k].update({n: v for n, v in compressed[k].items() if n not in original[k]})
            if placement is not None:
                placement.move_out(nodes)
    finally:
        ctx.block_stats, ctx.scope = None, None
        if placement is not None:  # after an error too: every weight back where the model is
            placement.move_out(list(program.graph.nodes))
    pass_.check_counts(counts)
    on = f", each block on {ctx.compute_device}" if placement is not None else ""
    ctx.note(f"{pass_.name}: calibrated sequentially over {segments.blocks} blocks of {segments.container} "
             f"({len(batches)} batches{on}, {time.perf_counter() - started:.1f} s)")
    return counts


class Placement:
    """Offloading: the model's weights stay where they are (the CPU, or memory-mapped from disk) and each segment's
    move to the compute device while it is calibrated and compressed. Afterwards the model's own tensors are put
    back as they were (the same objects, not copies) and the new ones (compressed weights) are moved to where
    the model is. Device arguments the capture baked into the graph are mapped the same way."""

    def __init__(self, program: Program, device: torch.device):
        self.program, self.device = program, torch.device(device)
        weight = next((program.tensor(n) for n in program.graph.nodes if program.is_weight(n)), None)
        self.home = weight.device if weight is not None else torch.device("cpu")
        self.device_map = {self.home: self.device} if self.home != self.device else {}
        self.originals: dict[str, torch.Tensor] = {}  # target -> the model's own tensor, while a copy is out

    def inputs(self, batch: list) -> list:
        return [v.to(self.device) if isinstance(v, torch.Tensor) else v for v in batch]

    def move_in(self, nodes: list[fx.Node]) -> None:
        for target in self._read_by(nodes):
            value = fetch_attr(self.program.gm, target)
            if isinstance(value, torch.Tensor) and value.device != self.device:
                self.originals.setdefault(target, value)
                self.program.place(target, value.detach().to(self.device))

    def move_out(self, nodes: list[fx.Node]) -> None:
        """The segment's weights home: the model's own restored, new ones moved; the originals of weights a pass
        replaced are let go (the program no longer holds them)."""
        for target, value in self.originals.items():
            if _has_attr(self.program.gm, target):
                self.program.place(target, value)
        self.originals.clear()
        for target in self._read_by(nodes):
            value = fetch_attr(self.program.gm, target)
            if isinstance(value, torch.Tensor) and value.device != self.home:
                self.program.place(target, value.detach().to(self.home))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _read_by(self, nodes: list[fx.Node]) -> set[str]:
        alive = set(self.program.graph.nodes)
        return {a.target for n in nodes if n in alive and n.op != "get_attr" for a in n.all_input_nodes
                if a.op == "get_attr"}


def _carried(env: dict, later: set) -> dict:
    """The values later segments read (weights are fetched afresh by each segment)."""
    return {n: v for n, v in env.items() if n in later and n.op != "get_attr"}


def _has_attr(module: torch.nn.Module, target: str) -> bool:
    try:
        fetch_attr(module, target)
        return True
    except AttributeError:
        return False


def release_memory() -> None:
    """Hand the memory a finished block freed back to the system. glibc keeps freed blocks under its mmap threshold
    (which grows to 32 MB) in its heaps; block after block of statistics and rows then leaves the process holding
    what it no longer uses (measured: 0.5 GiB after 4 blocks of a 1.1B-shaped model, every byte of it freed).
    Elsewhere a no-op."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _origins(program: Program, nodes: list[fx.Node]) -> set[str]:
    return {program.weights[n.args[1].target].origin for n in nodes
            if n.op == "call_function" and n.target in DENSE_LAYERS and program.is_weight(n.args[1])}
