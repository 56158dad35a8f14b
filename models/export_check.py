"""The export's own check of a tier: one step on both backends agrees, and agrees with finite differences.

Run on the staged files of every tier before its manifest is written: a seeded batch of inputs in
[0, 1) and labels 0, 1, 2, ... goes through one plain-SGD step of the onnxruntime-training
artifacts and one of the portable step graph, from the tier's initial weights. The updates must
agree within 1e-3 of the largest update (2e-2 for AdamW; measured 1e-8 to 1e-6 on the zoo), and
the portable step's gradient must agree with central finite differences of its loss along a few
random directions through the output layer's parameters (within 1e-2; measured 1e-4 to 1.5e-3).
Only there: upstream, at float32 and a batch's thousands of ReLU kinks, differences of the loss
stray 5-15% from any gradient (measured on a ResNet at steps 1e-2 to 1e-4), while two independent
gradients (onnxruntime-training's and ours) agreeing checks the whole graph. A failure names the
tier, the parameter and both numbers: that tier cannot be trained correctly, so nothing is published.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from models.manifest import STEP_FILE
from models.ort_training import TrainingAPI, captured_native_stderr
from models.spec import CLASS_MASK_NAME, GLOBAL_SUFFIX, INPUT_NAME, MU_NAME, OUTPUT_NAME, SCALE_NAME
from models.step_graph import step_graph_io
from models.tier_graph import initializer_arrays

log = logging.getLogger(__name__)

BATCH = 8
LEARNING_RATE = 1.0  # the update is then the gradient itself
UPDATE_TOLERANCE = {"sgd": 1e-3, "adamw": 2e-2}  # of the largest update, plus 1e-6: float32 sums in another order
# (AdamW's first step is about lr * sign(g): where |g| is near its epsilon, 1e-9 apart in g moves it visibly)
FD_EPSILON = 1e-2  # length of the step along a random unit direction (float32 losses need it this long)
FD_DIRECTIONS = 3
FD_TOLERANCE = 0.01


class ExportCheckFailed(RuntimeError):
    """A tier's two backends, or its gradient and finite differences, disagree."""


@dataclasses.dataclass(frozen=True)
class StepCheck:
    """What the check measured: the largest backend difference and the worst finite-difference error."""

    backend_difference: float
    largest_update: float
    finite_difference_error: float


