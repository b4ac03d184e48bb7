"""Task metric per N:M mask method on models trained on real data, and the weight memory it leaves.

    python benchmarks/nm_quality.py

Every linear layer of each built-in digits model is pruned at 2:4 (and 1:4 / 4:8 on the MLP) with magnitude,
wanda and sparsegpt; calibration: 1,024 training images; evaluation: 449 held-out images. Storage is the
compressed layout (values + packed indices), measured from the result's own weights.
"""
from __future__ import annotations

import warnings

import torch

import slimfx
from slimfx.models import evaluate, pretrained

METHODS = ("magnitude", "wanda", "sparsegpt")


def main() -> None:
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, patterns in (("digits-transformer", ((2, 4),)), ("digits-cnn", ((2, 4),)),
                           ("digits-mlp", ((2, 4), (1, 4), (4, 8)))):
        model, data = pretrained(name)
        calibration = [(data.train_x[i : i + 128],) for i in range(0, 1024, 128)]
        acc, loss = evaluate(model, data.test_x, data.test_y)
        print(f"\n{name}: original accuracy {acc:.2%}, loss {loss:.3f}")
        for n, m in patterns:
            for method in METHODS:
                result = slimfx.compress(model, (data.test_x[:32],), calibration=calibration,
                                         pipeline=f"nm{{n={n},m={m},method={method},layout=compressed}}")
                acc, loss = evaluate(result, data.test_x, data.test_y)
                r = result.report
                print(f"  {n}:{m} {method:<10} accuracy {acc:6.2%}  loss {loss:6.3f}  output err "
                      f"{r.final_rel_error:5.3f}  weight bytes {r.weight_bytes_after / r.weight_bytes_before:6.1%}")


if __name__ == "__main__":
    main()
