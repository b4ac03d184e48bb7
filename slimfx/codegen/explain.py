"""What ``slimfx explain --kernels`` shows: the kernel each lowered layer got, and the generated sources."""
from __future__ import annotations

from pathlib import Path

from ..ir.program import Program
from . import lowrank, nm, quant
from .epilogue import Epilogue
from .source import render

TEMPLATES = {lowrank.LOWRANK_FUSED: ("lowrank", lowrank.TEMPLATE), quant.QUANT_FUSED: ("quant", quant.TEMPLATE),
             nm.NM_FUSED: ("nm", nm.TEMPLATE)}


def kernel_table(program: Program, dump: Path | None = None) -> str:
    """One line per lowered layer (node, kernel, epilogue); the generated Triton sources follow, or are written
    to ``dump`` (one file per kernel) with their paths listed."""
    lines, sources = [], {}
    for node in program.graph.nodes:
        kernel = program.annotations(node).get("kernel") if node.op == "call_function" else None
        if kernel is None:
            continue
        epilogue = node.args[-1] if node.target in TEMPLATES else ""
        lines.append(f"  {node.name:<28} {kernel:<24} {('epilogue ' + epilogue) if epilogue else ''}")
        if node.target in TEMPLATES:
            family, template = TEMPLATES[node.target]
            rendered = render(family, template, Epilogue.parse(epilogue))
            sources[rendered.path.name] = rendered.source
    if not lines:
        return "no compressed layers were lowered"
    out = ["kernels:", *lines]
    for name, text in sources.items():
        if dump is not None:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / name).write_text(text)
            out.append(f"wrote {dump / name}")
        else:
            out += [f"\n== {name} ==", text]
    return "\n".join(out)
