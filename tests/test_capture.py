"""Capture and canonicalization: every spelling becomes one canonical op, outputs unchanged, model untouched."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nets import SmallResNet, count_modules, randomize_bn
from conftest import hf_models

import slimfx
from slimfx.errors import CaptureError
from slimfx.ir import BATCH_NORM, CONV2D, LINEAR, from_dynamo, verify


def op_counts(program) -> Counter:
    return Counter(n.target for n in program.graph.nodes if n.op == "call_function")


class Spellings(nn.Module):
    """Five ways to write a linear layer, two ways to write a conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 16) * 0.1)
        self.b = nn.Parameter(torch.randn(16) * 0.1)
        self.w_in_out = nn.Parameter(torch.randn(16, 16) * 0.1)  # HF Conv1D stores in×out
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        y = self.a(x)
        y = F.linear(y, self.w, self.b)
        y = y @ self.w.t()
        y = torch.addmm(self.b, y, self.w.T)
        y = torch.addmm(self.b, y, self.w_in_out)
        z = F.conv2d(y.reshape(-1, 1, 4, 4), self.conv.weight, self.conv.bias, 1, 0)
        return y, z


def test_every_linear_spelling_becomes_aten_linear():
    model = Spellings().eval()
    x = torch.randn(5, 16)
    program = slimfx.capture(model, (x,))
    counts = op_counts(program)
    assert counts[LINEAR] == 5
    assert counts[CONV2D] == 1
    assert not {torch.ops.aten.addmm.default, torch.ops.aten.matmul.default, torch.ops.aten.mm.default} & set(counts)
    for got, want in zip(program(x), model(x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dynamo_graph_canonicalizes_to_the_same_ops():
    model = Spellings().eval()
    x = torch.randn(5, 16)
    captured = []

    def grab(gm, inputs):
        captured.append(from_dynamo(gm, inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=grab, fullgraph=True)(x)
    (program,) = captured
    counts = op_counts(program)
    assert counts[LINEAR] == 5 and counts[CONV2D] == 1
    origins = {info.origin for info in program.weights.values()}
    assert {"a.weight", "a.bias", "w", "b", "conv.weight"} <= origins


def test_capture_binds_weights_by_identity_and_leaves_model_untouched():
    model = randomize_bn(SmallResNet())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    program = slimfx.capture(model, (torch.randn(2, 3, 16, 16),))
    for target, info in program.weights.items():
        if info.origin in params:
            assert program.tensor(next(n for n in program.graph.nodes if n.target == target)) is params[info.origin]
    slimfx.compress(model, (torch.randn(2, 3, 16, 16),), pipeline="fold-bn")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert count_modules(model, nn.BatchNorm2d) == 7 and not model.training


def test_dynamic_shapes_accept_other_batch_sizes():
    model = randomize_bn(SmallResNet())
    program = slimfx.capture(model, (torch.randn(2, 3, 16, 16),))
    x = torch.randn(5, 3, 24, 24)
    torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-6)
    assert not isinstance(program.graph.find_nodes(op="placeholder")[0].meta["val"].shape[0], int)


@pytest.mark.parametrize("index", [0, 1])
def test_hugging_face_models_capture(index):
    name, model, ids = hf_models()[index]
    program = slimfx.capture(model, (ids,))
    n_linear = op_counts(program)[LINEAR]
    assert n_linear == {"gpt2": 8, "bert": 13}[name]  # GPT-2's Conv1D addmm included
    verify(program)
    other = torch.randint(0, 100, (3, 7))
    torch.testing.assert_close(program(other).last_hidden_state, model(other).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_model_and_inputs_that_disagree_get_a_clear_error():
    with pytest.raises(CaptureError, match="does not run on the example inputs"):
        slimfx.capture(nn.Linear(4, 4), (torch.randn(2, 5),))
    with pytest.raises(CaptureError, match="tuple of positional inputs"):
        slimfx.capture(nn.Linear(4, 4), {"x": torch.randn(2, 4)})
    with pytest.raises(CaptureError, match="torch.nn.Module"):
        slimfx.capture(lambda x: x, (torch.randn(2),))


def test_untraceable_model_error_says_what_to_change():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(CaptureError, match="backend='slimfx'"):
        slimfx.capture(DataDependent(), (torch.randn(3),))


def test_training_bn_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def grab(gm, inputs):
        program = from_dynamo(gm, inputs)
        assert BATCH_NORM not in op_counts(program)  # training-mode BN is not canonical: nothing may fold it
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model.train(), backend=grab)(torch.randn(2, 3, 8, 8))
