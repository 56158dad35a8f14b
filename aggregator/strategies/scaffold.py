"""SCAFFOLD (Karimireddy et al., ICML 2020, option II): control variates against client drift.

The server keeps a control variate c (one float32 tensor per trainable parameter, global shapes,
zero at first) and sends each selected device its tier's slice of c with the weights. Device i
keeps its own c_i (edge_client.scaffold); each local SGD step uses g - c_i + c, and after K steps
at learning rate lr from x to y_i

    c_i+ = c_i - c + (x - y_i) / (K lr)          delta c_i = c_i+ - c_i = -c - (y_i - x) / (K lr)

delta c_i does not depend on c_i, so it does not travel: the aggregator derives it from what it
already has (`derived_change`): the decoded update y_i - x once it passed every check, its steps
K (Update.steps), the task's lr and the tier's slice of the c the task carried. A device with
K = 0 contributes none. The uplink is the update alone, as with FedAvg. The derived value differs
from the device's own by the codec's quantisation error / (K lr); with error feedback that error
is carried into the device's later updates, and so into later derived changes.
With S the devices that answered the round and N the fleet's size:

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

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.store.artifacts import ArtifactStore, TierArtifacts
from protocol.blocks import leading_slices
from protocol.control import control_shapes

Weights = dict[str, np.ndarray]


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


def derived_change(update: Mapping[str, np.ndarray], control: Mapping[str, np.ndarray],
                   shapes: Mapping[str, tuple[int, ...]], steps: int, learning_rate: float) -> Weights | None:
    """delta c_i = -c - update / (K lr) of a device whose accepted `update` (y_i - x, of its tier) took K = `steps`
    steps at `learning_rate` from a task that carried the server's `control` (global shapes, sliced here to the tier's
    variate `shapes`); None when K = 0 (no steps, no change)."""
    if steps <= 0:
        return None
    scale = np.float32(1.0 / (steps * learning_rate))
    return {name: -np.asarray(control[name][leading_slices(shape)], np.float32)
            - np.asarray(update[name], np.float32) * scale for name, shape in shapes.items()}


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
