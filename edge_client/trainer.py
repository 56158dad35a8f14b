"""Local training on the device with the ONNX Runtime training API.

One `OrtTrainer` holds the training session of one tier's artifacts. Each round the task's
weights are loaded by name (no artifact regeneration), E epochs of mini-batches run, and the
caller reads the new weights back to form the update (new minus start).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime

from models.data import Dataset, batches
from models.manifest import TierManifest
from models.ort_training import load_training_api
from models.spec import CLASS_MASK_NAME, GLOBAL_SUFFIX, INPUT_NAME, MU_NAME, SCALE_NAME

MASKED_LOGIT = -1e4  # added to a masked class's logit: exp() underflows to 0, the loss stays finite


@dataclass(frozen=True)
class TrainStats:
    """What one call to `train` did."""

    steps: int
    samples_seen: int
    loss: float
    accuracy: float
    seconds: float


@dataclass(frozen=True)
class EvalStats:
    """Loss and accuracy of the current weights on a dataset."""

    loss: float
    accuracy: float
    samples: int


def run_epochs(
    data: Dataset, epochs: int, batch_size: int, seed: int, step: Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]],
    stop_at: float | None = None, max_steps: int | None = None,
) -> TrainStats:
    """Feed `epochs` passes of shuffled mini-batches to `step` (one training step: loss, logits) and tally them.

    With `stop_at` (unix time) training ends early when that time comes: partial work, whose
    step count the stats report (at least one step is always taken). `max_steps` ends it after
    that many steps.
    """
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    steps = seen = correct = 0
    loss_sum = 0.0
    for _ in range(epochs):
        for x, y in batches(data, batch_size, rng):
            if (stop_at is not None and steps and time.time() >= stop_at) or (max_steps is not None and steps >= max_steps):
                break
            loss, logits = step(x, y)
            steps += 1
            seen += len(y)
            loss_sum += loss * len(y)
            correct += int((logits.argmax(axis=1) == y).sum())
    return TrainStats(steps=steps, samples_seen=seen, loss=loss_sum / max(seen, 1),
                      accuracy=correct / max(seen, 1), seconds=time.perf_counter() - start)


def check_weights(weights: Mapping[str, np.ndarray], manifest: TierManifest) -> None:
    """Raise ValueError unless `weights` has exactly the tier's parameter names and shapes."""
    shapes = {p.name: tuple(p.shape) for p in manifest.params}
    if set(weights) != set(shapes):
        missing, extra = set(shapes) - set(weights), set(weights) - set(shapes)
        raise ValueError(f"weights do not match tier {manifest.tier}: missing {sorted(missing)}, extra {sorted(extra)}")
    for name, value in weights.items():
        if tuple(value.shape) != shapes[name]:
            raise ValueError(f"{name}: shape {tuple(value.shape)}, tier {manifest.tier} expects {shapes[name]}")


def class_mask_for(data: Dataset, num_classes: int, mask_classes: bool, logit_adjust: float = 0.0) -> np.ndarray:
    """What training adds to the logits: 0 for every class; with `mask_classes`, MASKED_LOGIT for the classes absent
    from `data`; with `logit_adjust` tau > 0, tau * log of each class's share of `data` (logit adjustment, Menon et
    al. 2021: the loss sees the local label prior, so the weights learn the class-balanced logits), absent classes
    masked as well."""
    counts = np.bincount(data.y, minlength=num_classes)[:num_classes]
    if logit_adjust > 0 and counts.sum() > 0:
        shares = counts / counts.sum()
        return np.where(counts > 0, logit_adjust * np.log(np.maximum(shares, 1e-30)), MASKED_LOGIT).astype(np.float32)
    if not mask_classes:
        return np.zeros(num_classes, np.float32)
    return np.where(counts > 0, 0.0, MASKED_LOGIT).astype(np.float32)


def step_shifts(correction: Mapping[str, np.ndarray] | None, learning_rate: float) -> dict[str, np.ndarray]:
    """What each SGD step subtracts beside its gradient step: learning_rate * correction (none without one)."""
    return {name: np.ascontiguousarray(np.float32(learning_rate) * np.asarray(value, np.float32))
            for name, value in (correction or {}).items()}


class Trainer(Protocol):
    """What the agent needs from any training backend."""

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None: ...
    def get_weights(self) -> dict[str, np.ndarray]: ...
    def train(
        self, data: Dataset, epochs: int, batch_size: int, learning_rate: float, seed: int, mask_classes: bool = False,
        *, proximal_mu: float = 0.0, stop_at: float | None = None, max_steps: int | None = None,
        correction: Mapping[str, np.ndarray] | None = None, logit_adjust: float = 0.0,
    ) -> TrainStats: ...
    def evaluate(self, data: Dataset, batch_size: int = 512) -> EvalStats: ...


