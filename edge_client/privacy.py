"""Local differential privacy on the device: clip the update, add Gaussian noise, then send it.

DP-FedAvg's two steps (McMahan et al., 2018) done before the update leaves the device, so the
aggregator only ever sees a noisy update: every tensor of the delta together, as one vector, is
scaled to L2 norm at most `clip`, then N(0, (noise_multiplier x clip)^2) is added to every element.
Each round the device takes part in is then the Gaussian mechanism with sensitivity `clip`
(its RDP is alpha / (2 z^2): the aggregator's books, aggregator.strategies.privacy.DpEventAccountant, count it
with sampling rate 1).

The generator must be secret: seeded from the OS (`np.random.default_rng()`), never from the
task's public seed, or anyone knowing that seed can subtract the noise. Only the weight delta is
protected: the sample count, losses and accuracies the device reports travel as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from protocol.clipping import Tensors, clip_delta


def privatize(delta: Mapping[str, np.ndarray], clip: float, noise_multiplier: float, rng: np.random.Generator) -> Tensors:
    """`delta` clipped to L2 norm `clip`, plus N(0, (noise_multiplier x clip)^2) on every element (float32)."""
    if not noise_multiplier >= 0:
        raise ValueError(f"the noise multiplier must be >= 0, got {noise_multiplier}")
    clipped, _ = clip_delta(delta, clip)
    std = np.float32(noise_multiplier * clip)
    return {name: d + rng.standard_normal(d.shape, dtype=np.float32) * std for name, d in clipped.items()}
