"""Error types. Every message says what the user should change, not only what went wrong."""
from __future__ import annotations


class SlimfxError(Exception):
    """Base class for every error slimfx raises on purpose."""


class PipelineError(SlimfxError, ValueError):
    """Bad pipeline text, an unknown pass, or an invalid pass option."""


class BudgetError(PipelineError):
    """A budget no plan can meet; ``best`` is the best achievable value, which the message names."""

    def __init__(self, message: str, best: float):
        super().__init__(message)
        self.best = best


class CaptureError(SlimfxError, RuntimeError):
    """The model could not be traced into one graph, or model and inputs disagree."""


class ModelInputError(CaptureError):
    """The model does not run eagerly on the inputs it was given: model and inputs disagree."""


class ShapePropagationError(CaptureError):
    """Fake-tensor propagation through a captured graph failed at one op (named in the message)."""


class VerificationError(SlimfxError, AssertionError):
    """The IR broke one of the rules in ``slimfx/ir/README.md`` (a bug in a pass)."""


class NumericalMismatchError(SlimfxError, AssertionError):
    """A pipeline that promised exactness changed the model's outputs beyond tolerance."""


class ProfileError(SlimfxError, ValueError):
    """An unknown hardware profile, or a profile file with a missing or invalid field."""


class CalibrationError(SlimfxError, ValueError):
    """A data-aware pass needs calibration data, or the data does not fit the model."""


# Mistakes in what the user asked for: every entry point raises these. Anything else that goes wrong with a graph
# (an op slimfx cannot capture) leaves that graph untouched with a one-line warning where that is possible.
CONFIGURATION_ERRORS = (PipelineError, ProfileError, CalibrationError)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first sentence of an error, for one-line warnings (no graph dumps, no pytree internals)."""
    text = " ".join(str(exc).split())
    for stop in (". ", "; "):
        cut = text.find(stop, 40)
        if 0 < cut < limit:
            return text[: cut + 1].rstrip(";") if stop == ". " else text[:cut]
    return text if len(text) <= limit else text[: limit - 3] + "..."
