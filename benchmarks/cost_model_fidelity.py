"""How well does the cost model predict this machine? Calibrate, then compare predicted and measured latency
over dense, low-rank and conv layers, all measured side by side in this one run.

    python benchmarks/cost_model_fidelity.py [--profile FILE]   # FILE: skip calibration, use a saved profile

Prints one row per case, then Spearman rank correlation and mean absolute percentage error (MAPE).
Targets on a CPU machine: Spearman >= 0.9, MAPE <= 20%.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from slimfx.hw_profiles import latency, load_profile
from slimfx.hw_profiles.calibrate import calibrate, measure
from slimfx.hw_profiles.cost_model import conv2d, dense_linear, lowrank_linear


def cases():
    """(label, kernels, runnable) for each layer shape and rewrite option."""
    out = []
    for m in (1, 16, 128, 512):
        for n, k in ((384, 384), (768, 768), (768, 3072), (3072, 768)):
            x, w = torch.randn(m, k), torch.randn(n, k)
            out.append((f"dense    M={m:<4} N={n:<5} K={k:<5}", dense_linear(m, n, k), lambda x=x, w=w: F.linear(x, w)))
            for rank in (32, 128):
                v, u = torch.randn(rank, k), torch.randn(n, rank)
                out.append((f"lowrank  M={m:<4} N={n:<5} K={k:<5} r={rank}", lowrank_linear(m, n, k, rank),
                            lambda x=x, u=u, v=v: F.linear(F.linear(x, v), u)))
    for batch, cin, cout, hw, kk in ((1, 64, 64, 28, 3), (8, 32, 64, 16, 3), (8, 64, 128, 14, 1), (4, 3, 32, 32, 3)):
        x, w = torch.randn(batch, cin, hw, hw), torch.randn(cout, cin, kk, kk)
        pad = kk // 2
        out.append((f"conv     B={batch} {cin}->{cout} {hw}x{hw} k={kk}",
                    conv2d(batch, cin, cout, hw, hw, kk, kk, hw, hw),
                    lambda x=x, w=w, pad=pad: F.conv2d(x, w, None, 1, pad)))
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731 - no ties in timings
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", help="a calibrated profile file; default: calibrate now")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    start = time.perf_counter()
    profile = load_profile(args.profile) if args.profile else calibrate()
    print(f"profile: {profile.name} ({profile.description}); calibration {time.perf_counter() - start:.1f}s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    predicted, measured = [], []
    with torch.no_grad():
        for label, kernels, run in cases():
            p = float(latency(kernels, profile))
            t = measure(run)
            predicted.append(p)
            measured.append(t)
            print(f"  {label:<40} predicted {p * 1e6:9.1f} us  measured {t * 1e6:9.1f} us  ratio {p / t:5.2f}")
    predicted_a, measured_a = np.array(predicted), np.array(measured)
    mape = float(np.mean(np.abs(predicted_a - measured_a) / measured_a))
    print(f"cases: {len(predicted)}")
    print(f"Spearman rank correlation: {spearman(predicted_a, measured_a):.3f}   (target >= 0.9)")
    print(f"MAPE: {mape:.1%}   (target <= 20%)")


if __name__ == "__main__":
    main()
