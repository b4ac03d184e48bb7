"""Scale: compress a Llama-shaped model of 1.1B parameters on this machine, block by block, and watch memory.

    python benchmarks/scale.py [--layers 22] [--pipelines "factorize{keep=0.8,method=whitened}" "nm{method=sparsegpt}"]

The model is ``transformers.LlamaForCausalLM`` from a config with TinyLlama-1.1B's shape (hidden 2048, 22
layers, intermediate 5632, 32 heads, 4 KV heads, vocabulary 32000) and random weights (no download); the
calibration is 8 sequences of 256 random tokens. Each pipeline runs through ``slimfx.compress`` with sequential
calibration (the default) and ``profile="none"`` (no cost gating: every layer is compressed, the worst case for
time and memory). Printed per phase: wall time, the peak resident memory (sampled every 20 ms), and the peak's
growth over the memory before the phase, as a multiple of the fp32 model's size. ``--layers`` builds fewer
layers of the same shape (a quick check; time and the blocks' memory scale with it).
"""
from __future__ import annotations

import argparse
import gc
import threading
import time
import warnings
from contextlib import contextmanager

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """The process's resident memory, sampled in a thread: the peak since ``reset``."""

    def __init__(self, every_s: float = 0.02):
        self.peak, self.every_s, self.running = rss_bytes(), every_s, True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every_s)

    def reset(self) -> int:
        now = rss_bytes()
        self.peak = now
        return now


@contextmanager
def phase(name: str, memory: PeakMemory, model_bytes: int | None, rows: list):
    gc.collect()
    before = memory.reset()
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    time.sleep(0.05)
    peak = max(memory.peak, rss_bytes())
    growth = f"{(peak - before) / model_bytes:.2f}x the fp32 model" if model_bytes else "-"
    rows.append((name, seconds, before, peak, growth))
    print(f"{name:<48} {seconds:8.1f} s   RSS before {before / 2**30:6.2f} GiB   peak {peak / 2**30:6.2f} GiB   "
          f"growth {growth}", flush=True)


def build(layers: int):
    import transformers

    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).eval()
    return model


def main() -> None:
    import slimfx

    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--pipelines", nargs="+",
                        default=["factorize{keep=0.8,method=whitened}", "nm{method=sparsegpt}"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Llama shape 2048/5632, {args.layers} layers")
    memory, rows = PeakMemory(), []
    model = None
    with phase("build the model (random weights)", memory, None, rows):
        model = build(args.layers)
    params = sum(p.numel() for p in model.parameters())
    model_bytes = params * 4
    print(f"{params / 1e9:.3f}B parameters, {model_bytes / 2**30:.2f} GiB in fp32")
    generator = torch.Generator().manual_seed(1)
    calibration = [(torch.randint(0, 32000, (1, args.tokens), generator=generator),) for _ in range(args.sequences)]
    example = (torch.randint(0, 32000, (1, 16), generator=generator),)
    for pipeline in args.pipelines:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights: the "probably broken" warning is expected
            with phase(f"compress {pipeline}", memory, model_bytes, rows):
                result = slimfx.compress(model, example, pipeline=pipeline, calibration=calibration,
                                         profile="none", lower=False)
        for record in result.report.passes:
            print(f"  {record.name}: {record.seconds:.1f} s, rewrites {record.rewrites}")
        print("  " + "\n  ".join(n for n in result.report.notes if "calibrated" in n))
        del result
        gc.collect()
    print("\nphase | wall s | RSS before GiB | peak GiB | peak growth")
    for name, seconds, before, peak, growth in rows:
        print(f"{name} | {seconds:.1f} | {before / 2**30:.2f} | {peak / 2**30:.2f} | {growth}")


if __name__ == "__main__":
    main()
