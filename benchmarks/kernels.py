"""The lowered forms of the compressed ops against dense, timed side by side and interleaved in one run.

    python benchmarks/kernels.py

On CPU: one compressed linear layer (plus a GELU epilogue) per op, lowered by ``lower`` to each kernel that
applies, every variant compiled with torch.compile, against the dense fp32 layer (also compiled), at decode
(M = 1, 16) and prefill (M = 256) rows. "auto" is what ``lower`` chooses on cpu-generic. Then the end-to-end
check of issue 12: a factorized and quantized MLP lowered for this CPU against the same model in plain aten
form (every compressed layer as aten ops: two linears, dequantize-then-linear).

On CUDA (when a GPU is present): each generated Triton kernel against the unfused torch path (cuBLAS two-GEMM,
dequantize-then-matmul) at prefill and decode shapes, with achieved TB/s, TFLOP/s and percent of the roofline of
the matching built-in profile.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from slimfx.timing import interleaved

PIPELINES = {
    "low-rank r=N/8": ("factorize{rank=%d,method=svd}", ["aten-two-linears"]),
    "int4 g128 + r16": ("quant-lowrank{bits=4,group=128,rank=16}", ["torch-int4pack", "aten-dequant-linear"]),
    "2:4 sparse": ("nm{method=magnitude,layout=compressed}", ["aten-decompress-linear"]),
}


class Layer(nn.Module):
    def __init__(self, n: int, k: int):
        super().__init__()
        self.fc = nn.Linear(k, n)

    def forward(self, x):
        return F.gelu(self.fc(x))


torch._dynamo.config.recompile_limit = 256  # every variant is its own module: none may fall back to eager
torch._dynamo.config.accumulated_recompile_limit = 4096


def cpu(n: int = 2048, k: int = 2048) -> None:
    torch.manual_seed(0)
    layer = Layer(n, k).eval()
    calibration = [(torch.randn(256, k),)]
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads: one {k}->{n} linear + GELU; "
          "speed = dense compiled time / variant compiled time")
    for label, (pipeline, kernels) in PIPELINES.items():
        pipeline = pipeline % (n // 8) if "%d" in pipeline else pipeline
        for m in (1, 16, 256):
            x = torch.randn(m, k)
            variants = {"dense": layer}
            for kernel in ["auto", *kernels, "reference"]:
                lower = {"auto": "lower", "reference": None}.get(kernel, f"lower{{prefer={kernel}}}")
                spec = f"{pipeline},{lower}" if lower else pipeline
                result = slimfx.compress(layer, (x,), pipeline=spec, calibration=calibration, profile="cpu-generic",
                                         check=False) if lower else _unlowered(layer, x, pipeline, calibration)
                chosen = result.report.rewrites("lower") if lower else {}
                variants[f"{kernel}{'=' + ','.join(chosen) if kernel == 'auto' else ''}"] = result
            compiled = {name: torch.compile(model) for name, model in variants.items()}
            with torch.no_grad():
                timings = interleaved({name: (lambda f=f: f(x)) for name, f in compiled.items()}, rounds=7,
                                      min_time=0.02)
            dense = timings["dense"].median_s
            cells = "  ".join(f"{name} {dense / t.median_s:5.2f}x" for name, t in timings.items() if name != "dense")
            print(f"{label:<16} M={m:<4} dense {dense * 1e6:8.1f} us  {cells}")


def _unlowered(layer, x, pipeline, calibration):
    """The compressed model with its reference ops (no lower stage): what slimfx ran before lowering existed."""
    from slimfx.passes import PassContext, PassManager

    program = slimfx.capture(layer, (x,))
    PassManager(pipeline, check=False).run(program, PassContext(calibration=calibration))
    return program.gm


class MLP(nn.Module):
    def __init__(self, dim: int = 1024, hidden: int = 4096):
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


def end_to_end() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    calibration = [(torch.randn(128, 1024),) for _ in range(2)]
    pipeline = "factorize{keep=0.4,method=svd,exclude=down},quant-lowrank{bits=4,group=128,rank=16}"
    print(f"\nend to end: {pipeline} on a 1024-4096-1024 residual MLP, torch.compile, lowered for this CPU vs the "
          "same model in plain aten form")
    for m in (1, 16, 256):
        x = torch.randn(m, 1024)
        lowered = slimfx.compress(model, (x,), pipeline=pipeline, calibration=calibration, profile="cpu-generic")
        plain = slimfx.compress(model, (x,), pipeline=f"{pipeline},lower{{prefer=aten-two-linears|aten-dequant-linear}}",
                                calibration=calibration, profile="cpu-generic")
        compiled = {"plain aten": torch.compile(plain), "lowered": torch.compile(lowered), "dense": torch.compile(model)}
        with torch.no_grad():
            timings = interleaved({name: (lambda f=f: f(x)) for name, f in compiled.items()}, rounds=9, min_time=0.02)
        base = timings["plain aten"].median_s
        print(f"M={m:<4} kernels {lowered.report.rewrites('lower')}: lowered {base / timings['lowered'].median_s:.2f}x "
              f"the plain aten form, dense {base / timings['dense'].median_s:.2f}x  "
              f"(plain aten {timings['plain aten']}, lowered {timings['lowered']}, dense {timings['dense']})")


def cuda() -> None:
    from slimfx.hw_profiles.profiles import local_profile
    from slimfx.ir.quant_format import group_params, pack, quantize_with, unpack

    profile = local_profile()
    name = torch.cuda.get_device_name()
    print(f"\nCUDA: {name} (roofline from the {profile.name} profile), fp16")
    dt = torch.float16
    for m, n, k, r in ((1, 4096, 4096, 256), (16, 4096, 4096, 256), (4096, 4096, 4096, 256)):  # rank <= 25%
        x = torch.randn(m, k, device="cuda", dtype=dt)
        v, u = torch.randn(r, k, device="cuda", dtype=dt) / 64, torch.randn(n, r, device="cuda", dtype=dt) / 16
        w = torch.randn(n, k) / 64
        params = group_params(w, 4, 128, symmetric=False)
        packed = pack(quantize_with(w, params, 4, 128), 4).cuda()
        scales, zeros = params.scales.to("cuda", dt), params.zeros.to("cuda", dt)
        a, b = torch.randn(n, 16, device="cuda", dtype=dt) / 16, torch.randn(16, k, device="cuda", dtype=dt) / 64
        dense_w = w.to("cuda", dt)

        def deq():  # the unfused path: dequantize to a dense weight, then cuBLAS
            weight = ((unpack(packed, 4, k).to(dt) - zeros.repeat_interleave(128, 1))
                      * scales.repeat_interleave(128, 1))
            return F.linear(x, weight)

        cases = {
            "lowrank fused": lambda: torch.ops.slimfx.lowrank_fused(x, v, u, None, [], ""),
            "lowrank two-GEMM": lambda: F.linear(F.linear(x, v), u),
            "W4 fused": lambda: torch.ops.slimfx.quant_fused(x, packed, scales, zeros, None, None, None, None, None,
                                                             4, 128, k, [], ""),
            "W4+LR fused": lambda: torch.ops.slimfx.quant_fused(x, packed, scales, zeros, a, b, None, None, None,
                                                                4, 128, k, [], ""),
            "W4 dequant-then-matmul": deq,
            "dense cuBLAS": lambda: F.linear(x, dense_w),
        }
        synced = {label: (lambda f=f: (f(), torch.cuda.synchronize())) for label, f in cases.items()}
        with torch.no_grad():
            timings = interleaved(synced, rounds=9, min_time=0.05)
        moved = {"lowrank fused": (m * k + r * (k + n) + m * n) * 2, "lowrank two-GEMM": (m * k + r * (k + n) + m * n) * 2,
                 "W4 fused": m * k * 2 + n * k / 2 + m * n * 2, "W4+LR fused": m * k * 2 + n * k / 2 + 16 * (n + k) * 2,
                 "W4 dequant-then-matmul": m * k * 2 + n * k / 2 + m * n * 2, "dense cuBLAS": (m * k + n * k + m * n) * 2}
        flops = {"lowrank fused": 2 * m * r * (k + n), "lowrank two-GEMM": 2 * m * r * (k + n)}
        for label, t in timings.items():
            s = t.median_s
            f = flops.get(label, 2 * m * n * k)
            roof = max(f / (profile.peak_tflops.get("fp16", 1) * 1e12), moved[label] / (profile.memory_bandwidth_gbs * 1e9))
            print(f"M={m:<5} N={n} K={k} r={r:<4} {label:<24} {s * 1e6:9.1f} us  {moved[label] / s / 1e12:6.2f} TB/s  "
                  f"{f / s / 1e12:7.1f} TFLOP/s  {100 * roof / s:5.1f}% of roofline")


if __name__ == "__main__":
    cpu()
    end_to_end()
    if torch.cuda.is_available():
        cuda()
