"""The portable training backend: one step graph of standard ONNX operators on plain onnxruntime.

`step_model.onnx` maps (parameters, optimizer state, batch, labels, learning rate) to (loss,
logits, new parameters, new state); `forward.onnx` is the plain forward pass with parameters as
inputs, for evaluation. Parameters and optimizer state live in two sets of OrtValues, A and B,
and two IO bindings are made once: one reads A and writes B, the other reads B and writes A.
Steps alternate between them, so a step binds only its batch and copies no weights at all.
Runs on any onnxruntime, including aarch64 and Python 3.13 wheels.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime

from edge_client.trainer import EvalStats, TrainStats, check_weights, class_mask_for, run_epochs, step_shifts
from models.data import Dataset
from models.manifest import FORWARD_FILE, STEP_FILE, TierManifest
from models.scoring import score_logits
from models.spec import CLASS_MASK_NAME, GLOBAL_SUFFIX, INPUT_NAME, MU_NAME, SCALE_NAME

_NEW = ".new"


def _ort(array: np.ndarray) -> onnxruntime.OrtValue:
    return onnxruntime.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


class PortableTrainer:
    """Trainer on plain onnxruntime: same interface as OrtTrainer."""

    backend = "portable"

    def __init__(self, tier_dir: Path, manifest: TierManifest, threads: int = 1) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.manifest = manifest
        self._step = onnxruntime.InferenceSession(str(tier_dir / STEP_FILE), options, providers=providers)
        self._forward = onnxruntime.InferenceSession(str(tier_dir / FORWARD_FILE), options, providers=providers)
        self._shapes = {p.name: tuple(p.shape) for p in manifest.params}
        # Everything the step both reads and rewrites: parameters, running statistics, optimizer state.
        outputs = {o.name for o in self._step.get_outputs()}
        self._carried = [i.name for i in self._step.get_inputs() if i.name + _NEW in outputs]
        # numpy arrays the OrtValues share their memory with (CPU): SCAFFOLD's correction is applied to them in place
        self._arrays = [{name: np.zeros(self._carried_shape(name), np.float32) for name in self._carried} for _ in "AB"]
        buffers = [{name: _ort(arrays[name]) for name in self._carried} for arrays in self._arrays]
        self._buffers = buffers
        self._bindings = [self._step.io_binding(), self._step.io_binding()]
        for binding, (read, write) in zip(self._bindings, [(buffers[0], buffers[1]), (buffers[1], buffers[0])]):
            for name in self._carried:
                binding.bind_ortvalue_input(name, read[name])
                binding.bind_ortvalue_output(name + _NEW, write[name])
        self._current = 0  # buffers[_current] hold the weights; bindings[_current] reads them
        self._loss_shape = tuple(next(o.shape for o in self._step.get_outputs() if o.name == "loss"))
        self._outputs: dict[int, tuple[onnxruntime.OrtValue, onnxruntime.OrtValue]] = {}  # batch size -> loss, logits
        self._no_mask = np.zeros(manifest.model.num_classes, np.float32)
        self._global: dict[str, np.ndarray] = {}
        self._bound: dict[str, np.ndarray] = {}  # numpy buffers bound on the CPU (onnxruntime borrows them)

    def _carried_shape(self, name: str) -> tuple[int, ...]:
        if name in self._shapes:
            return self._shapes[name]
        shape = next(i.shape for i in self._step.get_inputs() if i.name == name)
        if not all(isinstance(d, int) for d in shape):
            raise ValueError(f"step graph input {name!r} has a symbolic shape {shape}; state must be static")
        return tuple(shape)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load weights by name; names and shapes must match the manifest exactly."""
        check_weights(weights, self.manifest)
        for name, value in weights.items():
            self._values[name].update_inplace(np.ascontiguousarray(value, dtype=np.float32))
        self._global = {n + GLOBAL_SUFFIX: np.array(v, np.float32) for n, v in weights.items()}  # FedProx's w_global

    def get_weights(self) -> dict[str, np.ndarray]:
        """A copy of every parameter, by name."""
        return {name: self._values[name].numpy().copy() for name in self._shapes}

    def train(
        self, data: Dataset, epochs: int, batch_size: int, learning_rate: float, seed: int, mask_classes: bool = False,
        *, proximal_mu: float = 0.0, stop_at: float | None = None, max_steps: int | None = None,
        correction: Mapping[str, np.ndarray] | None = None, logit_adjust: float = 0.0,
    ) -> TrainStats:
        """Run `epochs` passes of shuffled mini-batches through the step graph (options as OrtTrainer.train; the
        SCAFFOLD `correction` is subtracted in place from the buffers the step just wrote)."""
        inputs = {i.name for i in self._step.get_inputs()}
        if (mask_classes or logit_adjust) and CLASS_MASK_NAME not in inputs:
            raise ValueError(f"tier {self.manifest.tier}: the step graph has no class mask input; re-export it")
        if proximal_mu and MU_NAME not in inputs:
            raise ValueError(f"tier {self.manifest.tier}: the step graph has no FedProx term; export it with proximal")
        class_mask = class_mask_for(data, len(self._no_mask), mask_classes, logit_adjust)
        constants = {"learning_rate": np.array([learning_rate], np.float32), "momentum": np.zeros(1, np.float32),
                     SCALE_NAME: np.array([1.0 / self.manifest.rate], np.float32), CLASS_MASK_NAME: class_mask,
                     MU_NAME: np.array([proximal_mu], np.float32), **self._global}
        self._bound = {name: np.ascontiguousarray(value) for name, value in constants.items() if name in inputs}
        for name, value in self._bound.items():
            for binding in self._bindings:
                binding.bind_cpu_input(name, value)
        shifts = step_shifts(correction, learning_rate)
        if not shifts:
            return run_epochs(data, epochs, batch_size, seed, self._run_step, stop_at, max_steps)
        corrected = [[(arrays[name], shift) for name, shift in shifts.items()] for arrays in self._arrays]

        def step(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
            result = self._run_step(x, y)
            for array, shift in corrected[self._current]:  # SCAFFOLD: the step's g - c_i + c
                np.subtract(array, shift, out=array)
            return result

        return run_epochs(data, epochs, batch_size, seed, step, stop_at, max_steps)

    @property
    def _values(self) -> dict[str, onnxruntime.OrtValue]:
        return self._buffers[self._current]

    def _run_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """One step: bind the batch, run the binding that reads the current buffers, flip to the other."""
        binding = self._bindings[self._current]
        binding.bind_cpu_input(INPUT_NAME, np.ascontiguousarray(x, dtype=np.float32))
        binding.bind_cpu_input("labels", np.ascontiguousarray(y, dtype=np.int64))
        loss, logits = self._outputs_for(len(y))
        binding.bind_ortvalue_output("loss", loss)
        binding.bind_ortvalue_output("logits", logits)
        self._step.run_with_iobinding(binding)
        self._current = 1 - self._current
        return float(loss.numpy().reshape(-1)[0]), logits.numpy()

    def _outputs_for(self, batch: int) -> tuple[onnxruntime.OrtValue, onnxruntime.OrtValue]:
        """Loss and logits buffers for a batch size (reading our own OrtValues beats binding.get_outputs)."""
        if batch not in self._outputs:
            self._outputs[batch] = (onnxruntime.OrtValue.ortvalue_from_numpy(np.zeros(self._loss_shape, np.float32)),
                                    _ort(np.zeros((batch, self.manifest.model.num_classes), np.float32)))
        return self._outputs[batch]

    def evaluate(self, data: Dataset, batch_size: int = 512) -> EvalStats:
        """Mean loss and accuracy over `data` with the forward graph (no weight change)."""
        weights = {name: self._values[name] for name in self._shapes}
        loss_sum, correct = 0.0, 0
        for i in range(0, len(data), batch_size):
            x, y = data.x[i : i + batch_size], data.y[i : i + batch_size]
            (logits,) = self._forward.run_with_ort_values(None, {INPUT_NAME: _ort(x), **weights})
            batch_loss, batch_correct = score_logits(logits.numpy(), y)
            loss_sum += batch_loss
            correct += batch_correct
        n = len(data)
        return EvalStats(loss=loss_sum / max(n, 1), accuracy=correct / max(n, 1), samples=n)
