"""Progress bars for the long steps (training, calibration, per-layer work): shown on a terminal, silent in logs."""
from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency; degrade to no bar rather than fail
        return items
    return tqdm(items, desc=desc, total=total, leave=False, disable=None, dynamic_ncols=True)
