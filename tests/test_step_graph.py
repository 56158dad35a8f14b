"""Portable training-step graphs of the zoo: standard ONNX only, equal to onnxruntime-training, correct gradients.

tests/test_step_graph_ops.py covers forward graphs of every other operator a user's model may hold.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from models import autodiff
from models.data import load_digits
from models.ort_training import captured_native_stderr, load_training_api
from models.step_graph import StepGraphIO, build_step_graph, step_graph_io
from models.tiers import tier_rate
from models.zoo import ModelSpec
from tests.tiers import zoo_plan, zoo_tier, zoo_weights

ZOO = [ModelSpec(arch=a, image_size=s, batch_norm=bn) for a in ("mlp", "cnn") for s in (8, 28) for bn in (False, True)]
MLP8, CNN8 = ModelSpec(arch="mlp"), ModelSpec(arch="cnn")
MLP8_BN, CNN8_BN = ModelSpec(arch="mlp", batch_norm=True), ModelSpec(arch="cnn", batch_norm=True)
SMALL_MLP_BN = ModelSpec(arch="mlp", hidden=(8,), batch_norm=True)
SMALL_CNN_BN = ModelSpec(arch="cnn", hidden=(4, 4, 8), batch_norm=True)


def _forward(spec: ModelSpec, rate: float, scaler: bool = False, class_mask: bool = False) -> onnx.ModelProto:
    """The zoo's tier forward graph at `rate`, parameters as inputs (what build_step_graph takes)."""
    return zoo_tier(spec, rate, class_mask=class_mask, scaler=scaler, params_as_inputs=True)


def _step_graph(
    spec: ModelSpec, rate: float, scaler: bool = False, class_mask: bool = False, **options: object
) -> onnx.ModelProto:
    """build_step_graph of the zoo's forward graph at `rate`."""
    forward, plan = _forward(spec, rate, scaler, class_mask), zoo_plan(spec)
    return build_step_graph(forward, plan.trainable, plan.frozen, **options)  # type: ignore[arg-type]


class Stepper:
    """A zoo model's step graph in a 1-thread onnxruntime InferenceSession, run with named feeds."""

    def __init__(self, spec: ModelSpec, rate: float, **options: object) -> None:
        model = _step_graph(spec, rate, **options)  # type: ignore[arg-type]
        self.io: StepGraphIO = step_graph_io(model)
        settings = ort.SessionOptions()
        settings.intra_op_num_threads = settings.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), settings)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(list(self.io.outputs), {n: feeds[n] for n in self.io.inputs})
        return dict(zip(self.io.outputs, values))


def _weights(spec: ModelSpec, rate: float, seed: int = 0) -> dict[str, np.ndarray]:
    """The tier's initial weights, perturbed so BN's gamma/beta and running stats are not trivial."""
    rng = np.random.default_rng(seed)
    noisy = {n: w + rng.normal(0, 0.1, w.shape) for n, w in zoo_weights(spec, rate).items()}
    noisy |= {n: np.abs(w) + 0.5 for n, w in noisy.items() if n.endswith("running_var")}
    return {n: w.astype(np.float32) for n, w in noisy.items()}


