"""int8-dynamic (W8A8): the op's lowerings against its reference, the predicted error bound, cost gating, and the
byte LM end to end."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx.hw_profiles import load_profile
from slimfx.ir.ops import INT8_LINEAR, int8_linear
from slimfx.passes.calibration import LayerStats
from slimfx.passes.int8_dynamic import predicted_error, quantize_rows


def fast_int8_cpu():
    """cpu-generic with an int8 GEMM six times its float rate (what calibration measured on this project's CPU)."""
    profile = load_profile("cpu-generic")
    return dataclasses.replace(profile, name="cpu-vnni", peak_tflops={**profile.peak_tflops,
                                                                       "int8": 6 * profile.peak_tflops["fp32"]})


def test_the_reference_quantizes_rows_and_weights_symmetrically():
    torch.manual_seed(0)
    x, w, bias = torch.randn(5, 3, 32), torch.randn(16, 32), torch.randn(16)
    codes, scales = quantize_rows(w)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127 and scales.dtype == w.dtype
    step = x.abs().amax(-1, keepdim=True) / 127
    expected = (torch.round(x / step) @ codes.double().T.float()) * step * scales + bias
    assert torch.allclose(int8_linear(x, codes, scales, bias), expected, atol=1e-4)
    exact = torch.nn.functional.linear(x, w, bias)
    assert (int8_linear(x, codes, scales, bias) - exact).norm() / exact.norm() < 0.02  # int8 on both sides, K=32


@pytest.mark.parametrize("kernel", ["aten-int8-mm", "aten-int8-float-gemm"])
def test_both_lowerings_compute_the_reference(kernel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()
    x = torch.randn(4, 10, 64)
    canonical = slimfx.compress(model, (x,), pipeline="int8-dynamic", profile="none", lower=False)
    lowered = slimfx.compress(model, (x,), pipeline=f"int8-dynamic,lower{{prefer={kernel}}}", profile="none",
                              lower=False)
    assert canonical.report.rewrites("int8-dynamic") == {"linear": 2}
    assert sum(n.target == INT8_LINEAR for n in canonical.program.graph.nodes) == 2
    assert lowered.report.rewrites("lower") == {kernel: 2}
    assert not any(n.target == INT8_LINEAR for n in lowered.program.graph.nodes)
    probe = torch.randn(3, 7, 64)  # other sizes than the example's
    assert torch.allclose(lowered(probe), canonical(probe), atol=1e-5, rtol=1e-5)
    compiled = torch.compile(lowered, fullgraph=True)
    assert torch.allclose(compiled(probe), canonical(probe), atol=1e-4, rtol=1e-4)


def test_the_predicted_error_bounds_the_measured_one_and_is_not_vacuous():
    torch.manual_seed(0)
    w = torch.randn(48, 64, dtype=torch.float64)
    for spread in (1.0, 8.0):  # even rows, and rows with a few large inputs
        x = torch.randn(400, 64, dtype=torch.float64) * torch.where(torch.rand(64) < 0.05, spread, 1.0)
        stats = LayerStats(torch.zeros(64, 64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64))
        stats.add(x)
        codes, scales = quantize_rows(w)
        y = x @ w.T
        measured = float((int8_linear(x.float(), codes, scales.float(), None).double() - y).norm() / y.norm())
        bound = predicted_error(w, codes, scales, stats)
        weights_only = float((x @ (codes.double() * scales[:, None] - w).T).norm() / y.norm())
        assert weights_only < measured <= bound < 20 * measured, (spread, weights_only, measured, bound)


def test_a_layer_is_left_in_float_where_the_target_multiplies_int8_no_faster():
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).eval()
    x = (torch.randn(64, 128),)
    slow = slimfx.compress(model, x, pipeline="int8-dynamic", profile="cpu-generic")  # int8 at the fp32 rate
    assert slow.report.rewrites("int8-dynamic") == {"skipped-slower-on-profile": 2}
    assert any("int8 is not faster on cpu-generic" in s.reason for s in slow.report.skipped)
    fast = slimfx.compress(model, x, pipeline="int8-dynamic", profile=fast_int8_cpu())
    assert fast.report.rewrites("int8-dynamic") == {"linear": 2}
    assert fast.report.rewrites("lower") == {"aten-int8-mm": 2}
    assert fast.report.weight_bytes_after < 0.3 * fast.report.weight_bytes_before


def test_a_trained_byte_lm_in_int8_loses_almost_nothing_and_its_weights_stay_the_users():
    from slimfx.lm import bits_per_byte, pretrained_lm

    model, text = pretrained_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal = [(w[:, :-1],) for w in text.windows("train", 64, 64).split(8)]
    held_out = text.windows("test", 128, 64, seed=1)
    result = slimfx.compress(model, cal[0], pipeline="int8-dynamic", calibration=cal, profile=fast_int8_cpu())
    assert result.report.rewrites("int8-dynamic") == {"linear": 9}
    dense, int8 = bits_per_byte(model, held_out), bits_per_byte(result, held_out)
    assert abs(int8 - dense) < 0.002 * dense  # measured: 2.27614 -> 2.27619 bits per byte
    assert result.report.final_rel_error < 0.02  # measured: 0.0099 relative output error
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_half_precision_and_bad_options():
    model = nn.Sequential(nn.Linear(64, 64)).eval().to(torch.bfloat16)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    result = slimfx.compress(model, (x,), pipeline="int8-dynamic", profile=fast_int8_cpu())
    assert result(x).dtype == torch.bfloat16 and result.report.rewrites("lower") == {"aten-int8-mm": 1}
    scales = [t for n, t in result.program.gm.named_buffers() if "scales" in n]
    assert scales and all(t.dtype == torch.bfloat16 for t in scales)  # new tensors take the layer's dtype
    with pytest.raises(slimfx.errors.PipelineError, match="exclude"):
        slimfx.compress(model, (x,), pipeline="int8-dynamic{exclude=(}")


def test_the_planner_takes_int8_only_where_the_targets_int8_gemm_pays_and_the_passes_execute_it():
    from slimfx.lm import bits_per_byte, pretrained_lm
    from slimfx.plan import Int8

    model, text = pretrained_lm()
    cal = [(w[:, :-1],) for w in text.windows("train", 64, 64).split(8)]
    held_out = text.windows("test", 128, 64, seed=1)
    fast = slimfx.compress(model, cal[0], calibration=cal, budget={"latency": 0.6}, profile=fast_int8_cpu())
    plan = fast.report.plans[0]
    chosen = [k for k, o in plan.layers.items() if isinstance(o.decision, Int8)]
    assert chosen and plan.latency_ratio <= 0.6
    assert fast.report.rewrites("plan")["int8"] == len(chosen)
    assert fast.report.rewrites("lower")["aten-int8-mm"] == len(chosen)
    assert all(plan.layers[k].error < 0.05 for k in chosen)  # each a bound: inputs' rounding included
    dense = bits_per_byte(model, held_out)
    assert bits_per_byte(fast, held_out) < dense + 0.01
    plain = slimfx.compress(model, cal[0], calibration=cal, pipeline="plan{latency=0.8,techniques=int8|lowrank}",
                            profile="cpu-generic")
    assert not any(isinstance(o.decision, Int8) for o in plain.report.plans[0].layers.values())  # int8 at fp32's rate


def test_half_precision_stays_finite_and_zero_rows_give_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64)).eval().half()
    x = torch.randn(16, 256, dtype=torch.float16) * 4
    x[3] = 0
    for lower in (False, True):
        result = slimfx.compress(model, (x,), pipeline="int8-dynamic", profile="none", lower=lower)
        y, y0 = result(x), model(x)
        assert y.dtype == torch.float16 and torch.isfinite(y).all()  # integer products reach ~88,000 > fp16's max
        assert ((y.float() - y0.float()).norm() / y0.float().norm()) < 0.03
    single = nn.Linear(256, 64).eval().half()
    for lower in (False, True):
        result = slimfx.compress(single, (x,), pipeline="int8-dynamic", profile="none", lower=lower)
        assert torch.equal(result(x)[3], single.bias.detach())  # a zero row: no 0/0, the bias alone


