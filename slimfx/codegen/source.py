"""Rendered kernel sources: written to the kernel cache and imported, once per (family, epilogue, mode).

A template marks with ``{EPILOGUE}`` where its tile is finished: the bias, the epilogue's steps and the one store
are rendered there, the same for every kernel, and ``{EXTRA_PARAMS}`` where the epilogue's tensors are passed.

Triton reads a kernel's source from its file, so a kernel rendered for an epilogue is written under
``$SLIMFX_CACHE/kernels/`` (``slimfx explain --kernels`` prints or dumps it) and imported from there. Triton's own
cache then keys the compiled binaries by dtype, constexpr tile sizes and device; the tile configuration is
chosen per shape bucket by ``tuning``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .epilogue import Epilogue

_LOADED: dict[tuple[str, str, bool], "Rendered"] = {}


@dataclass(frozen=True)
class Rendered:
    family: str
    epilogue: Epilogue
    path: Path
    source: str
    module: ModuleType

    @property
    def kernel(self):
        return self.module.kernel


def interpreting() -> bool:
    """Triton's CPU interpreter: kernels run on CPU tensors, for tests without a GPU. It needs TRITON_INTERPRET=1
    before triton is first imported (its standard library is decorated then); set later, it is not in effect.
    ``SLIMFX_CPU_KERNELS=0`` keeps CPU tensors on the reference path even so (the test suite's default, so only
    the kernel tests pay for interpretation)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" or os.environ.get("SLIMFX_CPU_KERNELS", "1") == "0":
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


POISON_OUTPUTS = False  # tests set this: outputs start as NaN, so an element a kernel does not write shows


def new_output(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    out = torch.empty((rows, cols), dtype=like.dtype, device=like.device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def as_rows(x: torch.Tensor, width_in: int, width_out: int, extras: list) -> tuple[torch.Tensor, torch.Tensor, list]:
    """A kernel op's input as rows [M, in], its output [M, out] (poisoned in tests), and the epilogue's extra
    tensors as the kernel arguments (tensor, row stride, column stride)."""
    rows = x.reshape(-1, width_in)
    out = new_output(rows.shape[0], width_out, x)
    flat = (e.reshape(rows.shape[0], width_out) for e in extras)
    return rows, out, [arg for e in flat for arg in (e, e.stride(0), e.stride(1))]


def _tail(epilogue: Epilogue, indent: str) -> str:
    """What every kernel does with its fp32 tile ``acc`` (rows ``rm``, columns ``rn``): add the bias, apply the
    epilogue, store once."""
    head = [f"{indent}if HAS_BIAS:",
            f"{indent}    acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]",
            f"{indent}mask = (rm[:, None] < M) & (rn[None, :] < N)"]
    store = f"{indent}tl.store(Y + rm[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty), mask=mask)"
    return "\n".join([*head, epilogue.render(indent), store])


def extra_params(epilogue: Epilogue) -> str:
    return "".join(f"E{i}, se{i}m, se{i}n, " for i in range(epilogue.extras))


def render(family: str, template: str, epilogue: Epilogue) -> Rendered:
    """The kernel of ``family`` for ``epilogue``: rendered, written once, imported once per process and mode."""
    key = (family, str(epilogue), interpreting())
    if key in _LOADED:
        return _LOADED[key]
    from ..models import cache_dir

    source = re.sub(r"^( *){EPILOGUE}$", lambda match: _tail(epilogue, match.group(1)),
                    template.replace("{EXTRA_PARAMS}", extra_params(epilogue)), flags=re.M)
    digest = hashlib.sha1(f"{source}|{key[2]}".encode()).hexdigest()[:12]
    path = cache_dir() / "kernels" / f"{family}_{digest}.py"
    if not path.exists() or path.read_text() != source:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(source)
        partial.replace(path)  # atomic: a concurrent process never imports half a file
    spec = importlib.util.spec_from_file_location(f"slimfx_kernels.{family}_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered = Rendered(family, epilogue, path, source, module)
    _LOADED[key] = rendered
    return rendered
