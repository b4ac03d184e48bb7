"""Hardware profiles, the sympy cost model, and calibration."""
from __future__ import annotations

import dataclasses
import tomllib

import pytest
import sympy
import torch
import torch.nn as nn

import slimfx
from slimfx.errors import ProfileError
from slimfx.hw_profiles import (break_even, break_even_rank, builtin_profiles, kernel_latency, latency, load_profile,
                                node_kernels, program_cost)
from slimfx.hw_profiles.cost_model import M, N, K, Kernel, conv2d, dense_linear, lowrank_linear, nm_linear, quant_linear
from slimfx.hw_profiles.profiles import parse_profile, to_toml


def test_a_cpu_with_int8_dot_products_gets_the_profile_that_prices_them():
    from slimfx.hw_profiles.profiles import builtin_cpu_profile

    assert builtin_cpu_profile("flags\t\t: fpu sse avx2 fma avx512f avx512_vnni avx512_bf16\n") == "cpu-vnni"
    assert builtin_cpu_profile("flags\t\t: fpu sse avx2 fma amx_int8\n") == "cpu-vnni"
    assert builtin_cpu_profile("flags\t\t: fpu sse avx2 fma\nbugs\t: avx_vnni_fake\n") == "cpu-generic"
    vnni, generic = load_profile("cpu-vnni"), load_profile("cpu-generic")
    assert vnni.peak_tflops["int8"] == 4 * generic.peak_tflops["fp32"] and generic.peak_tflops["int8"] == \
        generic.peak_tflops["fp32"]
    assert dataclasses.replace(vnni, name="x", description="", peak_tflops=generic.peak_tflops, source="") == \
        dataclasses.replace(generic, name="x", description="", source="")  # the int8 rate is the one difference


def test_builtin_profiles_load_and_round_trip():
    assert {"h100", "a100", "l4", "cpu-generic", "cpu-vnni"} <= set(builtin_profiles())
    for name in builtin_profiles():
        profile = load_profile(name)
        assert profile.peak_tflops["fp32"] > 0 and profile.bandwidth > 0
        assert parse_profile(tomllib.loads(to_toml(profile)), "round-trip") == profile
    h100 = load_profile("h100")
    assert h100.peak_tflops["bf16"] == pytest.approx(989.4) and h100.supports_2_4("fp16")
    assert not load_profile("cpu-generic").supports_2_4("fp32")


def _data(**overrides):
    data = tomllib.loads(to_toml(load_profile("a100")))
    for dotted, value in overrides.items():
        table, _, key = dotted.rpartition(".")
        target = data[table] if table else data
        if value is None:
            del target[key]
        else:
            target[key] = value
    return data


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"memory_bandwidth_gbs": None}, "missing field 'memory_bandwidth_gbs'"),
        ({"memory_bandwidth_gbs": -5.0}, "field 'memory_bandwidth_gbs' must be > 0"),
        ({"launch_overhead_us": -1.0}, "field 'launch_overhead_us' must be >= 0"),
        ({"peak_tflops.fp32": None}, "missing field 'peak_tflops.fp32'"),
        ({"peak_tflops.bf16": 0}, "field 'bf16' must be > 0"),
        ({"peak_tflops.fp4": 1.0}, "unknown dtype 'peak_tflops.fp4'"),
        ({"efficiency.matmul": 1.5}, "'matmul' is a fraction of peak"),
        ({"sparse_2_4.speedup": "fast"}, "field 'speedup' must be float"),
        ({"device": "tpu"}, "field 'device' must be 'cuda' or 'cpu'"),
    ],
)
def test_invalid_profiles_name_the_field(overrides, message):
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_profile(_data(**overrides), "test")


def test_unknown_profile_lists_the_known_ones(tmp_path):
    with pytest.raises(ProfileError, match="known profiles: a100, cpu-generic, cpu-vnni, h100, l4"):
        load_profile("h200")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(bad)
    with pytest.raises(ProfileError, match="known profiles"):
        slimfx.compress(nn.Linear(2, 2), (torch.randn(1, 2),), profile="tpu-v5")


def test_cost_expressions_match_hand_counts():
    (k,) = dense_linear(4, 3, 5, itemsize=4)
    assert k.flops == 2 * 4 * 3 * 5 and k.bytes == (4 * 5 + 3 * 5 + 4 * 3) * 4 and k.kind == "gemm"
    assert dense_linear(1, 3, 5)[0].kind == "gemv"
    first, second = lowrank_linear(4, 3, 5, 2, itemsize=2)
    assert first.flops == 2 * 4 * 2 * 5 and second.flops == 2 * 4 * 3 * 2
    assert first.bytes == (4 * 5 + 2 * 5 + 4 * 2) * 2 and second.bytes == (4 * 2 + 3 * 2 + 4 * 3) * 2
    (fused,) = lowrank_linear(4, 3, 5, 2, itemsize=2, fused=True)
    assert fused.bytes == (4 * 5 + 2 * (5 + 3) + 4 * 3) * 2  # the [M, r] intermediate stays on chip
    (sparse,) = nm_linear(4, 8, 16, keep=2, group=4, itemsize=2, dtype="fp16")
    assert sparse.bytes == 4 * 16 * 2 + 8 * 16 // 2 * 2 + 8 * 16 // 2 // 4 + 4 * 8 * 2  # x + values + 2-bit idx + y
    q, *correction = quant_linear(4, 8, 256, bits=4, group_size=128, rank=2, itemsize=2)
    assert q.bytes == 4 * 256 * 2 + 8 * 256 // 2 + (8 * 256 // 128) * 2 * 2 + 4 * 8 * 2 and len(correction) == 2
    (c,) = conv2d(2, 3, 8, 6, 6, 3, 3, 6, 6)
    assert c.flops == 2 * (2 * 6 * 6) * 8 * (3 * 3 * 3)
    symbolic = dense_linear()[0]
    assert symbolic.flops == 2 * M * N * K