def test_a_weight_read_by_two_layers_is_quantized_and_stored_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64)

        def forward(self, x):
            return self.a(torch.relu(self.a(x)))

    result = slimfx.compress(Twice().eval(), (torch.randn(8, 64),), pipeline="int8-dynamic", profile="none")
    assert result.report.rewrites("int8-dynamic") == {"linear": 1} and result.report.rewrites("lower") == {
        "aten-int8-mm": 2}
    assert result.report.weight_bytes_after == 64 * 64 + 64 * 4 + 64 * 4  # codes once, scales, bias


def test_the_gate_prices_the_kernel_lower_can_give_and_plans_count_the_inputs_rounding():
    model = nn.Sequential(nn.Linear(4096, 4096)).eval().to(torch.bfloat16)
    slow = slimfx.compress(model, (torch.randn(8, 4096, dtype=torch.bfloat16),), pipeline="int8-dynamic",
                           profile="h100")  # no int8 kernel for CUDA yet: a float GEMM on the levels, slower
    assert slow.report.rewrites("int8-dynamic") == {"skipped-slower-on-profile": 1}
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 256)).eval()
    cal = [(torch.randn(64, 256),) for _ in range(4)]
    with pytest.raises(slimfx.errors.BudgetError, match=r"least output error is 0\.01"):
        slimfx.compress(mlp, cal[0], budget={"latency": 0.6, "max_error": 0.008}, calibration=cal,
                        profile=fast_int8_cpu())  # once accepted: scored with the weights' rounding alone (0.0048)
    result = slimfx.compress(mlp, cal[0], budget={"latency": 0.6, "max_error": 0.02}, calibration=cal,
                             profile=fast_int8_cpu())
    plan = result.report.plans[0]
    assert result.report.final_rel_error <= 0.02
    assert plan.measured_error == pytest.approx(result.report.final_rel_error, rel=0.05)
    with pytest.raises(slimfx.errors.PipelineError, match="use exclude="):
        slimfx.compress(mlp, cal[0], pipeline="int8-dynamic{plan=0.weight}")
