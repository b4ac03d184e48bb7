"""End to end: dense under torch.compile against slimfx, on the demo models, timed side by side, interleaved.

    python benchmarks/end_to_end.py [--budgets 0.9,0.85,0.8,0.75,0.7,0.6,0.5] [--heal-lm ...] [--heal-cnn ...]
                                    [--models byte-lm,digits-cnn]

For each model (the byte LM trained on the standard library's source; the digits CNN) and each latency budget:

- ``backend``: ``torch.compile(model, backend="slimfx", options={"budget": ..., "calibration": stats})``: the
  plan is made on every Dynamo graph from calibration statistics (no end-to-end scoring, no healing there);
- ``compress``: ``slimfx.compress(model, budget=..., heal=...)`` (the planner weighs each layer by its measured
  end-to-end sensitivity, then heals), then ``torch.compile``. The LM plans on 1,024 calibration windows of 64
  bytes (32 batches) and heals on 24 of those batches (768 windows, 49,152 bytes of its 720 KB training text;
  the other 8 are held out to decide whether healing is kept) for 1,000 steps of 32 windows, matching the
  original's next-byte distribution (KL): 2.0M bytes processed, two thirds of the 3.1M its training processed,
  so on this tiny model healing is not short; the CNN heals for 200 steps on its 8 calibration batches.

All of them and the dense model are timed in one interleaved run per model. Quality loss: relative perplexity
(2^(Δ bits per byte) − 1) for the LM, accuracy points for the CNN. Then the frontier: the fastest result within
1%, 3% and 10% loss. Profile: this machine's (its built-in one unless calibrated).
"""
from __future__ import annotations

import argparse
import time

import torch

import slimfx
from slimfx.demo import subjects
from slimfx.timing import interleaved

# Every backend variant recompiles the model's own forward (and again for the held-out batch's shape): with
# Dynamo's default limit of 8 the later ones, the dense baseline among them, would silently run eagerly.
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096


def loss_of(name: str, dense: float, value: float) -> float:
    """Quality loss in percent: relative perplexity for the LM, accuracy points for the CNN."""
    return 100 * (2 ** (value - dense) - 1) if name == "byte-lm" else dense - value


def lm_calibration() -> list:
    """1,024 training windows of the byte LM in 32 batches of 32: its planning and healing data."""
    from slimfx.lm import load_python_text

    return [(w[:, :-1],) for w in load_python_text().windows("train", 1024, 64).split(32)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="0.9,0.85,0.8,0.75,0.7,0.6,0.5")
    parser.add_argument("--heal-lm", default="steps=1000,batches=32,loss=kl")
    parser.add_argument("--heal-cnn", default="steps=200")
    parser.add_argument("--models", default="byte-lm,digits-cnn", help="which of the demo's models to run")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    unknown = set(args.models.split(",")) - {"byte-lm", "digits-cnn"}
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}: choose from byte-lm, digits-cnn")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for subject in [s for s in subjects() if s.name in args.models.split(",")]:
        heal = args.heal_lm if subject.name == "byte-lm" else args.heal_cnn
        calibration = lm_calibration() if subject.name == "byte-lm" else subject.calibration
        dense_quality = subject.quality(subject.model)
        stats = slimfx.collect_stats(subject.model, subject.calibration)
        runners = {"dense": torch.compile(subject.model)}
        quality = {"dense": dense_quality}
        for budget in budgets:
            name = f"backend latency={budget}"
            try:
                compiled = torch.compile(subject.model, backend="slimfx", options={  # statistics describe the
                    "pipeline": "fold-bn,dead-code", "budget": {"latency": budget}, "calibration": stats})  # original
                with torch.no_grad():
                    compiled(*subject.measure_input)  # plans and compiles now, so errors show here
                runners[name], quality[name] = compiled, subject.quality(compiled)
            except Exception as exc:  # noqa: BLE001 - an unreachable budget is a line of output
                lines = str(exc).splitlines()  # Dynamo wraps the backend's error: its own line names it
                print(f"{subject.name} {name}: {type(exc).__name__}: "
                      f"{next((l for l in lines if 'Error: ' in l), lines[-1] if lines else '')[:200]}")
            name = f"compress latency={budget}"
            try:
                start = time.perf_counter()
                result = slimfx.compress(subject.model, subject.example, pipeline=subject.pipeline,
                                         calibration=calibration, budget={"latency": budget}, heal=heal)
                print(f"{subject.name} {name}: planned and compressed in {time.perf_counter() - start:.1f} s; "
                      f"plan {result.report.plans[0].decisions()}")
                runners[name], quality[name] = torch.compile(result), subject.quality(result)
            except slimfx.errors.BudgetError as exc:
                print(f"{subject.name} {name}: {exc}")
        with torch.no_grad():
            timings = interleaved({k: (lambda m=m: m(*subject.measure_input)) for k, m in runners.items()}, rounds=15)
        base = timings["dense"].median_s
        print(f"\n{subject.name}: quality in {subject.unit} (dense {dense_quality:.4f}), batch "
              f"{tuple(subject.measure_input[0].shape)}, torch.compile, interleaved")
        print(f"  {'':<34} {'quality':>9} {'loss %':>8} {'median':>10} {'speedup':>8}")
        rows = []
        for key, t in timings.items():
            loss = loss_of(subject.name, dense_quality, quality[key])
            speedup = base / t.median_s
            rows.append((key, loss, speedup))
            print(f"  {key:<34} {quality[key]:>9.4f} {loss:>8.2f} {t.median_s * 1e3:>8.2f}ms {speedup:>7.2f}x")
        for limit in (1, 3, 10):
            within = [r for r in rows if r[1] <= limit]
            best = max(within, key=lambda r: r[2])
            print(f"  frontier at <= {limit}% loss: {best[2]:.2f}x ({best[0]}, loss {best[1]:.2f}%)")
        print()


if __name__ == "__main__":
    main()
