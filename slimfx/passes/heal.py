"""``heal{steps=200}``: a short distillation of what the lossy passes made, against the original's outputs.

The papers this project follows (SVD-LLM, SparseGPT/Wanda with fine-tuning, LQER/EoRA, DepthShrinker) report
their numbers after such a step. Trained: low-rank factors, the kept N:M values (the mask stays fixed: indices
are not trained), the quantization corrections A and B (the codes, scales and zero points stay), and the
weights of factorized and merged convs and linears. Compressed ops run through their reference math
(differentiable) while training. The target is the original model's outputs on the calibration batches, computed
before the first pass; a quarter of the batches are held out, and the report shows the output error on them
before and after. Kept only if its loss falls there and, with ``loss=kl`` under a max_error budget, the output
error there does not rise above both that budget and its level before healing (held-out batches are a sample: the
whole calibration set may still read a little differently).
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..ir.ops import LOWRANK_LINEAR, NM_LINEAR, QUANT_LINEAR, REFERENCE
from ..ir.program import CONV2D, LINEAR, Program, fetch_attr
from .base import Pass, PassContext, register
from .distill import LOSSES, _set, distill, distillation_loss, output_error

TRAINED_ARGS = {LOWRANK_LINEAR: (1, 2), NM_LINEAR: (1,), QUANT_LINEAR: (4, 5)}
LOSSY_PASSES = ("factorize", "depth-merge", "nm", "quant-lowrank")


@register
@dataclass
class Heal(Pass):
    name = "heal"
    summary = "distil the compressed layers' factors, kept values and corrections against the original's outputs"
    needs_reference: ClassVar[bool] = True  # the manager keeps the original's outputs on calibration batches

    steps: int = 200
    lr: float = 1e-2  # relative: each tensor's Adam step is this fraction of its RMS
    batches: int = 8  # calibration batches trained on (and scored on)
    loss: str = "mse"  # "kl": match the softmax of the first output, the logits (an LM's, a classifier's)
    decay: bool = True  # the learning rate falls to 0 along a cosine over the steps

    def validate(self) -> None:
        if self.steps < 0:
            raise self.invalid("steps", "must be >= 0")
        if not 0 < self.lr < 1:
            raise self.invalid("lr", "must be in (0, 1)")
        if self.batches < 1:
            raise self.invalid("batches", "must be >= 1")
        if self.loss not in LOSSES:
            raise self.invalid("loss", f"must be one of {', '.join(LOSSES)}")

    def run(self, program: Program, ctx: PassContext) -> Counter:
        from .plan import require_batches

        if self.steps == 0:
            return Counter()
        require_batches(ctx, "heal")
        batches, reference = ctx.reference
        targets = healable(program)
        if not targets:
            ctx.note("heal: nothing to train (no low-rank factors, kept N:M values, corrections or merged layers)")
            return Counter({"unchanged": 0})
        if self.loss == "kl":
            check_logits(reference[0][0] if reference and reference[0] else None)
        kept = {t: fetch_attr(program.gm, t) for t in targets}
        infos = {t: dataclasses.replace(program.weights[t]) for t in targets}
        balance_factors(program)
        overrides = {n: _reference(n) for n in program.graph.nodes
                     if n.op == "call_function" and n.target in REFERENCE}
        held = len(batches) // 4  # scored on batches it did not train on: a few batches are easy to overfit
        train, check = (batches[:-held], batches[-held:]) if held else (batches, batches)
        train_ref, check_ref = (reference[:-held], reference[-held:]) if held else (reference, reference)
        error_before = output_error(program, check, check_ref, overrides)  # what the report shows, whatever the loss
        before = error_before if self.loss == "mse" else distillation_loss(program, check, check_ref, self.loss,
                                                                             overrides)
        distill(program, train, train_ref, self.steps, self.lr, self.name, targets, overrides, relative_lr=True,
                loss=self.loss, decay=self.decay)
        after = distillation_loss(program, check, check_ref, self.loss, overrides)
        error_after = after if self.loss == "mse" else output_error(program, check, check_ref, overrides)
        why_not = "" if after < before else "its loss did not fall there"
        cap = error_budget(ctx)  # a KL heal can lower the KL while the output error a max_error budget reads rises
        if not why_not and cap is not None and math.sqrt(error_after) > max(cap, math.sqrt(error_before)):
            why_not = f"its output error {math.sqrt(error_after):.4f} exceeds the budget's max_error={cap:g}"
        if why_not:  # it did not generalise, or broke the budget: leave the compressed model as it was
            for t, value in kept.items():
                _set(program.gm, t, value)
                program.weights[t] = infos[t]
            error_after = error_before
        where = f"{len(check)} held-out calibration batch(es)" if held else "the calibration data (too few batches " \
                                                                             "to hold some out)"
        ctx.heal_errors = (math.sqrt(error_before), math.sqrt(error_after))
        judged = f"; KL of the logits there {before:.5f} -> {after:.5f}" if self.loss == "kl" else ""
        ctx.note(f"heal: {len(targets)} tensors trained {self.steps} steps ({self.loss}) on {len(train)} batch(es); "
                 f"output error on {where} {math.sqrt(error_before):.4f} -> {math.sqrt(error_after):.4f}{judged}"
                 + (f" (not kept: {why_not})" if why_not else ""))
        return Counter({"unchanged": len(targets)} if why_not else {"trained": len(targets)})


def error_budget(ctx: PassContext) -> float | None:
    """The tightest max_error of the plans this run made (None: no error budget)."""
    caps = [p.budget.max_error for p in ctx.plans if p.budget.max_error is not None]
    return min(caps) if caps else None


def check_logits(output) -> None:
    """``loss=kl`` reads the model's first floating-point output as logits over its last dimension."""
    from ..errors import PipelineError

    if output is None or output.dim() < 1 or output.shape[-1] < 2:
        shape = "none" if output is None else tuple(output.shape)
        raise PipelineError(f"heal{{loss=kl}} matches the softmax of the model's first floating-point output, which "
                            f"must be logits over its last dimension; it has shape {shape} (a loss computed from "
                            "labels in the batches comes first: leave the labels out, or use loss=mse)")
    if not torch.isfinite(output).all():
        raise PipelineError("heal{loss=kl}: the original's logits on the calibration batches are not all finite "
                            "(masked with -inf?); use loss=mse")


