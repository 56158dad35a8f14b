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
RDP is converted to (epsilon, delta) with the improved conversion of Balle et al. (2020,
"Hypothesis Testing Interpretations and Renyi Differential Privacy", Theorem 21), the one of
Canonne, Kamath and Steinke (2020), which is tighter than epsilon = rdp + log(1/delta)/(alpha-1).

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
FRACTIONAL_ORDERS = (1.1, 1.25, 1.5, 1.75, 2.25, 2.5, 2.75, 3.5, 4.5, 5.5, 6.5, 8.5, 10.5, 12.5)
ORDERS: tuple[float, ...] = tuple(sorted((*FRACTIONAL_ORDERS, *map(float, range(2, 257)))))
_SERIES_CUTOFF = -30.0  # log of a term small enough to end the fractional-order series (A >= 1)
_SERIES_MAX_TERMS = 1 << 24


# -- RDP of the sampled Gaussian mechanism -----------------------------------------------------


def _log_erfc(x: np.ndarray) -> np.ndarray:
    """log(erfc(x)) element-wise, finite far into the tail where erfc(x) underflows."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    near = x < 20.0
    out[near] = np.log([math.erfc(v) for v in x[near]])
    far = x[~near]
    inv = 1.0 / (far * far)  # asymptotic series of erfc; at x >= 20 its relative error is below 1e-11
    series = 1.0 - inv / 2 + 3 * inv**2 / 4 - 15 * inv**3 / 8 + 105 * inv**4 / 16
    out[~near] = -far * far - np.log(far) - 0.5 * math.log(math.pi) + np.log(series)
    return out


def _log_sum(log_terms: np.ndarray) -> float:
    """log(sum(exp(log_terms))) without overflow; -inf for no terms."""
    if log_terms.size == 0:
        return -math.inf
    top = float(log_terms.max())
    return top + math.log(float(np.exp(log_terms - top).sum()))


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha: the binomial expansion (Mironov et al. 2019, Section 3.3)."""
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = np.array([math.lgamma(alpha + 1) - math.lgamma(i + 1) - math.lgamma(alpha - i + 1) for i in range(alpha + 1)])
    return _log_sum(log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2))


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for real alpha: the two erfc-weighted series of Mironov et al. 2019, Section 3.3.

    Past k = alpha the generalised binomial coefficients alternate in sign and shrink, so the
    terms are summed until the second half of them is below exp(_SERIES_CUTOFF) (A >= 1).
    """
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    n = 256
    while True:
        k = np.arange(n, dtype=np.float64)
        factors = (alpha - k[1:] + 1) / k[1:]  # binom(alpha, k) = binom(alpha, k - 1) * factor
        log_coef = np.concatenate(([0.0], np.cumsum(np.log(np.abs(factors)))))
        sign = np.concatenate(([1.0], np.cumprod(np.sign(factors))))
        j = alpha - k
        s0 = (log_coef + k * math.log(q) + j * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
              + math.log(0.5) + _log_erfc((k - z0) / (math.sqrt(2) * sigma)))
        s1 = (log_coef + j * math.log(q) + k * math.log1p(-q) + (j * j - j) / (2 * sigma**2)
              + math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma)))
        terms = np.logaddexp(s0, s1)
        if n // 2 > alpha and terms[n // 2:].max() < _SERIES_CUTOFF:
            break
        if n >= _SERIES_MAX_TERMS or np.isnan(terms).any():
            raise ArithmeticError(f"the RDP series does not converge for q={q}, sigma={sigma}, alpha={alpha}")
        n *= 2
    positive, negative = _log_sum(terms[sign > 0]), _log_sum(terms[sign < 0])
    return positive + math.log1p(-math.exp(negative - positive)) if negative > -math.inf else positive


def sampled_gaussian_rdp(q: float, noise_multiplier: float, alpha: float) -> float:
    """RDP at order `alpha` of one step of the Gaussian mechanism (std z x sensitivity) on a Poisson sample of rate q."""
    if not 0 <= q <= 1:
        raise ValueError(f"the sampling rate must be in [0, 1], got {q}")
    if not noise_multiplier >= 0:
        raise ValueError(f"the noise multiplier must be >= 0, got {noise_multiplier}")
    if not alpha > 1:
        raise ValueError(f"RDP orders must be > 1, got {alpha}")
    if q == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if q == 1:
        return alpha / (2 * noise_multiplier**2)
    if float(alpha).is_integer():
        log_a = _log_a_integer(q, noise_multiplier, int(alpha))
    else:
        log_a = _log_a_fractional(q, noise_multiplier, alpha)
    return log_a / (alpha - 1)


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """Smallest epsilon over the orders for this delta (Balle et al. 2020, Thm. 21), and the order giving it."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    alphas = np.asarray(orders, np.float64)
    with np.errstate(invalid="ignore"):  # inf - finite stays inf
        eps = np.asarray(rdp, np.float64) + np.log1p(-1 / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1)
    if not np.isfinite(eps).any():
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    return max(float(eps[best]), 0.0), float(alphas[best])


