"""slimfx: compress PyTorch models with torch.fx passes checked against a hardware cost model."""
from .errors import (CalibrationError, CaptureError, NumericalMismatchError, PipelineError, ProfileError,
                     SlimfxError, VerificationError)
from .ir import Program, capture, verify

__all__ = ["CalibrationError", "CaptureError", "NumericalMismatchError", "PipelineError", "ProfileError",
           "Program", "SlimfxError", "VerificationError", "capture", "verify"]
__version__ = "0.1.0"
