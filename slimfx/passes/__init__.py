"""Rewrite passes. Importing this package registers every built-in pass by name."""
from . import dead_code, depth_merge, factorize, fold_bn, heal, int8_dynamic, lower, nm_sparsity, plan, quant_lowrank  # noqa: F401
from .base import PASSES, Pass, PassContext, describe_options, register
from .manager import PassManager, PassRecord, Report, relative_error
from .pipeline import format_pipeline, parse_pipeline

__all__ = ["PASSES", "Pass", "PassContext", "PassManager", "PassRecord", "Report", "describe_options",
           "format_pipeline", "parse_pipeline", "register", "relative_error"]
