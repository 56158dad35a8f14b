"""Local differential privacy on the device: clip the update, add Gaussian noise, then send it.

DP-FedAvg's two steps (McMahan et al., 2018) done before the update leaves the device, so the
aggregator only ever sees a noisy update: every tensor of the delta together, as one vector, is
scaled to L2 norm at most `clip`, then N(0, (noise_multiplier x clip)^2) is added to every element.
Each round the device takes part in is then the Gaussian mechanism with sensitivity `clip`
(its RDP is alpha / (2 z^2), aggregator.privacy.RdpAccountant with sampling rate 1).

The generator must be secret: seeded from the OS (`np.random.default_rng()`), never from the
task's public seed, or anyone knowing that seed can subtract the noise. Only the weight delta is
protected: the sample count, losses and accuracies the device reports travel as they are.
"""

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


def privatize(delta: Mapping[str, np.ndarray], clip: float, noise_multiplier: float, rng: np.random.Generator) -> Tensors:
    """`delta` clipped to L2 norm `clip`, plus N(0, (noise_multiplier x clip)^2) on every element (float32)."""
    if not noise_multiplier >= 0:
        raise ValueError(f"the noise multiplier must be >= 0, got {noise_multiplier}")
    clipped, _ = clip_delta(delta, clip)
    std = np.float32(noise_multiplier * clip)
    return {name: d + rng.standard_normal(d.shape, dtype=np.float32) * std for name, d in clipped.items()}