def _batch(spec: ModelSpec, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    size = spec.image_size
    return rng.random((n, 1, size, size), dtype=np.float32), rng.integers(0, spec.num_classes, n)


def _feeds(
    io: StepGraphIO, spec: ModelSpec, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, **extra: object
) -> dict[str, np.ndarray]:
    """Every input of `io`: the batch, lr 0.1, momentum 0, scale 1, no mask, zero state unless in `weights`, then `extra`."""
    one = lambda v: np.array([v], np.float32)  # noqa: E731
    feeds = {"input": x, "labels": y, "learning_rate": one(0.1), "momentum": one(0.0), "scale": one(1.0), "mu": one(0.0)}
    feeds |= {"class_mask": np.zeros(spec.num_classes, np.float32), **io.initial_optimizer_state(), **weights}
    feeds |= {p + ".global": weights[p] for p in io.trainable}
    feeds |= {k: one(v) if isinstance(v, float) else v for k, v in extra.items()}
    return feeds


@pytest.mark.parametrize("spec", ZOO, ids=lambda s: s.name)
def test_every_step_graph_is_standard_onnx(spec: ModelSpec):
    for tier in ("a", "e"):
        for optimizer in ("sgd", "adamw"):
            for scaler in (False, True) if spec.batch_norm else (False,):
                model = _step_graph(spec, tier_rate(tier), scaler, class_mask=True, optimizer=optimizer)
                assert {node.domain for node in model.graph.node} == {""}
                assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)] and model.ir_version == 10
                onnx.checker.check_model(model, full_check=True)
                io = step_graph_io(model)
                plan = zoo_plan(spec)
                assert set(io.trainable) == set(plan.trainable) and set(io.running_stats) == set(plan.frozen)
                assert set(io.updates.values()) == set(io.outputs) - {"loss", "logits"}


def test_names_follow_the_contract():
    model = _step_graph(MLP8_BN, 1.0, scaler=True, class_mask=True, optimizer="adamw", proximal=True, with_gradients=True)
    io = step_graph_io(model)
    assert io.inputs[:7] == ("input", "scale", "class_mask", "labels", "learning_rate", "mu", "fc1.weight")
    assert {"bn1.running_mean", "fc1.weight.exp_avg", "fc1.weight.exp_avg_sq", "step", "fc1.weight.global"} <= set(io.inputs)
    assert io.outputs[:2] == ("loss", "logits")
    assert {"fc1.weight.new", "bn2.running_var.new", "fc3.bias.exp_avg_sq.new", "step.new"} <= set(io.outputs)
    assert io.state_shapes["step"] == (1,) and io.state_shapes["fc1.weight.exp_avg"] == (256, 64)
    assert io.gradients["fc1.weight"] == "fc1.weight.grad"
    assert io.running_stats == ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var")
    sgd = step_graph_io(_step_graph(MLP8, 1.0))
    assert sgd.inputs[:4] == ("input", "labels", "learning_rate", "momentum")
    assert sgd.updates["fc1.weight.momentum"] == "fc1.weight.momentum.new" and not sgd.gradients
    assert sgd.initial_optimizer_state()["fc2.bias.momentum"].shape == (256,)
    with pytest.raises(ValueError, match="unknown optimizer"):
        _step_graph(MLP8, 1.0, optimizer="adam")
    with pytest.raises(ValueError, match="AdamW only"):
        _step_graph(MLP8, 1.0, optimizer="sgd", weight_decay=0.01)


def test_shapes_come_from_the_forward_graph():
    """Every declared shape is the forward's: parameters, their state and gradients, the batch symbol of data and labels."""
    forward = _forward(CNN8_BN, 0.5, scaler=True, class_mask=True)
    for value in (forward.graph.input[0], forward.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    plan = zoo_plan(CNN8_BN)
    model = build_step_graph(forward, plan.trainable, plan.frozen, "adamw", with_gradients=True)
    declared = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in (*model.graph.input, *model.graph.output)}
    shapes = plan.param_shapes(0.5)
    for name, shape in shapes.items():
        assert declared[name] == declared[f"{name}.new"] == list(shape), name
    assert declared["conv1.weight.exp_avg"] == declared["conv1.weight.grad"] == list(shapes["conv1.weight"])
    assert shapes["conv1.weight"] == (16, 1, 3, 3)  # half of cnn8's 32 channels
    assert declared["input"] == ["batch", 1, 8, 8] and declared["labels"] == ["batch"] and declared["logits"] == ["batch", 10]
    assert declared["scale"] == [1] and declared["class_mask"] == [10] and declared["loss"] == []


