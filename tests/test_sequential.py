"""Sequential (block-by-block) calibration: blocks found, statistics from the compressed blocks' outputs with the
original's as the target, one-shot as the fallback, float32 statistics, and clear errors."""
from __future__ import annotations

import warnings

import pytest
import torch

import slimfx
from slimfx.errors import PipelineError
from slimfx.ir import capture
from slimfx.passes.sequential import find_segments


@pytest.fixture(scope="module")
def byte_lm():
    from slimfx.lm import pretrained_lm

    model, text = pretrained_lm()
    cal = [(w[:, :-1],) for w in text.windows("train", 64, 64).split(8)]
    return model, cal, text.windows("test", 128, 64, seed=1)


@pytest.mark.parametrize("pipeline", ["factorize{keep=0.5,method=whitened}", "nm{method=sparsegpt}"])
def test_sequential_calibration_loses_less_than_one_shot_on_the_trained_byte_lm(byte_lm, pipeline):
    from slimfx.lm import bits_per_byte

    model, cal, test = byte_lm
    dense = bits_per_byte(model, test)
    loss = {}
    for mode in ("one-shot", "sequential"):
        result = slimfx.compress(model, cal[0], pipeline=pipeline, calibration=cal, profile="none",
                                 calibration_mode=mode)
        loss[mode] = bits_per_byte(result, test) - dense
        calibrated = [n for n in result.report.notes if "calibrated sequentially" in n]
        assert bool(calibrated) == (mode == "sequential")
        assert sum(result.report.passes[0].rewrites.values()) == 9  # every layer, in both modes
    assert calibrated[0].split(": ", 1)[1].startswith("calibrated sequentially over 2 blocks of blocks")
    assert 0 < loss["sequential"] < 0.97 * loss["one-shot"]


