"""``slimfx``: compress, explain (print the IR after every pass), demo, and list passes."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Sequence

import torch

from .errors import SlimfxError

DEMO_PIPELINE = "dead-code,fold-bn"


def load_model(spec: str, input_shape: str | None) -> tuple[torch.nn.Module, tuple, Any]:
    """A built-in model name (trained on the digits data) or ``package.module:factory``.

    The factory returns a model, or ``(model, example_inputs)``; with a bare model pass ``--input-shape``.
    Returns (model, example inputs, evaluation data or None).
    """
    from .models import ZOO, pretrained

    if spec in ZOO:
        model, data = pretrained(spec)
        return model, (data.test_x[:32],), data
    if ":" not in spec:
        raise SlimfxError(f"unknown model {spec!r}: use a built-in one ({', '.join(ZOO)}) or package.module:factory")
    module_name, _, attr = spec.partition(":")
    try:
        made = getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError) as exc:
        raise SlimfxError(f"cannot load {spec!r}: {exc}; check the module path and the factory name") from exc
    if isinstance(made, tuple):
        model, example = made
        return model, example if isinstance(example, tuple) else (example,), None
    if input_shape is None:
        raise SlimfxError(f"{spec} returned a bare model: pass --input-shape, e.g. --input-shape 1,3,224,224")
    shape = [int(s) for s in input_shape.split(",")]
    return made, (torch.randn(*shape),), None


def _compare(model: Any, compressed: Any, data: Any, compiled: bool = False) -> tuple[list[str], tuple[float, float]]:
    """Accuracy on the held-out digits, and latency measured side by side (interleaved) in this run.

    Returns the lines to print and the measured (original, compressed) median seconds.
    """
    from .models import evaluate
    from .timing import interleaved

    lines = []
    for label, m in (("original", model), ("compressed", compressed)):
        acc, loss = evaluate(m, data.test_x, data.test_y)
        lines.append(f"{label:<11} accuracy {acc:.2%}  loss {loss:.4f}  (held-out digits, n={len(data.test_y)})")
    x = data.test_x[:MEASURE_BATCH]
    runners = {"original": model, "compressed": compressed}
    if compiled:  # as a user would deploy either one
        runners = {name: torch.compile(m) for name, m in runners.items()}
    with torch.no_grad():
        timings = interleaved({name: (lambda m=m: m(x)) for name, m in runners.items()})
    before, after = timings["original"], timings["compressed"]
    how = "under torch.compile" if compiled else "eager"
    lines.append(f"measured latency, batch {len(x)}, {torch.get_num_threads()} CPU threads, {how}, interleaved: "
                 f"{before} -> {after}: {before.median_s / after.median_s:.2f}x")
    return lines, (before.median_s, after.median_s)


def _explain_prediction(report: Any, measured_before_s: float, measured_after_s: float) -> list[str]:
    """Set the cost model's prediction beside the measurement, and account for the gap between them."""
    if report.latency_before_s is None or report.latency_after_s is None:
        return []
    predicted = report.latency_before_s / report.latency_after_s
    measured = measured_before_s / measured_after_s
    lines = [f"predicted {predicted:.2f}x on profile {report.cost.profile} vs measured {measured:.2f}x"]
    unpriced = measured_before_s - report.latency_before_s
    if unpriced > 0:
        adjusted = measured_before_s / (report.latency_after_s + unpriced)
        lines.append(
            f"  the profile prices {report.latency_before_s * 1e3:.2f} ms of the {measured_before_s * 1e3:.2f} ms "
            f"measured for the original; the other {unpriced * 1e3:.2f} ms (framework overhead, ops it does not "
            f"model, this machine differing from the profile) do not shrink. Holding them fixed predicts "
            f"{adjusted:.2f}x. `slimfx profile calibrate` fits a profile to this machine.")
    else:
        lines.append(
            f"  the profile prices the original at {report.latency_before_s * 1e3:.2f} ms, but it measured "
            f"{measured_before_s * 1e3:.2f} ms: this machine is not the profile's, and torch.compile fuses what the "
            "profile prices op by op. "
            "`slimfx profile calibrate` fits a profile to this machine.")
    return lines


def _validate(args: argparse.Namespace) -> None:
    """Check the pipeline and the profile before loading or training anything."""
    from .hw_profiles.profiles import resolve_profile
    from .passes import PassManager

    from .passes.plan import with_budget

    PassManager(with_budget(args.pipeline, getattr(args, "budget", None), getattr(args, "workload", None),
                            getattr(args, "tune", "model"), getattr(args, "heal", 0)))
    resolve_profile(args.profile)


MEASURE_BATCH = 256


