"""Run a program on calibration inputs, with some nodes altered, and fine-tune its weights by distillation.

A lossy rewrite is scored by the output error of the whole model on calibration data (``output_error``), and
recovered by a short distillation against the original model's outputs (``distill``): a few hundred Adam steps
on the mean squared error of the outputs, relative to their energy. Only trained weights are trained, and each is
replaced by a copy first, so the user's tensors are never written.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..ir.program import Program, fetch_attr, is_input_guard

Override = Callable[[fx.Node, tuple, dict], Any]  # (node, its args, its kwargs) -> its value


class _Runner(fx.Interpreter):
    def __init__(self, program: Program, overrides: dict[fx.Node, Override] | None = None):
        super().__init__(program.gm)
        self.overrides = overrides or {}

    def run_node(self, n: fx.Node) -> Any:
        if is_input_guard(n):
            return None  # calibration batches may be larger than the example
        if n in self.overrides:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return self.overrides[n](n, args, kwargs)
        return super().run_node(n)


def run(program: Program, inputs: list, overrides: dict[fx.Node, Override] | None = None) -> list[torch.Tensor]:
    """The program's floating-point outputs on flat graph inputs, as one list of tensors."""
    outputs = _Runner(program, overrides).run(*inputs)
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]


@torch.no_grad()
def outputs_on(program: Program, batches: list, overrides: dict[fx.Node, Override] | None = None) -> list:
    return [[t.detach() for t in run(program, inputs, overrides)] for inputs in batches]


@torch.no_grad()
def output_error(program: Program, batches: list, reference: list,
                 overrides: dict[fx.Node, Override] | None = None) -> float:
    """Σ‖y − y₀‖² / Σ‖y₀‖² over every output of every batch: the squared relative error, which adds up roughly
    over independent changes (so the depth DP may sum it)."""
    num = den = 0.0
    for inputs, ref in zip(batches, reference):
        for y, y0 in zip(run(program, inputs, overrides), ref):
            num += (y.double() - y0.double()).pow(2).sum().item()
            den += y0.double().pow(2).sum().item()
    return num / max(den, 1e-30)


@torch.no_grad()
def distillation_loss(program: Program, batches: list, reference: list, loss: str = "mse",
                      overrides: dict[fx.Node, Override] | None = None) -> float:
    """What ``distill`` minimises, on ``batches``: the squared relative output error (``"mse"``), or the mean
    KL divergence of the first output's softmax from the original's (``"kl"``: that output is the logits, as HF
    models and classifiers return them first; a KV cache or hidden states after it are not logits)."""
    if loss == "mse":
        return output_error(program, batches, reference, overrides)
    total = sum(float(_kl(run(program, inputs, overrides)[0].double(), ref[0].double()))
                for inputs, ref in zip(batches, reference))
    return total / max(len(batches), 1)


def trainable_weights(program: Program) -> list[str]:
    """The get_attr targets a distillation may train: trained (not buffer or constant) floating-point weights
    that no earlier pass constrained (a mask, factors, codes) and that only aten ops read (slimfx's compressed
    ops have no autograd formula)."""
    out = []
    for node in program.graph.nodes:
        if not program.is_weight(node) or node.target in out:
            continue
        info = program.weights[node.target]
        readers_differentiable = all(isinstance(u.target, torch._ops.OpOverload) and u.target.namespace == "aten"
                                     for u in node.users)
        if info.compressible and not info.constraints and readers_differentiable \
                and fetch_attr(program.gm, node.target).is_floating_point():
            out.append(node.target)
    return out


def distill(program: Program, batches: list, reference: list, steps: int = 300, lr: float = 1e-3,
            pass_name: str = "depth-merge", targets: list[str] | None = None,
            overrides: dict[fx.Node, Override] | None = None, relative_lr: bool = False,
            loss: str = "mse", decay: bool = False) -> tuple[float, float]:
    """Fine-tune the program's trainable weights (or ``targets``) so its outputs match ``reference`` on
    ``batches``; ``overrides`` run nodes differentiably (compressed ops through their reference math).
    ``relative_lr`` scales each tensor's step by its RMS, so a small factor moves as much, relatively, as a large
    one. ``loss="kl"`` matches the outputs' softmax instead of their values (for logits), and ``decay`` lowers the
    learning rate to 0 along a cosine. Returns the loss (as ``distillation_loss``) before and after."""
    before = distillation_loss(program, batches, reference, loss, overrides)
    targets = trainable_weights(program) if targets is None else targets
    if steps <= 0 or not targets or before == 0.0:
        return before, before
    originals = {t: fetch_attr(program.gm, t) for t in targets}
    # float32 master copies (Adam's state and small updates underflow in half precision), cast on every step
    params = {t: value.detach().to(torch.promote_types(value.dtype, torch.float32)).clone().requires_grad_(True)
              for t, value in originals.items()}
    groups = [{"params": [p], "lr": lr * (float(p.detach().pow(2).mean().sqrt()) or 1.0 if relative_lr else 1.0)}
              for p in params.values()]
    optimizer = torch.optim.Adam(groups, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if decay else None
    energy = [sum(y.double().pow(2).mean().item() for y in ref) or 1.0 for ref in reference]
    with torch.enable_grad():
        for _, index in zip(range(steps), itertools.cycle(range(len(batches)))):
            for t, p in params.items():
                _set(program.gm, t, p.to(originals[t].dtype))
            outputs = run(program, batches[index], overrides)
            if loss == "kl":  # the first floating-point output: the logits, as HF models and classifiers return them
                value = _kl(outputs[0].float(), reference[index][0].float())
            else:
                value = sum(torch.nn.functional.mse_loss(y.float(), y0.float())
                            for y, y0 in zip(outputs, reference[index])) / energy[index]
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
    for t, p in params.items():
        _set(program.gm, t, p.detach().to(originals[t].dtype))
    after = distillation_loss(program, batches, reference, loss, overrides)
    if not after <= before:  # never leave the model worse than the fine-tuning found it (nor NaN)
        for t, value in originals.items():
            _set(program.gm, t, value)
        return before, before
    for t in params:
        info = program.weights[t]
        if info.kind != "derived":  # a pass's tensor keeps its maker (and its constraints); the user's becomes ours
            info.kind, info.derived_by = "derived", pass_name
        info.note = (info.note + "; " if info.note else "") + f"distilled {steps} steps"
    return before, after


def _kl(y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    """KL(softmax(y0) || softmax(y)) over the last dimension, averaged over the rest: the distillation loss of
    logits, which weighs the classes the original finds likely (what perplexity and accuracy measure)."""
    return torch.nn.functional.kl_div(y.log_softmax(-1).reshape(-1, y.shape[-1]),
                                      y0.log_softmax(-1).reshape(-1, y0.shape[-1]),
                                      log_target=True, reduction="batchmean")


LOSSES = ("mse", "kl")


def _set(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Rebind a weight of the graph module (a parameter becomes a buffer: the program holds no nn.Parameters
    it could hand back to the user's model)."""
    *path, leaf = target.split(".")
    owner = fetch_attr(gm, ".".join(path)) if path else gm
    owner._parameters.pop(leaf, None)
    if leaf not in owner._buffers:
        owner.__dict__.pop(leaf, None)
    if leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        owner.register_buffer(leaf, value, persistent=True)
