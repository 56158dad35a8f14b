"""Strategies: which devices train what each round, and how their updates combine.

The interface is small, like Flower's: `configure_round` picks devices and their task settings;
`task_weights` gives each device the model it starts from (the global one, or FedMut's mutation
of it); `start_aggregation` returns an accumulator that takes updates one at a time as they arrive
(memory O(model), not O(devices x model)) and yields the new global weights at the end;
`metrics` reports what the strategy wants in the round summary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from aggregator.registry import DeviceInfo
from aggregator.store.round_spool import Assignment
from aggregator.strategies.sampling import ClientSampler, UniformSampler
from aggregator.strategies.tiering import FixedTiers, TierPolicy
from protocol.blocks import leading_slices
from protocol.quantized import QuantizedTensor

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Contribution:
    """The devices of one tier behind a relay's combined update, and the block shapes they trained."""

    tier: str
    samples: int
    devices: int
    shapes: Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class ClientUpdate:
    """A decoded, validated update: deltas for the leading block of each global tensor.

    `work` (the share of the asked local steps the device did, partial work at a deadline)
    multiplies its weight; `scale` multiplies the delta but not its weight in the mean (FedBuff's
    staleness factor). With `contributions` the delta is a relay's per-element mean.
    """

    device_id: str
    tier: str
    num_samples: int
    delta: Mapping[str, np.ndarray]
    scale: float = 1.0
    work: float = 1.0
    contributions: tuple[Contribution, ...] = ()


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
    def task_weights(self, assignment: Assignment, global_weights: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]: ...
    def start_aggregation(self, global_weights: Mapping[str, np.ndarray]) -> Accumulator: ...
    def metrics(self) -> dict[str, float]: ...


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
        """Fold one update into the running sums (its delta scaled by `update.scale`, its mass not)."""
        if update.contributions:
            self._add_combined(update)
            return
        weight = self._weight(update)
        scaled = np.float32(weight * update.scale)
        for name, delta in update.delta.items():
            target = self._sums[name][leading_slices(delta.shape)]
            if isinstance(delta, QuantizedTensor):  # decoded straight into the sum, never dequantised whole
                delta.add_into(target, scaled)
            else:
                target += delta * scaled
        self._add_mass(update)
        self.count += 1

    @property
    def weighted(self) -> bool:
        """Whether updates weigh by their samples (False: one vote per device)."""
        return self._weighted

    def sums(self) -> Weights:
        """The running element-wise sums of weight x delta (an aggregator worker's partial sum)."""
        return self._sums

    def merge(self, sums: Mapping[str, np.ndarray], folded: Sequence[ClientUpdate]) -> None:
        """Fold a partial sum: `sums` (another accumulator's `sums()` over the updates `folded`) added as they are,
        and each of `folded`'s mass as `add` counts it; `folded`'s deltas are read for their shapes only."""
        for name, value in sums.items():
            self._sums[name] += value
        for update in folded:
            self._add_mass(update)
        self.count += len(folded)

    def _weight(self, update: ClientUpdate) -> float:
        return (float(update.num_samples) if self._weighted else 1.0) * update.work

    def _add_mass(self, update: ClientUpdate) -> None:
        """Count an update's weight toward the elements it holds: its delta's leading blocks, or its contributors'."""
        for name, delta in update.delta.items():
            shapes = self._mass_by_shape[name]
            if update.contributions:
                for part in update.contributions:
                    block = part.shapes[name]
                    shapes[block] = shapes.get(block, 0.0) + float(part.samples if self._weighted else part.devices)
            else:
                shapes[delta.shape] = shapes.get(delta.shape, 0.0) + self._weight(update)

    def _add_combined(self, update: ClientUpdate) -> None:
        """A relay's per-element mean: weigh it back into a sum by its contributors' mass."""
        for name, mean in update.delta.items():
            mass = np.zeros(mean.shape, np.float32)
            shapes = self._mass_by_shape[name]
            for part in update.contributions:
                mass[leading_slices(part.shapes[name])] += float(part.samples if self._weighted else part.devices)
            self._sums[name][leading_slices(mean.shape)] += np.asarray(mean, np.float32) * mass * np.float32(update.scale)
        self._add_mass(update)
        self.count += 1

    def mean_delta(self) -> Weights:
        """The per-element mean delta (zero where no update reached)."""
        means = {}
        for name, current in self._global.items():
            mass = np.zeros(current.shape, np.float64)
            for shape, total in self._mass_by_shape[name].items():
                mass[leading_slices(shape)] += total
            means[name] = np.divide(self._sums[name], mass, out=np.zeros_like(mass), where=mass > 0).astype(np.float32)
        return means

    def result(self) -> Weights:
        """Global weights plus the per-element mean delta."""
        return {name: (self._global[name] + mean).astype(np.float32) for name, mean in self.mean_delta().items()}