def test_forward_graphs_the_step_cannot_take_are_refused(monkeypatch: pytest.MonkeyPatch):
    plan = zoo_plan(MLP8_BN)
    trainable, frozen = plan.trainable, plan.frozen
    with pytest.raises(ValueError, match="running statistics"):
        build_step_graph(_forward(MLP8_BN, 1.0), trainable, frozen[:1])
    with pytest.raises(ValueError, match="distinct graph inputs"):
        build_step_graph(_forward(MLP8_BN, 1.0), [*trainable, "fc9.weight"], frozen)
    fixed = _forward(MLP8, 1.0)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 32
    with pytest.raises(ValueError, match="symbolic batch"):
        build_step_graph(fixed, zoo_plan(MLP8).trainable)
    monkeypatch.setitem(sys.modules, "onnx_ad", None)  # as if onnx-ad were not installed
    with pytest.raises(ImportError, match=r"tierfl\[full\]"):
        build_step_graph(_forward(MLP8, 1.0), zoo_plan(MLP8).trainable)


class OrtTraining:
    """onnxruntime-training artifacts of a zoo model at a tier (class mask; scaler with batch norm), loaded with weights."""

    def __init__(self, spec: ModelSpec, tier: str, out: Path, optimizer: str, weights: Mapping[str, np.ndarray]) -> None:
        training = load_training_api()
        rate = tier_rate(tier)
        forward, plan = zoo_tier(spec, rate, class_mask=True, scaler=spec.batch_norm), zoo_plan(spec)
        kinds = {"sgd": training.artifacts.OptimType.SGD, "adamw": training.artifacts.OptimType.AdamW}
        with captured_native_stderr():
            training.artifacts.generate_artifacts(
                forward, requires_grad=list(plan.trainable), frozen_params=list(plan.frozen) or None,
                loss=training.artifacts.LossType.CrossEntropyLoss, optimizer=kinds[optimizer], artifact_directory=out,
                additional_output_names=["logits"],
            )
        api = training.api
        self.state = api.CheckpointState.load_checkpoint(str(out / "checkpoint"))
        self.module = api.Module(str(out / "training_model.onnx"), self.state, str(out / "eval_model.onnx"))
        self.optimizer = api.Optimizer(str(out / "optimizer_model.onnx"), self.module)
        for name, value in weights.items():
            self.state.parameters[name].data = value
        self.module.train()

    def step(self, feeds: Mapping[str, np.ndarray], lr: float) -> float:
        loss, _ = self.module(*(feeds[n] for n in self.module.input_names()))
        self.optimizer.set_learning_rate(lr)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(loss)

    def weights(self, names: list[str]) -> dict[str, np.ndarray]:
        return {n: np.array(self.state.parameters[n].data) for n in names}


@pytest.mark.parametrize(
    ("spec", "tier"), [(MLP8, "a"), (CNN8, "a"), (MLP8_BN, "b"), (CNN8_BN, "b")], ids=lambda v: getattr(v, "name", v)
)
def test_one_sgd_step_equals_onnxruntime_training(spec: ModelSpec, tier: str, tmp_path: Path):
    rate, lr = tier_rate(tier), 0.1
    weights, (x, y) = _weights(spec, rate), _batch(spec, 24)
    ort_training = OrtTraining(spec, tier, tmp_path, "sgd", weights)
    stepper = Stepper(spec, rate, scaler=spec.batch_norm, class_mask=True, with_gradients=True)
    feeds = _feeds(stepper.io, spec, weights, x, y, scale=1.0 / rate, learning_rate=lr)
    ours = stepper(feeds)
    expected_loss = ort_training.step(feeds, lr)
    theirs = ort_training.weights(list(weights))
    np.testing.assert_allclose(ours["loss"], expected_loss, rtol=1e-5)
    # ORT's BatchNorm kernels round more coarsely: against a float64 reference of mlp8-bn our
    # gradients are within 1.2e-7, ORT's within 1.3e-5, so batch-norm models get a looser atol.
    atol = 3e-6 if spec.batch_norm else 1e-7
    for name, new in stepper.io.updates.items():
        if name in theirs:
            np.testing.assert_allclose(ours[new], theirs[name], rtol=1e-5, atol=atol, err_msg=name)
    for name, grad in stepper.io.gradients.items():
        np.testing.assert_allclose(ours[grad], (weights[name] - theirs[name]) / lr, rtol=1e-4, atol=10 * atol, err_msg=name)
        np.testing.assert_array_equal(ours[f"{name}.momentum.new"], ours[grad])  # momentum 0: the buffer is g


