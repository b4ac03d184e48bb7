"""Error types. Every message says what the user should change, not only what went wrong."""
from __future__ import annotations


class SlimfxError(Exception):
    """Base class for every error slimfx raises on purpose."""


class PipelineError(SlimfxError, ValueError):
    """Bad pipeline text, an unknown pass, or an invalid pass option."""


class CaptureError(SlimfxError, RuntimeError):
    """The model could not be traced into one graph, or model and inputs disagree."""


class VerificationError(SlimfxError, AssertionError):
    """The IR broke one of the rules in ``slimfx/ir/README.md`` (a bug in a pass)."""


class NumericalMismatchError(SlimfxError, AssertionError):
    """A pipeline that promised exactness changed the model's outputs beyond tolerance."""


class ProfileError(SlimfxError, ValueError):
    """An unknown hardware profile, or a profile file with a missing or invalid field."""


class CalibrationError(SlimfxError, ValueError):
    """A data-aware pass needs calibration data, or the data does not fit the model."""
