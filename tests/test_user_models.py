"""Models as users bring them: fresh processes, default configs, graph breaks, size-dependent padding, saving."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from nets import GraphBreakNet, TinyMobileViT, TinySwin, randomize_bn

import slimfx
from slimfx.errors import CalibrationError, PipelineError, ProfileError, SlimfxError

transformers = pytest.importorskip("transformers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def module_bytes(module: nn.Module) -> int:
    """Bytes of every distinct tensor the module holds (what it keeps alive)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def run_fresh(code: str) -> str:
    """Run code in a new interpreter, as a user would, and return what it printed."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def causal_lms():
    """Default configs (use_cache=True, default attention), shrunk only in size so the suite stays fast."""
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=500))
    return [("gpt2", gpt2.eval()), ("llama", llama.eval())]


def test_backend_by_name_in_a_process_that_never_imported_slimfx():
    out = run_fresh("""
        import sys, torch
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU()).eval()
        x = torch.randn(4, 8)
        assert "slimfx" not in sys.modules
        y = torch.compile(model, backend="slimfx")(x)
        assert "slimfx" in sys.modules
        print("ok", float((y - model(x)).abs().max()))
    """)
    assert out.startswith("ok") and float(out.split()[1]) < 1e-5


@pytest.mark.parametrize("name, model", causal_lms())
def test_default_causal_lm_is_one_graph_keeps_its_cache_and_shrinks(name, model):
    torch.manual_seed(0)
    example = torch.randint(0, 500, (1, 8))  # batch 1: export would fix the batch size to 1
    calibration = [(torch.randint(0, 500, (3, 12 + i)),) for i in range(4)]  # other batch sizes and lengths
    data_free = slimfx.compress(model, (example,), pipeline="factorize{keep=0.5,method=svd}", profile="none")
    assert data_free.program is not None  # captured as one graph, not around a break
    assert data_free.report.params_after < 0.8 * data_free.report.params_before
    probe = torch.randint(0, 500, (2, 10))
    out = data_free(probe)
    assert type(out.past_key_values).__name__ == "DynamicCache"
    assert out.logits.shape == model(probe).logits.shape

    whitened = slimfx.compress(model, (example,), pipeline="factorize{keep=0.5}", calibration=calibration,
                               profile="none")  # every layer (this CPU's profile would keep these small ones dense)
    rewritten = whitened.report.rewrites("factorize").get("linear", 0)
    assert rewritten >= {"gpt2": 8, "llama": 14}[name]
    assert whitened.report.params_after < 0.8 * whitened.report.params_before
    with torch.no_grad():  # data-aware beats data-free on the data it saw
        batch = calibration[0][0]
        ref = model(batch).logits
        assert rel_err(whitened(batch).logits, ref) < rel_err(data_free(batch).logits, ref)
    stats = slimfx.collect_stats(model, calibration)  # the statistics path works on these models too
    assert stats.batches == 4 and len(stats.layers) >= rewritten


def test_keyword_batches_are_full_model_inputs():
    _, model = causal_lms()[0]
    ids = torch.randint(0, 500, (2, 8))
    mask = torch.ones_like(ids)
    calibration = [{"attention_mask": torch.ones(3, 9, dtype=torch.long), "input_ids": torch.randint(0, 500, (3, 9))}]
    result = slimfx.compress(model, (), {"input_ids": ids, "attention_mask": mask}, pipeline="factorize{keep=0.5}",
                             calibration=calibration, profile="none")
    assert result.report.rewrites("factorize")["linear"] == 8
    with pytest.raises(CalibrationError, match="not structured like the example inputs"):
        slimfx.compress(model, (), {"input_ids": ids, "attention_mask": mask}, pipeline="factorize{keep=0.5}",
                        calibration=[(ids,)])  # the example's attention_mask is not borrowed for it


def test_graph_break_model_returns_fewer_bytes_and_takes_calibration():
    torch.manual_seed(0)
    model = randomize_bn(GraphBreakNet(width=32, hidden=64))
    x = torch.randn(4, 3, 8, 8)
    calibration = [(torch.randn(8, 3, 8, 8),) for _ in range(4)]
    with pytest.warns(UserWarning, match="not one graph"):
        result = slimfx.compress(model, (x,), pipeline="fold-bn,factorize{keep=0.3}", calibration=calibration,
                                 profile="none")
    assert result.report.rewrites("factorize")  # the data-aware method reached the parts
    assert sum(r.rewrites.get("linear", 0) + r.rewrites.get("conv-channel", 0) for r in result.report.passes) >= 2
    assert module_bytes(result) < 0.7 * module_bytes(model)  # no dense copy is kept anywhere
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.modules())
    with torch.no_grad():
        assert rel_err(result(x), model(x)) < 0.5
    stats = slimfx.collect_stats(model, calibration)  # raised "use torch.compile" before
    assert stats.batches == 4 and any(k[0].startswith("features.") for k in stats.layers)


@pytest.mark.parametrize("cls", [TinySwin, TinyMobileViT])
def test_vision_models_with_size_dependent_padding_compress(cls):
    torch.manual_seed(0)
    model = randomize_bn(cls())
    x = torch.randn(2, 3, 30, 30)
    exact = slimfx.compress(model, (x,), pipeline="fold-bn")
    assert exact.program is not None and exact.report.final_rel_error < 1e-5
    other = torch.randn(3, 3, 26, 26)  # another size: the padding amounts change
    with torch.no_grad():
        assert rel_err(exact(other), model(other)) < 1e-5
    lossy = slimfx.compress(model, (x,), pipeline="fold-bn,factorize{keep=0.5,method=svd}", profile="none")
    assert lossy.report.params_after < lossy.report.params_before


def test_configuration_errors_raise_everywhere_and_graph_trouble_leaves_the_graph_alone(half_rewrite_pass):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(4, 8)
    mistakes = [({"profile": "h1000"}, ProfileError, "unknown hardware profile"),
                ({"pipeline": "nm{method=wanda}"}, CalibrationError, "needs calibration data"),
                ({"pipeline": "nm", "calibration": [(x,)]}, CalibrationError, "slimfx.collect_stats")]
    for options, error, message in mistakes:
        torch._dynamo.reset()
        with pytest.raises(Exception, match=message):
            torch.compile(model, backend="slimfx", options=options)(x)
        if "calibration" not in options:
            with pytest.raises(error, match=message):
                slimfx.compress(model, (x,), **options)
    with pytest.raises(CalibrationError, match=r"pass \[\(x,\)\]"):
        slimfx.compress(model, (x,), pipeline="nm", calibration=torch.randn(16, 8))
    with pytest.raises(CalibrationError, match=r"calibration batch 0 is a Tensor, not \(x,\)"):
        slimfx.compress(model, (x,), pipeline="nm", calibration=[torch.randn(16, 8)])

    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="left a graph untouched: pass test-half-rewrite failed: deliberate failure"):
        y = torch.compile(model, backend="slimfx", options={"pipeline": "test-half-rewrite", "inductor": False})(x)
    assert torch.equal(y, model(x))  # the graph as Dynamo gave it: no relu became a sigmoid


def test_broken_results_warn_naming_layers_and_repeated_skips_are_one_line():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)).eval()
    with pytest.warns(UserWarning, match=r"probably broken\. Largest predicted layer errors: \d\.weight"):
        slimfx.compress(model, (torch.randn(8, 256),), pipeline="factorize{rank=1,method=svd}")

    convs = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1, groups=8) for _ in range(5)], nn.Conv2d(8, 8, 1)).eval()
    report = slimfx.compress(convs, (torch.randn(2, 8, 6, 6),), pipeline="factorize{keep=0.5,method=svd}").report
    lines = [line for line in report.summary().splitlines() if "note:" in line and "grouped-conv" in line]
    assert lines == ["  note: factorize: 5 layers left as they were: grouped-conv: 0.weight, 1.weight, 2.weight, "
                     "3.weight, ... (+1)"]


def test_save_and_load_in_a_fresh_process_keeps_outputs_sizes_and_compression(tmp_path):
    _, model = causal_lms()[0]
    torch.manual_seed(0)
    calibration = [(torch.randint(0, 500, (2, 16)),) for _ in range(2)]
    pipeline = "factorize{keep=0.5,exclude=c_fc},nm{method=magnitude,layout=compressed,only=c_fc}"
    small = slimfx.compress(model, (torch.randint(0, 500, (1, 8)),), pipeline=pipeline, calibration=calibration,
                            profile="none")  # no target: N:M stays compressed (a CPU target would run it dense)
    slimfx.save(small, tmp_path / "saved")
    probe = torch.randint(0, 500, (3, 11))
    with torch.no_grad():
        torch.save((probe, small(probe).logits), tmp_path / "probe.pt")
    out = run_fresh(f"""
        import torch, slimfx
        loaded = slimfx.load({str(tmp_path / 'saved')!r})
        probe, ref = torch.load({str(tmp_path / 'probe.pt')!r})
        with torch.no_grad():
            out = loaded(probe)
        print(float((out.logits - ref).abs().max()), type(out.past_key_values).__name__)
    """)
    diff, cache = out.split()
    assert float(diff) == 0.0 and cache == "DynamicCache"
    manifest = json.loads((tmp_path / "saved" / "manifest.json").read_text())
    assert manifest["pipeline"] == small.report.pipeline and manifest["torch_version"] == torch.__version__
    from safetensors import safe_open

    with safe_open(str(tmp_path / "saved" / "weights.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert any(k.endswith("_indices") and d in ("U8", "I8") for k, d in dtypes.items())  # packed, not dense
    assert not any(k.endswith("c_attn.weight") for k in dtypes)  # the dense weights were not saved


def test_torch_export_of_a_compressed_module_loads_after_other_compressions(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    small = slimfx.compress(model, (x,), pipeline="factorize{keep=0.5,method=svd},nm{method=magnitude}")
    torch.export.save(torch.export.export(small, (x,), strict=False), tmp_path / "small.pt2")
    slimfx.compress(nn.Sequential(nn.Linear(16, 16)).eval(), (x,), pipeline="factorize{rank=2,method=svd}")
    loaded = torch.export.load(tmp_path / "small.pt2").module()
    assert torch.equal(loaded(x), small(x))


def test_part_compressed_modules_refuse_to_save_with_a_reason(tmp_path):
    model = randomize_bn(GraphBreakNet())
    with pytest.warns(UserWarning):
        result = slimfx.compress(model, (torch.randn(2, 3, 8, 8),), pipeline="fold-bn")
    with pytest.raises(SlimfxError, match="compressed in parts"):
        slimfx.save(result, tmp_path / "x")


def test_cli_checks_the_pipeline_before_loading_a_model(monkeypatch, capsys):
    from slimfx import cli

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the pipeline was checked")

    monkeypatch.setattr(cli, "load_model", never)
    monkeypatch.setattr("slimfx.models.pretrained", never)
    assert cli.main(["compress", "digits-cnn", "--pipeline", "fold_bn"]) == 2
    assert "Did you mean 'fold-bn'" in capsys.readouterr().err
    assert cli.main(["demo", "--profile", "h1000"]) == 2
    assert "unknown hardware profile" in capsys.readouterr().err
    assert cli.main(["passes"]) == 0
    assert all(line.count("[exact]") <= 1 and "(exact)" not in line for line in capsys.readouterr().out.splitlines())


def test_pretrained_models_are_trained_once_then_cached(monkeypatch, tmp_path):
    from slimfx import models

    monkeypatch.setenv("SLIMFX_CACHE", str(tmp_path))
    first, data = models.pretrained("digits-mlp", epochs=1)
    monkeypatch.setattr(models, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained again")))
    second, _ = models.pretrained("digits-mlp", epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_printed_ir_hides_export_input_guards():
    program = slimfx.capture(nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(2, 4),))
    assert any(n.op == "call_module" and "guards" in str(n.target) for n in program.graph.nodes)
    assert "guards" not in program.print()


@pytest.mark.slow
def test_example_round_trips_a_default_gpt2(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, "examples", "gpt2_save_load.py"), str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CausalLMOutputWithCrossAttentions DynamicCache max |difference| after reload: 0.0" in done.stdout
    assert "linear=48" in done.stdout


def test_loaded_model_names_the_inputs_it_takes(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16)).eval()
    slimfx.save(slimfx.compress(model, (torch.randn(4, 1, 8, 8),), pipeline="dead-code"), tmp_path / "m")
    loaded = slimfx.load(tmp_path / "m")
    assert loaded(torch.randn(2, 1, 8, 8)).shape == (2, 16)
    with pytest.raises(slimfx.errors.ModelInputError, match=r"saved from a model called with \(\(4, 1, 8, 8\)\)"):
        loaded(torch.randn(3, 64))


def test_keyword_batches_with_a_positional_example_say_how_to_fix_it():
    _, model = causal_lms()[0]
    ids = torch.randint(0, 500, (2, 8))
    with pytest.raises(CalibrationError, match="keyword batches need keyword example inputs too"):
        slimfx.compress(model, (ids,), pipeline="factorize{keep=0.5}", calibration=[{"input_ids": ids}])


def test_symbolic_shape_trouble_retries_with_the_examples_sizes(monkeypatch):
    from slimfx import api
    from slimfx.errors import ShapePropagationError

    real_capture = api.capture

    def symbolic_fails(model, args, kwargs, dynamic=True, **options):
        if dynamic:
            raise ShapePropagationError("shape propagation failed at %pad (aten.pad.default): RuntimeError: boom")
        return real_capture(model, args, kwargs, dynamic=dynamic, **options)

    monkeypatch.setattr(api, "capture", symbolic_fails)
    model = randomize_bn(TinyMobileViT())
    result = slimfx.compress(model, (torch.randn(2, 3, 30, 30),), pipeline="fold-bn")
    assert result.program is not None and result.report.final_rel_error < 1e-5
    assert any("captured with the example's fixed sizes" in n and "aten.pad" in n for n in result.report.notes)
