"""depth-merge: exact merges of consecutive linear and conv layers, property-tested, and refused with a reason."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slimfx
from slimfx.ir.program import CONV2D, LINEAR


def layers(program, target):
    return sum(n.target == target for n in program.graph.nodes)


@st.composite
def conv_chains(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    cin, cout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    groups = draw(st.sampled_from([1, cin]))  # grouped or depthwise first convs merge into a dense one
    mid = cin * draw(st.integers(1, 4)) if groups > 1 else draw(st.integers(4, 24))
    k1, k2 = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2, 3]))
    first = nn.Conv2d(cin, mid, k1, padding=draw(st.integers(0, k1 // 2)), groups=groups, bias=draw(st.booleans()))
    second = nn.Conv2d(mid, cout, k2, stride=draw(st.sampled_from([1, 2])), bias=draw(st.booleans()))
    size = draw(st.integers(k1 + k2 + 1, 12))
    return nn.Sequential(first, second).eval(), torch.randn(2, cin, size, size)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_chains())
def test_conv_chains_merge_exactly_when_they_shrink(case):
    model, x = case
    result = slimfx.compress(model, (x,), pipeline="depth-merge")
    merged = result.report.rewrites("depth-merge").get("conv", 0)
    assert layers(result.program, CONV2D) == 2 - merged
    if not merged:
        assert [s.reason for s in result.report.skipped if s.pass_name == "depth-merge"]  # a reason, always
    assert result.report.final_rel_error < 1e-5
    with torch.no_grad():  # other sizes too
        other = torch.randn(3, *x.shape[1:2], x.shape[2] + 3, x.shape[3] + 1)
        assert ((result(other) - model(other)).norm() / model(other).norm()).item() < 1e-5


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**16), st.lists(st.integers(1, 40), min_size=3, max_size=5), st.booleans())
def test_linear_chains_merge_exactly_when_they_shrink(seed, widths, bias):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(a, b, bias=bias) for a, b in zip(widths, widths[1:])]).eval()
    x = torch.randn(5, widths[0])
    result = slimfx.compress(model, (x,), pipeline="depth-merge")
    assert result.report.final_rel_error < 1e-5
    assert result.report.flops_after <= result.report.flops_before
    assert layers(result.program, LINEAR) == len(widths) - 1 - result.report.rewrites("depth-merge").get("linear", 0)


def test_refusals_say_why():
    torch.manual_seed(0)
    cases = {
        "not reduce multiply-adds and size": nn.Sequential(nn.Conv2d(64, 16, 1), nn.Conv2d(16, 64, 3)),  # a bottleneck
        "pads the intermediate": nn.Sequential(nn.Conv2d(8, 32, 1), nn.Conv2d(32, 4, 3, padding=1)),
        "the second conv is grouped": nn.Sequential(nn.Conv2d(8, 32, 1), nn.Conv2d(32, 32, 3, groups=32)),
        "strided or either is dilated": nn.Sequential(nn.Conv2d(8, 32, 3, stride=2), nn.Conv2d(32, 4, 1)),
    }
    for reason, model in cases.items():
        x = torch.randn(2, model[0].in_channels, 12, 12)
        result = slimfx.compress(model.eval(), (x,), pipeline="depth-merge")
        assert result.report.rewrites("depth-merge") == {"refused": 1}
        assert reason in result.report.skipped[0].reason
    relu = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).eval()  # a nonlinearity between
    assert slimfx.compress(relu, (torch.randn(2, 16),), pipeline="depth-merge").report.rewrites("depth-merge") == {}


def test_a_projection_after_a_conv_merges_in_a_trained_style_block():
    """A 3×3 conv followed by a 1×1 projection with no activation between (as in a linear bottleneck), then BN:
    fold-bn and depth-merge leave one conv."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.Conv2d(64, 24, 1, bias=False), nn.BatchNorm2d(24),
                          nn.ReLU()).eval()
    block[2].running_mean.uniform_(-1, 1)
    block[2].running_var.uniform_(0.5, 2)
    result = slimfx.compress(block, (torch.randn(2, 16, 8, 8),), pipeline="fold-bn,depth-merge")
    assert layers(result.program, CONV2D) == 1
    assert result.report.final_rel_error < 1e-5


