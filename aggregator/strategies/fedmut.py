"""FedMut (Hu et al., AAAI 2024): each device starts from its own mutation of the global model.

After round t commits w_t, the devices of round t+1 are paired (a seeded shuffle). For every
tensor k and pair, a coin picks which device moves along the last global step D = w_t - w_{t-1}
and which moves against it:

    w_i[k] = w_t[k] + alpha * s_ik * D[k],   s_ik in {+1, -1 + b(t)},  the pair's two signs differ

so the pair's mutations cancel (b = 0) or lean toward the update direction early on: the bias
b(t) = bias * max(0, 1 - t / bias_rounds) decays to zero. With an odd count the unpaired device
gets the global model. The new global model is the mean of the devices' local models, so each
update counts as (its mutation + its trained delta). Mutations are whole-model and the engine
slices them per tier like the global weights, so FedMut works with HeteroFL tiers.

A mutation is regenerated from (seed, round, pair, tensor) whenever it is needed: memory is one
extra copy of the model (D), whatever the number of devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from aggregator.registry import DeviceInfo
from aggregator.store.round_spool import Assignment
from aggregator.strategies.bn_statistics import is_statistic
from aggregator.strategies.fedavg import Accumulator, ClientUpdate, FedAvg, Weights
from protocol.blocks import leading_slices


class FedMut(FedAvg):
    """FedAvg whose devices train mutated copies of the global model (takes FedAvg's options too)."""

    name = "fedmut"

    def __init__(self, *args: object, alpha: float = 4.0, bias: float = 0.5, bias_rounds: int = 50, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if alpha < 0:
            raise ValueError(f"FedMut alpha must be >= 0, got {alpha}")
        if not 0 <= bias < 2:
            raise ValueError(f"FedMut bias must be in [0, 2), got {bias}")
        self.alpha, self.bias, self.bias_rounds = alpha, bias, max(bias_rounds, 1)
        self._round = 0
        self._variants: dict[str, int] = {}  # device -> variant (1-based position in the pairing; 0: unmutated)
        self._previous: dict[str, np.ndarray] | None = None  # the global model of the previous round
        self._step: dict[str, np.ndarray] | None = None  # D = w_t - w_{t-1}, None before two rounds

    def configure_round(self, round_number: int, available: Sequence[DeviceInfo]) -> list[Assignment]:
        """FedAvg's selection; each device gets its variant (position in a seeded pairing)."""
        assignments = super().configure_round(round_number, available)
        order = np.random.default_rng([self.seed, round_number, 1]).permutation(len(assignments))
        paired = len(assignments) - len(assignments) % 2
        self._round = round_number
        self._variants = {assignments[i].device_id: (pos + 1 if pos < paired else 0) for pos, i in enumerate(order)}
        return [replace(a, variant=self._variants[a.device_id]) for a in assignments]

    def variant_of(self, device_id: str) -> int:
        """The device's variant this round (0: the unmutated global model)."""
        return self._variants.get(device_id, 0)

    def bias_at(self, round_number: int) -> float:
        """b(t): how far the second sign of a pair leans toward the update direction."""
        return self.bias * max(0.0, 1.0 - round_number / self.bias_rounds)

    def signs(self, round_number: int, variant: int, names: Sequence[str]) -> dict[str, float]:
        """s_ik of one variant for each tensor; variants 2p-1 and 2p form pair p."""
        if variant == 0:
            return {name: 0.0 for name in names}
        pair, second = divmod(variant - 1, 2)
        coins = np.random.default_rng([self.seed, round_number, 2, pair]).random(len(names)) > 0.5
        against = -1.0 + self.bias_at(round_number)
        return {name: (1.0 if coin != bool(second) else against) for name, coin in zip(names, coins)}

    def mutation(self, round_number: int, variant: int) -> dict[str, np.ndarray]:
        """alpha * s_ik * D[k] for one variant (zeros before the first global step)."""
        if self._step is None or variant == 0:
            return {}
        signs = self.signs(round_number, variant, sorted(self._step))
        return {name: (self.alpha * signs[name]) * step for name, step in self._step.items()}

    def task_weights(self, assignment: Assignment, global_weights: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """The global model plus this device's mutation."""
        mutation = self.mutation(self._round, assignment.variant)
        if not mutation:
            return global_weights
        return {name: (w + mutation[name]).astype(np.float32) if name in mutation else w for name, w in global_weights.items()}

    def start_aggregation(self, global_weights: Mapping[str, np.ndarray]) -> Accumulator:
        """Record the global step since the previous round; aggregate local models (mutation + delta)."""
        if self._previous is not None:
            self._step = {n: (w - self._previous[n]).astype(np.float32) for n, w in global_weights.items()
                          if n in self._previous and not is_statistic(n)}
        self._previous = {n: np.array(w, np.float32) for n, w in global_weights.items()}
        return _MutatedUpdates(super().start_aggregation(global_weights), self, self._round)

    def metrics(self) -> dict[str, float]:
        """The mutation radius, the current sign bias and the size of the global step."""
        norm = float(np.sqrt(sum(float(np.vdot(d, d)) for d in self._step.values()))) if self._step else 0.0
        return {"fedmut_alpha": self.alpha, "fedmut_bias": self.bias_at(self._round), "fedmut_step_norm": norm}


class _MutatedUpdates:
    """Adds each device's mutation (on the block it trained) to its delta before the inner accumulator."""

    def __init__(self, inner: Accumulator, strategy: FedMut, round_number: int) -> None:
        self._inner, self._strategy, self._round = inner, strategy, round_number

    @property
    def count(self) -> int:
        return self._inner.count

    def add(self, update: ClientUpdate) -> None:
        """Fold (mutation + delta) into the inner accumulator."""
        mutation = self._strategy.mutation(self._round, self._strategy.variant_of(update.device_id))
        if mutation:
            delta = {name: np.asarray(d, np.float32) + mutation[name][leading_slices(np.shape(d))] if name in mutation
                     else d for name, d in update.delta.items()}
            update = replace(update, delta=delta)
        self._inner.add(update)

    def result(self) -> Weights:
        """The inner accumulator's new global weights."""
        return self._inner.result()
