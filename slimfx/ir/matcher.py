"""Rewrite rules as small ``(pattern, fn)`` pairs, applied by a matcher.

A rule names the node kinds it looks at (``op``, ``target``) and a function that builds a replacement in front
of the node and returns it, or returns ``None`` to decline. The matcher rewires users, erases the old node when
it is dead, and counts matches per rule so passes can report (and tests can assert) what they did.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import torch
import torch.fx as fx

if TYPE_CHECKING:
    from .program import Program

RuleFn = Callable[[fx.Node, "Program"], Optional[fx.Node]]


@dataclass(frozen=True)
class Rule:
    name: str
    op: str  # "call_function" | "call_method" | ...
    targets: tuple[Any, ...]
    fn: RuleFn


class Matcher:
    def __init__(self, rules: Iterable[Rule]):
        self.rules = list(rules)
        self._index: dict[tuple[str, Any], list[Rule]] = {}
        for rule in self.rules:
            for target in rule.targets:
                self._index.setdefault((rule.op, target), []).append(rule)

    def rewrite(self, program: "Program") -> Counter:
        """One sweep over the graph in order; returns ``{rule name: matches}``."""
        counts: Counter = Counter()
        graph = program.graph
        for node in list(graph.nodes):
            if node.graph is not graph:  # erased by an earlier rule
                continue
            try:
                candidates = self._index.get((node.op, node.target), ())
            except TypeError:  # unhashable target
                continue
            for rule in candidates:
                with graph.inserting_before(node):
                    replacement = rule.fn(node, program)
                if replacement is None:
                    continue
                if replacement is not node:
                    replacement.meta.setdefault("stack_trace", node.meta.get("stack_trace"))
                    if "nn_module_stack" in node.meta:  # which module it came from (sequential calibration's blocks)
                        replacement.meta.setdefault("nn_module_stack", node.meta["nn_module_stack"])
                    if "val" in node.meta:  # same value by contract: later rules in this sweep may read it
                        replacement.meta.setdefault("val", node.meta["val"])
                    node.replace_all_uses_with(replacement)
                    if not node.users:
                        graph.erase_node(node)
                    if isinstance(replacement.target, torch._ops.OpOverload):
                        replacement._rename(replacement.target._opname)  # %conv2d, not %conv2d_default
                counts[rule.name] += 1
                break
        return counts


def rule(name: str, op: str, *targets: Any) -> Callable[[RuleFn], Rule]:
    """Decorator form: ``@rule("linear-from-addmm", "call_function", torch.addmm)``."""

    def wrap(fn: RuleFn) -> Rule:
        return Rule(name, op, tuple(targets), fn)

    return wrap
