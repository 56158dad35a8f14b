"""Differential privacy: DP-FedAvg and a Renyi-DP accountant that reports (epsilon, delta) per round.

DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language Models"),
user-level: one device's whole update is the unit of privacy.

- `central`: the aggregator clips every update's delta (all its tensors as one vector) to L2 norm
  C, sums them with equal weight, adds N(0, (z C)^2) to every element of the sum and divides by
  the number of updates (`DpFedAvg`). Devices must trust the aggregator with their raw updates.
- `local`: each device clips and noises its own delta before sending it (edge_client.privacy);
  the aggregator combines the noisy updates as usual and only keeps the books.

Why equal weights: adding or removing one device changes the clipped sum by at most C, the
sensitivity the noise is calibrated to. Weighting by the sample count a device reports would let
one device scale its contribution at will and the bound would be gone.

Why divide by the actual count, per element: HeteroFL tiers hold leading blocks, so an element
is divided by the number of updates holding it (noise std z C / n on it); elements no update
holds keep their value and get no noise. The fixed denominator of McMahan et al. (the expected
count qW) avoids treating the count as public, but with devices dropping out mid-round and tiers
of different widths it shrinks the model by a varying factor. We treat the number of updates
and which tiers took part as public, as the round summaries publish them anyway (TensorFlow
Federated's DP mean does the same); the guarantee covers the content of the updates.

Accounting: every committed round is one step of the sampled Gaussian mechanism with sampling
rate q = selected / available devices (RDP per Mironov, Talwar and Zhang, 2019, for Poisson
sampling: TierFL draws a fixed-size sample, which this treats as Poisson with the same rate, the
usual approximation). Local DP gains nothing from sampling against the aggregator, which knows
who was asked: each round counts with q = 1 (the bound for a device selected every round).
The books are kept by Google's maintained `dp-accounting` package (its RDP accountant composes
the events and converts RDP to (epsilon, delta)); `DpEventAccountant` is the one accountant, for
training rounds and for analytics queries (aggregator.analytics) alike: not ours to keep right.

Not covered: what devices report beside the delta (sample counts, losses, accuracies) and the
batch-norm statistics phase, which send values computed on local data without noise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.strategies.fedavg import AccumulatorFactory, ClientUpdate, Weights
from models.spec import RUNNING_VAR
from protocol.blocks import leading_slices
from protocol.clipping import clip_delta

DP_MODES = ("off", "central", "local")
DEFAULT_DELTA = 1e-5
MIN_ORDER = 2.0  # the smallest RDP order the accountant uses (DpEventAccountant)
MAX_UNITS = 4096  # (noise, rate) pairs whose one-event RDP the accountant keeps


# -- the accountant: the maintained dp-accounting package ---------------------------------------


class DpEventAccountant:
    """The books of a sequence of (sampled) Gaussian mechanisms, kept by the maintained `dp-accounting` package.

    Its RDP accountant composes the events and converts to (epsilon, delta); the books are the list
    of events (noise multiplier, sampling rate, count), so they persist as plain JSON and restore by
    composing them again. ImportError naming the package when it is not installed.

    Orders: the package's defaults from 2 up. Below 2 its series for a sampled Gaussian may not
    converge (it then warns on every call and drops the order); they only matter for epsilons far
    past any useful guarantee.

    RDP adds up under composition, so the RDP of one event of each (noise, rate) is computed once
    by the package (a fraction of a second for a sampled Gaussian) and added per step: rebuilding
    the books of a long run after a restart costs one computation per distinct (noise, rate).
    """

    def __init__(self, events: Sequence[Sequence[float]] = ()) -> None:
        import dp_accounting  # the aggregator's host: tierfl[full]
        from dp_accounting.rdp import rdp_privacy_accountant

        self._dp = dp_accounting
        self._package = rdp_privacy_accountant
        self.orders = [order for order in rdp_privacy_accountant.DEFAULT_RDP_ORDERS if order >= MIN_ORDER]
        self._rdp = np.zeros(len(self.orders))
        self._units: dict[tuple[float, float], np.ndarray] = {}  # (noise, rate) -> RDP of one such event
        self.events: list[tuple[float, float, int]] = []
        for z, q, count in events:
            self.step(float(z), float(q), int(count))

    def _unit(self, noise_multiplier: float, sampling_rate: float) -> np.ndarray:
        """The RDP per order of one event, as the package's accountant composes it."""
        key = (noise_multiplier, sampling_rate)
        if key not in self._units:
            event = self._dp.GaussianDpEvent(noise_multiplier)
            if sampling_rate < 1:
                event = self._dp.PoissonSampledDpEvent(sampling_rate, event)
            one = self._package.RdpAccountant(self.orders)
            one.compose(event)
            if len(self._units) >= MAX_UNITS:
                self._units.clear()
            self._units[key] = np.asarray(one.rdp, np.float64)  # its RDP per order (the accountant's public copy)
        return self._units[key]

    def step(self, noise_multiplier: float, sampling_rate: float = 1.0, count: int = 1) -> None:
        """Compose `count` more Gaussian mechanisms of this noise multiplier on Poisson samples of this rate."""
        if not noise_multiplier > 0:
            raise ValueError(f"the noise multiplier must be > 0, got {noise_multiplier}")
        if not 0 < sampling_rate <= 1 or count < 1:
            raise ValueError(f"need a sampling rate in (0, 1] and a count >= 1, got {sampling_rate}, {count}")
        self._rdp = self._rdp + count * self._unit(noise_multiplier, sampling_rate)
        self.events.append((noise_multiplier, sampling_rate, count))

    def epsilon(self, delta: float) -> tuple[float, float]:
        """(epsilon, the RDP order that gives it) of everything composed so far, at this delta (0 with no events)."""
        if not self.events:
            return 0.0, math.nan
        epsilon, order = self._package.compute_epsilon(self.orders, self._rdp, delta)
        return float(epsilon), float(order)


