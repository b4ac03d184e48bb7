"""How well does the cost model predict this machine, for the ops the passes really emit? Calibrate, then time
each dense layer beside its rewrites, interleaved in this one run, and compare with the prediction.

    python benchmarks/cost_model_fidelity.py [--profile FILE]   # FILE: skip calibration, use a saved profile

The rewrites are timed as slimfx emits them: ``torch.ops.slimfx.lowrank_linear`` (factorize),
``torch.ops.slimfx.nm_linear`` with packed 2:4 values and indices (nm, compressed layout), and the conv pairs
factorize builds (k×k to r channels then 1×1; k×1 then 1×k). Prints one row per case, then Spearman rank
correlation and mean absolute percentage error (MAPE) over every timing, and decision accuracy: in how many
(shape, rewrite) pairs the model predicts correctly whether the rewrite is faster than the dense layer, which is
what the passes use it for. Targets on a CPU: Spearman >= 0.9, MAPE <= 20%.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import slimfx  # noqa: F401 - registers the slimfx:: ops timed below
from slimfx.hw_profiles import latency, load_profile
from slimfx.hw_profiles.calibrate import calibrate
from slimfx.hw_profiles.cost_model import conv2d, dense_linear, lowrank_linear, nm_linear
from slimfx.ir.sparse_format import compress
from slimfx.passes.nm_masks import magnitude_mask
from slimfx.timing import interleaved

LOWRANK, NM = torch.ops.slimfx.lowrank_linear, torch.ops.slimfx.nm_linear


def linear_groups():
    """(label, [(variant, kernels, run)]) with the dense layer first, for each linear shape."""
    for m in (1, 16, 128, 512):
        for n, k in ((384, 384), (768, 768), (768, 3072), (3072, 768)):
            x, w = torch.randn(m, k), torch.randn(n, k)
            variants = [("dense", dense_linear(m, n, k), lambda x=x, w=w: F.linear(x, w))]
            for rank in (32, 128):
                v, u = torch.randn(rank, k), torch.randn(n, rank)
                variants.append((f"lowrank r={rank}", lowrank_linear(m, n, k, rank),
                                 lambda x=x, u=u, v=v: LOWRANK(x, v, u, None)))
            mask = magnitude_mask(w, 2, 4)
            values, indices = compress(w * mask, mask, 2, 4)
            variants.append(("nm 2:4 compressed", nm_linear(m, n, k, 2, 4, 4, "fp32"),
                             lambda x=x, values=values, indices=indices, k=k: NM(x, values, indices, None, 2, 4, k)))
            yield f"linear M={m:<4} N={n:<5} K={k:<5}", variants


def conv_groups():
    for batch, cin, cout, hw, kk in ((1, 64, 64, 28, 3), (8, 32, 64, 16, 3), (8, 64, 128, 14, 3), (4, 16, 32, 32, 3)):
        x, w = torch.randn(batch, cin, hw, hw), torch.randn(cout, cin, kk, kk)
        pad = kk // 2
        variants = [("dense", conv2d(batch, cin, cout, hw, hw, kk, kk, hw, hw),
                     lambda x=x, w=w, pad=pad: F.conv2d(x, w, None, 1, pad))]
        for rank in (cout // 4, cout // 2):
            first, second = torch.randn(rank, cin, kk, kk), torch.randn(cout, rank, 1, 1)
            variants.append((f"channel r={rank}",
                             conv2d(batch, cin, rank, hw, hw, kk, kk, hw, hw) + conv2d(batch, rank, cout, hw, hw, 1, 1, hw, hw),
                             lambda x=x, a=first, b=second, pad=pad: F.conv2d(F.conv2d(x, a, None, 1, pad), b)))
            vertical, horizontal = torch.randn(rank, cin, kk, 1), torch.randn(cout, rank, 1, kk)
            variants.append((f"spatial r={rank}",
                             conv2d(batch, cin, rank, hw, hw, kk, 1, hw, hw) + conv2d(batch, rank, cout, hw, hw, 1, kk, hw, hw),
                             lambda x=x, a=vertical, b=horizontal, pad=pad:
                             F.conv2d(F.conv2d(x, a, None, 1, (pad, 0)), b, None, 1, (0, pad))))
        yield f"conv B={batch} {cin}->{cout} {hw}x{hw} k={kk}", variants


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731 - no ties in timings
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", help="a calibrated profile file; default: calibrate now")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per group (default 7)")
    args = parser.parse_args()
    start = time.perf_counter()
    profile = load_profile(args.profile) if args.profile else calibrate()
    print(f"profile: {profile.name} ({profile.description}); calibration {time.perf_counter() - start:.1f}s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    predicted, measured, decisions, right = [], [], 0, 0
    with torch.no_grad():
        for label, variants in [*linear_groups(), *conv_groups()]:
            timings = interleaved({name: run for name, _, run in variants}, rounds=args.rounds, min_time=0.01)
            dense_p = float(latency(variants[0][1], profile))
            dense_t = timings["dense"].median_s
            for name, kernels, _ in variants:
                p, t = float(latency(kernels, profile)), timings[name].median_s
                predicted.append(p)
                measured.append(t)
                verdict = ""
                if name != "dense":
                    decisions += 1
                    agree = (p < dense_p) == (t < dense_t)
                    right += agree
                    verdict = f"  faster: predicted {'yes' if p < dense_p else 'no '} measured {'yes' if t < dense_t else 'no '}" \
                              f"{'' if agree else '  <- wrong'}"
                print(f"  {label:<34} {name:<18} predicted {p * 1e6:9.1f} us  measured {t * 1e6:9.1f} us  "
                      f"ratio {p / t:5.2f}{verdict}")
    predicted_a, measured_a = np.array(predicted), np.array(measured)
    mape = float(np.mean(np.abs(predicted_a - measured_a) / measured_a))
    print(f"timings: {len(predicted)}; decisions (rewrite faster than dense?): {decisions}")
    print(f"Spearman rank correlation: {spearman(predicted_a, measured_a):.3f}   (target >= 0.9)")
    print(f"MAPE: {mape:.1%}   (target <= 20%)")
    print(f"decision accuracy: {right}/{decisions} = {right / decisions:.1%}")


if __name__ == "__main__":
    main()
