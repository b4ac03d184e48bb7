"""Exact depth merging on a CNN trained on real data: accuracy, size, predicted and measured latency.

    python benchmarks/depth_merge.py

digits-proj-cnn (a 3×3 conv followed by a 1×1 projection, and two head linears, with nothing nonlinear between
them), compressed with ``fold-bn,depth-merge``; both models compiled with torch.compile and timed interleaved at
batch 256 on this machine.
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


if __name__ == "__main__":
    main()
