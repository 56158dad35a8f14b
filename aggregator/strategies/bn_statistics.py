"""Static batch norm (HeteroFL's sBN) on the aggregator: pool devices' statistics, put them in the weights.

Each device reports, per BatchNorm layer, the mean and population variance of the layer's input
over its own data, measured with its tier's submodel. Pooling by sample count gives the mean and
variance over the union of the devices' data of that tier: E[x] = sum n_i m_i / N and
Var[x] = sum n_i (v_i + m_i^2) / N - E[x]^2. Each tier keeps its own statistics, because a
narrower submodel feeds its layers different activations.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.spec import RUNNING_MEAN, RUNNING_STATISTICS, RUNNING_VAR
from models.tiers import tier_rate
from protocol.blocks import leading_slices


def is_statistic(name: str) -> bool:
    """True for a batch-norm running-statistics tensor (not a trained parameter)."""
    return name.endswith(RUNNING_STATISTICS)


def statistic_names(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The running-statistics tensors among a tier's parameters."""
    return [name for name in shapes if is_statistic(name)]


class BnStatisticsPool:
    """Sample-weighted pooling of one tier's per-device batch-norm statistics."""

    def __init__(self) -> None:
        self.samples = 0
        self._sums: dict[str, np.ndarray] = {}

    def add(self, num_samples: int, statistics: Mapping[str, np.ndarray]) -> None:
        """Fold one device's statistics (means and variances by running-stat name) into the pool."""
        for name, mean in statistics.items():
            if name.endswith(RUNNING_MEAN):
                var = statistics[name.removesuffix(RUNNING_MEAN) + RUNNING_VAR].astype(np.float64)
                mean = mean.astype(np.float64)
                self._sums[name] = self._sums.get(name, 0) + num_samples * mean
                self._sums[name + "^2"] = self._sums.get(name + "^2", 0) + num_samples * (var + mean * mean)
        self.samples += num_samples

    def result(self) -> dict[str, np.ndarray]:
        """Pooled running_mean and running_var per layer."""
        pooled = {}
        for name in [n for n in self._sums if not n.endswith("^2")]:
            mean = self._sums[name] / self.samples
            pooled[name] = mean.astype(np.float32)
            pooled[name.removesuffix(RUNNING_MEAN) + RUNNING_VAR] = np.maximum(self._sums[name + "^2"] / self.samples - mean * mean, 0).astype(np.float32)
        return pooled


def with_statistics(weights: Mapping[str, np.ndarray], by_tier: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`weights` whose running statistics are overwritten by each tier's, narrowest first, so the widest wins."""
    merged = {name: np.array(value) for name, value in weights.items()}
    for tier in sorted(by_tier, key=tier_rate):
        for name, value in by_tier[tier].items():
            merged[name][leading_slices(value.shape)] = value
    return merged
