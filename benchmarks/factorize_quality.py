"""Task metric against the parameter budget for each factorization method, on models trained on real data.

    python benchmarks/factorize_quality.py

For each built-in digits model (trained here, deterministic), factorize every layer but the input/output ones at
several ``keep`` fractions with ``svd``, ``asvd`` and ``whitened`` (SVD-LLM) and print held-out accuracy,
cross-entropy, and output error against the original. Calibration: 1,024 training images; evaluation: the
449 held-out images.
"""
from __future__ import annotations

import warnings

import torch

import slimfx
from slimfx.models import evaluate, pretrained

MODELS = {"digits-transformer": "head|embed", "digits-cnn": "fc2|conv1", "digits-mlp": "fc3"}
KEEPS = (0.5, 0.3, 0.2)
METHODS = ("svd", "asvd", "whitened")


def main() -> None:
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, exclude in MODELS.items():
        model, data = pretrained(name)
        calibration = [(data.train_x[i : i + 128],) for i in range(0, 1024, 128)]
        acc, loss = evaluate(model, data.test_x, data.test_y)
        print(f"\n{name}: original accuracy {acc:.2%}, loss {loss:.3f}; excluded layers: {exclude}")
        print(f"  {'keep':>5} {'params':>8}  " + "  ".join(f"{m:>26}" for m in METHODS))
        for keep in KEEPS:
            cells, params = [], 0
            for method in METHODS:
                result = slimfx.compress(model, (data.test_x[:32],), calibration=calibration,
                                         pipeline=f"factorize{{method={method},keep={keep},exclude={exclude}}}")
                acc, loss = evaluate(result, data.test_x, data.test_y)
                params = result.report.params_after
                cells.append(f"{acc:6.2%} {loss:6.3f} err {result.report.final_rel_error:5.3f}")
            print(f"  {keep:>5} {params:>8}  " + "  ".join(f"{c:>26}" for c in cells))
    print("\ncells: held-out accuracy, cross-entropy, relative output error vs the original model")


if __name__ == "__main__":
    main()