def test_adamw_steps_equal_onnxruntime_training(tmp_path: Path):
    spec, rate, lr = MLP8_BN, tier_rate("b"), 0.01
    weights = _weights(spec, rate)
    ort_training = OrtTraining(spec, "b", tmp_path, "adamw", weights)
    stepper = Stepper(spec, rate, optimizer="adamw", scaler=True, class_mask=True)
    state = {**weights, **stepper.io.initial_optimizer_state()}
    for seed in range(3):
        x, y = _batch(spec, 16, seed)
        out = stepper(_feeds(stepper.io, spec, state, x, y, scale=2.0, learning_rate=lr))
        expected_loss = ort_training.step(_feeds(stepper.io, spec, weights, x, y, scale=2.0), lr)
        np.testing.assert_allclose(out["loss"], expected_loss, rtol=1e-5)
        state = {name: out[new] for name, new in stepper.io.updates.items()}
    assert state["step"] == 3.0
    for name, value in ort_training.weights(list(weights)).items():
        # AdamW divides by sqrt(v): where a gradient is tiny, rounding moves the update by ~1e-3 lr.
        np.testing.assert_allclose(state[name], value, rtol=1e-5, atol=1e-3 * lr, err_msg=name)


def test_adamw_weight_decay_and_sgd_momentum_follow_their_formulas():
    spec, lr, momentum = SMALL_MLP_BN, 0.05, 0.9
    weights, (x, y) = _weights(spec, 1.0), _batch(spec, 8)
    decayed = Stepper(spec, 1.0, optimizer="adamw", with_gradients=True, weight_decay=0.1)
    heavy = Stepper(spec, 1.0, with_gradients=True)
    buffers = {f"{p}.exp_avg": np.full_like(weights[p], 0.01) for p in decayed.io.trainable}
    buffers |= {f"{p}.exp_avg_sq": np.full_like(weights[p], 1e-4) for p in decayed.io.trainable}
    buffers |= {f"{p}.momentum": np.full_like(weights[p], 0.2) for p in decayed.io.trainable}
    adamw = decayed(_feeds(decayed.io, spec, weights, x, y, learning_rate=lr, step=4.0, **buffers))
    sgd = heavy(_feeds(heavy.io, spec, weights, x, y, learning_rate=lr, momentum=momentum, **buffers))
    t = 5
    for p in decayed.io.trainable:
        g = adamw[f"{p}.grad"]
        m, v = 0.9 * 0.01 + 0.1 * g, 0.999 * 1e-4 + 0.001 * g * g
        stepped = weights[p] - lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (np.sqrt(v) + 1e-6)
        np.testing.assert_allclose(adamw[f"{p}.new"], stepped - lr * 0.1 * stepped, rtol=1e-5, atol=1e-7, err_msg=p)
        np.testing.assert_allclose(adamw[f"{p}.exp_avg_sq.new"], v, rtol=1e-5, err_msg=p)
        buffer = momentum * 0.2 + sgd[f"{p}.grad"]
        np.testing.assert_allclose(sgd[f"{p}.momentum.new"], buffer, rtol=1e-5, atol=1e-8, err_msg=p)
        np.testing.assert_allclose(sgd[f"{p}.new"], weights[p] - lr * buffer, rtol=1e-5, atol=1e-8, err_msg=p)


