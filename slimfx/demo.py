"""``slimfx demo``: the main job. Two models trained here on real data, planned at budgets, measured.

- a byte-level transformer LM trained on CPython's standard library source (shipped; bits per byte on held-out
  text of this machine's standard library), and
- a CNN trained on the UCI handwritten digits shipped with slimfx (held-out accuracy).

Each is planned for this machine (its calibrated profile if one is cached, else the built-in one for its kind),
at latency budgets, healed, lowered, and timed against the dense model under ``torch.compile``, interleaved.
The LM is also planned for an H100 at a memory budget for decoding (one token per step), where int4 and N:M
kernels pay; that row is predicted (no GPU here) but its quality is measured, the math being the same. The
table, each plan, and a Pareto plot of quality against latency go to ``--out``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

MEASURE_BATCH = 256


@dataclass
class Row:
    model: str
    target: str
    budget: str
    quality: str
    params: int
    weight_bytes: int
    predicted: float | None  # latency ratio to dense (compressed / dense), on the target's profile
    measured: float | None  # on this machine, under torch.compile
    report: Any = None
    error: float | None = None  # relative output error on the calibration data (the plan's measurement)


@dataclass
class Subject:
    name: str
    model: torch.nn.Module
    example: tuple
    calibration: list
    quality: Callable[[Any], float]  # higher or lower is better, see ``better``
    unit: str
    measure_input: tuple
    pipeline: str = "dead-code"  # exact passes before the plan


def subjects() -> list[Subject]:
    from .lm import bits_per_byte, pretrained_lm
    from .models import evaluate, pretrained

    lm, text = pretrained_lm()
    lm_cal = [(w[:, :-1],) for w in text.windows("train", 64, 64).split(8)]
    held_out = text.windows("test", 128, 64, seed=1)
    cnn, digits = pretrained("digits-proj-cnn")
    return [
        Subject("byte-lm", lm, lm_cal[0], lm_cal, lambda m: bits_per_byte(m, held_out), "bits/byte",
                (held_out[:32, :-1],)),
        Subject("digits-cnn", cnn, (digits.test_x[:MEASURE_BATCH],),
                [(digits.train_x[i : i + 128],) for i in range(0, 1024, 128)],
                lambda m: 100 * evaluate(m, digits.test_x, digits.test_y)[0], "% accuracy",
                (digits.test_x[:MEASURE_BATCH],), "fold-bn,depth-merge,dead-code"),
    ]


def run_demo(out: Path, budgets: tuple[float, ...] = (0.7, 0.5), heal: int = 100, profile: Any = None) -> list[Row]:
    from .api import compress
    from .hw_profiles.profiles import local_profile, resolve_profile
    from .report import write_report
    from .timing import interleaved

    local = resolve_profile(profile) or local_profile()
    rows: list[Row] = []
    for subject in subjects():
        dense_quality = subject.quality(subject.model)
        rows.append(Row(subject.name, "dense", "-", f"{dense_quality:.3f}", _params(subject.model),
                        _bytes(subject.model), 1.0, 1.0))
        compressed = {}
        for budget in budgets:
            try:
                result = compress(subject.model, subject.example, pipeline=subject.pipeline, profile=local,
                                  calibration=subject.calibration, budget={"latency": budget}, heal=heal)
            except Exception as exc:  # an unreachable budget is a row of the table, not the end of the demo
                from .errors import BudgetError

                if not isinstance(exc, BudgetError):
                    raise
                rows.append(Row(subject.name, local.name, f"latency={budget}", f"unreachable: {exc}", 0, 0,
                                None, None))
                continue
            compressed[budget] = result
            rows.append(Row(subject.name, local.name, f"latency={budget}", f"{subject.quality(result):.3f}",
                            result.report.params_after, result.report.weight_bytes_after, _predicted(result.report),
                            None, result.report, _error(result.report)))
        if compressed:  # dense and every compressed model, compiled as a user deploys them, timed interleaved
            runners = {"dense": torch.compile(subject.model)}
            runners.update({b: torch.compile(m) for b, m in compressed.items()})
            with torch.no_grad():
                timings = interleaved({k: (lambda m=m: m(*subject.measure_input)) for k, m in runners.items()})
            for row in rows:
                if row.model == subject.name and row.target == local.name and row.report is not None:
                    budget = float(row.budget.split("=")[1])
                    row.measured = timings[budget].median_s / timings["dense"].median_s
        if subject.name == "byte-lm":  # an H100 plan for decoding, at a memory budget
            result = compress(subject.model, subject.example, pipeline=subject.pipeline, profile="h100",
                              calibration=subject.calibration, budget={"memory": 0.3},
                              workload={"batch": 1, "phase": "decode"}, heal=heal)
            rows.append(Row(subject.name, "h100 decode", "memory=0.3", f"{subject.quality(result):.3f}",
                            result.report.params_after, result.report.weight_bytes_after, _predicted(result.report),
                            None, result.report,
                            _error(result.report)))
        for row in rows:
            if row.model == subject.name and row.report is not None:
                points = [{"label": f"{r.budget} measured here", "latency": r.measured, "error": r.error}
                          for r in rows if r.model == subject.name and r.measured is not None and r.error is not None
                          and r.target == row.target]
                write_report(row.report, out / f"{subject.name}-{row.target.replace(' ', '-')}-{row.budget}",
                             f"{subject.name}: {row.target}, {row.budget} (quality in {subject.unit})", points,
                             [f"quality: {row.quality} {subject.unit} (dense {dense_quality:.3f})"])
    (out / "summary.md").write_text(table(rows, markdown=True) + "\n")
    return rows


def table(rows: list[Row], markdown: bool = False) -> str:
    head = ["model", "target", "budget", "quality", "params", "weight bytes", "predicted", "measured here",
            "error (calib.)"]
    body = []
    for r in rows:
        body.append([r.model, r.target, r.budget, r.quality, f"{r.params:,}" if r.params else "-",
                     f"{r.weight_bytes:,}" if r.weight_bytes else "-", _ratio(r.predicted), _ratio(r.measured),
                     f"{r.error:.4f}" if r.error is not None else "-"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*b) for b in body])


def _predicted(report: Any) -> float:
    """The whole pipeline's predicted latency relative to the original (exact passes, plan, lowering)."""
    return report.latency_after_s / report.latency_before_s


def _error(report: Any) -> float | None:
    """The output error on calibration data after healing (before it, if there was none)."""
    return report.heal_errors[1] if report.heal_errors is not None else report.plans[0].measured_error


def _ratio(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2f}x ({1 / value:.2f}x faster)" if value != 1.0 else "1.00x"


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
