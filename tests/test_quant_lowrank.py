"""quant-lowrank: packed group-wise integer weights with a low-rank correction of the quantization error."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import slimfx
from nets import compress_canonical
from slimfx.errors import CalibrationError, PipelineError
from slimfx.ir.ops import QUANT_LINEAR
from slimfx.ir.quant_format import BITS, GroupParams, dequantize, group_params, pack, quantize_with, unpack
from slimfx.models import evaluate


def calibration(data, batches=8, size=128):
    return [(data.train_x[i : i + size],) for i in range(0, batches * size, size)]


@pytest.mark.parametrize("bits", BITS)
def test_codes_pack_into_bits_per_weight_and_round_trip(bits):
    codes = torch.randint(0, 2**bits, (6, 45), dtype=torch.uint8)  # a width that is not a multiple of 8
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 6 * bits)  # ceil(45 / 8) = 6 runs of 8 codes
    assert torch.equal(unpack(packed, bits, 45), codes)


@pytest.mark.parametrize("symmetric", [False, True])
def test_round_to_nearest_error_is_at_most_half_a_step(symmetric):
    weight = torch.randn(8, 64, dtype=torch.float64)
    for bits in BITS:
        params = group_params(weight, bits, 16, symmetric)
        restored = dequantize(quantize_with(weight, params, bits, 16), params, 16, torch.float64)
        step = params.scales.repeat_interleave(16, dim=1)
        assert ((restored - weight).abs() <= step / 2 + 1e-9).all()


def test_int3_group64_takes_at_most_035_of_the_dense_bytes_with_its_correction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512)).eval()
    result = compress_canonical(model, (torch.randn(4, 512),), pipeline="quant-lowrank{bits=3,group=64,rank=16,correction=alternate}")
    assert result.report.rewrites("quant-lowrank") == {"quantized": 2}
    weights = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("weight"))
    biases = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("bias"))
    assert (result.report.weight_bytes_after - biases) <= 0.35 * weights
    packed = [n for n in result.program.graph.nodes if n.target == QUANT_LINEAR]
    assert len(packed) == 2 and all(result.program.tensor(n.args[1]).dtype == torch.uint8 for n in packed)


def test_corrections_and_gptq_lower_the_output_error_on_a_trained_transformer(digits_transformer):
    model, data = digits_transformer
    x, batches = data.test_x[:32], calibration(data)

    def error(**options):
        text = ",".join(f"{k}={v}" for k, v in {"group": 32, "exclude": "head|embed", **options}.items())
        result = compress_canonical(model, (x,), pipeline=f"quant-lowrank{{{text}}}", calibration=batches,
                                    calibration_mode="one-shot")  # the quality of the math, not of a kernel
        return result.report.final_rel_error, evaluate(result, data.test_x, data.test_y)[0]

    for bits in (3, 4):
        plain, plain_acc = error(bits=bits, rank=0)
        for correction in ("lqer", "eora", "alternate"):
            corrected, acc = error(bits=bits, rank=8, correction=correction)
            assert corrected < 0.8 * plain, (bits, correction)
            assert acc >= plain_acc - 0.01
        assert error(bits=bits, rank=0, quantizer="gptq")[0] < 0.7 * plain  # gptq beats rtn
        ranks = [error(bits=bits, rank=r, correction="eora")[0] for r in (0, 4, 8, 16)]
        assert ranks == sorted(ranks, reverse=True)  # a higher correction rank never raises the error


def test_predicted_layer_error_is_the_measured_one():
    from slimfx.passes.calibration import LayerStats
    from slimfx.passes.quant_lowrank import QuantLowRank

    torch.manual_seed(0)
    weight = torch.randn(24, 64, dtype=torch.float64)
    x = torch.randn(500, 64, dtype=torch.float64) * torch.rand(64, dtype=torch.float64)
    stats = LayerStats(torch.zeros(64, 64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64))
    stats.add(x)
    for correction, int8 in (("none", False), ("lqer", False), ("eora", False), ("alternate", False), ("eora", True)):
        result = QuantLowRank(bits=3, group=16, rank=6, correction=correction,
                              correction_int8=int8).quantize(weight, stats, 3, 16, 6)
        approx = dequantize(result.codes, GroupParams(result.params.scales, result.params.zeros), 16, torch.float64)
        if result.a is not None:
            a, b = result.a.double(), result.b.double()
            if int8:
                assert result.a.dtype == result.b.dtype == torch.int8
                a, b = a * result.a_scale[:, None], b * result.b_scale[:, None]
            approx = approx + a @ b
        measured = ((x @ (weight - approx).T).norm() / (x @ weight.T).norm()).item()
        assert result.rel_error == pytest.approx(measured, rel=1e-6)


def test_bad_options_say_what_to_change():
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(2, 48)
    for text, message in (("quant-lowrank{bits=5}", "must be one of 2, 3, 4, 8"),
                          ("quant-lowrank{group=20,rank=0}", "group=20 does not divide the 48 input features of 0.weight"),
                          ("quant-lowrank{group=8,rank=8,correction=alternate}", "rank=8 is not below min\\(out, in\\) = 8 of 2.weight")):
        with pytest.raises(PipelineError, match=message):
            slimfx.compress(model, (x,), pipeline=text)
    for text in ("quant-lowrank{group=8,quantizer=gptq,rank=0}", "quant-lowrank{group=8,correction=eora,rank=4}",
                 "quant-lowrank{group=8,correction=lqer,rank=4}"):
        with pytest.raises(CalibrationError, match="needs calibration data"):
            slimfx.compress(model, (x,), pipeline=text)
    plain = slimfx.compress(model, (x,), pipeline="quant-lowrank{group=8,rank=0}")  # data-free: plain rtn
    assert plain.report.rewrites("quant-lowrank") == {"quantized": 2}


def test_candidates_cover_bits_groups_and_ranks_with_exact_errors(digits_mlp):
    from slimfx.ir.program import LINEAR
    from slimfx.passes.quant_lowrank import quant_candidates

    model, data = digits_mlp
    program = slimfx.capture(model, (data.test_x[:16],))
    stats = slimfx.collect_stats(model, calibration(data, 2))
    node = [n for n in program.graph.nodes if n.target == LINEAR][1]
    options = quant_candidates(program, node, stats, profile=slimfx.hw_profiles.load_profile("cpu-generic"))
    assert {(o.bits, o.group) for o in options} == {(b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128)}
    for b in (2, 3, 4, 8):  # more rank, less error; more bits, less error
        by_rank = [o.rel_error for o in options if o.bits == b and o.group == 64]
        assert by_rank == sorted(by_rank, reverse=True)
    plain = {o.bits: o.rel_error for o in options if o.group == 64 and o.rank == 0}
    assert plain[2] > plain[3] > plain[4] > plain[8]
    assert all(o.latency_s is not None and o.bytes > 0 for o in options)


def test_an_int8_correction_takes_a_quarter_of_the_bytes_and_keeps_most_of_its_effect(digits_transformer):
    model, data = digits_transformer
    x, batches = data.test_x[:32], calibration(data)
    results = {}
    for name, extra in (("none", "rank=0"), ("fp32", "rank=16,correction=eora"),
                        ("int8", "rank=16,correction=eora,correction_int8=true")):
        results[name] = slimfx.compress(model, (x,), calibration=batches,
                                        pipeline=f"quant-lowrank{{bits=3,group=32,exclude=head|embed,{extra}}},"
                                                 "lower{storage=compressed}").report  # lowered, still packed
    plain = results["none"].weight_bytes_after
    fp32, int8 = results["fp32"].weight_bytes_after - plain, results["int8"].weight_bytes_after - plain
    assert int8 < 0.3 * fp32  # one byte per element, plus one scale per row
    assert results["int8"].final_rel_error < 1.2 * results["fp32"].final_rel_error < results["none"].final_rel_error


@pytest.mark.slow
def test_corrections_and_gptq_lower_the_task_loss_of_a_byte_lm():
    """Bits per byte of a byte-level LM trained on the standard library's source, on held-out source: the task
    metric that reacts to quantization the way an LLM's perplexity does (the digits models barely react)."""
    from slimfx.lm import bits_per_byte, pretrained_lm

    model, text = pretrained_lm()
    test = text.windows("test", 64, 64, seed=1)
    batches = [(text.windows("train", 16, 64, seed=1000 + i)[:, :-1],) for i in range(8)]
    dense = bits_per_byte(model, test)

    def loss(**options):
        body = ",".join(f"{k}={v}" for k, v in {"group": 64, "exclude": "head", **options}.items())
        result = compress_canonical(model, (batches[0][0][:4],), pipeline=f"quant-lowrank{{{body}}}",
                                    calibration=batches,  # the quality of the math, not of a kernel,
                                    calibration_mode="one-shot")  # nor of sequential calibration
        return bits_per_byte(result, test)

    for bits in (3, 4):
        plain = loss(bits=bits, rank=0)
        assert plain > dense
        lqer, eora = loss(bits=bits, rank=16, correction="lqer"), loss(bits=bits, rank=16, correction="eora")
        assert dense < eora < lqer < plain  # recorded, int3: 2.320 < 2.355 < 2.400 < 2.416
        assert eora - dense < 0.7 * (plain - dense)  # eora recovers much of what quantization lost
        assert loss(bits=bits, rank=0, quantizer="gptq") < plain