class OrtTrainer:
    """Trainer backed by onnxruntime-training's Module/Optimizer on one tier's artifacts."""

    backend = "ort-training"

    def __init__(self, tier_dir: Path, manifest: TierManifest, threads: int = 1) -> None:
        ort_api = load_training_api().api
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # ORT warns on every optimizer graph load (harmless shape merge)
        self.manifest = manifest
        self._shapes = {p.name: tuple(p.shape) for p in manifest.params}
        self._state = ort_api.CheckpointState.load_checkpoint(str(tier_dir / "checkpoint"))
        self._module = ort_api.Module(
            str(tier_dir / "training_model.onnx"), self._state, str(tier_dir / "eval_model.onnx"), session_options=options
        )
        self._optimizer = ort_api.Optimizer(str(tier_dir / "optimizer_model.onnx"), self._module)
        self._parameters = self._state.parameters
        self._input_names = list(self._module.input_names())  # input, [scale], [class_mask], labels, [mu, globals]
        self._no_mask = np.zeros(manifest.model.num_classes, np.float32)
        self._global: dict[str, np.ndarray] = {}  # FedProx's w_global: the weights of the last set_weights

    def _run(self, x: np.ndarray, y: np.ndarray, scale: float, class_mask: np.ndarray, mu: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """One call of the current (train or eval) graph: (loss, logits)."""
        feeds = {INPUT_NAME: x, SCALE_NAME: np.array([scale], np.float32), CLASS_MASK_NAME: class_mask, "labels": y,
                 MU_NAME: np.array([mu], np.float32), **self._global}
        return self._module(*(feeds[name] for name in self._input_names))

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load weights by name; names and shapes must match the manifest exactly."""
        check_weights(weights, self.manifest)
        for name, value in weights.items():
            self._parameters[name].data = np.ascontiguousarray(value, dtype=np.float32)
        self._global = {n + GLOBAL_SUFFIX: np.array(v, np.float32) for n, v in weights.items()
                        if n + GLOBAL_SUFFIX in self._input_names}

    def get_weights(self) -> dict[str, np.ndarray]:
        """A copy of every parameter, by name."""
        return {name: np.array(self._parameters[name].data, dtype=np.float32) for name in self._shapes}

    def train(
        self, data: Dataset, epochs: int, batch_size: int, learning_rate: float, seed: int, mask_classes: bool = False,
        *, proximal_mu: float = 0.0, stop_at: float | None = None, max_steps: int | None = None,
        correction: Mapping[str, np.ndarray] | None = None, logit_adjust: float = 0.0,
    ) -> TrainStats:
        """Run `epochs` passes of shuffled mini-batches of SGD at `learning_rate` (at most `max_steps` steps).

        `mask_classes` leaves the classes absent from `data` out of the softmax (label-split
        non-IID), when the artifacts have a class mask input; `logit_adjust` > 0 adds that multiple of the log
        label shares of `data` to the logits in the loss (see class_mask_for). `proximal_mu` > 0 adds FedProx's
        mu/2 ||w - w_global||^2 (w_global: the weights of the last set_weights); it needs
        artifacts exported with the proximal term. `stop_at` ends training early (partial work).
        `correction` (SCAFFOLD's c - c_i, by trainable parameter) makes every step use g + correction: after
        each optimizer step w <- w - learning_rate * correction, exact for plain SGD.
        """
        if proximal_mu and MU_NAME not in self._input_names:
            raise ValueError(f"tier {self.manifest.tier}: these artifacts have no FedProx term; export them with proximal")
        if (mask_classes or logit_adjust) and CLASS_MASK_NAME not in self._input_names:
            raise ValueError(f"tier {self.manifest.tier}: these artifacts have no class mask input; re-export them")
        class_mask = class_mask_for(data, len(self._no_mask), mask_classes, logit_adjust)
        self._optimizer.set_learning_rate(learning_rate)
        self._module.train()

        shifts = step_shifts(correction, learning_rate)
        parameters = [(self._parameters[name], shift) for name, shift in shifts.items()]

        def step(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
            loss, logits = self._run(x, y, 1.0 / self.manifest.rate, class_mask, proximal_mu)
            self._optimizer.step()
            self._module.lazy_reset_grad()
            for parameter, shift in parameters:  # SCAFFOLD: the step's g - c_i + c
                value = parameter.data  # on the CPU a view of the parameter's buffer: changed in place, no copy
                np.subtract(value, shift, out=value)
            return float(loss), logits

        return run_epochs(data, epochs, batch_size, seed, step, stop_at, max_steps)

    def evaluate(self, data: Dataset, batch_size: int = 512) -> EvalStats:
        """Mean loss and accuracy over `data` with the eval graph (no weight change)."""
        self._module.eval()
        loss_sum, correct = 0.0, 0
        for i in range(0, len(data), batch_size):
            x, y = data.x[i : i + batch_size], data.y[i : i + batch_size]
            loss, logits = self._run(x, y, 1.0, self._no_mask)
            loss_sum += float(loss) * len(y)
            correct += int((logits.argmax(axis=1) == y).sum())
        n = len(data)
        return EvalStats(loss=loss_sum / max(n, 1), accuracy=correct / max(n, 1), samples=n)