def test_segments_of_a_default_llama_are_its_decoder_layers_and_each_is_compressed_in_turn():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 16))
    segments = find_segments(capture(model, (ids,)))
    assert segments.container == "model.layers" and segments.blocks == 3
    layer_names = [[n.meta["nn_module_stack"] and list(n.meta["nn_module_stack"].values())[-1][0]
                    for n in segment if n.op == "call_function" and "linear" in str(n.target)]
                   for segment in segments.nodes]
    assert layer_names[0] == [] and layer_names[-1] == ["lm_head"]
    assert all(len(names) == 7 and all(f"layers.{i}." in x for x in names) for i, names in enumerate(layer_names[1:-1]))
    cal = [(torch.randint(0, 128, (4, 32)),) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = slimfx.compress(model, (ids,), pipeline="factorize{keep=0.5}", calibration=cal, profile="none")
    assert result.report.passes[0].rewrites["linear"] == 22  # 7 per layer and the head
    assert torch.isfinite(result(ids).logits).all()


def test_gpt2s_conv1d_layers_keep_their_blocks_through_canonicalization():
    """HF GPT-2 runs its linears as addmm (Conv1D); canonicalized to linear they still name their block."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    segments = find_segments(capture(model, (torch.randint(0, 128, (1, 16)),)))
    assert not isinstance(segments, str), segments
    assert segments.container == "transformer.h" and segments.blocks == 2


def test_without_repeated_blocks_it_calibrates_one_shot_and_says_so(digits_cnn):
    model, data = digits_cnn
    cal = [(data.train_x[i : i + 128],) for i in range(0, 512, 128)]
    x = (data.test_x[:64],)
    runs = {mode: slimfx.compress(model, x, pipeline="fold-bn,factorize{keep=0.5}", calibration=cal, profile="none",
                                  calibration_mode=mode) for mode in ("sequential", "one-shot")}
    notes = [n for n in runs["sequential"].report.notes if "one-shot" in n]
    assert len(notes) == 1 and "no repeated blocks" in notes[0]
    assert torch.equal(runs["sequential"](*x), runs["one-shot"](*x))


def test_statistics_are_float32_unless_asked_and_bad_settings_say_what_to_pass(digits_mlp):
    from slimfx.passes.calibration import collect_stats

    model, data = digits_mlp
    cal = [(data.train_x[i : i + 128],) for i in range(0, 512, 128)]
    program = capture(model, (data.test_x[:8],))
    single, double = collect_stats(program, cal), collect_stats(program, cal, dtype=torch.float64)
    for key, stats in single.layers.items():
        assert stats.gram.dtype == torch.float32 and double.layers[key].gram.dtype == torch.float64
        assert torch.allclose(stats.gram.double(), double.layers[key].gram, rtol=1e-4, atol=1e-3)
    x = (data.test_x[:64],)
    results = [slimfx.compress(model, x, pipeline="factorize{keep=0.5}", calibration=cal, profile="none",
                               stats_dtype=dtype, calibration_mode="one-shot") for dtype in (torch.float32, torch.float64)]
    assert torch.allclose(results[0](*x), results[1](*x), rtol=1e-3, atol=1e-3)
    with pytest.raises(PipelineError, match="'sequential'.*'one-shot'"):
        slimfx.compress(model, x, pipeline="factorize{keep=0.5}", calibration=cal, calibration_mode="blockwise")
    with pytest.raises(PipelineError, match="torch.float32 or torch.float64"):
        slimfx.compress(model, x, pipeline="factorize{keep=0.5}", calibration=cal, stats_dtype=torch.float16)


def test_too_few_calibration_tokens_warn_with_how_many_are_needed(digits_mlp):
    model, data = digits_mlp
    with pytest.warns(UserWarning, match=r"fc2.weight, which reads 256 features: .* at least 256 tokens, e\.g\. 16 batches like these"):
        slimfx.compress(model, (data.test_x[:8],), pipeline="factorize{keep=0.5}", profile="none",
                        calibration=[(data.train_x[i : i + 16],) for i in range(0, 32, 16)])


# -- bounded work --------------------------------------------------------------------------------------------------

def test_the_managers_check_compares_a_bounded_sample_of_each_output(digits_mlp):
    from slimfx.passes.manager import sample

    logits = torch.randn(3, 1000, 7)
    picked = sample(logits, 100)
    assert picked.numel() <= 100 and torch.equal(picked, logits.reshape(-1)[:: -(-logits.numel() // 100)])
    assert torch.equal(sample(logits, 10**6), logits) and sample(logits, 10**6) is not logits
    model, data = digits_mlp
    cal = [(data.train_x[i : i + 128],) for i in range(0, 512, 128)]
    x = (data.test_x[:256],)  # 2,560 logits
    full, bounded = (slimfx.compress(model, x, pipeline="factorize{keep=0.3}", calibration=cal, profile="none",
                                     check_elements=n) for n in (10**6, 64))
    a, b = full.report.passes[0].rel_error, bounded.report.passes[0].rel_error
    assert a > 0.01 and b > 0.01 and a != b and b == pytest.approx(a, rel=0.5)  # a sample of 64: near, not equal
    with pytest.raises(PipelineError, match="check_elements=0 must be >= 1"):
        slimfx.compress(model, x, pipeline="factorize{keep=0.3}", calibration=cal, check_elements=0)


def test_the_permutation_search_stops_at_its_time_budget():
    from slimfx.passes.nm_permute import kept_saliency, search_permutation

    torch.manual_seed(0)
    saliency = torch.rand(64, 128)
    expired = search_permutation(saliency, 2, 4, seconds=1e-12)  # out of time before the first group
    assert torch.equal(expired, torch.arange(128))
    searched = search_permutation(saliency, 2, 4, rounds=1, seconds=60.0)
    assert kept_saliency(saliency[:, searched], 2, 4) > kept_saliency(saliency, 2, 4)


def test_compensation_is_the_ridge_least_squares_fit_solved_in_column_blocks():
    """W' = argmin ‖W X_o − W' X_c‖² + λ‖W'−W‖-style ridge, in closed form W + W (C − G)(G + λI)⁻¹; the solve runs a
    block of columns at a time (3 here, so blocks and a ragged last one are exercised) and is cached per object."""
    from slimfx.passes.calibration import LayerStats

    torch.manual_seed(0)
    x_orig = torch.randn(200, 10, dtype=torch.float64)
    x_comp = x_orig @ (torch.eye(10, dtype=torch.float64) + 0.1 * torch.randn(10, 10, dtype=torch.float64))  # a drift
    stats = LayerStats(torch.zeros(10, 10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64))
    for rows in range(0, 200, 50):
        stats.add(x_comp[rows : rows + 50], x_orig[rows : rows + 50])
    weight = torch.randn(6, 10, dtype=torch.float64)  # 6 rows of 10: the mix; 3 rows (below): solved directly
    gram, cross = x_comp.T @ x_comp, x_orig.T @ x_comp
    ridge = gram + 0.1 * gram.diagonal().mean() * torch.eye(10, dtype=torch.float64)
    expected = weight + weight @ (cross - gram) @ torch.linalg.inv(ridge)
    mix = stats._compensation(0.1, columns=3)
    torch.testing.assert_close(stats.compensate(weight), expected, rtol=1e-10, atol=1e-10)
    assert stats._compensation(0.1) is mix  # made once per statistics object
    stats.forget()  # a weight of few rows (a down projection) is solved for directly, without the mix
    narrow = weight[:3]
    torch.testing.assert_close(stats.compensate(narrow), expected[:3], rtol=1e-10, atol=1e-10)
    assert "compensation" not in stats.derived and "ridge_factor" in stats.derived
    # and it is the fit: on the drifted inputs the compensated weight reproduces the original outputs better
    before = (x_orig @ weight.T - x_comp @ weight.T).norm()
    assert (x_orig @ weight.T - x_comp @ expected.T).norm() < 0.5 * before


def test_factors_do_not_keep_the_whole_decomposition_alive():
    from slimfx.passes.lowrank import factorize_matrix

    factors = factorize_matrix(torch.randn(40, 30), "svd")
    for factor in factors.truncate(5, torch.float32):
        assert factor.is_contiguous() and factor.untyped_storage().nbytes() == factor.numel() * 4


def test_a_budget_plan_is_executed_block_by_block_and_loses_less_than_one_shot(byte_lm):
    """compress(budget=...) plans from one-shot statistics, then the passes execute the plan block by block: the
    same decisions, each layer fitted to the inputs the compressed blocks before it produce."""
    from slimfx.lm import bits_per_byte

    model, cal, test = byte_lm
    results = {mode: slimfx.compress(model, cal[0], budget={"latency": 0.6}, calibration=cal, profile="cpu-generic",
                                     calibration_mode=mode) for mode in ("one-shot", "sequential")}
    decisions = {mode: {k: o.decision for k, o in r.report.plans[0].layers.items()} for mode, r in results.items()}
    assert decisions["sequential"] == decisions["one-shot"]
    assert sum(not isinstance(d, slimfx.plan.Dense) for d in decisions["sequential"].values()) >= 4
    assert any("calibrated sequentially" in note for note in results["sequential"].report.notes)
    dense = bits_per_byte(model, test)
    loss = {mode: bits_per_byte(r, test) - dense for mode, r in results.items()}
    assert loss["sequential"] < 0.9 * loss["one-shot"]


def _tiny_llama(layers: int = 2):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_offloading_moves_one_segment_at_a_time_and_puts_the_models_own_tensors_back():
    """The mechanics of compute_device= without a GPU: the meta device stands in for it (shapes only). Every
    segment of a captured Llama runs there, device arguments the capture baked in (arange(device=cpu),
    to(cpu)) mapped; only that segment's weights are out at a time; afterwards the model's own tensors are back
    behind the program, the same objects."""
    from slimfx.passes.sequential import Placement, _Runner

    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    program = capture(model, (ids,))
    assert any(isinstance(v, torch.device) for n in program.graph.nodes for v in n.kwargs.values())  # baked in
    own = {n.target: program.tensor(n) for n in program.graph.nodes if program.is_weight(n)}
    placement = Placement(program, torch.device("meta"))
    segments = find_segments(program)
    env = dict(zip([n for n in program.graph.nodes if n.op == "placeholder"], placement.inputs([ids])))
    runner = _Runner(program, device_map=placement.device_map)
    for nodes in segments.nodes:
        placement.move_in(nodes)
        out = {t for t, v in own.items() if program.tensor(next(n for n in program.graph.nodes if n.target == t))
               .is_meta}
        assert out and out <= {a.target for n in nodes for a in n.all_input_nodes if a.op == "get_attr"}
        env = runner.run_nodes(nodes, env)
        placement.move_out(nodes)
    logits = env[next(n for n in program.graph.nodes if n.op == "output").args[0][0]]
    assert logits.is_meta and logits.shape == (2, 16, 128)
    assert all(program.tensor(n) is own[n.target] for n in program.graph.nodes if program.is_weight(n))
    assert not any(p.is_meta for p in model.parameters())


def test_compute_device_errors_say_what_to_pass():
    model = _tiny_llama(1)
    ids = torch.randint(0, 128, (1, 8))
    with pytest.raises(PipelineError, match="not a torch device"):
        slimfx.compress(model, (ids,), pipeline="factorize{keep=0.5}", calibration=[(ids,)], compute_device="gpu7")
    with pytest.raises(PipelineError, match="needs calibration_mode='sequential'"):
        slimfx.compress(model, (ids,), pipeline="factorize{keep=0.5}", calibration=[(ids,)], compute_device="cpu",
                        calibration_mode="one-shot")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="sees no CUDA device"):
            slimfx.compress(model, (ids,), pipeline="factorize{keep=0.5}", calibration=[(ids,)], compute_device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading to a GPU needs one")
def test_a_model_on_the_cpu_is_compressed_block_by_block_on_the_gpu():
    model = _tiny_llama(3)
    ids = torch.randint(0, 128, (2, 16))
    cal = [(torch.randint(0, 128, (4, 32)),) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        here = slimfx.compress(model, (ids,), pipeline="nm{method=sparsegpt}", calibration=cal, profile="none")
        there = slimfx.compress(model, (ids,), pipeline="nm{method=sparsegpt}", calibration=cal, profile="none",
                                compute_device="cuda")
    assert any("each block on cuda" in note for note in there.report.notes)
    assert all(t.device.type == "cpu" for t in there.state_dict().values())
    assert all(p.device.type == "cpu" for p in model.parameters())
    reference = here(ids).logits
    assert ((there(ids).logits - reference).norm() / reference.norm()) < 1e-3


def test_weights_memory_mapped_from_safetensors_are_never_copied(tmp_path):
    """A model loaded from safetensors (memory-mapped, as Hugging Face loads it) stays on disk: what compression
    leaves unchanged is the mapped tensor itself in the compressed model, not a copy in memory."""
    from safetensors.torch import load_file, save_file

    model = _tiny_llama()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              tmp_path / "model.safetensors")
    mapped = load_file(tmp_path / "model.safetensors")
    model.load_state_dict(mapped, strict=False, assign=True)
    ids = torch.randint(0, 128, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = slimfx.compress(model, (ids,), pipeline="factorize{keep=0.5,exclude=embed}",
                                 calibration=[(torch.randint(0, 128, (4, 32)),) for _ in range(4)], profile="none")
    kept = {t.data_ptr() for t in result.state_dict().values()}
    assert mapped["model.embed_tokens.weight"].data_ptr() in kept
    assert mapped["model.norm.weight"].data_ptr() in kept


def test_sparsegpt_never_writes_into_the_users_gpt2_weights():
    """GPT-2's Conv1D weights reach the passes as transposed views of the user's parameters; SparseGPT works on a
    transposed copy, which must be a copy (found by a fresh-process review: the user's weights were pruned and
    the layer errors read 0)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128,
                                                                 n_positions=64)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (2, 16))
    cal = [(torch.randint(0, 128, (4, 32)),) for _ in range(4)]
    for mode in ("one-shot", "sequential"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = slimfx.compress(model, (ids,), pipeline="nm{method=sparsegpt}", calibration=cal, profile="none",
                                     calibration_mode=mode)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), mode
        assert len(result.report.layer_errors) == 8 and min(result.report.layer_errors.values()) > 0.01, mode


def test_int8_factors_of_a_bf16_model_keep_its_dtype_when_calibrated_sequentially():
    model = _tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = slimfx.compress(model, (ids,), pipeline="factorize{keep=0.5,factor_bits=8}", profile="none",
                                 calibration=[(torch.randint(0, 128, (4, 32)),) for _ in range(4)], lower=False)
    assert result.report.passes[0].rewrites["linear-int-factors"] == 15
    assert {str(t.dtype) for t in result.state_dict().values() if t.is_floating_point()} == {"torch.bfloat16"}