@pytest.mark.parametrize("spec", [SMALL_MLP_BN, SMALL_CNN_BN], ids=lambda s: s.name)
def test_gradients_match_central_differences(spec: ModelSpec):
    """Loss with scaler, class mask and the FedProx term; a few random coordinates of each tensor."""
    stepper = Stepper(spec, 1.0, scaler=True, class_mask=True, proximal=True, with_gradients=True)
    weights, (x, y) = _weights(spec, 1.0), _batch(spec, 12)
    rng = np.random.default_rng(1)
    mask = np.where(np.isin(np.arange(spec.num_classes), y), 0.0, -1e4).astype(np.float32)  # mask absent classes
    extra = {"scale": 1.5, "class_mask": mask, "mu": 0.3}
    drift = {p: rng.normal(0, 0.05, weights[p].shape).astype(np.float32) for p in stepper.io.trainable}
    extra |= {f"{p}.global": weights[p] + d for p, d in drift.items()}
    base = _feeds(stepper.io, spec, weights, x, y, **extra)
    grads = stepper(base)
    # eps trades float32 rounding of the loss (~2e-7 / 2 eps) against ReLU kinks crossed within +-eps.
    eps = 1e-3
    for name in stepper.io.trainable:
        for flat in rng.choice(weights[name].size, size=min(4, weights[name].size), replace=False):
            losses = []
            for sign in (1, -1):
                moved = weights[name].copy()
                moved.flat[flat] += sign * eps
                losses.append(float(stepper({**base, name: moved})["loss"]))
            numeric = (losses[0] - losses[1]) / (2 * eps)
            assert grads[f"{name}.grad"].flat[flat] == pytest.approx(numeric, rel=1e-2, abs=5e-4), (name, flat)


def _loss_model(spec: ModelSpec, n: int) -> onnx.ModelProto:
    """Forward graph (params as inputs, fixed batch `n`) followed by the mean cross-entropy loss."""
    model = zoo_tier(spec, 1.0, params_as_inputs=True)
    size = spec.image_size
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, 1, size, size]))
    model.graph.input.append(helper.make_tensor_value_info("labels", TensorProto.INT64, [n]))
    model.graph.node.append(helper.make_node("SoftmaxCrossEntropyLoss", ["logits", "labels"], ["loss"], reduction="mean"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))
    return model


@pytest.mark.parametrize("spec", [MLP8, CNN8], ids=lambda s: s.name)
def test_gradients_match_onnx_ad_on_the_whole_graph(spec: ModelSpec):
    """onnx-ad's reverse of the whole forward + loss at a fixed batch (no BN: it has no training mode) gives our gradients."""
    onnx_ad = autodiff.require_onnx_ad()
    n, trainable = 16, list(zoo_plan(spec).trainable)
    adjoint = onnx_ad.reverse(_loss_model(spec, n), inputs=trainable, outputs=["loss"], layout="onnx")
    session = ort.InferenceSession(adjoint.SerializeToString())
    weights, (x, y) = _weights(spec, 1.0), _batch(spec, n)
    feeds = {"input": x, "labels": y, "adj_loss": np.ones(1, np.float32), **weights}
    theirs = session.run([f"adj_{p}" for p in trainable], feeds)
    stepper = Stepper(spec, 1.0, with_gradients=True)
    ours = stepper(_feeds(stepper.io, spec, weights, x, y))
    for name, expected in zip(trainable, theirs):
        np.testing.assert_allclose(ours[f"{name}.grad"], expected[..., 0], rtol=1e-4, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("spec", ZOO, ids=lambda s: s.name)
def test_hand_rules_equal_onnx_ad(spec: ModelSpec, monkeypatch: pytest.MonkeyPatch):
    """The zoo's hand-written rules (what it trains with) against onnx-ad for every node but BatchNorm, at batches 1, 7, 32."""
    rate = tier_rate("b")
    options = dict(scaler=spec.batch_norm, class_mask=True, proximal=True, with_gradients=True)
    hand = Stepper(spec, rate, **options)
    monkeypatch.setattr(autodiff, "HAND_RULES", {})
    alone = Stepper(spec, rate, **options)
    assert hand.io == alone.io
    weights = _weights(spec, rate)
    for n in (1, 7, 32):
        feeds = _feeds(hand.io, spec, weights, *_batch(spec, n, seed=n), scale=2.0, mu=0.1, momentum=0.9)
        ours, theirs = hand(feeds), alone(feeds)
        for name in hand.io.outputs:
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-5, err_msg=f"{name} at batch {n}")


