"""Depth merging on CNNs trained on real data: accuracy, size, predicted and measured latency.

    python benchmarks/depth_merge.py

1. Exact: digits-proj-cnn (a 3×3 conv followed by a 1×1 projection, and two head linears, with nothing nonlinear
   between them), compressed with ``fold-bn,depth-merge``.
2. Lossy: digits-mobilenet (MobileNetV2-style inverted residuals), ``fold-bn,depth-merge{latency=B}``: the
   two-stage DP removes activations at a latency budget B, distils (600 steps on 1,024 training images), and
   merges. "predicted" is the cpu-generic cost model's ratio for the depth-merge pass alone (torch.compile folds
   BN into the convs of the original too).
All models are compiled with torch.compile and timed side by side, interleaved, at batch 256 on this machine.
"""
from __future__ import annotations

import torch

import slimfx
from slimfx.models import evaluate, pretrained
from slimfx.timing import interleaved


def main() -> None:
    model, data = pretrained("digits-proj-cnn")
    x = data.test_x[:256]
    merged = slimfx.compress(model, (x,), pipeline="fold-bn,depth-merge", profile="cpu-generic")
    print(merged.report.summary())
    for label, m in (("original", model), ("merged", merged)):
        acc, loss = evaluate(m, data.test_x, data.test_y)
        print(f"{label:<9} accuracy {acc:.2%}  loss {loss:.5f}")
    compiled = {"original": torch.compile(model), "merged": torch.compile(merged)}
    with torch.no_grad():
        timings = interleaved({name: (lambda m=m: m(x)) for name, m in compiled.items()}, rounds=21)
    before, after = timings["original"], timings["merged"]
    predicted = merged.report.latency_before_s / merged.report.latency_after_s
    print(f"torch.compile, batch 256, {torch.get_num_threads()} threads: {before} -> {after}: "
          f"measured {before.median_s / after.median_s:.2f}x, predicted (cpu-generic) {predicted:.2f}x")


def shrink(budgets=(0.85, 0.7)) -> None:
    model, data = pretrained("digits-mobilenet")
    x = data.test_x[:256]
    calibration = [(data.train_x[i : i + 128],) for i in range(0, 1024, 128)]
    models = {"original": model}
    for budget in budgets:
        result = slimfx.compress(model, (x,), pipeline=f"fold-bn,depth-merge{{latency={budget},steps=600}}",
                                 calibration=calibration, profile="cpu-generic")
        print(result.report.summary())
        models[f"latency={budget}"] = result
    compiled = {name: torch.compile(m) for name, m in models.items()}
    with torch.no_grad():
        timings = interleaved({name: (lambda m=m: m(x)) for name, m in compiled.items()}, rounds=21)
    base = timings["original"].median_s
    print(f"digits-mobilenet, torch.compile, batch 256, {torch.get_num_threads()} threads")
    print(f"{'model':<14} {'accuracy':>9} {'loss':>8} {'convs':>6} {'predicted':>10} {'measured':>9}")
    for name, m in models.items():
        acc, loss = evaluate(m, data.test_x, data.test_y)
        convs = sum(isinstance(mod, torch.nn.Conv2d) for mod in model.modules()) if m is model else sum(
            n.target == torch.ops.aten.conv2d.default for n in m.program.graph.nodes)
        merge = None if m is model else m.report.passes[1]  # predicted against the BN-folded model (compiled
        predicted = 1.0 if merge is None else merge.latency_after_s / merge.latency_before_s  # BN folds anyway)
        print(f"{name:<14} {acc:>9.2%} {loss:>8.4f} {convs:>6} {predicted:>9.2f}x "
              f"{timings[name].median_s / base:>8.2f}x  ({timings[name]})")


if __name__ == "__main__":
    main()
    shrink()
