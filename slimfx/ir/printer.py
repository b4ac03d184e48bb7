"""A readable listing of a ``Program``: weights, then one line per op with shapes and annotations.

Stable enough for golden tests: names come from the graph, shapes from ``meta["val"]``.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .program import Program, fetch_attr, is_input_guard

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
           torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.bool: "bool"}


def format_type(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        return f"{_DTYPES.get(val.dtype, str(val.dtype))}[{','.join(str(s) for s in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(format_type(v) for v in val) + ")"
    return type(val).__name__ if val is not None else "none"


def op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f".{target}"
    if node.op == "call_module":
        return f"module[{target}]"
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        packet = target._opname
        return f"{ns}.{packet}" if target._overloadname == "default" else f"{ns}.{packet}.{target._overloadname}"
    if getattr(target, "__module__", None) == "_operator" or target in vars(operator).values():
        return f"operator.{target.__name__}"
    module = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", str(target))
    return f"{module.replace('torch.nn.functional', 'F')}.{name}" if module else name


def _fmt_arg(arg: Any, program: Program) -> str:
    if isinstance(arg, fx.Node):
        return f"${arg.target}" if program.is_weight(arg) else f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_fmt_arg(a, program) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner})"
    if isinstance(arg, float):
        return f"{arg:g}"
    return repr(arg) if isinstance(arg, str) else str(arg)


def _fmt_annotations(note: dict) -> str:
    if not note:
        return ""
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(note.items())]
    return "  # " + ", ".join(parts)


def _is_input_guard(node: fx.Node) -> bool:
    return is_input_guard(node) and str(node.target).startswith("_guards")


def format_program(program: Program) -> str:
    graph = program.graph
    used = sorted({n.target for n in graph.nodes if program.is_weight(n)})
    inputs = [n for n in graph.nodes if n.op == "placeholder" and not n.meta.get("slimfx_weight_placeholder")]
    lines = [
        f"program ({program.frontend}): {len(inputs)} inputs, {len(used)} weights, "
        f"{program.parameter_count():,} weight elements"
    ]
    if used:
        lines.append("weights:")
        width = max(len(t) for t in used)
        for target in used:
            value = fetch_attr(program.gm, target)
            info = program.weights[target]
            via = f" [{info.derived_by}{': ' + info.note if info.note else ''}]" if info.derived_by else ""
            lines.append(f"  ${target:<{width}}  {format_type(value):<16} <- {info.origin}{via}")
    lines.append("graph:")
    body = []
    for node in graph.nodes:
        if node.op == "get_attr" or node.meta.get("slimfx_weight_placeholder") or _is_input_guard(node):
            continue
        if node.op == "placeholder":
            body.append((f"%{node.name}", "input", format_type(node.meta.get("val")), ""))
        elif node.op == "output":
            body.append(("return", _fmt_arg(node.args[0], program), "", ""))
        else:
            args = [_fmt_arg(a, program) for a in node.args]
            args += [f"{k}={_fmt_arg(v, program)}" for k, v in node.kwargs.items()]
            call = f"{op_name(node)}({', '.join(args)})"
            body.append((f"%{node.name}", call, format_type(node.meta.get("val")),
                         _fmt_annotations(node.meta.get("slimfx", {}))))
    width = max((len(b[0]) for b in body), default=0)
    for name, call, typ, note in body:
        if name == "return":
            lines.append(f"  return {call}")
        else:
            lines.append(f"  {name:<{width}} = {call} : {typ}{note}")
    return "\n".join(lines)
