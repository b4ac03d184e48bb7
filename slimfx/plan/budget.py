"""What a plan must meet (``Budget``) and the workload it is priced on (``Workload``).

``{"latency": 0.5}`` is a fraction of the dense model's predicted latency, ``{"memory": "2GB"}`` the weights'
bytes (or ``{"memory": 0.3}``, a fraction of the dense weights), ``{"max_error": 0.01}`` the relative output error
on the calibration data. ``max_error`` may join a latency or memory budget ("2x faster and lose at most 1%"); alone
it asks for the fastest plan within that error. Text works too: ``"latency=0.5,max_error=0.01"``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import PipelineError

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_FORM = ('a budget is a dict or text with latency (fraction of dense, e.g. 0.5), memory (bytes such as "2GB", or a '
         'fraction of the dense weights such as 0.3) and/or max_error (relative output error, e.g. 0.01): '
         '{"latency": 0.5} or "latency=0.5,max_error=0.01"')


@dataclass(frozen=True)
class Budget:
    latency: float | None = None  # fraction of the dense model's latency
    memory: float | None = None  # bytes if > 1, else a fraction of the dense weights' bytes
    max_error: float | None = None  # relative L2 output error on the calibration data

    def __post_init__(self) -> None:
        if self.latency is None and self.memory is None and self.max_error is None:
            raise PipelineError(f"the budget is empty; {_FORM}")
        if self.latency is not None and not 0 < self.latency <= 1:
            raise PipelineError(f"budget latency={self.latency} must be in (0, 1]: a fraction of the dense latency, "
                                "e.g. 0.5 for 2x faster")
        if self.memory is not None and not self.memory > 0:
            raise PipelineError(f"budget memory={self.memory} must be > 0 (bytes, e.g. '2GB', or a fraction <= 1)")
        if self.max_error is not None and not 0 < self.max_error < 1:
            raise PipelineError(f"budget max_error={self.max_error} must be in (0, 1): a relative output error, "
                                "e.g. 0.01 for 1%")
        if self.latency is not None and self.memory is not None:
            raise PipelineError("give a latency or a memory budget, not both (max_error may join either)")

    @property
    def resource(self) -> Literal["latency", "memory"]:
        """What the knapsack constrains (latency or memory), or minimises under a max_error budget alone."""
        return "memory" if self.memory is not None else "latency"

    @classmethod
    def parse(cls, spec: Any) -> "Budget":
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, str):
            items = {}
            for part in filter(None, (p.strip() for p in spec.split(","))):
                if "=" not in part:
                    raise PipelineError(f"cannot read budget item {part!r}; {_FORM}")
                key, value = (s.strip() for s in part.split("=", 1))
                items[key] = value
            spec = items
        if not isinstance(spec, dict):
            raise PipelineError(f"budget must be a dict or text, got {type(spec).__name__}; {_FORM}")
        unknown = sorted(set(spec) - {"latency", "memory", "max_error"})
        if unknown:
            raise PipelineError(f"unknown budget key(s) {unknown}; {_FORM}")
        return cls(_number(spec.get("latency"), "latency"), _bytes(spec.get("memory")),
                   _number(spec.get("max_error"), "max_error"))

    def __str__(self) -> str:
        parts = []
        if self.latency is not None:
            parts.append(f"latency={self.latency:g}")
        if self.memory is not None:
            parts.append(f"memory={self.memory:g}" if self.memory <= 1 else f"memory={self.memory / 1e6:g}MB")
        if self.max_error is not None:
            parts.append(f"max_error={self.max_error:g}")
        return ",".join(parts)


def _number(value: Any, key: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PipelineError(f"budget {key}={value!r} is not a number; {_FORM}") from None


def _bytes(value: Any) -> float | None:
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else float(value)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise PipelineError(f"budget memory={value!r} is not a size; write bytes with a unit (500MB, 2GB, 1.5GiB) "
                            "or a fraction of the dense weights (0.3)")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


@dataclass(frozen=True)
class Workload:
    """The sizes a plan is priced at: the example inputs' unless given. ``batch`` and ``seq`` set the first
    input's first two dimensions (they must have been captured as symbolic sizes); ``phase="decode"`` is one new
    token per sequence (seq=1; the KV cache's reads are not priced)."""

    batch: int | None = None
    seq: int | None = None
    phase: Literal["prefill", "decode"] = "prefill"

    def __post_init__(self) -> None:
        for key in ("batch", "seq"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PipelineError(f"workload {key}={value!r} must be a positive integer")
        if self.phase not in ("prefill", "decode"):
            raise PipelineError(f"workload phase={self.phase!r} must be 'prefill' or 'decode'")
        if self.phase == "decode" and self.seq not in (None, 1):
            raise PipelineError("workload phase='decode' prices one token per sequence: leave seq unset (or 1)")

    @classmethod
    def parse(cls, spec: Any) -> "Workload":
        if spec is None:
            return cls()
        if isinstance(spec, Workload):
            return spec
        if isinstance(spec, str):
            parts = [p for p in (s.strip() for s in spec.split(",")) if p]
            bad = [p for p in parts if "=" not in p]
            if bad:
                raise PipelineError(f"cannot read workload item {bad[0]!r}: write key=value, e.g. batch=1,phase=decode")
            spec = dict(p.split("=", 1) for p in parts)
        if not isinstance(spec, dict):
            raise PipelineError(f"workload must be a dict like {{'batch': 1, 'seq': 512, 'phase': 'decode'}}, "
                                f"got {type(spec).__name__}")
        unknown = sorted(set(spec) - {"batch", "seq", "phase"})
        if unknown:
            raise PipelineError(f"unknown workload key(s) {unknown}; keys are batch, seq, phase")
        ints = {}
        for key in ("batch", "seq"):
            if spec.get(key) is not None:
                try:
                    ints[key] = int(str(spec[key]).strip()) if not isinstance(spec[key], int) else spec[key]
                except ValueError:
                    raise PipelineError(f"workload {key}={spec[key]!r} must be a positive integer") from None
        return cls(**ints, phase=str(spec.get("phase", "prefill")))

    @property
    def rows_seq(self) -> int | None:
        return 1 if self.phase == "decode" else self.seq

    def __str__(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("batch", "seq") if getattr(self, k) is not None]
        return ",".join(parts + [f"phase={self.phase}"]) if parts or self.phase != "prefill" else "the example inputs"
