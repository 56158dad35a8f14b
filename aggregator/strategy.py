"""Strategies: which devices train what each round, and how their updates combine.

The interface is small, like Flower's: `configure_round` picks devices and their task settings;
`start_aggregation` returns an accumulator that takes updates one at a time as they arrive
(memory O(model), not O(devices x model)) and yields the new global weights at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from aggregator.registry import DeviceInfo
from aggregator.tiering import FixedTiers, TierPolicy
from models.slicing import leading_slices

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Assignment:
    """One device's task for a round."""

    device_id: str
    tier: str
    epochs: int
    batch_size: int
    learning_rate: float
    mask_classes: bool = False
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class ClientUpdate:
    """A decoded, validated update: deltas for the leading block of each global tensor."""

    device_id: str
    tier: str
    num_samples: int
    delta: Mapping[str, np.ndarray]


class Accumulator(Protocol):
    """Running combination of one round's updates."""

    count: int

    def add(self, update: ClientUpdate) -> None: ...
    def result(self) -> Weights: ...


AccumulatorFactory = Callable[[Mapping[str, np.ndarray]], Accumulator]


class Strategy(Protocol):
    """A federated algorithm as the round engine sees it."""

    name: str

    def configure_round(self, round_number: int, available: Sequence[DeviceInfo]) -> list[Assignment]: ...
    def start_aggregation(self, global_weights: Mapping[str, np.ndarray]) -> Accumulator: ...


class ElementwiseMean:
    """Weighted mean of deltas per element over the updates that hold it (HeteroFL-ready).

    A full-width update covers every element, so with one tier this is exactly FedAvg. An
    element no update touched keeps its global value.
    """

    def __init__(self, global_weights: Mapping[str, np.ndarray], weighted: bool = True) -> None:
        self._global = global_weights
        self._weighted = weighted
        self._sums = {n: np.zeros_like(w, dtype=np.float32) for n, w in global_weights.items()}
        # Per-element mass depends only on each update's block shape: keep totals per shape, expand once.
        self._mass_by_shape: dict[str, dict[tuple[int, ...], float]] = {n: {} for n in global_weights}
        self.count = 0

    def add(self, update: ClientUpdate) -> None:
        """Fold one update into the running sums."""
        weight = float(update.num_samples) if self._weighted else 1.0
        for name, delta in update.delta.items():
            self._sums[name][leading_slices(delta.shape)] += delta * np.float32(weight)
            shapes = self._mass_by_shape[name]
            shapes[delta.shape] = shapes.get(delta.shape, 0.0) + weight
        self.count += 1

    def result(self) -> Weights:
        """Global weights plus the per-element mean delta."""
        new = {}
        for name, current in self._global.items():
            mass = np.zeros(current.shape, np.float64)
            for shape, total in self._mass_by_shape[name].items():
                mass[leading_slices(shape)] += total
            mean = np.divide(self._sums[name], mass, out=np.zeros_like(mass), where=mass > 0)
            new[name] = (current + mean).astype(np.float32)
        return new


class FedAvg:
    """FedAvg (McMahan et al.): a seeded fraction C of the available devices, E epochs of batch B,
    updates averaged weighted by sample count over the devices that answered.

    With a tier policy over several tiers this is HeteroFL: each device trains its tier's slice
    and every element is averaged over the devices that hold it (`weighted=False`: HeteroFL's
    plain mean over those devices; `mask_classes`: devices train without the classes they lack).
    With `proximal_mu` > 0 it is FedProx: devices add mu/2 ||w - w_global||^2 to their loss.
    `accumulator` replaces that mean, e.g. with a robust one from aggregator.robust.
    """

    name = "fedavg"

    def __init__(
        self,
        fraction: float = 1.0,
        min_clients: int = 1,
        epochs: int = 1,
        batch_size: int = 32,
        learning_rate: float = 0.05,
        tiers: TierPolicy | None = None,
        weighted: bool = True,
        mask_classes: bool = False,
        proximal_mu: float = 0.0,
        seed: int = 0,
        accumulator: AccumulatorFactory | None = None,
    ) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction C must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.min_clients = min_clients
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.tiers = tiers if tiers is not None else FixedTiers({"a": 1.0})
        self.weighted = weighted
        self.mask_classes = mask_classes
        if proximal_mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu
        self.seed = seed
        self.accumulator = accumulator

    def configure_round(self, round_number: int, available: Sequence[DeviceInfo]) -> list[Assignment]:
        """max(C * K, min_clients) devices drawn without replacement, reproducible per round."""
        if len(available) < self.min_clients:
            return []
        count = min(len(available), max(self.min_clients, math.ceil(self.fraction * len(available))))
        rng = np.random.default_rng([self.seed, round_number])
        chosen = [available[i] for i in sorted(rng.choice(len(available), size=count, replace=False))]
        tiers = self.tiers.assign(round_number, chosen)
        return [
            Assignment(
                device_id=device.device_id,
                tier=tiers[device.device_id],
                epochs=self.epochs,
                batch_size=self.batch_size,
                learning_rate=self.learning_rate,
                mask_classes=self.mask_classes,
                proximal_mu=self.proximal_mu,
            )
            for device in chosen
        ]

    def start_aggregation(self, global_weights: Mapping[str, np.ndarray]) -> Accumulator:
        """An element-wise mean of the deltas, weighted by samples unless configured otherwise, or `accumulator`'s."""
        if self.accumulator is not None:
            return self.accumulator(global_weights)
        return ElementwiseMean(global_weights, weighted=self.weighted)