def healable(program: Program) -> list[str]:
    """The weights heal trains, as get_attr targets: what the lossy passes made, minus codes and indices."""
    out: list[str] = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        positions = TRAINED_ARGS.get(node.target, ())
        if node.target in (LINEAR, CONV2D) and program.is_weight(node.args[1]):
            info = program.weights[node.args[1].target]
            if info.derived_by in LOSSY_PASSES and not any(c.kind == "nm-mask" for c in info.constraints):
                positions = (1,)  # a masked dense weight would lose its mask
        for i in positions:
            arg = node.args[i] if i < len(node.args) else None
            if program.is_weight(arg) and program.tensor(arg).is_floating_point() and arg.target not in out:
                out.append(arg.target)
    return out


def balance_factors(program: Program) -> None:
    """Give each low-rank pair once (V and U of a factorized layer, B and A of a correction) equal norms per rank
    component, without changing their product: whitening leaves one factor orders of magnitude smaller than the
    other, and Adam's per-element steps would then wreck the small one. New tensors replace the old ones."""
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in (LOWRANK_LINEAR, QUANT_LINEAR):
            continue
        first, second = (node.args[1], node.args[2]) if node.target == LOWRANK_LINEAR else (node.args[5], node.args[4])
        if not (program.is_weight(first) and program.is_weight(second)):
            continue
        rows, cols = program.tensor(first), program.tensor(second)  # [r, in] and [out, r]
        if not (rows.is_floating_point() and cols.is_floating_point()):
            continue  # int8 corrections are not trained
        scale = (cols.double().norm(dim=0) / rows.double().norm(dim=1).clamp_min(1e-30)).clamp_min(1e-30).sqrt()
        _set(program.gm, first.target, (rows.double() * scale[:, None]).to(rows.dtype))
        _set(program.gm, second.target, (cols.double() / scale[None, :]).to(cols.dtype))


def _reference(node: fx.Node):
    fn = REFERENCE[node.target]
    return lambda n, args, kwargs: fn(*args, **kwargs)
