"""The nm pass: the pattern holds everywhere, the storage really shrinks, masks rank as they should on trained
models, and the profile decides the layout."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import slimfx
from nets import compress_canonical
from slimfx.errors import CalibrationError, PipelineError
from slimfx.hw_profiles import load_profile, latency
from slimfx.hw_profiles.cost_model import dense_linear, nm_linear
from slimfx.ir import LINEAR
from slimfx.ir.ops import NM_LINEAR
from slimfx.ir.sparse_format import compress, decompress, satisfies_pattern
from slimfx.models import evaluate
from slimfx.passes.nm_masks import magnitude_mask


def calibration(data, batches=8, size=128):
    return [(data.train_x[i : i + size],) for i in range(0, batches * size, size)]


def pruned_weights(program):
    """Every pruned layer's effective dense weight, decompressed where it is stored compressed."""
    out = []
    for node in program.graph.nodes:
        if node.target == NM_LINEAR:
            values, indices = program.tensor(node.args[1]), program.tensor(node.args[2])
            out.append((decompress(values, indices, *node.args[4:7]), node.args[4], node.args[5]))
        elif node.target == LINEAR and "nm" in node.meta.get("slimfx", {}):
            n, m = map(int, node.meta["slimfx"]["nm"].split(":"))
            out.append((program.tensor(node.args[1]), n, m))
    return out


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8), (4, 16)])
@pytest.mark.parametrize("layout", ["compressed", "dense"])
def test_every_group_satisfies_the_pattern(digits_mlp, n, m, layout):
    model, data = digits_mlp
    result = compress_canonical(model, (data.test_x[:16],), calibration=calibration(data, 2),
                             pipeline=f"nm{{n={n},m={m},method=sparsegpt,layout={layout}}}")
    weights = pruned_weights(result.program)
    assert len(weights) == 3 and result.report.rewrites("nm") == {layout: 3}
    for weight, wn, wm in weights:
        assert (wn, wm) == (n, m) and satisfies_pattern(weight, n, m)
        assert (weight != 0).float().mean() <= n / m + 1e-6


def test_compressed_storage_really_shrinks_and_matches_the_masked_model(digits_mlp):
    model, data = digits_mlp
    compressed = slimfx.compress(model, (data.test_x[:16],), pipeline="nm{method=magnitude,layout=compressed}",
                                 profile="none")  # no target: the weights stay compressed whatever the speed
    dense = slimfx.compress(model, (data.test_x[:16],), pipeline="nm{method=magnitude,layout=dense}", profile="none")
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    saved = dense.report.weight_bytes_after - compressed.report.weight_bytes_after
    assert saved == pytest.approx(linear_bytes * (1 - 0.5 - 0.5 / 16), abs=16)  # values ½, 2-bit indices
    x = data.test_x[:64]
    torch.testing.assert_close(compressed(x), dense(x), rtol=1e-5, atol=1e-5)


def test_format_round_trips():
    weight = torch.randn(8, 24)
    for n, m in ((2, 4), (3, 8), (1, 2), (2, 3)):
        if 24 % m:
            continue
        mask = magnitude_mask(weight, n, m)
        values, packed = compress(weight * mask, mask, n, m)
        assert values.shape == (8, 24 * n // m)
        torch.testing.assert_close(decompress(values, packed, n, m, 24), weight * mask)


def _losses(model, data, methods=("magnitude", "wanda", "sparsegpt"), seed=None):
    batches = calibration(data)
    if seed is not None:  # another calibration sample of the same size
        order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:1024]
        batches = [(data.train_x[order[i : i + 128]],) for i in range(0, 1024, 128)]
    losses = {}
    for method in methods:
        result = compress_canonical(model, (data.test_x[:32],), calibration=batches, pipeline=f"nm{{method={method}}}")
        losses[method] = evaluate(result, data.test_x, data.test_y)[1]
        assert all(satisfies_pattern(w, 2, 4) for w, _, _ in pruned_weights(result.program))
    return losses


def test_sparsegpt_beats_both_one_shot_masks_on_a_trained_cnn(digits_cnn):
    # On this CNN at 2:4, wanda and magnitude land within a few percent of each other and their order changes
    # with the training run (0.190 vs 0.220 in one, 0.207 vs 0.203 in another), so only the clear gap is asserted.
    losses = _losses(*digits_cnn)
    assert losses["sparsegpt"] < 0.8 * min(losses["wanda"], losses["magnitude"])