# -- the central DP-FedAvg accumulator ---------------------------------------------------------


def round_rng(seed: int, global_weights: Mapping[str, np.ndarray]) -> np.random.Generator:
    """A noise generator keyed by `seed` and the weights the round starts from (so: per round, reproducible)."""
    digest = hashlib.sha256()
    for name in sorted(global_weights):
        value = np.ascontiguousarray(global_weights[name])
        digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        digest.update(value.tobytes())
    return np.random.default_rng(np.random.SeedSequence([seed, int.from_bytes(digest.digest(), "big")]))


class DpFedAvg:
    """DP-FedAvg at the aggregator: clip each delta to norm C, sum with equal weights, add N(0, (z C)^2), divide.

    Each element is divided by the number of updates holding it (HeteroFL tiers); an element no
    update holds keeps its global value, noiseless; batch-norm running variances are floored at 0
    after the noise. Memory O(model). The noisy result is computed
    once and kept: reading it twice must not release two noisy copies of the same sum.
    """

    def __init__(self, global_weights: Mapping[str, np.ndarray], clip_norm: float, noise_multiplier: float,
                 rng: np.random.Generator) -> None:
        if not clip_norm > 0:
            raise ValueError(f"the clipping bound must be > 0, got {clip_norm}")
        if not noise_multiplier >= 0:
            raise ValueError(f"the noise multiplier must be >= 0, got {noise_multiplier}")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self._rng = rng
        self._global = global_weights
        self._sums = {n: np.zeros_like(w, dtype=np.float32) for n, w in global_weights.items()}
        self._holders: dict[str, dict[tuple[int, ...], int]] = {n: {} for n in global_weights}
        self._result: Weights | None = None
        self.clipped = 0  # updates scaled down so far: for the aggregator's own logs, not privatized
        self.count = 0

    def add(self, update: ClientUpdate) -> None:
        """Clip one update (after its `scale`) and add it to the sum with weight 1."""
        if self._result is not None:
            raise RuntimeError("this round's noisy result has been released; no update can be added")
        if update.contributions:
            raise ValueError(f"{update.device_id} sent a relay's combined update: central DP needs each "
                             "device's own update to bound its influence (use --dp local with relays)")
        if unknown := sorted(set(update.delta) - set(self._sums)):
            raise ValueError(f"{update.device_id}: tensors {', '.join(unknown)} are not in the global model")
        scaled = update.delta if update.scale == 1.0 else {n: d * np.float32(update.scale) for n, d in update.delta.items()}
        bounded, was_clipped = clip_delta(scaled, self.clip_norm)
        for name, delta in bounded.items():
            self._sums[name][leading_slices(delta.shape)] += delta
            shapes = self._holders[name]
            shapes[delta.shape] = shapes.get(delta.shape, 0) + 1
        self.clipped += was_clipped
        self.count += 1

    def holders(self, name: str) -> np.ndarray:
        """How many of the round's updates hold each element of tensor `name`."""
        count = np.zeros(self._global[name].shape, np.int64)
        for shape, n in self._holders[name].items():
            count[leading_slices(shape)] += n
        return count

    def _noisy_mean(self, name: str, noise: np.ndarray) -> np.ndarray:
        held = self.holders(name)
        return np.divide(self._sums[name] + noise, held, out=np.zeros(noise.shape, np.float32), where=held > 0)

    def result(self) -> Weights:
        """Global weights plus (clipped sum + noise) / holders per element; computed once per round."""
        if self._result is None:
            std = np.float32(self.noise_multiplier * self.clip_norm)
            noise = {name: self._rng.standard_normal(self._global[name].shape, dtype=np.float32) * std
                     for name in sorted(self._global)}  # a fixed order: the same noise for the same seed
            self._result = {name: (current + self._noisy_mean(name, noise[name])).astype(np.float32)
                            for name, current in self._global.items()}
            for name in self._result:  # noise must not leave a batch-norm variance negative (post-processing)
                if name.endswith(RUNNING_VAR):
                    np.maximum(self._result[name], 0, out=self._result[name])
        return self._result


