"""torch's own weight-only int8/int4 CPU kernels, and slimfx's reference quant_linear, against the dense linear.

    python benchmarks/weight_only_kernels.py

At decode (M = 1, 4, 8) and prefill (M = 128, 1024) shapes, each kernel is timed beside the dense fp32 linear of
the same shape, interleaved (``slimfx.timing.interleaved``), and printed as a speed ratio (dense time / kernel time,
so > 1 is faster than dense):
- ``int8 _weight_int8pack_mm``: per-channel int8 weights, bf16 activations (torch's CPU weight-only int8 kernel);
- ``int4 _weight_int4pack_mm_for_cpu``: group-32 int4 weights, bf16 activations;
- ``inductor dequant+mm``: int8 weights dequantized to fp32 and multiplied, compiled by torch.compile;
- ``slimfx quant_linear int4 g128``: the reference op the quant-lowrank pass emits (unpack, dequantize, GEMM).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import slimfx  # noqa: F401 - registers slimfx::quant_linear
from slimfx.ir.quant_format import group_params, pack, quantize_with
from slimfx.timing import interleaved


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = dense fp32 time / kernel time")
    for n, k in ((1024, 1024), (4096, 4096)):
        w = torch.randn(n, k)
        w8 = torch.randint(-128, 127, (n, k), dtype=torch.int8)
        s8 = torch.rand(n, dtype=torch.bfloat16)
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
        sz4 = torch.rand(k // 32, n, 2, dtype=torch.bfloat16)
        params = group_params(w, 4, 128, symmetric=False)
        packed = pack(quantize_with(w, params, 4, 128), 4)
        scale8 = torch.rand(n)

        @torch.compile
        def dequant_mm(x, w8=w8, scale8=scale8):
            return F.linear(x, w8.to(torch.float32) * scale8[:, None])

        for m in (1, 4, 8, 128, 1024):
            x, xb = torch.randn(m, k), torch.randn(m, k, dtype=torch.bfloat16)
            with torch.no_grad():
                timings = interleaved({
                    "dense fp32": lambda: F.linear(x, w),
                    "int8 _weight_int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, s8),
                    "int4 _weight_int4pack_mm_for_cpu": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w4, 32, sz4),
                    "inductor dequant+mm": lambda: dequant_mm(x),
                    "slimfx quant_linear int4 g128": lambda: torch.ops.slimfx.quant_linear(
                        x, packed, params.scales, params.zeros, None, None, None, 4, 128, k),
                }, rounds=5, min_time=0.02)
            dense = timings["dense fp32"].median_s
            cells = "  ".join(f"{name} {dense / t.median_s:5.2f}x" for name, t in timings.items() if name != "dense fp32")
            print(f"N={n:<5} K={k:<5} M={m:<5} dense {dense * 1e6:9.1f} us  {cells}")


if __name__ == "__main__":
    main()