def test_act_order_plans_the_backend_and_save_load(digits_mlp, tmp_path):
    from slimfx.passes.quant_lowrank import QuantLowRank

    model, data = digits_mlp
    x, batches = data.test_x[:16], calibration(data, 2)
    rtn = compress_canonical(model, (x,), calibration=batches, pipeline="quant-lowrank{bits=3,group=32,rank=0}")
    act = compress_canonical(model, (x,), calibration=batches,
                          pipeline="quant-lowrank{bits=3,group=32,rank=0,quantizer=gptq,act_order=true}")
    assert act.report.final_rel_error < rtn.report.final_rel_error

    planned = compress_canonical(model, (x,), calibration=batches, pipeline=QuantLowRank(
        plan={"fc1.weight": (8, 64, 0), "fc2.weight": (2, 32, 8), "fc3.weight": (4, 32, 4)}, correction="eora"))
    chosen = {n.meta["slimfx"]["bits"]: (n.meta["slimfx"]["group"], n.meta["slimfx"]["rank"])
              for n in planned.program.graph.nodes if n.target == QUANT_LINEAR}
    assert chosen == {8: (64, 0), 2: (32, 8), 4: (32, 4)}

    slimfx.save(planned, tmp_path / "q")
    assert torch.equal(slimfx.load(tmp_path / "q")(data.test_x[:5]), planned(data.test_x[:5]))

    torch._dynamo.reset()
    report = slimfx.Report("")
    compiled = torch.compile(model, backend="slimfx", options={
        "pipeline": "quant-lowrank{bits=4,group=32,rank=8,correction=eora}", "report": report, "inductor": False,
        "calibration": slimfx.collect_stats(model, batches)})
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert sum(r.rewrites.get("quantized", 0) for r in report.passes) == 3
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    torch._dynamo.reset()