def _batch(input_shape: Sequence[int], classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded batch: inputs in [0, 1), labels cycling through the classes."""
    rng = np.random.default_rng(0)
    return rng.random((BATCH, *input_shape), np.float32), np.arange(BATCH, dtype=np.int64) % classes


def _extra_feeds(names: Sequence[str], weights: Mapping[str, np.ndarray], rate: float, classes: int) -> dict[str, np.ndarray]:
    """Class mask (none masked), scaler 1/rate, FedProx mu 0 with w_global = w, where the graph takes them."""
    feeds = {CLASS_MASK_NAME: np.zeros(classes, np.float32), SCALE_NAME: np.array([1.0 / rate], np.float32),
             MU_NAME: np.zeros(1, np.float32), **{n + GLOBAL_SUFFIX: w for n, w in weights.items()}}
    return {n: feeds[n] for n in names if n in feeds}


def _ort_training_step(stage: Path, training: TrainingAPI, x: np.ndarray, y: np.ndarray, rate: float,
                       classes: int) -> dict[str, np.ndarray]:
    """Trainable weights after one onnxruntime-training SGD step from the checkpoint's weights."""
    api = training.api
    with captured_native_stderr(log):
        state = api.CheckpointState.load_checkpoint(str(stage / "checkpoint"))
        module = api.Module(str(stage / "training_model.onnx"), state, str(stage / "eval_model.onnx"))
        optimizer = api.Optimizer(str(stage / "optimizer_model.onnx"), module)
    weights = {name: np.array(p.data) for name, p in state.parameters}
    feeds = {INPUT_NAME: x, "labels": y, **_extra_feeds(list(module.input_names()), weights, rate, classes)}
    optimizer.set_learning_rate(LEARNING_RATE)
    module.train()
    module(*(feeds[name] for name in module.input_names()))
    optimizer.step()
    return {name: np.array(p.data) for name, p in state.parameters if p.requires_grad}


class _PortableStep:
    """The portable step graph run from given weights and a fresh optimizer state."""

    def __init__(self, stage: Path, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, rate: float,
                 classes: int) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        graph = onnx.load(str(stage / STEP_FILE))
        self.session = onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        params = {n: w for n, w in weights.items() if n in names}
        self.feeds = {INPUT_NAME: x, "labels": y, "learning_rate": np.array([LEARNING_RATE], np.float32),
                      **_extra_feeds(names, params, rate, classes), **params,
                      **step_graph_io(graph).initial_optimizer_state()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, **changed: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of one step, with some inputs replaced."""
        return dict(zip(self.outputs, self.session.run(None, {**self.feeds, **changed})))


def check_tier(stage: Path, training: TrainingAPI, trainable: Sequence[str], input_shape: Sequence[int], classes: int,
               rate: float, optimizer: str = "sgd") -> StepCheck:
    """Check a staged tier (ExportCheckFailed says what disagrees); returns the measured differences.

    With AdamW the update is not the gradient, so only the two backends' steps are compared.
    """
    inference = onnx.load(str(stage / "inference.onnx"))
    weights = initializer_arrays(inference)
    x, y = _batch(input_shape, classes)
    ours = _ort_training_step(stage, training, x, y, rate, classes)
    step = _PortableStep(stage, weights, x, y, rate, classes)
    outputs = step.run()
    largest = max(float(np.abs(weights[n] - ours[n]).max()) for n in trainable)
    head = [n for n in _output_layer(inference) if n in trainable]
    difference = 0.0
    for name in trainable:
        gap = float(np.abs(outputs[name + ".new"] - ours[name]).max())
        difference = max(difference, gap)
        if gap > UPDATE_TOLERANCE[optimizer] * largest + 1e-6:
            raise ExportCheckFailed(f"tier at rate {rate:g}: one {optimizer} step of {name} differs by {gap:.3g} "
                                    f"between onnxruntime-training and the portable step (largest update {largest:.3g})")
    agreement = _finite_differences(step, weights, outputs, head, rate) if optimizer == "sgd" else float("nan")
    return StepCheck(difference, largest, agreement)


def _output_layer(forward: onnx.ModelProto) -> list[str]:
    """The inputs of the node writing the logits, and of its producers while that is a bias Add."""
    producers = {o: node for node in forward.graph.node for o in node.output}
    names, node = [], producers.get(OUTPUT_NAME)
    while node is not None:
        names += list(node.input)
        node = producers.get(node.input[0]) if node.op_type == "Add" else None
    return names


def _finite_differences(step: _PortableStep, weights: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                        trainable: Sequence[str], rate: float) -> float:
    """Worst relative error of the step's gradient along random directions against central differences of its loss."""
    rng = np.random.default_rng(1)
    gradient = {n: (weights[n].astype(np.float64) - outputs[n + ".new"]) / LEARNING_RATE for n in trainable}
    if not trainable:
        return 0.0
    errors = []
    for _ in range(FD_DIRECTIONS):
        direction = {n: rng.standard_normal(weights[n].shape) for n in trainable}
        norm = np.sqrt(sum(float(np.sum(d * d)) for d in direction.values()))
        direction = {n: d / norm for n, d in direction.items()}  # a unit step: the head's curvature stays out of it
        analytic = sum(float(np.sum(gradient[n] * direction[n])) for n in trainable)
        losses = []
        for sign in (1.0, -1.0):
            moved = {n: (weights[n] + sign * FD_EPSILON * direction[n]).astype(np.float32) for n in trainable}
            losses.append(float(np.asarray(step.run(**moved)["loss"]).reshape(-1)[0]))
        numeric = (losses[0] - losses[1]) / (2 * FD_EPSILON)
        errors.append(abs(analytic - numeric) / max(abs(numeric), abs(analytic), 1e-2))
    if max(errors) > FD_TOLERANCE:
        raise ExportCheckFailed(f"tier at rate {rate:g}: the portable step's gradient disagrees with finite "
                                f"differences of its loss (relative errors {', '.join(f'{e:.2g}' for e in errors)})")
    return max(errors)
