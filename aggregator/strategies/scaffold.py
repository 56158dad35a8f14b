"""SCAFFOLD (Karimireddy et al., ICML 2020, option II): control variates against client drift.

The server keeps a control variate c (one float32 tensor per trainable parameter, global shapes,
zero at first) and sends each selected device its tier's slice of c with the weights. Device i
keeps its own c_i (edge_client.scaffold); each local SGD step uses g - c_i + c, and after K steps
at learning rate lr from x to y_i

    c_i+ = c_i - c + (x - y_i) / (K lr)          delta c_i = c_i+ - c_i

goes back with the update. With S the devices that answered the round and N the fleet's size:

    x  <-  x + lr_g * mean(delta y_i)            (the round's aggregate, or a server optimizer's step)
    c  <-  c + (|S| / N) * mean_{i in S_e} delta c_i      element by element

where S_e are the answering devices whose tier holds element e: an element no answering tier
holds keeps its value (HeteroFL). The mean is unweighted (one vote per device), as in the paper.
N is `--scaffold-fleet-size` when given, else the devices available when the round was drawn
(kept in the round's plan, so a resumed round uses the same N), and never less than |S|.
c is committed with each version beside the weights (as `scaffold/<param>`) and resumed after a
restart, like a server optimizer's moments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.store.artifacts import ArtifactStore, TierArtifacts
from protocol.blocks import leading_slices
from protocol.control import control_shapes
from protocol.messages import RejectReason

Weights = dict[str, np.ndarray]
MAX_VARIATE = 1e6  # |element| of a device's delta c_i: far above any gradient a trained model sees


@dataclass(frozen=True)
class Scaffold:
    """SCAFFOLD's server settings."""

    fleet_size: int | None = None  # N; None: the devices available when each round was drawn

    def __post_init__(self) -> None:
        if self.fleet_size is not None and self.fleet_size < 1:
            raise ValueError(f"--scaffold-fleet-size must be >= 1, got {self.fleet_size}")

    def population(self, available: int, answered: int) -> int:
        """N of a round drawn from `available` devices of which `answered` answered."""
        return max(self.fleet_size if self.fleet_size is not None else available, answered, 1)


def tier_control_shapes(tier: TierArtifacts) -> dict[str, tuple[int, ...]]:
    """The variate tensors of a tier (by parameter name): its trainable parameters' shapes."""
    return control_shapes((p.name, tuple(p.shape), p.trainable) for p in tier.manifest.params)


def global_control_shapes(artifacts: ArtifactStore, weights: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The server variate's tensors: the global shapes of the parameters the widest tier trains."""
    return {name: tuple(weights[name].shape) for name in tier_control_shapes(artifacts.widest)}


def initial_control(shapes: Mapping[str, tuple[int, ...]]) -> Weights:
    """c = 0 of the given global shapes."""
    return {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}


def check_variates(variates: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                   tier: str) -> tuple[RejectReason, str] | None:
    """Why a device's delta c_i is refused: names or shapes not the tier's variates, not float32, NaN/Inf, or an
    element over MAX_VARIATE; None when it may be folded."""
    if set(variates) != set(expected):
        return RejectReason.BAD_TENSOR, (f"control variates {sorted(set(variates) ^ set(expected))[:8]} do not match "
                                         f"tier {tier}'s trainable parameters")
    for name, value in variates.items():
        if value.dtype != np.float32 or tuple(value.shape) != expected[name]:
            return RejectReason.BAD_TENSOR, (f"control variate {name}: {value.dtype}{list(value.shape)}, expected "
                                             f"float32{list(expected[name])}")
    for name, value in variates.items():
        array = np.asarray(value)
        if not np.isfinite(array).all():
            return RejectReason.NON_FINITE, f"control variate {name} holds NaN or Inf"
        if array.size and (largest := float(np.abs(array).max())) > MAX_VARIATE:
            return RejectReason.OUTLIER, f"control variate {name} holds |{largest:.4g}|, over the bound {MAX_VARIATE:g}"
    return None


def variate_norm(variates: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of a delta c_i, all tensors together."""
    return math.sqrt(sum(float(np.square(np.asarray(v), dtype=np.float64).sum()) for v in variates.values()))


class VariateMean:
    """The round's delta c_i, summed element by element with a count of the devices holding each element."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._sums = {name: np.zeros(shape, np.float64) for name, shape in shapes.items()}
        self._counts: dict[str, dict[tuple[int, ...], int]] = {name: {} for name in shapes}  # block shape -> devices
        self.devices = 0

    def add(self, variates: Mapping[str, np.ndarray]) -> None:
        """Fold one device's delta c_i (each tensor the leading block of its global tensor)."""
        for name, value in variates.items():
            array = np.asarray(value, np.float32)
            self._sums[name][leading_slices(array.shape)] += array
            blocks = self._counts[name]
            blocks[array.shape] = blocks.get(array.shape, 0) + 1
        self.devices += 1

    def step(self, control: Mapping[str, np.ndarray], population: int) -> Weights:
        """The next c: c + (|S| / N) * the per-element mean over the devices holding it (`population` = N); an
        element nobody held keeps its value. The inputs are not changed."""
        factor = self.devices / population
        new: Weights = {}
        for name, c in control.items():
            count = np.zeros(c.shape, np.float64)
            for shape, devices in self._counts[name].items():
                count[leading_slices(shape)] += devices
            mean = np.divide(self._sums[name], count, out=np.zeros_like(count), where=count > 0)
            new[name] = (c + factor * mean).astype(np.float32)
        return new
