"""``slimfx.save(module, path)`` and ``slimfx.load(path)``: a compressed model as a directory of plain files.

    manifest.json         format, versions, pipeline, profile, weight names and aliases, pytree types
    weights.safetensors   every weight, compressed ones as they are stored (packed ints, factors)
    program.pt2           the graph, saved by torch.export with the weights as inputs (so it holds none)

The program is exported from the compressed graph with symbolic sizes, so the loaded module accepts the same
range of batch sizes and sequence lengths. Loading needs slimfx (for its custom ops), not the original model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import ModelInputError, SlimfxError, one_line
from .ir.capture import every_dim_may_vary
from .ir.fake_prop import size_one_stays_dynamic
from .ir.model_outputs import ensure_pytree_types, pytree_type_names
from .passes.calibration import describe_inputs

FORMAT = "slimfx-saved/1"


class _WeightsAsInputs(torch.nn.Module):
    """Calls a graph module with its weights passed in, so export saves the graph and not the weights."""

    def __init__(self, gm: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "gm", gm)  # not a submodule: export must not see its weights as state

    def forward(self, weights: dict, args: tuple, kwargs: dict) -> Any:
        return torch.func.functional_call(self.gm, weights, args, kwargs)


class LoadedProgram(torch.nn.Module):
    """A loaded program: owns its weights, and calls like the module that was saved."""

    def __init__(self, program: torch.nn.Module, weights: dict[str, torch.Tensor], aliases: dict[str, str],
                 manifest: dict):
        super().__init__()
        self.program = program
        self.manifest = manifest
        self._names = {}
        for index, (name, value) in enumerate(weights.items()):
            self.register_buffer(f"w{index}", value)
            self._names[name] = f"w{index}"
        self._aliases = aliases

    def weights(self) -> dict[str, torch.Tensor]:
        own = {name: getattr(self, attr) for name, attr in self._names.items()}
        return {**own, **{alias: own[target] for alias, target in self._aliases.items()}}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.program(self.weights(), args, kwargs)
        except Exception as exc:  # noqa: BLE001 - torch names internal arguments; say what the model takes
            raise ModelInputError(
                f"the loaded model does not take these inputs ({type(exc).__name__}: {one_line(exc)}); it was saved "
                f"from a model called with {self.manifest.get('example_inputs', '?')} (sizes may vary where the "
                "model allows, ranks and dtypes may not)") from exc


def save(module: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write a module returned by ``slimfx.compress`` to the directory ``path`` (created if needed)."""
    from . import __version__

    program = getattr(module, "program", None)
    if program is None:
        raise SlimfxError(
            "slimfx.save needs a module compressed as one graph; this one was compressed in parts around code "
            "torch.export cannot trace, and that code exists only in your model's source. Make forward "
            "traceable to save it, or torch.save the module with your model code importable."
        )
    gm = program.gm
    named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    weights, aliases, seen = {}, {}, {}
    for name, value in named:  # a tensor registered twice (a tie) is stored once
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
               value.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            weights[name] = value.detach()
    every_weight = {**weights, **{alias: weights[target] for alias, target in aliases.items()}}
    args, kwargs = tuple(program.example_args), dict(program.example_kwargs)
    try:
        with size_one_stays_dynamic():
            exported = torch.export.export(
                _WeightsAsInputs(gm), (every_weight, args, kwargs), strict=False,
                dynamic_shapes=({name: None for name in every_weight}, every_dim_may_vary(args),
                                every_dim_may_vary(kwargs)))
    except Exception as exc:  # noqa: BLE001
        raise SlimfxError(f"slimfx.save could not export the compressed graph: {one_line(exc)}") from exc
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "weights.safetensors"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / "weights.safetensors", 0o666 & ~umask)  # like the other files (it is written as 0600)
    exported._example_inputs = None  # export keeps them (weights included) as sample inputs otherwise
    torch.export.save(exported, str(out / "program.pt2"))
    report = getattr(module, "report", None)
    manifest = {
        "format": FORMAT,
        "slimfx_version": __version__,
        "torch_version": torch.__version__,
        "pipeline": getattr(report, "pipeline", ""),
        "profile": getattr(getattr(report, "cost", None), "profile", None),
        "final_rel_error": getattr(report, "final_rel_error", None),
        "example_inputs": describe_inputs(program.example_args, program.example_kwargs),
        "weights": list(weights),
        "aliases": aliases,
        "pytree_types": pytree_type_names(exported.call_spec.in_spec) + pytree_type_names(exported.call_spec.out_spec),
        "notes": list(getattr(report, "notes", [])),
        "budget": [str(plan.budget) for plan in getattr(report, "plans", [])] or None,
        "plans": [plan.to_dict() for plan in getattr(report, "plans", [])],  # each layer's decision and its prices
        "heal_errors": getattr(report, "heal_errors", None),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return out


def load(path: str | os.PathLike) -> LoadedProgram:
    """Load a directory written by ``slimfx.save``. Runs a torch.export program: load only what you trust."""
    from safetensors.torch import load_file

    root = Path(path)
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise SlimfxError(f"{root} has no manifest.json: it was not written by slimfx.save")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise SlimfxError(f"{root} is in format {manifest.get('format')!r}; this slimfx reads {FORMAT!r}")
    ensure_pytree_types(manifest.get("pytree_types", []))
    weights = load_file(str(root / "weights.safetensors"))
    program = torch.export.load(str(root / "program.pt2")).module()
    return LoadedProgram(program, {k: weights[k] for k in manifest["weights"]}, manifest["aliases"], manifest)