def test_wanda_beats_magnitude_and_sparsegpt_beats_wanda_on_a_trained_mlp(digits_mlp):
    # three calibration samples, so the ordering is not one sample's luck; sparsegpt's lead has a margin
    for seed in (None, 1, 2):
        losses = _losses(*digits_mlp, seed=seed)
        assert losses["sparsegpt"] < 0.8 * losses["wanda"] and losses["wanda"] < losses["magnitude"], (seed, losses)


def test_lower_runs_nm_layers_in_the_storage_that_pays_on_the_target(digits_mlp):
    model, data = digits_mlp
    cpu = slimfx.compress(model, (data.test_x[:64],), calibration=calibration(data, 2), profile="cpu-generic",
                          pipeline="nm")
    assert cpu.report.rewrites("nm") == {"compressed": 3}  # the canonical form; the target decides below
    assert cpu.report.rewrites("lower") == {"dense-masked": 3}  # no sparse units on a CPU: expanded once
    assert any(n.startswith("lower: 3 compressed layer(s) run dense") for n in cpu.report.notes)
    # fp16 on an H100: cuSPARSELt's 2:4 loses to dense at batch 1 and wins at 8192 (the cost model's view)
    h100 = load_profile("h100")
    small = [float(latency(k(1, 4096, 4096, **kw), h100)) for k, kw in
             ((dense_linear, {"itemsize": 2, "dtype": "fp16"}), (nm_linear, {"itemsize": 2, "dtype": "fp16"}))]
    large = [float(latency(k(8192, 4096, 4096, **kw), h100)) for k, kw in
             ((dense_linear, {"itemsize": 2, "dtype": "fp16"}), (nm_linear, {"itemsize": 2, "dtype": "fp16"}))]
    assert small[1] > small[0] and large[1] < large[0]
    # decode is memory-bound: the kernel that reads only the kept values pays; prefill is compute-bound: it does not
    half = nn.Sequential(nn.Linear(1024, 1024)).half().eval()
    decode = slimfx.compress(half, (torch.randn(1, 1024).half(),), profile="h100", pipeline="nm{method=magnitude}",
                             check=False, dynamic=False)
    prefill = slimfx.compress(half, (torch.randn(8192, 1024).half(),), profile="h100",
                              pipeline="nm{method=magnitude}", check=False, dynamic=False)
    assert decode.report.rewrites("lower") == {"triton-nm": 1}
    assert prefill.report.rewrites("lower") == {"dense-masked": 1}


def test_exclusions_and_widths(digits_transformer):
    model, data = digits_transformer
    result = compress_canonical(model, (data.test_x[:16],), pipeline="nm{method=magnitude,exclude=head,skip_first=true}")
    pruned = {n.meta.get("slimfx", {}).get("nm") for n in result.program.graph.nodes}
    assert result.report.rewrites("nm") == {"compressed": 8}  # embed (first) and head excluded
    assert "2:4" in pruned
    odd = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    report = compress_canonical(odd, (torch.randn(2, 6),), pipeline="nm{method=magnitude}").report
    assert report.rewrites("nm") == {"skipped-width": 1, "compressed": 1}
    assert [s.reason for s in report.skipped] == ["6 input features are not a multiple of m=4"]
    with pytest.raises(PipelineError, match="m=4 does not divide"):
        compress_canonical(odd, (torch.randn(2, 6),), pipeline="nm{method=magnitude,only=^0}")


@pytest.mark.parametrize("text, message", [
    ("nm{n=4,m=4}", "n >= m would prune nothing"),
    ("nm{n=5,m=4}", "must be in \\[1, m\\)"),
    ("nm{m=1}", "m=1 must be >= 2"),
    ("nm{method=random}", "must be one of 'wanda', 'sparsegpt', 'magnitude'"),
])
def test_bad_options(text, message):
    with pytest.raises(PipelineError, match=message):
        slimfx.parse_pipeline(text)


def test_data_aware_masks_need_calibration():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(CalibrationError, match=f"nm{{method={method}}} needs calibration data"):
            slimfx.compress(model, (torch.randn(2, 8),), pipeline=f"nm{{method={method}}}")


