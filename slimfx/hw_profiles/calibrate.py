"""Measure the local device and write a profile: GEMM throughput and knee, memory bandwidth, per-op overhead,
and (where torch has them) int8/int4 weight-only and 2:4 semi-structured matmuls.

Fits the same model the cost model evaluates: ``t = launch + Max((flops + knee)/peak, bytes/bandwidth)``, so a
calibrated profile predicts this machine by construction of its parameters, not by per-shape lookup.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .profiles import Profile, load_profile

# Calibration shapes are disjoint from those of benchmarks/cost_model_fidelity.py, which checks the fit.
GEMM_GRID = [(m, n, k) for m in (16, 64, 256) for (n, k) in ((256, 256), (512, 1024), (1024, 1024), (1024, 4096),
                                                             (4096, 1024))]
GEMV_GRID = [(512, 512), (1024, 1024), (1024, 4096), (2048, 2048)]
CONV_GRID = [(2, 16, 32, 32, 3), (4, 64, 64, 16, 3), (4, 128, 64, 8, 1)]  # batch, cin, cout, hw, k


def measure(fn: Callable[[], object], device: str = "cpu", min_time: float = 0.02, repeats: int = 5) -> float:
    """Median seconds per call: each sample runs enough calls to last ``min_time``."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_time / 4 or calls < 2:
        fn()
        calls += 1
    sync()
    per_call = (time.perf_counter() - start) / calls
    number = max(1, int(min_time / max(per_call, 1e-9)))
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def measure_launch(device: str) -> float:
    x, w = torch.randn(1, 8, device=device), torch.randn(8, 8, device=device)
    return measure(lambda: F.linear(x, w), device)


