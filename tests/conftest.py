from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch

if not torch.cuda.is_available():  # Triton's interpreter must be on before triton is imported; kernel tests opt in
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SLIMFX_CPU_KERNELS", "0")

from slimfx.errors import SlimfxError  # noqa: E402
from slimfx.passes import Pass  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(2)
os.environ.setdefault("SLIMFX_CACHE", tempfile.mkdtemp(prefix="slimfx-test-cache-"))  # never the user's cache


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_cnn():
    from slimfx.models import pretrained

    return pretrained("digits-cnn")


@pytest.fixture(scope="session")
def digits_mlp():
    from slimfx.models import pretrained

    return pretrained("digits-mlp")


@pytest.fixture(scope="session")
def digits_transformer():
    from slimfx.models import pretrained

    return pretrained("digits-transformer")


def hf_models():
    """Tiny Hugging Face models built from configs (no downloads): (name, model, input_ids)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 12))
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(
        use_cache=False, n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0))
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100))
    return [("gpt2", gpt2.eval(), ids), ("bert", bert.eval(), ids)]


class _HalfRewriteThenFail(Pass):
    name = "test-half-rewrite"
    summary = "rewrites every relu into a sigmoid, then fails (tests rollback)"

    def run(self, program, ctx):
        for node in program.graph.nodes:
            if node.target in (torch.relu, torch.nn.functional.relu, torch.ops.aten.relu.default):
                node.target = torch.sigmoid
        raise SlimfxError("deliberate failure after a partial rewrite")


@pytest.fixture
def half_rewrite_pass():
    from dataclasses import dataclass

    from slimfx.passes import PASSES, register

    cls = register(dataclass(_HalfRewriteThenFail))
    yield cls
    del PASSES[cls.name]
