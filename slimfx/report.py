"""Writing a report: ``report.md`` (or ``.html``), ``report.json`` and, with a plan, ``pareto.png``.

The plot is quality against latency (or memory) over budgets: the planner's predicted frontier, the planned
point, and any points the caller measured (the demo adds each budget's measured speedup and quality).
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

from .passes.manager import Report
from .plan.planner import ROW_HEADS


def to_markdown(report: Report, title: str = "slimfx report", extra: Sequence[str] = ()) -> str:
    lines = [f"# {title}", "", f"pipeline: `{report.pipeline}`", ""]
    ratio = report.weight_bytes_after / report.weight_bytes_before if report.weight_bytes_before else 1.0
    lines += ["| | before | after |", "|---|---|---|",
              f"| parameters | {report.params_before:,} | {report.params_after:,} |",
              f"| weight bytes | {report.weight_bytes_before:,} | {report.weight_bytes_after:,} ({ratio:.1%}) |",
              f"| MFLOPs | {report.flops_before / 1e6:.3f} | {report.flops_after / 1e6:.3f} |"]
    if report.latency_before_s is not None and report.latency_after_s is not None and report.cost is not None:
        lines.append(f"| predicted latency ({report.cost.profile}) | {report.latency_before_s * 1e6:.1f} us | "
                     f"{report.latency_after_s * 1e6:.1f} us |")
    if report.final_rel_error is not None:
        lines.append(f"| output error vs original | 0 | {report.final_rel_error:.4f} |")
    if report.heal_errors is not None:
        lines.append(f"| calibration output error, before / after healing | {report.heal_errors[0]:.4f} | "
                     f"{report.heal_errors[1]:.4f} |")
    for plan in report.plans:
        lines += ["", f"## Plan: {plan.budget} on {plan.profile} ({plan.workload}, tune={plan.tune})", "",
                  f"predicted latency {plan.latency_ratio:.3f}x dense, weights {plan.memory_ratio:.3f}x, predicted "
                  f"error {plan.predicted_error:.4f}" + (f", measured error {plan.measured_error:.4f}"
                                                         if plan.measured_error is not None else ""), "",
                  "| " + " | ".join(ROW_HEADS) + " |", "|" + "---|" * len(ROW_HEADS)]
        lines += ["| " + " | ".join(row) + " |" for row in plan.rows()]
    notes = report.grouped_notes()
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if extra:
        lines += ["", *extra]
    return "\n".join(lines) + "\n"


def write_report(report: Report, directory: str | Path, title: str = "slimfx report",
                 measured: Sequence[dict] = (), extra: Sequence[str] = (), html_too: bool = False) -> list[Path]:
    """Write report.md, report.json and (with a plan and matplotlib) pareto.png; returns the paths written.

    ``measured``: points to add to the plot, dicts with ``label``, ``latency`` (ratio to dense) and ``error``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    plot = pareto_plot(report, out / "pareto.png", measured)
    text = to_markdown(report, title, [*extra, *([f"![Pareto plot]({plot.name})"] if plot else [])])
    (out / "report.md").write_text(text)
    written.append(out / "report.md")
    if html_too:
        (out / "report.html").write_text(f"<html><body><pre>{html.escape(text)}</pre></body></html>")
        written.append(out / "report.html")
    payload = {**report.to_dict(), "measured": list(measured)}
    (out / "report.json").write_text(json.dumps(payload, indent=2, default=str))
    written.append(out / "report.json")
    if plot:
        written.append(plot)
    return written


def pareto_plot(report: Report, path: Path, measured: Sequence[dict] = ()) -> Path | None:
    """Quality against latency over budgets; None (nothing written) without a plan, or without matplotlib."""
    plans = [p for p in report.plans if p.frontier]
    if not plans and not measured:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for plan in plans[:1]:
        xs, ys = zip(*plan.frontier)
        resource = "weights" if plan.budget.resource == "memory" else "latency"
        ax.plot(xs, ys, "-", color="tab:blue", label=f"predicted frontier ({plan.profile})")
        ax.plot([plan.memory_ratio if resource == "weights" else plan.latency_ratio], [plan.predicted_error], "o",
                color="tab:blue", label=f"plan {plan.budget} (predicted)")
        ax.set_xlabel(f"{resource}, fraction of dense")
    for point in measured:
        ax.plot([point["latency"]], [point["error"]], "s", label=point.get("label", "measured"))
    ax.set_ylabel("relative output error")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
