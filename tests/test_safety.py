"""Rewrites are device-, dtype- and sharing-safe, and a failing pass leaves nothing half done."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from nets import SmallResNet, compress_canonical, randomize_bn

import slimfx
from slimfx.errors import VerificationError
from slimfx.passes import PASSES, PassContext, PassManager, Report
from slimfx.passes.calibration import collect_stats

PIPELINES = ["fold-bn", "factorize{keep=0.5,method=svd}", "factorize{keep=0.5}", "factorize{keep=0.5,method=asvd}",
             "factorize{keep=0.5,conv=spatial,method=svd}", "nm{method=magnitude}", "nm{method=wanda}",
             "nm{method=sparsegpt}", "nm{method=wanda,permute=true}", "nm{method=magnitude,layout=dense}"]


def _device_probe_model() -> nn.Module:
    # a bias-free conv and a non-affine BN make fold-bn invent default zeros and ones; the linears feed nm/permute
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 32), nn.ReLU(),
                         nn.Linear(32, 8)).eval()


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_new_tensors_take_the_device_of_what_they_replace(pipeline, monkeypatch):
    """No GPU here, so another device stands in for it: with torch's default device set to "meta" while passes
    run, a tensor made without device= lands on meta and either fails to mix with the CPU weights or is caught by
    verify's V7. (fold-bn's default zeros and ones, nm's packed indices and masks failed this before.)"""
    torch.manual_seed(0)
    model = randomize_bn(_device_probe_model())
    program = slimfx.capture(model, (torch.randn(2, 3, 4, 4),))
    stats = collect_stats(program, [(torch.randn(16, 3, 4, 4),) for _ in range(2)])
    for name, cls in PASSES.items():
        original = cls.run

        def on_meta_by_default(self, program, ctx, _run=original):
            with torch.device("meta"):
                return _run(self, program, ctx)

        monkeypatch.setattr(cls, "run", on_meta_by_default)
    report = PassManager(pipeline, check=False).run(program, PassContext(calibration=stats))
    assert sum(sum(r.rewrites.values()) for r in report.passes) > 0
    assert {program.tensor(n).device.type for n in program.graph.nodes if program.is_weight(n)} == {"cpu"}


def test_statistics_live_on_the_activations_device_in_their_dtype():
    """A model on another device (meta stands in for cuda): the statistics follow its activations, never the CPU."""
    model = _device_probe_model().to("meta")
    program = slimfx.capture(model, (torch.randn(2, 3, 4, 4, device="meta"),))
    stats = collect_stats(program, [(torch.randn(4, 3, 4, 4, device="meta"),)])
    assert len(stats.layers) == 4
    assert all(s.gram.device.type == "meta" and s.gram.dtype == torch.float32 for s in stats.layers.values())
    double = collect_stats(program, [(torch.randn(4, 3, 4, 4, device="meta"),)], dtype=torch.float64)
    assert all(s.gram.device.type == "meta" and s.gram.dtype == torch.float64 for s in double.layers.values())


def test_verify_rejects_a_weight_made_on_another_device():
    program = slimfx.capture(nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(2, 4),))
    linear = next(n for n in program.graph.nodes if n.target == torch.ops.aten.linear.default)
    with program.graph.inserting_before(linear):
        stray = program.add_weight("stray", torch.zeros(4, 4, device="meta"), "0.weight", "test")
    linear.update_arg(1, stray)
    program.drop_unused_weights()
    with pytest.raises(VerificationError, match=r"\[V7\].*made by test is on meta"):
        slimfx.verify(program)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_compress_through_both_entry_points(dtype):
    torch.manual_seed(0)
    model = randomize_bn(SmallResNet()).to(dtype)
    x = torch.randn(3, 3, 16, 16, dtype=dtype)
    exact = slimfx.compress(model, (x,), pipeline="fold-bn")  # raised "this is a slimfx bug" in bf16 before
    assert exact.report.rewrites("fold-bn") == {"conv-bn": 7}
    assert exact.report.final_rel_error < 4 * torch.finfo(dtype).eps
    assert all(p.dtype == dtype for p in exact.parameters()) and all(b.dtype == dtype for b in exact.buffers())
    calibration = [(torch.randn(4, 3, 16, 16, dtype=dtype),) for _ in range(2)]
    lossy = slimfx.compress(model, (x,), pipeline="fold-bn,factorize{keep=0.5}", calibration=calibration)
    assert lossy.report.params_after < lossy.report.params_before
    assert all(b.dtype == dtype for b in lossy.buffers() if b.is_floating_point())

    torch._dynamo.reset()
    report = Report("")
    compiled = torch.compile(model, backend="slimfx",
                             options={"pipeline": "fold-bn", "check": True, "report": report, "inductor": False})
    with torch.no_grad():
        out = compiled(x)
    assert sum(r.rewrites.get("conv-bn", 0) for r in report.passes) == 7
    assert ((out.double() - model(x).double()).norm() / model(x).double().norm()).item() < 4 * torch.finfo(dtype).eps
    torch._dynamo.reset()


