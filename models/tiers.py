"""HeteroFL device-tier catalog: tier letter -> width rate, and the width each rate keeps."""

from __future__ import annotations

import math
import types
from collections.abc import Mapping

TIER_RATES: Mapping[str, float] = types.MappingProxyType(
    {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}
)


def tier_rate(tier: str) -> float:
    """Return the width rate of a tier letter; ValueError names the known tiers."""
    try:
        return TIER_RATES[tier]
    except KeyError:
        known = ", ".join(f"{t}={r:g}" for t, r in TIER_RATES.items())
        raise ValueError(f"unknown tier {tier!r}; known tiers: {known}") from None


def scaled_width(width: int, rate: float) -> int:
    """Return the leading channel count a tier keeps: max(1, ceil(rate * width))."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    # round first so float noise (0.1 * 30 = 3.0000000000000004) does not add a channel
    return max(1, math.ceil(round(rate * width, 9)))
