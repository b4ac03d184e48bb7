"""Pipeline text, pass options, and the pass manager's bookkeeping."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

import pytest
import torch
import torch.nn as nn
from nets import SharedConvBN, SmallResNet, randomize_bn

import slimfx
from slimfx.errors import NumericalMismatchError, PipelineError
from slimfx.ir import BATCH_NORM, refresh_metadata
from slimfx.passes import PASSES, Pass, PassManager, format_pipeline, parse_pipeline, register
from slimfx.passes.fold_bn import FoldBatchNorm


def test_pipeline_text_round_trips():
    passes = parse_pipeline("dead-code, fold-bn ,dead-code{}")
    assert [type(p) for p in passes] == [PASSES["dead-code"], FoldBatchNorm, PASSES["dead-code"]]
    assert format_pipeline(passes) == "dead-code,fold-bn,dead-code"
    assert parse_pipeline(["fold-bn", FoldBatchNorm()])[1].name == "fold-bn"
    assert parse_pipeline("") == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("fold-bm", "unknown pass 'fold-bm'. Did you mean 'fold-bn'?"),
        ("fold-bn{rank=3}", "has no option 'rank'"),
        ("fold-bn{", "missing '}'"),
        ("fold-bn}", "unbalanced"),
        ("dead-code{a{b=1}}", "nested"),
        ("Fold BN", "cannot parse pipeline item"),
        ("fold-bn{x}", "needs a value"),
    ],
)
def test_bad_pipeline_text_says_what_to_change(text, message):
    with pytest.raises(PipelineError, match=message.replace("{", r"\{").replace("}", r"\}").replace("?", r"\?").replace(".", r"\.")):
        parse_pipeline(text)


def test_typed_options_are_converted_and_validated():
    @dataclass
    class Toy(Pass):
        name = "toy-options"
        keep: float = 0.5
        rank: Optional[int] = None
        method: Literal["svd", "whitened"] = "whitened"
        fast: bool = False

        def validate(self):
            if not 0 < self.keep <= 1:
                raise self.invalid("keep", "must be in (0, 1]")

    register(Toy)
    try:
        (toy,) = parse_pipeline("toy-options{keep=0.25,rank=8,method=svd,fast=true}")
        assert (toy.keep, toy.rank, toy.method, toy.fast) == (0.25, 8, "svd", True)
        assert str(toy) == "toy-options{keep=0.25,rank=8,method=svd,fast=True}"
        assert parse_pipeline(str(toy))[0] == toy
        with pytest.raises(PipelineError, match="must be one of 'svd', 'whitened'"):
            parse_pipeline("toy-options{method=qr}")
        with pytest.raises(PipelineError, match="expects int"):
            parse_pipeline("toy-options{rank=half}")
        with pytest.raises(PipelineError, match=r"keep=1.5 must be in \(0, 1\]"):
            parse_pipeline("toy-options{keep=1.5}")
    finally:
        del PASSES["toy-options"]


def test_fold_bn_removes_every_foldable_batchnorm():
    model = randomize_bn(SmallResNet())
    x = torch.randn(4, 3, 16, 16)
    program = slimfx.capture(model, (x,))
    assert sum(n.target == BATCH_NORM for n in program.graph.nodes) == 7
    report = PassManager("dead-code,fold-bn").run(program)
    assert report.rewrites("fold-bn") == {"conv-bn": 7}
    assert not any(n.target == BATCH_NORM for n in program.graph.nodes)
    assert report.passes[-1].rel_error < 1e-5
    channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert report.params_after == report.params_before - 3 * channels  # 4 BN vectors gone, a conv bias added
    torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_bn_declines_when_the_conv_output_is_shared():
    model = randomize_bn(SharedConvBN())
    program = slimfx.capture(model, (torch.randn(2, 3, 8, 8),))
    report = PassManager("fold-bn").run(program)
    assert report.rewrites("fold-bn") == {}
    assert sum(n.target == BATCH_NORM for n in program.graph.nodes) == 1


def test_fold_bn_into_linear_with_batchnorm1d():
    model = randomize_bn(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3, bias=False),
                                       nn.BatchNorm1d(3)))
    x = torch.randn(7, 6)
    program = slimfx.capture(model, (x,))
    assert PassManager("fold-bn").run(program).rewrites("fold-bn") == {"conv-bn": 2}
    torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)


def test_dead_code_removes_unused_ops_and_their_weights():
    class Wasteful(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            self.unused(x)
            return self.used(x)

    x, model = torch.randn(2, 4), Wasteful()
    program = slimfx.capture(model, (x,))
    # capture already drops the dead linear, so plant dead work that only the pass can remove: an unused op
    # chain and an unused weight read
    graph, first_user = program.graph, next(n for n in program.graph.nodes if n.op == "call_function")
    with graph.inserting_before(first_user):
        spare = program.add_weight("spare", torch.randn(4, 4), "spare", "test")
        dead = graph.call_function(torch.ops.aten.linear.default, (first_user.args[0], spare, None))
        graph.call_function(torch.ops.aten.relu.default, (dead,))
    program.gm.recompile()
    refresh_metadata(program)
    before = program.parameter_count()
    report = PassManager("dead-code").run(program)
    assert report.rewrites("dead-code") == {"ops": 2, "weights": 1}
    assert before == 36 and program.parameter_count() == 20
    assert set(program.weights) == {"used.weight", "used.bias"}
    torch.testing.assert_close(program(x), model(x))


def test_manager_catches_an_exact_pass_that_changes_outputs():
    @dataclass
    class Broken(Pass):
        name = "broken-exact"
        exact = True

        def run(self, program, ctx):
            for node in program.graph.nodes:
                if program.is_weight(node):
                    new = program.tensor(node) * 1.5
                    with program.graph.inserting_before(node):
                        replacement = program.add_weight("scaled", new, "test", self.name)
                    node.replace_all_uses_with(replacement)
                    break
            program.drop_unused_weights()
            return Counter(scaled=1)

    register(Broken)
    try:
        program = slimfx.capture(nn.Linear(4, 4), (torch.randn(2, 4),))
        with pytest.raises(NumericalMismatchError, match="broken-exact promises exact results"):
            PassManager("broken-exact").run(program)
        # an exact pass after a lossy one is judged against its own input, not the original model
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)).eval()
        program = slimfx.capture(model, (torch.randn(4, 16),))
        report = PassManager("factorize{method=svd,rank=2},dead-code").run(program)
        assert report.passes[0].rel_error > 0.1 and report.passes[1].rel_error == report.passes[0].rel_error
    finally:
        del PASSES["broken-exact"]
