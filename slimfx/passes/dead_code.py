"""``dead-code``: remove ops whose results nobody uses, and free weights nothing reads any more."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch.fx as fx

from ..ir.program import Program
from .base import Pass, PassContext, register


def is_removable(node: fx.Node) -> bool:
    if node.users or node.op in ("placeholder", "output"):
        return False
    if node.op == "call_module":
        return False  # export's input guards and user modules may check or mutate
    return not node.is_impure()


@register
@dataclass
class DeadCode(Pass):
    name = "dead-code"
    summary = "remove unused ops and the weights only they read"
    exact = True

    def run(self, program: Program, ctx: PassContext) -> Counter:
        counts: Counter = Counter()
        for node in reversed(list(program.graph.nodes)):
            if node.op != "get_attr" and is_removable(node):
                program.graph.erase_node(node)
                counts["ops"] += 1
        counts["weights"] = program.drop_unused_weights()
        return +counts
