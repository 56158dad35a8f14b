"""Client sampling: which of the available devices train this round.

    uniform       a seeded fraction C of the available devices (McMahan et al.)
    availability  the same count, drawn with probability proportional to each device's record of
                  answering its tasks (Laplace-smoothed answered/asked); a device that missed its last
                  `bench_after` tasks in a row sits out until it answers again or `bench_rounds` pass
    loss          power-of-choice (Cho et al. 2020): d candidates drawn proportional to their data
                  size, then the count with the highest last-reported training loss (unknown loss
                  first, so every device gets measured)

Every sampler is reproducible: the draws depend only on (seed, round) and the registry's records.
Only online devices ever reach a sampler (the registry's `available`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from aggregator.registry import DeviceInfo

SAMPLERS = ("uniform", "availability", "loss")


class ClientSampler(Protocol):
    """Picks the devices of one round from the available ones."""

    def sample(self, round_number: int, available: Sequence[DeviceInfo]) -> list[DeviceInfo]: ...


def round_count(fraction: float, min_clients: int, available: int) -> int:
    """max(ceil(C * K), min_clients), capped at K; 0 when fewer than min_clients are available."""
    if available < min_clients:
        return 0
    return min(available, max(min_clients, math.ceil(fraction * available)))


def _rng(seed: int, round_number: int) -> np.random.Generator:
    return np.random.default_rng([seed, round_number])


def _by_id(devices: Sequence[DeviceInfo]) -> list[DeviceInfo]:
    return sorted(devices, key=lambda d: d.device_id)


class UniformSampler:
    """A seeded uniform draw without replacement of max(C*K, min_clients) devices."""

    def __init__(self, fraction: float = 1.0, min_clients: int = 1, seed: int = 0) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction C must be in (0, 1], got {fraction}")
        self.fraction, self.min_clients, self.seed = fraction, min_clients, seed

    def sample(self, round_number: int, available: Sequence[DeviceInfo]) -> list[DeviceInfo]:
        """The round's devices, sorted by id."""
        devices = _by_id(available)
        count = round_count(self.fraction, self.min_clients, len(devices))
        picked = _rng(self.seed, round_number).choice(len(devices), size=count, replace=False)
        return [devices[i] for i in sorted(picked)]


def reliability(device: DeviceInfo) -> float:
    """(answered + 1) / (asked + 2): the chance the device answers a task, with a uniform prior."""
    return (device.tasks_answered + 1) / (device.tasks_asked + 2)


class AvailabilitySampler(UniformSampler):
    """Favours devices that answer their tasks; benches devices that just missed several in a row."""

    def __init__(self, fraction: float = 1.0, min_clients: int = 1, seed: int = 0,
                 bench_after: int = 2, bench_rounds: int = 5) -> None:
        super().__init__(fraction, min_clients, seed)
        self.bench_after, self.bench_rounds = bench_after, bench_rounds

    def benched(self, round_number: int, device: DeviceInfo) -> bool:
        """True while a device that missed `bench_after` tasks in a row waits out its rounds."""
        return device.missed_in_a_row >= self.bench_after and round_number - device.last_asked_round <= self.bench_rounds

    def sample(self, round_number: int, available: Sequence[DeviceInfo]) -> list[DeviceInfo]:
        """The round's devices, drawn by reliability among those not benched, sorted by id."""
        devices = [d for d in _by_id(available) if not self.benched(round_number, d)]
        if len(devices) < self.min_clients:  # never stall the fleet: benched devices come back first
            devices = _by_id(available)
        count = round_count(self.fraction, self.min_clients, len(devices))
        if count == 0:
            return []
        weights = np.array([reliability(d) for d in devices])
        picked = _rng(self.seed, round_number).choice(len(devices), size=count, replace=False, p=weights / weights.sum())
        return [devices[i] for i in sorted(picked)]


class PowerOfChoiceSampler(UniformSampler):
    """Power-of-choice: d candidates by data size, then the highest recent losses."""

    def __init__(self, fraction: float = 1.0, min_clients: int = 1, seed: int = 0, candidates: float = 2.0) -> None:
        super().__init__(fraction, min_clients, seed)
        if candidates < 1:
            raise ValueError(f"power-of-choice candidates must be >= 1 times the round's count, got {candidates}")
        self.candidates = candidates

    def sample(self, round_number: int, available: Sequence[DeviceInfo]) -> list[DeviceInfo]:
        """The round's devices, sorted by id."""
        devices = _by_id(available)
        count = round_count(self.fraction, self.min_clients, len(devices))
        if count == 0:
            return []
        d = min(len(devices), max(count, math.ceil(self.candidates * count)))
        sizes = np.array([max(dev.num_samples, 1) for dev in devices], np.float64)
        drawn = _rng(self.seed, round_number).choice(len(devices), size=d, replace=False, p=sizes / sizes.sum())
        # Unknown loss ranks first; ties break by id, so the choice is reproducible.
        ranked = sorted(drawn, key=lambda i: (-(devices[i].last_loss if devices[i].last_loss is not None else math.inf),
                                              devices[i].device_id))
        return [devices[i] for i in sorted(ranked[:count])]


def make_sampler(kind: str, fraction: float = 1.0, min_clients: int = 1, seed: int = 0,
                 candidates: float = 2.0) -> ClientSampler:
    """The sampler named `kind` (one of SAMPLERS)."""
    if kind == "uniform":
        return UniformSampler(fraction, min_clients, seed)
    if kind == "availability":
        return AvailabilitySampler(fraction, min_clients, seed)
    if kind == "loss":
        return PowerOfChoiceSampler(fraction, min_clients, seed, candidates)
    raise ValueError(f"unknown client sampling {kind!r} (expected one of {', '.join(SAMPLERS)})")