def test_roofline_latency_by_hand():
    profile = load_profile("a100")
    memory_bound = Kernel(flops=1e6, bytes=1e9, dtype="fp16", kind="gemm")
    expected = 1e9 / (2039e9 * 0.85) + 5e-6
    assert float(kernel_latency(memory_bound, profile)) == pytest.approx(expected)
    compute_bound = Kernel(flops=1e13, bytes=1e3, dtype="fp16", kind="gemm")
    expected = (1e13 + 0.3e9) / (312e12 * 0.75) + 5e-6
    assert float(kernel_latency(compute_bound, profile)) == pytest.approx(expected)
    # no fp32 2:4 tensor cores: the compressed weight is priced as what runs instead (decompress + dense GEMM)
    (sparse,) = nm_linear(8, 8, 8, dtype="fp32", itemsize=4)
    assert float(kernel_latency(sparse, profile)) == pytest.approx(float(latency(sparse.fallback, profile)))
    assert float(latency(sparse.fallback, profile)) > float(latency(dense_linear(8, 8, 8), profile))
    with pytest.raises(ValueError, match="no 2:4 sparse kernels"):
        kernel_latency(Kernel(1e6, 1e3, "fp32", "sparse_gemm"), profile)


@pytest.mark.parametrize("name, m", [("h100", 1), ("h100", 4096), ("cpu-generic", 64), ("l4", 16)])
def test_break_even_rank_is_where_factorizing_stops_paying(name, m):
    profile = load_profile(name)
    n = k = 4096
    dtype, size = ("fp32", 4) if profile.device == "cpu" else ("bf16", 2)
    rank = break_even_rank(profile, m, n, k, dtype, size)
    dense = float(latency(dense_linear(m, n, k, size, dtype), profile))
    factored = lambda rr: float(latency(lowrank_linear(m, n, k, rr, size, dtype), profile))  # noqa: E731
    assert 0 < rank < min(n, k)
    assert factored(rank * 0.95) < dense < factored(rank * 1.05)


def test_launch_overhead_can_make_factorizing_never_pay():
    h100 = load_profile("h100")
    # decode (M=1) on a 1024x1024 bf16 layer: the second kernel launch costs more than the bytes saved
    assert break_even_rank(h100, 1, 1024, 1024, "bf16", 2) == 0.0
    assert break_even_rank(h100, 1, 1024, 1024, "bf16", 2, fused=True) > 256  # one fused kernel does pay


def test_break_even_solves_symbolic_expressions():
    profile = load_profile("h100")
    dense = latency(dense_linear(M, 4096, 4096, 2, "bf16"), profile)
    assert M in dense.free_symbols
    batch = break_even(latency(dense_linear(M, 4096, 4096, 2, "bf16"), profile),
                       sympy.Float(1e-3), M, 1.0, 1e7)  # largest batch that runs in 1 ms
    assert float(dense.subs(M, batch)) == pytest.approx(1e-3)


def test_program_cost_with_symbolic_sizes():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    program = slimfx.capture(model, (torch.randn(4, 16),))
    linear = next(n for n in program.graph.nodes if n.target == torch.ops.aten.linear.default)
    (kernel,) = node_kernels(linear)
    assert not kernel.flops.is_number  # the batch is a symbol
    cost = program_cost(program.graph, load_profile("cpu-generic"))
    assert [c.op for c in cost.nodes] == ["aten.linear", "aten.relu", "aten.linear"]
    assert cost.nodes[0].flops == 2 * 4 * 32 * 16
    assert cost.total_s == pytest.approx(sum(c.latency_s for c in cost.nodes))
    report = slimfx.compress(model, (torch.randn(4, 16),), profile="cpu-generic").report
    assert report.latency_before_s == pytest.approx(cost.total_s)
    assert "predicted latency on cpu-generic" in report.summary()


def test_calibration_writes_a_valid_profile(tmp_path):
    from slimfx.cli import main

    out = tmp_path / "local.toml"
    assert main(["profile", "calibrate", "--device", "cpu", "--out", str(out)]) == 0
    profile = load_profile(out)
    assert profile.device == "cpu" and profile.source == str(out)
    assert profile.peak_tflops["fp32"] > 1e-3 and profile.memory_bandwidth_gbs > 1.0
    assert profile.measured["gemm_points"] == 15
    assert dataclasses.replace(profile, name="x").name == "x"
