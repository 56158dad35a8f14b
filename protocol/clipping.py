"""The L2 norm of an update (all its tensors as one vector) and clipping to a bound: the device's local DP and the
aggregator's central DP clip the same way."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Tensors = dict[str, np.ndarray]


def delta_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all of a delta's tensors taken together as one vector (summed in float64)."""
    return math.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for d in delta.values()))


def clip_delta(delta: Mapping[str, np.ndarray], clip: float) -> tuple[Tensors, bool]:
    """`delta` as float32 copies scaled to L2 norm at most `clip`, and whether it had to be scaled."""
    if not clip > 0:
        raise ValueError(f"the clipping bound must be > 0, got {clip}")
    norm = delta_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("the update has a NaN or infinite element: it cannot be clipped")
    scale = np.float32(clip / norm) if norm > clip else np.float32(1.0)
    return {name: np.asarray(d, np.float32) * scale for name, d in delta.items()}, norm > clip