def measure_copy_bandwidth(device: str, megabytes: int = 256) -> float:
    """DRAM bandwidth of a large copy (reported; the cost model uses the weight-streaming rate below)."""
    src = torch.empty(megabytes * 2**20 // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), device, min_time=0.1, repeats=3)
    return 2 * src.numel() * 4 / seconds


def measure_gemv_bandwidth(device: str, launch: float) -> float:
    """Bytes/s a single-row linear streams its weights at: what memory-bound layers actually see."""
    rates = []
    for n, k in GEMV_GRID:
        x, w = torch.randn(1, k, device=device), torch.randn(n, k, device=device)
        seconds = measure(lambda: F.linear(x, w), device) - launch
        rates.append((n * k + n + k) * 4 / max(seconds, 1e-9))
    return float(statistics.median(rates))


def fit_gemm(device: str, dtype: torch.dtype, launch: float, grid=GEMM_GRID) -> tuple[float, float, float]:
    """Least squares of ``t - launch = (flops + knee + pack * N*K) / peak`` -> (peak, knee, pack).

    Weighted by 1/t so small and large GEMMs count alike (the fit minimises relative error).
    """
    rows, seconds = [], []
    for m, n, k in grid:
        x, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
        t = measure(lambda: F.linear(x, w), device) - launch
        rows.append([2.0 * m * n * k, 1.0, float(n * k)])
        seconds.append(max(t, 1e-9))
    a, t = np.array(rows), np.array(seconds)
    coef, *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    inv_peak = max(float(coef[0]), 1e-18)
    return 1.0 / inv_peak, max(float(coef[1]), 0.0) / inv_peak, max(float(coef[2]), 0.0) / inv_peak


def measure_conv_efficiency(device: str, launch: float, peak: float, knee: float) -> float:
    """Median ratio of the GEMM-rate prediction to measured time over a few convs."""
    ratios = []
    for batch, cin, cout, hw, kk in CONV_GRID:
        x, w = torch.randn(batch, cin, hw, hw, device=device), torch.randn(cout, cin, kk, kk, device=device)
        seconds = measure(lambda: F.conv2d(x, w, None, 1, kk // 2), device) - launch
        flops = 2.0 * batch * hw * hw * cout * cin * kk * kk
        ratios.append(((flops + knee) / peak) / max(seconds, 1e-9))
    return float(min(1.0, statistics.median(ratios)))


def measure_int8_peak(device: str, launch: float) -> float | None:
    """Int8 x int8 -> int32 GEMM throughput (aten._int_mm), median over the large calibration shapes; None where
    torch has no such kernel for the device. VNNI, AMX and tensor cores make it several times the float rate."""
    rates = []
    for m, n, k in GEMM_GRID[-5:]:
        x = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
        w = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=device)
        try:
            seconds = measure(lambda: torch._int_mm(x, w), device) - launch
        except (RuntimeError, AttributeError):
            return None
        rates.append(2.0 * m * n * k / max(seconds, 1e-9))
    return float(statistics.median(rates))


def measure_weight_only(device: str, dense_seconds: Callable[[int, int, int], float]) -> dict:
    """Relative cost of torch's int8/int4 weight-only matmuls against dense, on one mid-size shape."""
    result = {}
    m, n, k = 32, 1024, 1024
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    dense = dense_seconds(m, n, k)
    try:
        w8 = torch.randint(-128, 127, (n, k), dtype=torch.int8, device=device)
        scales = torch.rand(n, dtype=torch.bfloat16, device=device)
        result["int8_weight_only_rel"] = measure(lambda: torch.ops.aten._weight_int8pack_mm(x, w8, scales), device) / dense
    except (RuntimeError, AttributeError):
        pass
    try:
        w4 = torch.randint(0, 16, (n, k), dtype=torch.int32, device=device)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w4, 2)
        sz = torch.rand(k // 32, n, 2, dtype=torch.bfloat16, device=device)
        fn = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)  # noqa: E731
        result["int4_weight_only_rel"] = measure(fn, device) / dense
    except (RuntimeError, AttributeError):
        pass
    return result


def measure_2_4(device: str) -> dict:
    """CUDA only: speedup of torch's semi-structured sparse matmul on a large fp16 GEMM, and its fixed cost."""
    if device != "cuda":
        return {}
    from torch.sparse import to_sparse_semi_structured

    result = {}
    for m in (16, 4096):
        w = torch.randn(4096, 4096, device=device, dtype=torch.float16)
        w = w * torch.tensor([0, 0, 1, 1], device=device, dtype=w.dtype).repeat(4096, 1024)
        x = torch.randn(m, 4096, device=device, dtype=torch.float16)
        try:
            sparse = to_sparse_semi_structured(w)
        except RuntimeError:
            return {}
        dense_t = measure(lambda: F.linear(x, w), device)
        sparse_t = measure(lambda: F.linear(x, sparse), device)
        result[f"sparse_2_4_m{m}_speedup"] = dense_t / sparse_t
        if m == 16:
            result["sparse_extra_us"] = max(0.0, (sparse_t - dense_t) * 1e6)
    return result


def calibrate(device: str | None = None, name: str | None = None, base: str | None = None) -> Profile:
    """Measure this machine; fields the measurement cannot reach come from ``base`` (a built-in profile)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base_profile = load_profile(base or ("h100" if device == "cuda" else "cpu-generic"))
    with torch.no_grad():
        launch = measure_launch(device)
        copy_bandwidth = measure_copy_bandwidth(device)
        bandwidth = measure_gemv_bandwidth(device, launch)
        peak, knee, pack = fit_gemm(device, torch.float32, launch)
        conv_efficiency = measure_conv_efficiency(device, launch, peak, knee)
        peaks = {"fp32": peak / 1e12}
        dtypes = [torch.bfloat16, torch.float16] if device == "cuda" else [torch.bfloat16]
        for dtype in dtypes:
            half_peak, _, _ = fit_gemm(device, dtype, launch, grid=GEMM_GRID[-5:])
            peaks[_dtype_name(dtype)] = half_peak / 1e12

        def dense_seconds(m: int, n: int, k: int) -> float:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
            return measure(lambda: F.linear(x, w), device)

        int8 = measure_int8_peak(device, launch)
        if int8 is not None:
            peaks["int8"] = int8 / 1e12
        extras = measure_weight_only(device, dense_seconds) if device == "cpu" else {}
        extras.update(measure_2_4(device))
    label = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()}-thread CPU"
    measured = {"launch_us": round(launch * 1e6, 3), "gemv_bandwidth_gbs": round(bandwidth / 1e9, 3),
                "copy_bandwidth_gbs": round(copy_bandwidth / 1e9, 3), "gemm_points": len(GEMM_GRID),
                "torch": torch.__version__}
    measured.update({k: round(v, 4) for k, v in extras.items()})
    sparse_speedup = extras.get("sparse_2_4_m4096_speedup", base_profile.sparse_speedup)
    return dataclasses.replace(
        base_profile,
        name=name or f"local-{device}",
        description=f"measured on {label} by slimfx profile calibrate",
        device=device,
        peak_tflops=peaks,
        memory_bandwidth_gbs=bandwidth / 1e9,
        launch_overhead_us=launch * 1e6,
        matmul_efficiency=1.0,  # the peaks above are already sustained, measured throughput
        memory_efficiency=1.0,
        knee_gflop=knee / 1e9,
        pack_flops_per_weight=pack,
        conv_efficiency=conv_efficiency,
        sparse_speedup=float(sparse_speedup),
        sparse_extra_overhead_us=float(extras.get("sparse_extra_us", base_profile.sparse_extra_overhead_us)),
        dequant_overhead=float(extras.get("int4_weight_only_rel", base_profile.dequant_overhead)),
        source="calibrated",
        measured=measured,
    )
