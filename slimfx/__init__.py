"""slimfx: compress PyTorch models with torch.fx passes checked against a hardware cost model."""
from . import passes  # noqa: F401  (registers the built-in passes)
from .api import CompressedModule, compress
from .backend import DEFAULT_PIPELINE, slimfx_backend
from .errors import (CalibrationError, CaptureError, NumericalMismatchError, PipelineError, ProfileError,
                     SlimfxError, VerificationError)
from .ir import Program, capture, verify
from .passes import Pass, PassManager, Report, parse_pipeline
from .passes.calibration import ActivationStats
from .passes.calibration import collect_model_stats as collect_stats
from .serialize import load, save

__all__ = ["ActivationStats", "collect_stats", "DEFAULT_PIPELINE", "CalibrationError", "CaptureError", "CompressedModule", "NumericalMismatchError",
           "Pass", "PassManager", "PipelineError", "ProfileError", "Program", "Report", "SlimfxError",
           "VerificationError", "capture", "compress", "load", "parse_pipeline", "save", "slimfx_backend", "verify"]
__version__ = "0.1.0"
