"""The planner: one budgeted plan across every lossy pass, per layer (see ``planner.py``)."""
from .budget import Budget, Workload
from .options import Decision, Dense, Int8, LayerOptions, LowRank, Merge, Option, Quant, Sparse
from .planner import Plan

__all__ = ["Budget", "Decision", "Dense", "Int8", "LayerOptions", "LowRank", "Merge", "Option", "Plan", "Quant", "Sparse", "Workload"]