def test_a_residual_identity_folds_into_its_conv_and_a_depthwise_pair_merges_where_it_pays():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.tail = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1))

        def forward(self, x):
            return self.tail(torch.relu(self.conv(x) + x))

    torch.manual_seed(0)
    model = Residual().eval()
    result = slimfx.compress(model, (torch.randn(2, 8, 6, 6),), pipeline="depth-merge")
    assert result.report.rewrites("depth-merge") == {"residual": 1, "refused": 1}  # depthwise 8->8 then 8->4: no
    assert not any(n.target == torch.ops.aten.add.Tensor for n in result.program.graph.nodes)
    assert result.report.final_rel_error < 1e-5 and result.report.params_after == result.report.params_before

    few_outputs = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 1, 1)).eval()  # depthwise, then 4->1
    merged = slimfx.compress(few_outputs, (torch.randn(2, 4, 6, 6),), pipeline="depth-merge")
    assert merged.report.rewrites("depth-merge") == {"conv": 1} and merged.report.final_rel_error < 1e-5
    assert merged.report.params_after < merged.report.params_before


def test_fold_bn_and_depth_merge_remove_layers_of_a_trained_cnn_exactly():
    from slimfx.models import evaluate, pretrained

    model, data = pretrained("digits-proj-cnn")
    result = slimfx.compress(model, (data.test_x[:32],), pipeline="fold-bn,depth-merge")
    assert result.report.rewrites("fold-bn") == {"conv-bn": 2}
    assert result.report.rewrites("depth-merge") == {"conv": 1, "linear": 1}  # conv2+proj, fc1+fc2
    assert layers(result.program, CONV2D) == 2 and layers(result.program, LINEAR) == 1
    assert result.report.flops_after < 0.6 * result.report.flops_before
    accuracy, loss = evaluate(model, data.test_x, data.test_y)
    merged_accuracy, merged_loss = evaluate(result, data.test_x, data.test_y)
    assert accuracy > 0.95 and merged_accuracy == accuracy and abs(merged_loss - loss) < 1e-4


def test_merges_are_priced_on_the_profile_when_one_is_given():
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 64)).eval()  # fewer multiply-adds merged (4096 < 6144)
    x = torch.randn(256, 64)
    assert slimfx.compress(chain, (x,), pipeline="depth-merge").report.rewrites("depth-merge") == {"linear": 1}
    on_cpu = slimfx.compress(chain, (x,), pipeline="depth-merge", profile="cpu-generic").report
    assert on_cpu.rewrites("depth-merge") == {"linear": 1}
    assert on_cpu.latency_after_s < on_cpu.latency_before_s
    on_h100 = slimfx.compress(chain, (x[:1],), pipeline="depth-merge", profile="h100", dynamic=False).report
    assert on_h100.rewrites("depth-merge") == {"linear": 1} and on_h100.latency_after_s < on_h100.latency_before_s


def test_linears_merge_through_shape_ops_that_commute_and_not_through_those_that_do_not():
    class Heads(nn.Module):
        def __init__(self, flatten_rows: bool):
            super().__init__()
            self.up, self.down, self.flatten_rows = nn.Linear(12, 96), nn.Linear(96, 8), flatten_rows

        def forward(self, x):  # x: [batch, tokens, 12]
            h = self.up(x)
            if self.flatten_rows:  # mixes rows of the last dimension: not a commuting reshape
                return self.down(h.reshape(h.shape[0], -1, 96 // 2).reshape(h.shape[0], -1, 96))
            return self.down(h.transpose(0, 1).reshape(-1, 96).unsqueeze(0))

    torch.manual_seed(0)
    x = torch.randn(3, 5, 12)
    model = Heads(flatten_rows=False).eval()
    result = slimfx.compress(model, (x,), pipeline="depth-merge")
    assert result.report.rewrites("depth-merge") == {"linear": 1}
    assert layers(result.program, LINEAR) == 1 and result.report.final_rel_error < 1e-5
    other = torch.randn(4, 7, 12)
    assert torch.allclose(result(other), model(other), atol=1e-5)
    mixed = slimfx.compress(Heads(flatten_rows=True).eval(), (x,), pipeline="depth-merge")
    assert layers(mixed.program, LINEAR) == 2

    class Views(nn.Module):  # a view after the first linear; its input is non-contiguous once replayed
        def __init__(self, last_dim_moves: bool):
            super().__init__()
            self.up, self.down, self.last_dim_moves = nn.Linear(12, 96), nn.Linear(96, 8), last_dim_moves

        def forward(self, x):
            h = self.up(x.transpose(0, 1))  # [tokens, batch, 96]
            if self.last_dim_moves:  # the transpose moves the last dimension: rows are mixed
                return self.down(h.transpose(1, 2).reshape(h.shape[0], h.shape[1], 96))
            return self.down(h.view(-1, 96))

    for moves, expected in ((False, 1), (True, 2)):
        model = Views(moves).eval()
        result = slimfx.compress(model, (x,), pipeline="depth-merge")
        assert layers(result.program, LINEAR) == expected and result.report.final_rel_error < 1e-5