@dataclass(frozen=True)
class CentralDp:
    """Accumulator factory: a `DpFedAvg` per round, its noise keyed by `seed` and the round's starting weights."""

    clip_norm: float
    noise_multiplier: float
    seed: int

    def __call__(self, global_weights: Mapping[str, np.ndarray]) -> DpFedAvg:
        """The accumulator of a round that starts from `global_weights`."""
        return DpFedAvg(global_weights, self.clip_norm, self.noise_multiplier, round_rng(self.seed, global_weights))


# -- the books: (epsilon, delta) after every round ---------------------------------------------


@dataclass(frozen=True)
class PrivacySpent:
    """The privacy spent so far: (epsilon, delta)-DP per device over `rounds` rounds."""

    epsilon: float
    delta: float
    order: float  # the RDP order that gave epsilon
    rounds: int

    def metrics(self) -> dict[str, float]:
        """For a round summary or a metrics line."""
        return {"dp_epsilon": self.epsilon, "dp_delta": self.delta, "dp_rdp_order": self.order, "dp_rounds": float(self.rounds)}


class PrivacyBudget:
    """Keeps the books of one fleet's DP training: one accountant step per round that released a model."""

    def __init__(self, mode: str, noise_multiplier: float, delta: float = DEFAULT_DELTA,
                 accountant: DpEventAccountant | None = None, rounds: int = 0) -> None:
        if mode not in ("central", "local"):
            raise ValueError(f"a privacy budget needs --dp central or local, got {mode!r}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.mode = mode
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.accountant = accountant if accountant is not None else DpEventAccountant()
        self.rounds = rounds

    def record_round(self, selected: int, available: int) -> PrivacySpent:
        """Charge one round that asked `selected` of `available` devices; the total spent so far."""
        if not 0 < selected <= available:
            raise ValueError(f"cannot sample {selected} of {available} available devices")
        rate = 1.0 if self.mode == "local" else selected / available
        self.accountant.step(self.noise_multiplier, rate)
        self.rounds += 1
        return self.spent()

    def spent(self) -> PrivacySpent:
        """(epsilon, delta) of the rounds recorded so far."""
        epsilon, order = self.accountant.epsilon(self.delta)
        return PrivacySpent(epsilon, self.delta, order, self.rounds)

    def state(self) -> dict[str, Any]:
        """JSON-ready books, for the state directory (`restore` reads them back after a restart)."""
        return {"mode": self.mode, "noise_multiplier": self.noise_multiplier, "delta": self.delta,
                "rounds": self.rounds, "events": [list(event) for event in self.accountant.events]}

    @classmethod
    def restore(cls, state: Mapping[str, Any]) -> PrivacyBudget:
        """The budget whose `state()` this is."""
        accountant = DpEventAccountant(state["events"])
        return cls(state["mode"], state["noise_multiplier"], state["delta"], accountant, int(state["rounds"]))


# -- options -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DpSettings:
    """The `--dp` options, checked."""

    mode: str = "off"
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    delta: float = DEFAULT_DELTA
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in DP_MODES:
            raise ValueError(f"unknown --dp mode {self.mode!r}; expected one of {', '.join(DP_MODES)}")
        if self.mode == "off":
            if self.clip_norm is not None or self.noise_multiplier is not None:
                raise ValueError("--dp-clip and --dp-noise need --dp central or --dp local")
            return
        if self.clip_norm is None or not self.clip_norm > 0:
            raise ValueError(f"--dp {self.mode} needs --dp-clip C > 0 (the bound on each update's L2 norm)")
        if self.noise_multiplier is None or not self.noise_multiplier > 0:
            raise ValueError(f"--dp {self.mode} needs --dp-noise z > 0: without noise epsilon is infinite "
                             "(for clipping alone use --robust clip --clip-norm C)")
        if not 0 < self.delta < 1:
            raise ValueError(f"--dp-delta must be in (0, 1), got {self.delta}")
        if self.seed < 0:
            raise ValueError(f"--dp-seed must be >= 0, got {self.seed}")

    def accumulator_factory(self) -> AccumulatorFactory | None:
        """The central DP-FedAvg accumulator factory; None when the aggregator combines updates as usual."""
        if self.mode != "central":
            return None
        assert self.clip_norm is not None and self.noise_multiplier is not None
        return CentralDp(self.clip_norm, self.noise_multiplier, self.seed)

    def budget(self) -> PrivacyBudget | None:
        """Fresh books for this mode; None without DP."""
        if self.mode == "off":
            return None
        assert self.noise_multiplier is not None
        return PrivacyBudget(self.mode, self.noise_multiplier, self.delta)
