"""Pipeline text: ``"fold-bn,factorize{keep=0.5,method=svd},nm{n=2,m=4}"`` <-> a list of passes."""
from __future__ import annotations

import re
from typing import Iterable, Sequence, Union

from ..errors import PipelineError
from .base import Pass, make_pass

PipelineSpec = Union[str, Pass, Sequence[Union[str, Pass]]]

_ITEM = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_-]*)\s*(?:\{([^{}]*)\})?\s*$")  # make_pass names a near miss


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
            if depth > 1:
                raise PipelineError(f"nested '{{' at position {i} in pipeline {text!r}; options are flat: name{{k=v,k=v}}")
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced '}}' at position {i} in pipeline {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise PipelineError(f"missing '}}' in pipeline {text!r}")
    items.append(text[start:])
    return items


def parse_pass(item: str) -> Pass:
    match = _ITEM.match(item)
    if not match:
        raise PipelineError(
            f"cannot parse pipeline item {item.strip()!r}; write a pass as name or name{{option=value,...}}, "
            "e.g. factorize{keep=0.5}"
        )
    name, body = match.group(1), match.group(2)
    options = {}
    for pair in (body.split(",") if body and body.strip() else []):
        if "=" not in pair:
            raise PipelineError(f"option {pair.strip()!r} of pass {name!r} needs a value: write key=value")
        key, value = (s.strip() for s in pair.split("=", 1))
        if key in options:
            raise PipelineError(f"option {key!r} given twice for pass {name!r}")
        options[key] = value
    return make_pass(name, options)


def parse_pipeline(spec: PipelineSpec) -> list[Pass]:
    """Accepts pipeline text, a Pass, or a list mixing both."""
    if isinstance(spec, Pass):
        return [spec]
    if isinstance(spec, str):
        if not spec.strip():
            return []
        return [parse_pass(item) for item in _split_top_level(spec)]
    if isinstance(spec, Iterable):
        passes: list[Pass] = []
        for item in spec:
            passes.extend(parse_pipeline(item))
        return passes
    raise PipelineError(f"a pipeline is text or a list of passes, got {type(spec).__name__}")


def format_pipeline(passes: Iterable[Pass]) -> str:
    return ",".join(str(p) for p in passes)