class RdpAccountant:
    """Renyi-DP of a sequence of sampled Gaussian steps, composed by adding RDP order by order."""

    def __init__(self, orders: Sequence[float] = ORDERS, rdp: Sequence[float] | None = None) -> None:
        self.orders = tuple(float(a) for a in orders)
        if not self.orders or min(self.orders) <= 1:
            raise ValueError("RDP orders must be a non-empty list of numbers > 1")
        if rdp is not None and len(rdp) != len(self.orders):
            raise ValueError(f"{len(rdp)} RDP values for {len(self.orders)} orders")
        self.rdp = np.zeros(len(self.orders)) if rdp is None else np.array(rdp, np.float64)

    def step(self, noise_multiplier: float, sampling_rate: float, steps: int = 1) -> None:
        """Compose `steps` more steps of the Gaussian mechanism with this noise on samples of this rate."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        one = np.array([sampled_gaussian_rdp(sampling_rate, noise_multiplier, a) for a in self.orders])
        if steps:
            self.rdp = self.rdp + steps * one

    def epsilon(self, delta: float) -> tuple[float, float]:
        """(epsilon, the RDP order that gives it) of everything composed so far, at this delta."""
        return rdp_to_epsilon(self.orders, self.rdp, delta)


class DpEventAccountant:
    """The books of a sequence of (sampled) Gaussian mechanisms, kept by the maintained `dp-accounting` package.

    Its RDP accountant composes the events and converts to (epsilon, delta); the books are the list
    of events (noise multiplier, sampling rate, count), so they persist as plain JSON and restore by
    composing them again. ImportError naming the package when it is not installed.
    """

    def __init__(self, events: Sequence[Sequence[float]] = ()) -> None:
        import dp_accounting  # the aggregator's host: tierfl[full]
        from dp_accounting.rdp import RdpAccountant as _Rdp

        self._dp = dp_accounting
        self._accountant = _Rdp()
        self.events: list[tuple[float, float, int]] = []
        for z, q, count in events:
            self.step(float(z), float(q), int(count))

    def step(self, noise_multiplier: float, sampling_rate: float = 1.0, count: int = 1) -> None:
        """Compose `count` more Gaussian mechanisms of this noise multiplier on Poisson samples of this rate."""
        if not noise_multiplier > 0:
            raise ValueError(f"the noise multiplier must be > 0, got {noise_multiplier}")
        if not 0 < sampling_rate <= 1 or count < 1:
            raise ValueError(f"need a sampling rate in (0, 1] and a count >= 1, got {sampling_rate}, {count}")
        event = self._dp.GaussianDpEvent(noise_multiplier)
        if sampling_rate < 1:
            event = self._dp.PoissonSampledDpEvent(sampling_rate, event)
        self._accountant.compose(event, count)
        self.events.append((noise_multiplier, sampling_rate, count))

    def epsilon(self, delta: float) -> tuple[float, float]:
        """(epsilon, the RDP order that gives it) of everything composed so far, at this delta (0 with no events)."""
        if not self.events:
            return 0.0, math.nan
        epsilon, order = self._accountant.get_epsilon_and_optimal_order(delta)
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
                 accountant: RdpAccountant | None = None, rounds: int = 0) -> None:
        if mode not in ("central", "local"):
            raise ValueError(f"a privacy budget needs --dp central or local, got {mode!r}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.mode = mode
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.accountant = accountant if accountant is not None else RdpAccountant()
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
                "rounds": self.rounds, "orders": list(self.accountant.orders), "rdp": self.accountant.rdp.tolist()}

    @classmethod
    def restore(cls, state: Mapping[str, Any]) -> PrivacyBudget:
        """The budget whose `state()` this is."""
        accountant = RdpAccountant(state["orders"], state["rdp"])
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