def cmd_compress(args: argparse.Namespace) -> int:
    from .api import compress

    _validate(args)
    model, example, data = load_model(args.model, args.input_shape)
    calibration = _calibration(data)
    if args.budget and calibration is None:
        raise SlimfxError("--budget plans with calibration data, which only the built-in models bring here; in "
                          "Python pass calibration= to slimfx.compress(..., budget=...)")
    result = compress(model, example, pipeline=args.pipeline, profile=args.profile, calibration=calibration,
                      budget=args.budget, workload=args.workload, tune=args.tune, heal=args.heal)
    print(result.report.summary())
    if data is not None:
        print("\n".join(_compare(model, result, data)[0]))
    if args.out:
        from .serialize import save

        save(result, args.out)
        print(f"compressed model written to {args.out}/ (load it with slimfx.load)")
    if args.report_json:
        with open(args.report_json, "w") as fh:
            json.dump(result.report.to_dict(), fh, indent=2, default=str)
    if args.report:
        from .report import write_report

        paths = write_report(result.report, args.report, f"slimfx compress {args.model}", html_too=True)
        print(f"report written: {', '.join(map(str, paths))}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .api import compress

    _validate(args)
    model, example, data = load_model(args.model, args.input_shape)
    from .ir import capture

    print("== captured ==")
    print(capture(model, example).print())

    def show(pass_: Any, program: Any) -> None:
        print(f"\n== after {pass_} ==")
        print(program.print())

    result = compress(model, example, pipeline=args.pipeline, profile=args.profile, calibration=_calibration(data),
                      on_pass=None if args.kernels else show)
    print()
    print(result.report.summary())
    if args.kernels:
        from pathlib import Path

        from .codegen.explain import kernel_table

        print()
        print(kernel_table(result.program, None if args.kernels == "-" else Path(args.kernels)))
    return 0


def _calibration(data: Any) -> list | None:
    """1,024 training images in batches of 128 (never the held-out ones used for accuracy)."""
    return [(data.train_x[i : i + 128],) for i in range(0, 1024, 128)] if data is not None else None


def cmd_demo(args: argparse.Namespace) -> int:
    if args.model is None:
        return _planned_demo(args)
    from .api import compress
    from .models import DEMO_PIPELINES, pretrained

    args.profile = args.profile or "cpu-generic"
    if args.model not in DEMO_PIPELINES:
        raise SlimfxError(f"unknown demo model {args.model!r}; choose one of {', '.join(DEMO_PIPELINES)}")
    args.pipeline = args.pipeline or DEMO_PIPELINES[args.model]
    _validate(args)
    print(f"{args.model} on the UCI handwritten digits (real data, shipped with slimfx; trained once, then cached)")
    print(f"pipeline: {args.pipeline}; profile: {args.profile}\n")
    model, data = pretrained(args.model)
    # the example batch is the measured one, so the prediction and the measurement are of the same workload
    result = compress(model, (data.test_x[:MEASURE_BATCH],), pipeline=args.pipeline, profile=args.profile,
                      calibration=_calibration(data))
    print(result.report.summary())
    lines, measured = _compare(model, result, data, compiled=True)
    print("\n".join(lines + _explain_prediction(result.report, *measured)))
    return 0


def _planned_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo import run_demo, table
    from .hw_profiles.profiles import local_profile, resolve_profile

    try:
        budgets = tuple(float(b) for b in args.budgets.split(","))
    except ValueError:
        raise SlimfxError(f"--budgets {args.budgets!r}: give latency fractions separated by commas, e.g. 0.7,0.5") from None
    profile = resolve_profile(args.profile) or local_profile()
    if any(not 0 < b <= 1 for b in budgets):
        raise SlimfxError(f"--budgets {args.budgets!r}: each is a fraction of the dense latency in (0, 1]")
    print("slimfx demo: a byte-level LM trained on CPython's standard library source (shipped with slimfx), and a "
          "CNN trained on the UCI handwritten digits (shipped too; trained once here, then cached).")
    print(f"Planned for {profile.name} at latency budgets {', '.join(map(str, budgets))} (then healed "
          f"{args.heal} steps and lowered), and for an H100 decoding at a memory budget; timed here under "
          f"torch.compile, interleaved, {torch.get_num_threads()} CPU threads.\n")
    out = Path(args.out)
    rows = run_demo(out, budgets, args.heal, args.profile)
    print(table(rows))
    print("\nquality: bits/byte on held-out text (lower is better) for byte-lm, held-out accuracy in % for "
          "digits-cnn. predicted: latency on the target's profile relative to dense; measured here: the same, timed "
          "on this machine (the h100 row cannot be). error: output error on calibration data, after healing.")
    for row in rows:
        if row.report is not None:
            plan = row.report.plans[0]
            print(f"\n{row.model}, {row.target}, {row.budget}:")
            print("\n".join("  " + line for line in plan.table().splitlines()))
            if row.report.heal_errors:
                print(f"  healing: output error on calibration data {row.report.heal_errors[0]:.4f} -> "
                      f"{row.report.heal_errors[1]:.4f}")
    print(f"\nreports (Markdown, JSON, Pareto plots) and the table: {out}/")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from .passes import PASSES, describe_options

    width = max(map(len, PASSES)) + 1
    for name in sorted(PASSES):
        cls = PASSES[name]
        print(f"{name:<{width}} {cls.summary}{'  [exact]' if cls.exact else ''}")
        print(f"{'':<{width}} options: {describe_options(cls)}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .hw_profiles import builtin_profiles, load_profile
    from .hw_profiles.profiles import to_toml

    if args.action == "list":
        for name in builtin_profiles():
            print(f"{name:<12} {load_profile(name).description}")
        return 0
    if args.action == "show":
        if not args.name:
            raise SlimfxError("slimfx profile show needs a profile name or file, e.g. slimfx profile show h100")
        print(to_toml(load_profile(args.name)), end="")
        return 0
    from .hw_profiles.calibrate import calibrate

    profile = calibrate(device=args.device, name=args.name)
    text = to_toml(profile)
    if args.save:
        from .hw_profiles.profiles import calibrated_path

        path = calibrated_path(profile.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"saved as this machine's default profile: {path} (compress, the backend and the planner use it "
              "when no profile is given)")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
        print(f"wrote {args.out}; use it with --profile {args.out}")
    elif not args.save:
        print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models import ZOO

    parser = argparse.ArgumentParser(
        prog="slimfx", description="Compress PyTorch models with torch.fx passes checked against a hardware cost model."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser, default_pipeline: str) -> None:
        p.add_argument("--pipeline", default=default_pipeline,
                       help=f'passes to run, e.g. "fold-bn,dead-code" (default: "{default_pipeline}")')
        p.add_argument("--profile", default=None, help="hardware profile name or file (see `slimfx profile list`)")
        p.add_argument("--input-shape", default=None, help="example input shape for a factory model, e.g. 1,3,224,224")

    p = sub.add_parser("compress", help="compress a model and print the report")
    p.add_argument("model", help=f"built-in model ({', '.join(ZOO)}) or package.module:factory")
    model_args(p, DEMO_PIPELINE)
    p.add_argument("--out", help="save the compressed model to this directory (slimfx.load reads it)")
    p.add_argument("--report-json", help="write the report as JSON here")
    p.add_argument("--report", metavar="DIR", help="write report.md, report.html, report.json (and pareto.png) here")
    p.add_argument("--budget", default=None,
                   help="plan the lossy passes for a budget instead: latency=0.5 (fraction of dense), memory=2GB, "
                        "max_error=0.01, or combined: latency=0.5,max_error=0.01")
    p.add_argument("--workload", default=None, help="sizes the plan is priced at: batch=1,seq=512,phase=decode")
    p.add_argument("--tune", choices=["model", "measure"], default="model",
                   help="price the plan on the profile (model) or time its options on this machine (measure)")
    p.add_argument("--heal", default="0", metavar="STEPS|OPTIONS",
                   help="distil the compressed layers against the original for STEPS steps, or with heal's "
                        "options: steps=1000,loss=kl,batches=32")
    p.set_defaults(fn=cmd_compress)

    p = sub.add_parser("explain", help="print the IR after capture and after every pass")
    p.add_argument("model", help="built-in model or package.module:factory")
    model_args(p, DEMO_PIPELINE)
    p.add_argument("--kernels", nargs="?", const="-", default=None, metavar="DIR",
                   help="print the kernel each compressed layer lowers to and the generated Triton source "
                        "(with DIR: write the sources there)")
    p.set_defaults(fn=cmd_explain)

    p = sub.add_parser("demo", help="train small models on real data, plan them at budgets, measure quality and speed")
    p.add_argument("--model", default=None,
                   help="instead of the planned demo, run one built-in model through a hand-written pipeline "
                        "(digits-proj-cnn, digits-cnn, digits-mlp, digits-transformer, digits-mobilenet)")
    p.add_argument("--pipeline", default=None, help="with --model: passes to run (default: one per model)")
    p.add_argument("--profile", default=None,
                   help="hardware profile name or file (default: this machine's; with --model: cpu-generic)")
    p.add_argument("--budgets", default="0.7,0.5", help="latency budgets, fractions of dense (default: 0.7,0.5)")
    p.add_argument("--heal", type=int, default=100, help="healing steps after planning (default: 100)")
    p.add_argument("--out", default="slimfx-demo", help="where the reports go (default: ./slimfx-demo)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("profile", help="hardware profiles: list, show, or calibrate this machine")
    p.add_argument("action", choices=["list", "show", "calibrate"])
    p.add_argument("name", nargs="?", help="show: profile name or file; calibrate: name for the new profile")
    p.add_argument("--out", help="calibrate: write the profile here (TOML)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="calibrate: device to measure (default: cuda if present)")
    p.add_argument("--save", action="store_true",
                   help="calibrate: keep it as this machine's default profile (used when no profile is given)")
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("passes", help="list the registered passes and their options")
    p.set_defaults(fn=cmd_passes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    try:
        return args.fn(args)
    except BrokenPipeError:  # `slimfx passes | head`: the reader has what it wanted
        sys.stderr.close()
        return 0
    except SlimfxError as exc:
        print(f"slimfx: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