@pytest.mark.parametrize("spec", [MLP8_BN, CNN8_BN], ids=lambda s: s.name)
def test_one_graph_runs_any_batch_size(spec: ModelSpec):
    stepper = Stepper(spec, 0.5, scaler=True, class_mask=True)
    weights = _weights(spec, 0.5)
    for n in (1, 7, 32):
        x, y = _batch(spec, n)
        out = stepper(_feeds(stepper.io, spec, weights, x, y, scale=2.0))
        assert out["logits"].shape == (n, 10) and np.isfinite(out["loss"])
        assert all(np.isfinite(out[new]).all() for new in stepper.io.updates.values())


def test_training_on_digits_with_plain_onnxruntime_reaches_90_percent():
    digits, rng = load_digits(), np.random.default_rng(0)
    order = rng.permutation(len(digits))
    train, test = digits.subset(order[:1400]), digits.subset(order[1400:])
    stepper = Stepper(MLP8, 1.0)
    state = {**zoo_weights(MLP8), **stepper.io.initial_optimizer_state()}
    for _ in range(4):
        shuffled = rng.permutation(len(train))
        for start in range(0, len(train), 32):
            batch = shuffled[start : start + 32]
            out = stepper(_feeds(stepper.io, MLP8, state, train.x[batch], train.y[batch], momentum=0.9, learning_rate=0.05))
            state = {name: out[new] for name, new in stepper.io.updates.items()}
    logits = stepper(_feeds(stepper.io, MLP8, state, test.x, test.y, learning_rate=0.0))["logits"]
    accuracy = (logits.argmax(axis=1) == test.y).mean()
    assert accuracy > 0.9, accuracy


def test_plain_sgd_carries_no_momentum_and_steps_like_momentum_zero():
    spec = SMALL_MLP_BN
    weights, (x, y) = _weights(spec, 1.0), _batch(spec, 16)
    plain, with_buffer = Stepper(spec, 1.0, optimizer="sgd", momentum=False), Stepper(spec, 1.0, optimizer="sgd")
    assert not plain.io.state_shapes and "momentum" not in plain.io.inputs
    ours, reference = plain(_feeds(plain.io, spec, weights, x, y)), with_buffer(_feeds(with_buffer.io, spec, weights, x, y))
    for name in plain.io.outputs:
        np.testing.assert_allclose(ours[name], reference[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_im2col_weight_gradient_equals_the_conv_form(monkeypatch):
    """28x28 inputs take the im2col form of the Conv weight gradient; it must equal the Conv form (ORT-checked above)."""
    import models.step_graph as step_graph

    spec = ModelSpec(arch="cnn", image_size=28, hidden=(3, 5, 8), batch_norm=True)
    weights, (x, y) = _weights(spec, 1.0), _batch(spec, 6)
    im2col = Stepper(spec, 1.0, with_gradients=True)
    monkeypatch.setattr(step_graph, "IM2COL_MIN_IMAGE", 1000)
    conv = Stepper(spec, 1.0, with_gradients=True)
    assert len(im2col.session.get_inputs()) == len(conv.session.get_inputs())
    ours, reference = im2col(_feeds(im2col.io, spec, weights, x, y)), conv(_feeds(conv.io, spec, weights, x, y))
    for name in (n for n in im2col.io.outputs if n.startswith("conv") and n.endswith(".grad")):
        np.testing.assert_allclose(ours[name], reference[name], rtol=1e-4, atol=1e-6, err_msg=name)