def share_caps(assignments: Sequence[Assignment], rates: Mapping[str, float], max_share: float) -> dict[str, int]:
    """The most samples each device's update may weigh so that its share is at most `max_share`.

    HeteroFL: an element is averaged over the devices whose tier holds it. Among the elements a
    device holds together with at least one other selected device, the fewest other holders
    are those of the level min(its tier, the widest other tier): the devices of that rate or
    wider. Its weight w is capped so that w / (w + theirs) <= max_share, theirs counted in the
    samples their hellos announced. A device alone in the round has no cap (its share is 1).
    """
    if max_share >= 1 or len(assignments) < 2:
        return {}
    announced = {a.device_id: a.announced_samples or 0 for a in assignments}
    levels = sorted({rates[a.tier] for a in assignments}, reverse=True)
    at_least = {level: sum(announced[a.device_id] for a in assignments if rates[a.tier] >= level) for level in levels}
    widest = [a for a in assignments if rates[a.tier] == levels[0]]
    caps = {}
    for a in assignments:
        others_widest = levels[1] if len(widest) == 1 and widest[0].device_id == a.device_id else levels[0]
        theirs = at_least[min(rates[a.tier], others_widest)] - announced[a.device_id]
        caps[a.device_id] = max(1, int(max_share / (1 - max_share) * theirs))
    return caps


def check_logit_adjust(tau: float) -> float:
    """`tau` when it is a logit-adjustment strength a task can carry (0 to 10); ValueError otherwise."""
    if not 0 <= tau <= 10:
        raise ValueError(f"--logit-adjust must be in [0, 10], got {tau}")
    return tau


class FedAvg:
    """FedAvg (McMahan et al.): a seeded fraction C of the available devices, E epochs of batch B,
    updates averaged weighted by sample count over the devices that answered.

    With a tier policy over several tiers this is HeteroFL: each device trains its tier's slice
    and every element is averaged over the devices that hold it (`weighted=False`: HeteroFL's
    plain mean over those devices; `mask_classes`: devices train without the classes they lack).
    With `logit_adjust` tau > 0 devices train with logit adjustment: tau * log(their label shares) added to the
    logits in the loss, so their label skew does not pull the shared classifier (Menon et al. 2021; FedLC).
    With `proximal_mu` > 0 it is FedProx: devices add mu/2 ||w - w_global||^2 to their loss.
    `accumulator` replaces that mean, e.g. with a robust one from aggregator.strategies.robust; `sampler`
    replaces the uniform draw of C (aggregator.strategies.sampling). `weigh_partial_work`: a device that
    stopped at the deadline counts in proportion to the local steps it did.
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
        logit_adjust: float = 0.0,
        accumulator: AccumulatorFactory | None = None,
        sampler: ClientSampler | None = None,
        weigh_partial_work: bool = False,
    ) -> None:
        self.sampler = sampler if sampler is not None else UniformSampler(fraction, min_clients, seed)
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.tiers = tiers if tiers is not None else FixedTiers({"a": 1.0})
        self.weighted = weighted
        self.mask_classes = mask_classes
        self.logit_adjust = check_logit_adjust(logit_adjust)
        if proximal_mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu
        self.seed = seed
        self.accumulator = accumulator
        self.weigh_partial_work = weigh_partial_work

    def configure_round(self, round_number: int, available: Sequence[DeviceInfo]) -> list[Assignment]:
        """The sampler's devices (default: max(C * K, min_clients) drawn uniformly), reproducible per round."""
        chosen = self.sampler.sample(round_number, available)
        if not chosen:
            return []
        tiers = self.tiers.assign(round_number, chosen)
        return [
            Assignment(
                device_id=device.device_id,
                tier=tiers[device.device_id],
                epochs=self.epochs,
                batch_size=self.batch_size,
                learning_rate=self.learning_rate,
                mask_classes=self.mask_classes,
                logit_adjust=self.logit_adjust,
                proximal_mu=self.proximal_mu,
                weighted=self.weighted,
                weigh_work=self.weigh_partial_work,
            )
            for device in chosen
        ]

    def task_weights(self, assignment: Assignment, global_weights: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """Every device starts from the global model."""
        return global_weights

    def start_aggregation(self, global_weights: Mapping[str, np.ndarray]) -> Accumulator:
        """An element-wise mean of the deltas, weighted by samples unless configured otherwise, or `accumulator`'s."""
        if self.accumulator is not None:
            return self.accumulator(global_weights)
        return ElementwiseMean(global_weights, weighted=self.weighted)

    def metrics(self) -> dict[str, float]:
        """Nothing beyond the engine's own round summary."""
        return {}
