"""``nm{n=2,m=4}``: prune linear layers so every m consecutive input weights keep at most n.

Masks come from ``nm_masks`` (magnitude, wanda, sparsegpt). The pruned layer is written in the canonical
compressed form (``slimfx.nm_linear``: values + packed indices, weight memory really shrinks); how it runs on the
target (cuSPARSELt 2:4, the generated load-as-sparse kernel, or the masked weight expanded to a dense one where
nothing sparse pays, as on CPUs) is the ``lower`` stage's choice, reported per layer. ``layout=dense`` keeps the
masked weight dense from the start (to fine-tune it, say).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.fx as fx

from ..errors import PipelineError
from ..ir.ops import NM_LINEAR
from ..ir.program import LINEAR, Constraint, Program
from ..ir.sparse_format import compress
from ..progress import progress
from .base import Pass, PassContext, claim_uses, first_use_of_each_weight, register, replace_each
from .calibration import LayerStats, require_stats
from .nm_masks import magnitude_mask, sparsegpt, wanda_mask
from .quant_lowrank import output_error
from .nm_permute import kept_saliency, producer_of, search_permutation


@register
@dataclass
class NMSparsity(Pass):
    name = "nm"
    summary = "N:M structured sparsity (wanda, sparsegpt, magnitude), stored compressed; lower picks how it runs"

    n: int = 2
    m: int = 4
    method: Literal["wanda", "sparsegpt", "magnitude"] = "wanda"
    layout: Literal["auto", "compressed", "dense"] = "auto"
    exclude: str = ""  # regex on weight names to leave dense, e.g. "embed|lm_head"
    only: str = ""  # regex: prune just these; a width m does not divide is then an error, not a note
    skip_first: bool = False
    skip_last: bool = False
    block: int = 128
    damp: float = 0.01
    permute: bool = False  # reorder input channels for a better mask, folded into the producing layer
    permute_seconds: float = 10.0  # the permutation search's time budget per layer
    plan: Optional[dict] = None  # weight origin -> (n, m), from the planner: only these layers, these patterns

    def validate(self) -> None:
        if self.m < 2:
            raise self.invalid("m", "must be >= 2")
        if not 1 <= self.n < self.m:
            raise self.invalid("n", f"must be in [1, m) = [1, {self.m}): n >= m would prune nothing")
        if not self.permute_seconds > 0:
            raise self.invalid("permute_seconds", "must be > 0 (seconds of permutation search per layer)")
        if self.block < self.m:
            raise self.invalid("block", f"must be >= m={self.m}")
        if not 0 <= self.damp < 1:
            raise self.invalid("damp", "must be in [0, 1)")
        self.check_regex("exclude", "only")
        if self.plan is not None and self.permute:
            raise self.invalid("permute", "cannot be combined with a plan (the planner priced unpermuted masks)")
        for origin, (n, m) in (self.plan or {}).items():
            if m < 2 or not 1 <= n < m:
                raise PipelineError(f"nm: plan gives {origin} the pattern {n}:{m}; a pattern keeps 1 <= n < m of m >= 2")

    @property
    def per_layer_statistics(self) -> bool:
        return self.method != "magnitude"

    def run(self, program: Program, ctx: PassContext) -> Counter:
        counts: Counter = Counter()
        stats = require_stats(program, ctx, self.method != "magnitude", f"nm{{method={self.method}}}",
                              "method=magnitude")
        layers = first_use_of_each_weight(program, (LINEAR,))  # a weight is decided once for all layers reading it
        if self.skip_first:
            layers = layers[1:]
        if self.skip_last:
            layers = layers[:-1]
        chosen = []
        for node in layers:
            origin = program.weights[node.args[1].target].origin
            if (self.exclude and re.search(self.exclude, origin)) or (self.only and not re.search(self.only, origin)) \
                    or (self.plan is not None and origin not in self.plan):
                continue
            uses = claim_uses(self.name, program, node, ("nm-mask", "quantized", "factorized"), ctx, counts)
            if uses is not None:
                chosen.append((uses, origin))
        single = [(uses[0], origin) for uses, origin in chosen if len(uses) == 1]  # a shared input cannot be permuted
        permuted_stats = self._permute_inputs(program, single, stats, counts, ctx) if self.permute else {}
        for uses, origin in progress(chosen, "nm layers"):
            layer_stats = permuted_stats.get(uses[0])
            if layer_stats is None and stats is not None:
                layer_stats = stats.get(origin, program.tensor(uses[0].args[1]).shape[1])
            outcome, why = self._rewrite(program, uses, origin, layer_stats, ctx)
            counts[outcome] += 1
            if outcome.startswith("skipped"):
                ctx.skip(self.name, origin, why.removeprefix("left dense: "))
            elif why:
                ctx.note(f"nm: {origin}: {why}")
        program.graph.eliminate_dead_code()
        program.drop_unused_weights()
        return counts

    def _permute_inputs(self, program: Program, chosen: list, stats, counts: Counter, ctx: PassContext) -> dict:
        """Reorder each chosen layer's input channels (and its producer's outputs); returns permuted stats."""
        permuted: dict = {}
        for node, origin in chosen:
            producer = producer_of(program, node)
            weight = program.tensor(node.args[1])
            in_f = weight.shape[1]
            if producer is None or in_f % self.m:
                continue
            layer_stats = stats.get(origin, in_f) if stats is not None else None
            norm = layer_stats.gram.diagonal().clamp_min(0).sqrt().float() if layer_stats is not None else 1.0
            saliency = weight.detach().abs().float() * norm
            perm = search_permutation(saliency, self.n, self.m, seconds=self.permute_seconds)
            if kept_saliency(saliency[:, perm], self.n, self.m) <= kept_saliency(saliency, self.n, self.m):
                continue
            self._replace_weight(program, node, 1, weight[:, perm], "input channels permuted")
            self._replace_weight(program, producer, 1, program.tensor(producer.args[1])[perm], "outputs permuted")
            if len(producer.args) > 2 and producer.args[2] is not None:
                self._replace_weight(program, producer, 2, program.tensor(producer.args[2])[perm], "outputs permuted")
            if layer_stats is not None:
                permuted[node] = LayerStats(layer_stats.gram[perm][:, perm], layer_stats.abs_sum[perm],
                                            layer_stats.rows)
            ctx.inputs_changed.add(origin)  # statistics collected before this pass no longer describe its input
            counts["permuted"] += 1
        return permuted

    def _replace_weight(self, program: Program, node: fx.Node, index: int, value: torch.Tensor, note: str) -> None:
        old = node.args[index]
        with program.graph.inserting_before(node):
            new = program.add_weight(f"{old.target}_perm", value, program.weights[old.target].origin, self.name, note)
        node.update_arg(index, new)

    def _rewrite(self, program: Program, uses: list[fx.Node], origin: str, layer_stats,
                 ctx: PassContext) -> tuple[str, str]:
        node = uses[0]
        n, m = self.plan[origin] if self.plan is not None else (self.n, self.m)
        weight = program.tensor(node.args[1])
        out_f, in_f = weight.shape
        if in_f % m:
            if self.only:
                raise PipelineError(f"nm: {origin} has {in_f} input features, which m={m} does not divide; "
                                    "choose an m that divides it or leave the layer out of only=")
            return "skipped-width", f"left dense: {in_f} input features are not a multiple of m={m}"
        if self.method != "magnitude" and layer_stats is None:
            return "skipped-no-calibration-statistics", "left dense: no calibration statistics reached this layer"
        if layer_stats is not None and layer_stats.cross is not None:  # sequential calibration (compensate)
            weight = layer_stats.compensate(weight).to(weight.dtype)
        if self.method == "magnitude":
            mask = magnitude_mask(weight, n, m)
            pruned = weight * mask
        elif self.method == "wanda":
            mask = wanda_mask(weight, layer_stats, n, m)
            pruned = weight * mask
        else:
            pruned, mask = sparsegpt(weight, layer_stats, n, m, self.block, self.damp)
        layout, why = self._choose_layout()
        note = {"nm": f"{n}:{m}", "layout": layout}
        # without data the weights' own relative error stands in for the output's
        error = output_error(pruned - weight, weight, layer_stats)
        if layer_stats is not None:
            note["pred_err"] = round(error, 4)
        ctx.layer_errors[origin] = error
        mask_kept = (Constraint("nm-mask", self.name, f"{n}:{m}"),)
        with program.graph.inserting_before(node):  # new weights are made once, before the first use
            if layout == "compressed":
                values, indices = compress(pruned, mask, n, m)
                target, tail = NM_LINEAR, (n, m, in_f)
                weights = (program.add_weight(f"{origin}_values", values, origin, self.name,
                                              f"{n}:{m} values", mask_kept),
                           program.add_weight(f"{origin}_indices", indices, origin, self.name,
                                              f"{n}:{m} indices", mask_kept))
            else:
                target, tail = LINEAR, ()
                weights = (program.add_weight(f"{origin}_{n}of{m}", pruned, origin, self.name,
                                              f"{n}:{m} masked, dense layout", mask_kept),)

        def build(use: fx.Node) -> fx.Node:
            bias = use.args[2] if len(use.args) > 2 else None
            return program.graph.call_function(target, (use.args[0], *weights, bias, *tail))

        replace_each(program, uses, build, note)
        return layout, why

    def _choose_layout(self) -> tuple[str, str]:
        if self.layout == "dense":
            return "dense", "dense layout, mask only (layout=dense)"
        return "compressed", ""
