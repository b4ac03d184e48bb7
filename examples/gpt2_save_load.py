"""A default Hugging Face GPT-2 (random weights from its default config, use_cache=True as shipped), compressed
with whitened factorization and calibration data, saved, and loaded back in a fresh process.

    python examples/gpt2_save_load.py [OUT_DIR]

The weights are random, so the output error says little about a trained GPT-2; what this shows is that a
default causal LM captures as one graph (its KV cache included), shrinks, and round-trips through disk.
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import slimfx

torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
example = torch.randint(0, 50257, (1, 16))  # batch 1, as an LM is usually called
calibration = [(torch.randint(0, 50257, (4, 64)),) for _ in range(4)]  # other batch sizes and lengths work
small = slimfx.compress(model, (example,), pipeline="factorize{keep=0.8}", calibration=calibration)
print(small.report.summary())

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()) / "gpt2-slim"
slimfx.save(small, out)
probe = torch.randint(0, 50257, (2, 24))
with torch.no_grad():
    reference = small(probe).logits
torch.save((probe, reference), out / "probe.pt")
dense_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
saved_mb = sum(f.stat().st_size for f in out.iterdir() if f.name != "probe.pt") / 2**20
print(f"saved to {out}: {saved_mb:.1f} MiB on disk (dense weights {dense_mb:.1f} MiB)")

check = f"""
import torch, slimfx
loaded = slimfx.load({str(out)!r})
probe, reference = torch.load({str(out / 'probe.pt')!r})
with torch.no_grad():
    out = loaded(probe)
print(type(out).__name__, type(out.past_key_values).__name__, "max |difference| after reload:",
      (out.logits - reference).abs().max().item())
"""
subprocess.run([sys.executable, "-c", check], check=True)
