"""The IR: one ``fx.GraphModule`` plus side tables (see README.md for the rules ``verify`` checks)."""
from .canonicalize import canonicalize
from .capture import capture, from_dynamo
from .fake_prop import refresh_metadata
from .matcher import Matcher, Rule, rule
from .program import BATCH_NORM, CONV2D, LINEAR, Program, WeightInfo
from .verify import verify

__all__ = ["BATCH_NORM", "CONV2D", "LINEAR", "Matcher", "Program", "Rule", "WeightInfo", "canonicalize",
           "capture", "from_dynamo", "refresh_metadata", "rule", "verify"]