def test_backend_runs_nm_with_stats(digits_mlp):
    model, data = digits_mlp
    stats = slimfx.collect_stats(model, calibration(data, 2))
    torch._dynamo.reset()
    report = slimfx.Report("")
    compiled = torch.compile(model, backend="slimfx", options={"pipeline": "nm{method=sparsegpt}", "calibration": stats,
                                                                 "report": report})
    with torch.no_grad():
        acc, _ = evaluate(compiled, data.test_x, data.test_y)
    assert report.passes[0].rewrites == {"compressed": 3}
    assert acc > 0.9
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_2_4_layout_runs():
    half = nn.Sequential(nn.Linear(4096, 4096)).half().cuda().eval()
    x = torch.randn(8192, 4096, device="cuda").half()
    result = slimfx.compress(half, (x,), profile="h100", pipeline="nm{method=magnitude}", check=False, dynamic=False)
    assert result.report.rewrites("lower") == {"cusparselt-2:4": 1}  # the weights are on the GPU: it can be built
    assert torch.isfinite(result(x)).all()


def test_permutation_is_folded_exactly_and_keeps_more_saliency(digits_mlp):
    from slimfx.ir.fake_prop import refresh_metadata
    from slimfx.passes.nm_permute import kept_saliency
    from slimfx.passes.nm_sparsity import NMSparsity

    model, data = digits_mlp
    x = data.test_x[:64]
    program = slimfx.capture(model, (x,))
    stats = slimfx.collect_stats(model, calibration(data, 2))
    layers = [(n, program.weights[n.args[1].target].origin) for n in program.graph.nodes if n.target == LINEAR]
    before = {o: program.tensor(n.args[1]).detach().clone() for n, o in layers}
    counts = __import__("collections").Counter()
    ctx = slimfx.passes.PassContext()
    permuted = NMSparsity(method="wanda", permute=True)._permute_inputs(program, layers, stats, counts, ctx)
    assert ctx.inputs_changed == {"fc2.weight", "fc3.weight"}  # statistics gathered before are now stale for them
    program.gm.recompile()
    refresh_metadata(program)
    assert counts["permuted"] == 2  # fc2 (fed by fc1 through GELU) and fc3 (fed by fc2)
    torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)  # same function before pruning
    for node, origin in layers[1:]:
        norm = stats.get(origin, 256).gram.diagonal().sqrt().float()
        old = kept_saliency(before[origin].abs() * norm, 2, 4)
        new = kept_saliency(program.tensor(node.args[1]).detach().abs() * permuted[node].gram.diagonal().sqrt().float(), 2, 4)
        assert new > old
    result = compress_canonical(model, (x,), calibration=calibration(data, 2), pipeline="nm{method=magnitude,permute=true}")
    assert result.report.rewrites("nm") == {"permuted": 2, "compressed": 3}
    assert all(satisfies_pattern(w, 2, 4) for w, _, _ in pruned_weights(result.program))


def _textbook_sparsegpt(weight, gram, rows, n, m, damp=0.01):
    """SparseGPT as the paper writes it, one column at a time on W, no blocks: the reference for the fast one."""
    w = weight.clone()
    hessian = gram / rows
    hessian += torch.eye(len(hessian), dtype=hessian.dtype) * damp * hessian.diagonal().mean()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    keep = torch.zeros_like(w, dtype=torch.bool)
    for j in range(w.shape[1]):
        if j % m == 0:
            saliency = w[:, j : j + m] ** 2 / hinv.diagonal()[j : j + m] ** 2
            keep[:, j : j + m].scatter_(1, saliency.topk(n, dim=1).indices, True)
        err = torch.where(keep[:, j], 0.0, w[:, j]) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None]
    return torch.where(keep, w, 0.0), keep


def test_sparsegpt_equals_the_textbook_column_loop_and_shares_one_inverse_per_input(monkeypatch):
    from slimfx.passes.calibration import LayerStats
    from slimfx.passes.nm_masks import sparsegpt

    torch.manual_seed(0)
    x = torch.randn(300, 40, dtype=torch.float64) @ torch.randn(40, 40, dtype=torch.float64)
    stats = LayerStats(x.T @ x, x.abs().sum(0), 300)
    inverses = []
    monkeypatch.setattr(torch, "cholesky_inverse", lambda *a, **k: inverses.append(1) or _cholesky_inverse(*a, **k))
    for out_f in (24, 56):  # two layers reading one input (as q and k do): one inverse between them
        weight = torch.randn(out_f, 40, dtype=torch.float64)
        fast, fast_keep = sparsegpt(weight, stats, 2, 4, block=8)  # blocks of 8: the lazy updates are exercised
        slow, slow_keep = _textbook_sparsegpt(weight, stats.gram, stats.rows, 2, 4)
        assert torch.equal(fast_keep, slow_keep)
        torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)
    assert len(inverses) == 1 + 2  # the layers' shared one, and the textbook's two


_cholesky_inverse = torch.cholesky_inverse
