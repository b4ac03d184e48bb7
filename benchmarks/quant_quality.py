"""Quality of quant-lowrank on models trained on real data: bits × quantizer × correction × rank -> task metric,
output error and bytes.

    python benchmarks/quant_quality.py

Models: the digits transformer and MLP (trained here on the UCI digits, cached); calibration on 1,024 training
images; accuracy and cross-entropy on the 449 held-out images. The input and output layers stay in full
precision. ``bytes`` is the whole model's weight bytes against the dense fp32 model.
"""
from __future__ import annotations

import slimfx
from slimfx.models import evaluate, pretrained

CONFIGS = [("rtn", "none", 0), ("rtn", "lqer", 8), ("rtn", "eora", 8), ("rtn", "alternate", 8), ("rtn", "eora", 16),
           ("gptq", "none", 0), ("gptq", "eora", 8)]
MODELS = {"digits-transformer": "head|embed", "digits-mlp": "fc1|fc3"}


def main() -> None:
    for name, exclude in MODELS.items():
        model, data = pretrained(name)
        batches = [(data.train_x[i : i + 128],) for i in range(0, 1024, 128)]
        acc, loss = evaluate(model, data.test_x, data.test_y)
        print(f"\n{name}: dense accuracy {acc:.2%}, loss {loss:.4f}")
        print(f"  {'bits':>4} {'group':>5} {'quantizer':<9} {'correction':<10} {'rank':>4}  {'accuracy':>8} {'loss':>7} "
              f"{'out err':>8} {'bytes':>6}")
        for bits in (2, 3, 4):
            for quantizer, correction, rank in CONFIGS:
                pipeline = (f"quant-lowrank{{bits={bits},group=32,rank={rank},correction={correction},"
                            f"quantizer={quantizer},exclude={exclude}}}")
                result = slimfx.compress(model, (data.test_x[:32],), pipeline=pipeline, calibration=batches)
                acc, loss = evaluate(result, data.test_x, data.test_y)
                ratio = result.report.weight_bytes_after / result.report.weight_bytes_before
                print(f"  {bits:>4} {32:>5} {quantizer:<9} {correction:<10} {rank:>4}  {acc:>8.2%} {loss:>7.4f} "
                      f"{result.report.final_rel_error:>8.4f} {ratio:>6.3f}")


if __name__ == "__main__":
    main()