class _TwiceApplied(nn.Module):
    """One linear applied twice: its weight has two uses, which must be decided and compressed once."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        return self.out(torch.relu(self.shared(torch.relu(self.shared(self.inp(x))))))


@pytest.mark.parametrize("pipeline, op, kind", [
    ("factorize{rank=8,method=svd,exclude=inp|out}", torch.ops.slimfx.lowrank_linear.default, "linear"),
    ("nm{method=magnitude,exclude=inp|out}", torch.ops.slimfx.nm_linear.default, "compressed")])
def test_a_layer_applied_twice_is_compressed_once_for_both_uses(pipeline, op, kind):
    torch.manual_seed(0)
    model = _TwiceApplied().eval()
    result = compress_canonical(model, (torch.randn(4, 16),), pipeline=pipeline)
    uses = [n for n in result.program.graph.nodes if n.target == op]
    assert len(uses) == 2 and all(a is b for a, b in zip(uses[0].args[1:3], uses[1].args[1:3]))
    assert result.report.rewrites(pipeline.split("{")[0]) == {kind: 1}  # one decision
    assert result.report.weight_bytes_after < result.report.weight_bytes_before


def test_a_tied_lm_head_stays_dense_and_keeps_its_first_owners_name():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300)).eval()
    ids = torch.randint(0, 300, (2, 8))
    result = slimfx.compress(model, (ids,), pipeline="factorize{keep=0.5,method=svd},nm{method=magnitude}",
                             profile="none")
    tied = [s for s in result.report.skipped if "wte" in s.layer]
    assert [s.pass_name for s in tied] == ["factorize", "nm"] and tied[0].layer == "transformer.wte.weight"
    assert result.report.weight_bytes_after < result.report.weight_bytes_before  # never bigger

    plain = slimfx.compress(model, (ids,), pipeline="")  # GPT-2's Conv1D weights are transposed as views
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert {t.untyped_storage().data_ptr() for t in [*plain.parameters(), *plain.buffers()]} <= own


def test_a_later_pass_respects_an_nm_mask_and_never_reads_stale_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    x = torch.randn(8, 32)
    batches = [(torch.randn(64, 32),) for _ in range(2)]
    masked = slimfx.compress(model, (x,), pipeline="nm{method=magnitude,layout=dense},factorize{rank=4,method=svd}")
    assert masked.report.rewrites("factorize") == {"skipped-constrained": 3}
    assert {s.reason for s in masked.report.skipped} == {"keeps nm-mask 2:4 (set by nm)"}

    # a permutation changes a layer's input: statistics gathered before no longer describe it
    from slimfx.passes.calibration import resolve_stats

    ready = slimfx.collect_stats(model, batches)  # statistics of the original model
    for calibration in (ready, batches):
        program = slimfx.capture(model, (x,))
        ctx = PassContext(calibration=calibration)
        PassManager("nm{method=wanda,permute=true,only=^4}", check=False).run(program, ctx)
        assert ctx.inputs_changed == {"4.weight"}
        now = resolve_stats(program, ctx)
        if calibration is ready:  # ready-made: the stale layer is withheld, so a pass finds none and declines
            assert ready.get("4.weight", 64) is not None and now.get("4.weight", 64) is None
        else:  # raw batches: collected again, through the permuted program
            fresh = collect_stats(program, batches).get("4.weight", 64)
            assert torch.equal(now.get("4.weight", 64).gram, fresh.gram)
            assert not torch.allclose(fresh.gram, ready.get("4.weight", 64).gram)
    # raw batches: after any rewrite they are run through the program as it is now
    program = slimfx.capture(model, (x,))
    ctx = PassContext(calibration=batches)
    PassManager("factorize{rank=4,method=svd,exclude=^[24]}", check=False).run(program, ctx)
    now, fresh = resolve_stats(program, ctx), collect_stats(program, batches)
    assert torch.equal(now.get("2.weight", 64).gram, fresh.get("2.weight", 64).gram)
    assert (now.get("2.weight", 64).gram - ready.get("2.weight", 64).gram).abs().max() > 1e-3  # 0 changed its input


def test_buffers_are_not_compressed():
    class Rotated(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("rotation", torch.linalg.qr(torch.randn(32, 32))[0])
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(x @ self.rotation.T)

    result = slimfx.compress(Rotated().eval(), (torch.randn(4, 32),), pipeline="factorize{rank=4,method=svd}",
                             profile="none")
    assert result.report.rewrites("factorize") == {"linear": 1, "skipped-constrained": 1}
    assert [s.reason for s in result.report.skipped] == ["not a trained weight (buffer)"]


def test_compress_names_the_failing_pass(half_rewrite_pass):
    with pytest.raises(slimfx.SlimfxError, match="pass test-half-rewrite failed: deliberate failure"):
        slimfx.compress(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), (torch.randn(2, 4),),
                        pipeline="test-half-rewrite")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_activation_removal_keeps_device_and_dtype(dtype, monkeypatch):
    """depth-merge{latency=...} makes merged weights and distils copies: on the weights' device (meta stands in
    as above) and in their dtype, training float32 masters for half-precision weights."""
    from slimfx.models import InvertedResidual

    torch.manual_seed(0)  # an inverted residual (1×1, depthwise 3×3, 1×1: one dense 3×3 once merged), a linear pair
    model = randomize_bn(nn.Sequential(InvertedResidual(8, 8), nn.Flatten(), nn.Linear(8 * 16, 32), nn.ReLU(),
                                       nn.Linear(32, 8))).eval().to(dtype)
    x = torch.randn(8, 8, 4, 4, dtype=dtype)
    for cls in (PASSES["depth-merge"],):
        original = cls.run

        def on_meta_by_default(self, program, ctx, _run=original):
            with torch.device("meta"):
                return _run(self, program, ctx)

        monkeypatch.setattr(cls, "run", on_meta_by_default)
    calibration = [(torch.randn(16, 8, 4, 4, dtype=dtype),)]
    result = slimfx.compress(model, (x,), pipeline="fold-bn,depth-merge{latency=0.6,steps=0}",
                             calibration=calibration, profile="cpu-generic")
    rewrites = result.report.rewrites("depth-merge")
    assert rewrites["activation-removed"] == 2 and rewrites["run-merged"] == 1 and rewrites["residual"] == 1
    program = result.program
    assert {program.tensor(n).device.type for n in program.graph.nodes if program.is_weight(n)} == {"cpu"}
    assert {program.tensor(n).dtype for n in program.graph.nodes if program.is_weight(n)} == {dtype}
    assert torch.isfinite(result(x)).all()
    monkeypatch.undo()  # distillation (torch's Adam makes its step counters on the default device) off meta
    distilled = slimfx.compress(model, (x,), pipeline="fold-bn,depth-merge{latency=0.6,steps=20}",
                                calibration=calibration, profile="cpu-generic")
    assert {w.dtype for w in distilled.buffers() if w.is_floating_point()} == {dtype}
    assert distilled.report.final_rel_error < result.report.final_rel_error
