"""Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): the round's mean update
as a pseudo-gradient, applied with SGD, momentum (FedAvgM), Adam, Yogi or Adagrad.

With x the global weights and Delta = (the round's aggregate - x), per element:

    sgd       x + lr Delta
    momentum  m = beta1 m + Delta;                              x + lr m
    adam      m = beta1 m + (1 - beta1) Delta;  v = beta2 v + (1 - beta2) Delta^2;          x + lr m / (sqrt(v) + tau)
    yogi      m as adam;  v = v - (1 - beta2) Delta^2 sign(v - Delta^2);                   x + lr m / (sqrt(v) + tau)
    adagrad   m as adam;  v = v + Delta^2;                                                x + lr m / (sqrt(v) + tau)

v starts at tau^2, m at 0 (the paper's initialisation, no bias correction). HeteroFL: an element no
update of the round held (its tier was not trained) gets no step and keeps its moments. Batch-norm
running statistics are not gradients: they take the aggregate's value. The state (m, v) is plain
numpy, committed with each version and loaded again after a restart, so a restarted run makes the
same next version as one that never stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.strategies.bn_statistics import is_statistic
from protocol.blocks import leading_slices

SERVER_OPTIMIZERS = ("fedavg", "sgd", "momentum", "adam", "yogi", "adagrad")  # fedavg: no server optimizer
ADAPTIVE = ("adam", "yogi", "adagrad")
Weights = dict[str, np.ndarray]
State = dict[str, np.ndarray]  # "m/<tensor>", "v/<tensor>"
STATE_PREFIX = "server_optimizer/"  # how the state's arrays are named beside the weights in a version's file


@dataclass(frozen=True)
class ServerOptimizer:
    """One server optimizer and its hyper-parameters."""

    kind: str
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS[1:]:
            raise ValueError(f"unknown server optimizer {self.kind!r} (expected one of {', '.join(SERVER_OPTIMIZERS)})")
        if not self.lr > 0:
            raise ValueError(f"--server-lr must be > 0, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"--server-beta1 and --server-beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.tau > 0:
            raise ValueError(f"--server-tau must be > 0, got {self.tau}")

    def step(self, weights: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray],
             touched: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> tuple[Weights, State]:
        """The next global weights and optimizer state (the inputs are not changed).

        `touched[name]` is a boolean mask of the elements some update of the round held."""
        new_weights: Weights = {}
        new_state: State = dict(state)
        for name, x in weights.items():
            if is_statistic(name):
                new_weights[name] = np.asarray(aggregate[name], np.float32)
                continue
            mask = touched[name]
            delta = np.where(mask, np.asarray(aggregate[name], np.float32) - x, np.float32(0))
            step = self._step(name, delta, mask, state, new_state)
            new_weights[name] = np.where(mask, x + np.float32(self.lr) * step, x).astype(np.float32)
        return new_weights, new_state

    def _step(self, name: str, delta: np.ndarray, mask: np.ndarray, state: Mapping[str, np.ndarray],
              new_state: State) -> np.ndarray:
        if self.kind == "sgd":
            return delta
        m = state.get(f"m/{name}", np.zeros_like(delta))
        if self.kind == "momentum":
            m = np.where(mask, np.float32(self.beta1) * m + delta, m)
            new_state[f"m/{name}"] = m.astype(np.float32)
            return m
        m = np.where(mask, np.float32(self.beta1) * m + np.float32(1 - self.beta1) * delta, m)
        v = state.get(f"v/{name}", np.full_like(delta, np.float32(self.tau**2)))
        square = delta * delta
        if self.kind == "adam":
            updated = np.float32(self.beta2) * v + np.float32(1 - self.beta2) * square
        elif self.kind == "yogi":
            updated = v - np.float32(1 - self.beta2) * square * np.sign(v - square)
        else:  # adagrad
            updated = v + square
        v = np.where(mask, updated, v)
        new_state[f"m/{name}"], new_state[f"v/{name}"] = m.astype(np.float32), v.astype(np.float32)
        return m / (np.sqrt(v) + np.float32(self.tau))


def touched_mask(global_shapes: Mapping[str, tuple[int, ...]], blocks: list[Mapping[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """Per tensor, the elements inside the leading block of at least one of `blocks` (the tiers that answered)."""
    masks = {name: np.zeros(shape, bool) for name, shape in global_shapes.items()}
    for shapes in blocks:
        for name, block in shapes.items():
            if name in masks:
                masks[name][leading_slices(block)] = True
    return masks


def split_state(stored: Mapping[str, np.ndarray]) -> tuple[Weights, State]:
    """A version's file as (global weights, optimizer state)."""
    weights = {n: a for n, a in stored.items() if not n.startswith(STATE_PREFIX)}
    state = {n[len(STATE_PREFIX):]: a for n, a in stored.items() if n.startswith(STATE_PREFIX)}
    return weights, state


def with_state(weights: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> Weights:
    """What a version's file holds: the global weights and the optimizer state beside them."""
    return {**weights, **{STATE_PREFIX + n: a for n, a in state.items()}}
