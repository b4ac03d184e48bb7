"""Hardware profiles (filled in by the cost-model work; for now only ``None`` = no cost gating)."""
from __future__ import annotations

from typing import Any

from ..errors import ProfileError


def resolve_profile(profile: Any) -> Any:
    if profile is None:
        return None
    raise ProfileError(f"unknown hardware profile {profile!r}; no profiles are installed yet")
