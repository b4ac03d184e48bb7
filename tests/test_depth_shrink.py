"""Latency-aware activation removal (depth-merge{latency=...}): the two-stage DP against brute force, the chain
analysis on real CNN blocks (ResNet basic and bottleneck, MobileNetV2 inverted residual), and the whole pass on
a CNN trained on real data."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import slimfx
from slimfx.errors import BudgetError, CalibrationError, PipelineError
from slimfx.ir.program import CONV2D
from slimfx.models import InvertedResidual
from slimfx.passes.depth_dp import solve
from slimfx.passes.depth_spans import find_chains


# -- the DP ---------------------------------------------------------------------------------------------------

def brute_force(merged, importance, kept, budget):
    """Least summed importance over every choice of kept boundaries and every split of each block into runs."""
    n = len(merged) - 1

    def fastest(i, j):  # every split of layers i..j-1 into merged runs
        options = [merged[i][j]]
        options += [fastest(i, k) + fastest(k, j) for k in range(i + 1, j)]
        return min(options)

    best = math.inf
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [b for b, cut in zip(range(1, n), cuts) if cut] + [n]
        blocks = list(zip(bounds, bounds[1:]))
        latency = sum(fastest(i, j) + (kept[j] if j < n else 0) for i, j in blocks)
        error = sum(importance[i][j] for i, j in blocks)
        if latency <= budget and error < best:
            best = error
    return best


@st.composite
def tables(draw):
    n = draw(st.integers(1, 6))
    merged = [[math.inf] * (n + 1) for _ in range(n + 1)]
    importance = [[math.inf] * (n + 1) for _ in range(n + 1)]
    for i in range(n):
        for j in range(i + 1, n + 1):
            single = j == i + 1
            if single or draw(st.booleans()):  # some runs cannot merge
                merged[i][j] = float(draw(st.integers(1, 20)))
            importance[i][j] = 0.0 if single else draw(st.floats(0, 5))
    kept = [float(draw(st.integers(0, 3))) for _ in range(n + 1)]  # an activation kept at each boundary
    for cut in draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=2)):  # branches: blocks may not cross
        for i in range(cut):
            for j in range(cut + 1, n + 1):
                importance[i][j] = math.inf
    dense = sum(merged[i][i + 1] for i in range(n)) + sum(kept[1:n])
    return merged, importance, kept, float(draw(st.integers(1, int(dense))))


@settings(max_examples=200, deadline=None)
@given(tables())
def test_the_two_stage_dp_finds_the_least_error_plan_within_budget(case):
    merged, importance, kept, budget = case
    expected = brute_force(merged, importance, kept, budget)
    if math.isinf(expected):
        with pytest.raises(BudgetError) as info:
            solve(merged, importance, kept, budget)
        assert info.value.best > budget and "lowest achievable" in str(info.value)
        return
    plan = solve(merged, importance, kept, budget, resolution=4000)
    assert plan.latency_s <= budget
    step = sum(v for row in importance for v in row if math.isfinite(v)) / 4000  # importance is rounded up to steps
    assert expected - 1e-9 <= plan.error <= expected + len(plan.blocks) * step + 1e-9
    assert [b.start for b in plan.blocks][0] == 0 and plan.blocks[-1].end == len(merged) - 1
    for block in plan.blocks:  # runs tile their block
        assert block.runs[0][0] == block.start and block.runs[-1][1] == block.end
        assert all(a[1] == b[0] for a, b in zip(block.runs, block.runs[1:]))


def test_a_plan_that_spends_every_importance_step_still_fits():
    """Three two-layer chains whose pairs must all merge to fit: the plan uses all the importance there is, and
    rounding each block up must not push it off the table (it once returned the unchanged plan, over budget)."""
    n, inf = 6, math.inf
    merged = [[inf] * (n + 1) for _ in range(n + 1)]
    importance = [[inf] * (n + 1) for _ in range(n + 1)]
    for c in range(0, n, 2):
        merged[c][c + 1] = merged[c + 1][c + 2] = 10.0
        merged[c][c + 2] = 1.0
        importance[c][c + 1] = importance[c + 1][c + 2] = 0.0
        importance[c][c + 2] = 1.0
    plan = solve(merged, importance, [0.0] * (n + 1), 3.0)
    assert plan.latency_s == 3.0 and plan.error == 3.0 and len(plan.blocks) == 3


def test_among_plans_of_equal_error_the_faster_wins():
    merged = [[math.inf, 5.0, 6.0], [math.inf, math.inf, 5.0], [math.inf] * 3]  # merging both: exact and faster
    importance = [[math.inf, 0.0, 0.0], [math.inf, math.inf, 0.0], [math.inf] * 3]
    plan = solve(merged, importance, [0.0] * 3, 10.0)
    assert plan.latency_s == 6.0 and plan.blocks[0].runs == ((0, 2),)


# -- chains on real CNN blocks --------------------------------------------------------------------------------

class BasicBlock(nn.Module):  # ResNet-18/34
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):  # ResNet-50
    def __init__(self, cin: int, mid: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, 4 * mid, 1, bias=False), nn.BatchNorm2d(4 * mid)
        self.down = None if stride == 1 and cin == 4 * mid else nn.Sequential(
            nn.Conv2d(cin, 4 * mid, 1, stride, bias=False), nn.BatchNorm2d(4 * mid))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(y)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def chain_names(model, x):
    program = slimfx.compress(model.eval(), (x,), pipeline="fold-bn").program
    names = lambda layers: [program.weights[layer.args[1].target].origin.rsplit(".", 1)[0] for layer in layers]
    return [(names(c.layers), [a is not None for a in c.activations]) for c in find_chains(program)]


def test_chains_follow_residual_blocks_and_stop_at_branches_and_joins():
    x = torch.randn(2, 16, 8, 8)
    assert chain_names(nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2)), x) == [
        (["0.conv1", "0.conv2"], [False, True, False]),
        (["1.conv1", "1.conv2"], [False, True, False]),  # the downsample conv is a branch of its own
    ]
    assert chain_names(nn.Sequential(Bottleneck(16, 4), Bottleneck(16, 4)), x) == [
        (["0.conv1", "0.conv2", "0.conv3"], [False, True, True, False]),
        (["1.conv1", "1.conv2", "1.conv3"], [False, True, True, False]),
    ]
    stride_two = nn.Sequential(InvertedResidual(16, 24, stride=2), InvertedResidual(24, 24))
    assert chain_names(stride_two, x) == [  # no skip on the first: its projection feeds the next block's fork
        (["0.expand.0", "0.depthwise.0", "0.project.0"], [False, True, True, False]),
        (["1.expand.0", "1.depthwise.0", "1.project.0"], [False, True, True, False]),
    ]


# -- the pass -------------------------------------------------------------------------------------------------

def calibration(data, n=512, batch=128):
    return [(data.train_x[i : i + batch],) for i in range(0, n, batch)]


@pytest.fixture(scope="module")
def mobilenet():
    from slimfx.models import pretrained

    return pretrained("digits-mobilenet", epochs=8)  # 97% held-out (shipped with slimfx, as the 20-epoch one is)


@pytest.mark.slow
def test_removing_activations_meets_the_budget_and_keeps_accuracy_on_a_trained_mobilenet(mobilenet):
    from slimfx.models import evaluate

    model, data = mobilenet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = slimfx.compress(model, (data.test_x[:256],), pipeline="fold-bn,depth-merge{latency=0.7}",
                             calibration=calibration(data), profile="cpu-generic")
    report = result.report
    rewrites = report.rewrites("depth-merge")
    assert rewrites["activation-removed"] >= 2 and rewrites["layers-removed"] >= 2
    convs = lambda program: sum(n.target == CONV2D for n in program.graph.nodes)
    assert convs(result.program) == 17 - rewrites["layers-removed"]
    merge = report.passes[1]  # (fold-bn, depth-merge, lower): the budget is a fraction of what depth-merge was given
    assert merge.latency_after_s <= 0.7 * merge.latency_before_s
    accuracy, _ = evaluate(model, data.test_x, data.test_y)
    shrunk, _ = evaluate(result, data.test_x, data.test_y)
    assert accuracy > 0.95 and shrunk > accuracy - 0.04
    distilled = next(n for n in report.notes if "distilled" in n)  # fine-tuning recovered most of the error
    start, end = (float(v) for v in distilled.split("output error ")[1].split(" (")[0].split(" -> "))
    assert end < 0.3 * start
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model is untouched

    loose = slimfx.compress(model, (data.test_x[:256],), pipeline="fold-bn,depth-merge{latency=1}",
                            calibration=calibration(data), profile="cpu-generic")
    assert "activation-removed" not in loose.report.rewrites("depth-merge")  # nothing lossy pays there
    assert loose.report.final_rel_error < 1e-5


def test_a_dilated_conv_stays_as_it_is_and_the_rest_of_its_chain_is_still_planned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(8, 32, 1), nn.ReLU(),
                          nn.Conv2d(32, 4, 1)).eval()
    x = torch.randn(4, 8, 8, 8)
    for latency in (1.0, 0.9):
        result = slimfx.compress(model, (x,), pipeline=f"depth-merge{{latency={latency},steps=0}}",
                                 calibration=[(x,)], profile="cpu-generic")
        merge = result.report.passes[0]
        assert merge.latency_after_s <= latency * merge.latency_before_s * (1 + 1e-9)
        assert any(n.target == CONV2D and list(n.args[5]) == [2, 2] for n in result.program.graph.nodes)


def test_a_merge_that_would_hold_more_weights_is_never_planned():
    """Expand 1×1 (8->32) then depthwise 3×3 would become a dense 8->32 3×3 conv (2,304 weights, not 544); with
    the 32->12 projection the whole block is one 8->12 3×3 conv (864, not 928)."""
    from slimfx.passes.depth_spans import grows

    block = InvertedResidual(8, 12, stride=2).eval()
    program = slimfx.compress(block, (torch.randn(2, 8, 8, 8),), pipeline="fold-bn").program
    chain = find_chains(program)[0]
    expand, depthwise, project = chain.layers
    assert grows([expand, depthwise]) and grows([depthwise, project])  # a depthwise conv made dense
    assert not grows([expand, depthwise, project]) and not grows([expand])


def test_bad_budgets_and_missing_calibration_say_what_to_change():
    torch.manual_seed(0)
    model = nn.Sequential(Bottleneck(16, 8)).eval()
    x = torch.randn(4, 16, 8, 8)
    with pytest.raises(BudgetError, match=r"lowest achievable latency is (\d\.\d+)x dense.*raise latency") as info:
        slimfx.compress(model, (x,), pipeline="fold-bn,depth-merge{latency=0.05}", calibration=[(x,)],
                        profile="cpu-generic")
    assert 0.05 < info.value.best < 1
    with pytest.raises(CalibrationError, match="pass calibration="):
        slimfx.compress(model, (x,), pipeline="depth-merge{latency=0.5}", profile="cpu-generic")
    with pytest.raises(PipelineError, match=r"latency=1.5.*\(0, 1\]"):
        slimfx.compress(model, (x,), pipeline="depth-merge{latency=1.5}")


def test_every_block_is_a_candidate_with_its_error_and_latency():
    from slimfx.passes.base import PassContext
    from slimfx.hw_profiles.profiles import load_profile
    from slimfx.passes.depth_shrink import span_candidates

    torch.manual_seed(0)
    model = nn.Sequential(Bottleneck(16, 8), Bottleneck(32, 8)).eval()
    x = torch.randn(8, 16, 8, 8)
    program = slimfx.compress(model, (x,), pipeline="fold-bn").program
    ctx = PassContext(profile=load_profile("cpu-generic"), calibration=[(x,)])
    candidates = span_candidates(program, ctx)
    assert len(candidates) == 2 * 6  # two chains of three layers: 3 + 2 + 1 blocks each
    for c in candidates:
        if len(c.layers) == 1:  # a layer alone removes nothing
            assert c.error == 0 and c.removed == () and c.latency_s == pytest.approx(c.dense_latency_s)
        else:
            assert c.error > 0 and len(c.removed) == len(c.layers) - 1
    whole = next(c for c in candidates if c.layers[0] == "0.conv1.weight" and len(c.layers) == 3)
    assert whole.runs[0][0] == 0 and whole.runs[-1][1] == 3
    measured = span_candidates(program, ctx, tables="measure")  # timed on this machine instead
    assert [c.layers for c in measured] == [c.layers for c in candidates]
    assert all(c.latency_s > 0 for c in measured)
