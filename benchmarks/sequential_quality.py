"""Sequential (block-by-block) against one-shot calibration, on the project's two trained transformers.

    python benchmarks/sequential_quality.py

For each data-aware pipeline, the task loss after compression with ``calibration_mode="one-shot"`` (every
layer's statistics from the original model) and ``"sequential"`` (each block's from the compressed blocks before
it, fitted to the original's outputs): bits per byte on held-out Python source for the byte LM, cross-entropy and
accuracy on held-out digits for the digits transformer. ``profile="none"``: every layer is compressed in both.
"""
from __future__ import annotations

import time
import warnings

import slimfx
from slimfx.lm import bits_per_byte, pretrained_lm
from slimfx.models import evaluate, pretrained

PIPELINES = ["factorize{keep=0.7}", "factorize{keep=0.5}", "factorize{keep=0.3}", "nm{method=sparsegpt}",
             "nm{method=wanda}", "quant-lowrank{bits=3,group=32,rank=8,quantizer=gptq,exclude=embed}"]


def main() -> None:
    warnings.simplefilter("ignore")
    lm, text = pretrained_lm()
    lm_cal = [(w[:, :-1],) for w in text.windows("train", 64, 64).split(8)]
    lm_test = text.windows("test", 128, 64, seed=1)
    digits, data = pretrained("digits-transformer")
    digits_cal = [(data.train_x[i : i + 128],) for i in range(0, 1024, 128)]
    subjects = [
        ("byte LM (bits/byte)", lm, lm_cal[0], lm_cal, lambda m: f"{bits_per_byte(m, lm_test):.4f}"),
        ("digits transformer (loss, acc)", digits, (data.test_x[:256],), digits_cal,
         lambda m: "{1:.4f}, {0:.2%}".format(*evaluate(m, data.test_x, data.test_y))),
    ]
    print("model | pipeline | dense | one-shot | sequential | seconds (one-shot, sequential)")
    for name, model, example, cal, quality in subjects:
        dense = quality(model)
        for pipeline in PIPELINES:
            row, seconds = [], []
            for mode in ("one-shot", "sequential"):
                start = time.perf_counter()
                result = slimfx.compress(model, example, pipeline=pipeline, calibration=cal, profile="none",
                                         calibration_mode=mode)
                seconds.append(f"{time.perf_counter() - start:.1f}")
                row.append(quality(result))
            print(f"{name} | {pipeline} | {dense} | {row[0]} | {row[1]} | {', '.join(seconds)}", flush=True)


if __name__ == "__main__":
    main()
