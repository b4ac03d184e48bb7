"""Input-channel permutation for N:M pruning, folded into the producing layer.

Which n of every m consecutive inputs survive depends on how channels are grouped. Reordering the consumer's
input columns by π and the producer's output rows (and bias) by the same π leaves the network's function
unchanged, through any elementwise activation in between, so the runtime pays nothing. π is chosen by greedy
swaps between groups that raise the saliency the N:M mask keeps.
"""
from __future__ import annotations

import time

import torch
import torch.fx as fx

from ..ir.op_table import ACTIVATIONS
from ..ir.program import LINEAR, Program

# elementwise ops that commute with a channel permutation
_ELEMENTWISE = ACTIVATIONS | {"dropout", "clone"}


def producer_of(program: Program, consumer: fx.Node) -> fx.Node | None:
    """The linear whose output channels feed ``consumer``'s input one to one, through elementwise ops only."""
    node = consumer.args[0]
    while isinstance(node, fx.Node) and len(node.users) == 1:
        if node.op == "call_function" and node.target == LINEAR and program.is_weight(node.args[1]):
            return node
        name = getattr(node.target, "_opname", getattr(node.target, "__name__", ""))
        if node.op != "call_function" or name not in _ELEMENTWISE:
            return None
        node = node.args[0]
    return None


def kept_saliency(saliency: torch.Tensor, n: int, m: int) -> float:
    out_f, in_f = saliency.shape
    return float(saliency.reshape(out_f, in_f // m, m).topk(n, dim=-1).values.sum())


def search_permutation(saliency: torch.Tensor, n: int, m: int, rounds: int = 4, partners: int = 12,
                       seed: int = 0, seconds: float | None = None) -> torch.Tensor:
    """Greedy swaps between each group and ``partners`` random other groups per round (cost linear in width);
    returns π with ``saliency[:, π]`` keeping at least as much under the N:M mask. With ``seconds``, the search
    stops after that long with the swaps found so far (each swap only ever gains), so a 5632-wide layer of a
    large model costs a bounded time."""
    deadline = None if seconds is None else time.perf_counter() + seconds
    out_f, in_f = saliency.shape
    groups = in_f // m
    perm = torch.arange(in_f, device=saliency.device)
    current = saliency.clone()
    gen = torch.Generator().manual_seed(seed)

    def group_score(block: torch.Tensor) -> torch.Tensor:  # [..., out, m] -> kept saliency per candidate
        return block.topk(n, dim=-1).values.sum((-1, -2))

    for _ in range(rounds):
        improved = False
        for g1 in torch.randperm(groups, generator=gen, device="cpu").tolist():  # a host-side visiting order
            if deadline is not None and time.perf_counter() > deadline:
                return perm
            others = torch.randperm(groups, generator=gen, device="cpu")[: partners + 1].tolist()
            for g2 in others:
                if g2 == g1:
                    continue
                a, b = current[:, g1 * m : (g1 + 1) * m], current[:, g2 * m : (g2 + 1) * m]
                base = group_score(a) + group_score(b)
                # every swap of one column of g1 with one of g2, scored at once: [m, m, out, m] candidates
                new_a = a.unsqueeze(0).unsqueeze(0).repeat(m, m, 1, 1)
                new_b = b.unsqueeze(0).unsqueeze(0).repeat(m, m, 1, 1)
                idx = torch.arange(m, device=saliency.device)
                new_a[idx[:, None], idx[None, :], :, idx[:, None]] = b.T[idx[None, :]].expand(m, m, out_f)
                new_b[idx[:, None], idx[None, :], :, idx[None, :]] = a.T[idx[:, None]].expand(m, m, out_f)
                gain = group_score(new_a) + group_score(new_b) - base
                best = int(gain.argmax())
                if float(gain.flatten()[best]) > 1e-12 * float(base):
                    i, j = g1 * m + best // m, g2 * m + best % m
                    perm[[i, j]] = perm[[j, i]]
                    current[:, [i, j]] = current[:, [j, i]]
                    improved = True
        if not improved:
            break
    return perm
