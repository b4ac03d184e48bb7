"""The planner's typed decisions, and one layer's options (decision, predicted error, latency, bytes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch


@dataclass(frozen=True)
class Dense:
    """Leave the layer as it is."""

    technique = "dense"

    def __str__(self) -> str:
        return "dense"


@dataclass(frozen=True)
class LowRank:
    """``factorize`` to this rank (linear: two thin linears; conv: a k×k conv to ``rank`` channels and a 1×1);
    ``bits``: the two factors stored as integer codes with a scale per row (linear only), factorization and
    quantization combined on one layer."""

    rank: int
    bits: Optional[int] = None
    technique = "lowrank"

    def __str__(self) -> str:
        return f"low-rank r={self.rank}" + (f" int{self.bits}" if self.bits else "")


@dataclass(frozen=True)
class Sparse:
    """``nm`` with n of every m input weights kept."""

    n: int
    m: int
    technique = "nm"

    def __str__(self) -> str:
        return f"{self.n}:{self.m} sparse"


@dataclass(frozen=True)
class Quant:
    """``quant-lowrank``: group-wise ``bits`` codes plus a rank-``rank`` correction (0: none)."""

    bits: int
    group: int
    rank: int
    technique = "quant"

    def __str__(self) -> str:
        return f"int{self.bits} g{self.group}" + (f" +r{self.rank}" if self.rank else "")


@dataclass(frozen=True)
class Int8:
    """``int8-dynamic``: int8 weights per output channel x inputs quantized to int8 per row on each call (W8A8)."""

    technique = "int8"

    def __str__(self) -> str:
        return "int8 W8A8"


@dataclass(frozen=True)
class Merge:
    """``depth-merge``: these layers (weight origins, in order) lose the activations between them and become one
    layer (or the fastest split into merged runs), as in Kim et al.'s depth compression."""

    layers: tuple[str, ...]
    technique = "depth"

    def __str__(self) -> str:
        return f"merged {len(self.layers)} layers: " + " + ".join(self.layers)


Decision = Union[Dense, LowRank, Sparse, Quant, Int8, Merge]


@dataclass
class Option:
    """One way to run one layer: its decision, the layer's predicted relative output error on the calibration
    data, its latency (predicted on the profile, for the kernel ``lower`` would give it, or measured), and the
    bytes its weights take."""

    decision: Decision
    error: float
    latency_s: float
    bytes: int
    kernel: str = ""
    measured: bool = False

    @property
    def kernels(self) -> frozenset[str]:
        """The kernels priced: a layer run as several ops (int8 factors: two) names each, joined by " + "."""
        return frozenset(self.kernel.split(" + "))

    def to_dict(self) -> dict:
        return {"decision": str(self.decision), "technique": self.decision.technique, "error": self.error,
                "latency_s": self.latency_s, "bytes": self.bytes, "kernel": self.kernel, "measured": self.measured}


@dataclass
class LayerOptions:
    """Every option of one weight (``layer``: its origin name, the plan's key; a weight read by several layers is
    one entry and decided once). ``options[0]`` is dense. ``approximate(decision)`` is the dense weight the decision
    stands for, to score a plan end to end without rewriting."""

    layer: str
    kind: str  # "linear" | "conv"
    shape: tuple[int, ...]
    uses: list  # the fx nodes reading the weight
    options: list[Option]
    approximate: Callable[[Decision], torch.Tensor] = field(repr=False, default=None)

    @property
    def dense(self) -> Option:
        return self.options[0]
