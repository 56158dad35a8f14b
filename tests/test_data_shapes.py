"""Data of any shape (issue 15): load_npz of any rank, fit_to_model's rules and refusals, the device's check, and
both trainers (and the batch-norm statistics) fed samples that are not images."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_client.agent import ClientConfig, DeviceAgent, TaskSkipped
from edge_client.bn_statistics import measure_bn_statistics
from edge_client.portable import PortableTrainer
from edge_client.trainer import run_epochs
from models.data import Dataset, batches, fit_split, fit_to_model, load_fashion_mnist, load_npz
from models.manifest import FORWARD_FILE, STEP_FILE, ModelCard, ParamInfo, TierManifest
from models.spec import INPUT_NAME, OUTPUT_NAME
from protocol.mqtt.url import parse as parse_broker

OPSET = 17
IR_VERSION = 8


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _data(sample: tuple[int, ...], labels: list[int] | None = None) -> Dataset:
    n = len(labels) if labels is not None else 6
    x = np.arange(n * int(np.prod(sample)), dtype=np.float32).reshape(n, *sample)
    return Dataset(x, np.array(labels if labels is not None else [i % 3 for i in range(n)], np.int64))


# --- load_npz ------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "loaded"), [
    ((5, 3, 32, 32), (5, 3, 32, 32)),  # RGB frames: as stored
    ((5, 1, 8, 8), (5, 1, 8, 8)),
    ((5, 2, 3, 4, 6), (5, 2, 3, 4, 6)),  # any rank
    ((5, 12), (5, 12)),  # tabular: as stored
    ((5, 16), (5, 1, 4, 4)),  # a square flat row: a single-channel image, as ever
    ((5, 40, 49), (5, 1, 40, 49)),  # [N, H, W]: a single-channel image, as ever
])
def test_load_npz_keeps_any_rank_and_reads_single_channel_images_as_ever(tmp_path: Path, shape: tuple[int, ...],
                                                                         loaded: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    ds = load_npz(_save(tmp_path / "d.npz", x=x, y=np.arange(5) % 2))
    assert ds.x.shape == loaded and ds.x.dtype == np.float32 and ds.sample_shape == loaded[1:]
    np.testing.assert_array_equal(ds.x.reshape(-1), x.reshape(-1) / np.float32(255.0))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_load_npz_takes_float_as_is(tmp_path: Path, dtype: type) -> None:
    x = (np.random.default_rng(1).standard_normal((4, 6, 10)) * 300).astype(dtype)  # not 0-1: never rescaled
    ds = load_npz(_save(tmp_path / "d.npz", x=x, y=np.zeros(4, np.int64)))
    assert ds.x.dtype == np.float32 and ds.x.shape == (4, 1, 6, 10)
    np.testing.assert_array_equal(ds.x[:, 0], x.astype(np.float32))


@pytest.mark.parametrize("y", [
    np.array([0, 3, 1], np.int16), np.array([0, 3, 1], np.uint8), np.array([0, 3, 1], np.uint64),
    np.array([0, 3, 1], np.int32), np.array([0.0, 3.0, 1.0], np.float32), np.array([0.0, 3.0, 1.0], np.float64),
])
def test_load_npz_labels_of_any_integer_dtype_or_whole_floats(tmp_path: Path, y: np.ndarray) -> None:
    ds = load_npz(_save(tmp_path / "d.npz", x=np.zeros((3, 5), np.float32), y=y))
    assert ds.y.dtype == np.int64 and ds.y.tolist() == [0, 3, 1]


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.array([[0.0, np.nan, np.inf], [1, 2, 3], [np.nan, 0, 0]], np.float32), "y": np.zeros(3, np.int64)},
     r"d\.npz: x holds 3 NaN or infinite values \(in 2 of 3 samples\); drop or repair"),
    ({"x": np.array([[1e39, 0.0], [0.0, 0.0]]), "y": np.zeros(2, np.int64)},
     r"d\.npz: x holds 1 NaN or infinite values or beyond float32's range \(in 1 of 2 samples\)"),
    ({"x": np.zeros((2, 3), np.int16), "y": np.zeros(2, np.int64)},
     r"d\.npz: x must be uint8 \(0-255, scaled to 0-1\) or float \(taken as is\), got int16"),
    ({"x": np.zeros((2, 3), bool), "y": np.zeros(2, np.int64)}, r"d\.npz: x must be uint8 .* got bool"),
    ({"x": np.zeros(4, np.float32), "y": np.zeros(4, np.int64)}, r"d\.npz: x must hold one sample per row"),
    ({"x": np.zeros((2, 0), np.float32), "y": np.zeros(2, np.int64)}, r"d\.npz: x's samples hold no values"),
    ({"x": np.array([[1.0], [2.0]], dtype=object), "y": np.zeros(2, np.int64)},
     r"d\.npz: 'x' is an array of Python objects \(dtype=object\), which is never loaded"),
    ({"x": np.zeros((2, 3), np.float32), "y": np.array([0, None], dtype=object)},
     r"d\.npz: 'y' is an array of Python objects"),
    ({"x": np.zeros((3, 3), np.float32), "y": np.array([0.0, 1.5, np.nan])},
     r"d\.npz: y must hold class labels, but 2 of its float64 values are not whole numbers \(first: 1\.5\)"),
    ({"x": np.zeros((2, 3), np.float32), "y": np.array([True, False])},
     r"d\.npz: y must hold integer class labels, got bool"),
    ({"x": np.zeros((3, 3), np.float32), "y": np.array([0, -1, -4], np.int8)},
     r"d\.npz: y holds 2 negative labels \(smallest -4\); class labels count from 0"),
    ({"x": np.zeros((3, 3), np.float32), "y": np.zeros(2, np.int64)}, r"d\.npz: x holds 3 samples but y 2 labels"),
])
def test_load_npz_refusals_name_the_file(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_npz(_save(tmp_path / "d.npz", **arrays))


def test_fashion_mnist_idx_files_still_load_as_single_channel_images(tmp_path: Path) -> None:
    images = np.random.default_rng(2).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">III", 3, 28, 28) + images.tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + bytes([7, 0, 9]))
    ds = load_fashion_mnist(tmp_path, split="test")
    assert ds.x.shape == (3, 1, 28, 28) and ds.y.tolist() == [7, 0, 9]
    np.testing.assert_array_equal(ds.x[:, 0], images / np.float32(255.0))


# --- fit_to_model ------------------------------------------------------------------

@pytest.mark.parametrize(("sample", "model"), [
    ((3, 32, 32), (3, 32, 32)),  # rule 1: as is
    ((28, 28), (1, 28, 28)),  # rule 2: a single channel added
    ((1, 40, 49), (40, 49)),  # rule 2: dropped (an .npz [N, 40, 49] is read as [N, 1, 40, 49])
    ((3, 32, 32), (3, 1, 32, 32)),
    ((1, 8, 8), (64,)),  # rule 3: flattened for a flat model
    ((3, 4), (12,)),
    ((1, 1, 1), (1,)),
    ((784,), (1, 28, 28)),  # rule 4: a flat row reshaped for a single-channel image model
    ((12,), (1, 3, 4)),
])
def test_fit_to_model_reshapes_by_the_rules_keeping_values_in_order(sample: tuple[int, ...],
                                                                      model: tuple[int, ...]) -> None:
    data = _data(sample)
    fitted = fit_to_model(data, list(model), 3, "data.npz")
    assert fitted.x.shape == (6, *model) and fitted.y is data.y
    np.testing.assert_array_equal(fitted.x.reshape(6, -1), data.x.reshape(6, -1))
    assert np.shares_memory(fitted.x, data.x)  # a view, not a copy
    if sample == model:
        assert fitted is data


@pytest.mark.parametrize(("sample", "model"), [
    ((3, 32, 32), (1, 28, 28)),
    ((100, 3), (3, 100)),  # never transposed
    ((3072,), (3, 32, 32)),  # flat rows only for single-channel images: channel order would be a guess
    ((1960,), (40, 49)),
    ((1, 28, 28), (1, 32, 32)),  # never cropped or resized
    ((12,), (13,)),
    ((2, 6), (1, 3, 4)),
])
def test_fit_to_model_refuses_other_shapes_naming_both(sample: tuple[int, ...], model: tuple[int, ...]) -> None:
    with pytest.raises(ValueError) as caught:
        fit_to_model(_data(sample), list(model), 3, "data.npz")
    message = str(caught.value)
    assert message.startswith(f"data.npz: x holds samples of shape {list(sample)} but the model takes {list(model)}")
    assert f"give this device x of shape [N, {', '.join(map(str, model))}]" in message


def test_fit_to_model_refusal_quoted_by_the_issue() -> None:
    with pytest.raises(ValueError, match=r"^data\.npz: x holds samples of shape \[3, 32, 32\] but the model takes "
                                         r"\[1, 28, 28\]; give this device x of shape \[N, 1, 28, 28\]"):
        fit_to_model(_data((3, 32, 32)), [1, 28, 28], 10, "data.npz")


def test_a_refused_npz_says_how_it_read_a_3d_x(tmp_path: Path) -> None:
    path = _save(tmp_path / "imu.npz", x=np.zeros((4, 3, 100), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(ValueError) as caught:
        fit_to_model(load_npz(path), [100, 3], 2, str(path))
    assert (f"{path}: x holds samples of shape [1, 3, 100] but the model takes [100, 3] (an .npz x of shape "
            "[N, 3, 100] is read as single-channel images [N, 1, 3, 100])") in str(caught.value)
    assert fit_to_model(load_npz(path), [3, 100], 2, str(path)).x.shape == (4, 3, 100)


@pytest.mark.parametrize(("labels", "message"), [
    ([0, 1, 12, 3, 12, 5], "data.npz: label 12 out of range: 2 of 6 samples have labels >= 10, but the model has 10 "
                           "classes (labels 0 to 9); relabel the data or train a model with more classes"),
    ([10, 11, 0, 11], "data.npz: labels 10, 11 out of range: 3 of 4 samples have labels >= 10"),
    (list(range(17)), "data.npz: labels 10, 11, 12, 13, 14, ... (7 distinct) out of range: 7 of 17 samples"),
])
def test_fit_to_model_refuses_labels_out_of_range(labels: list[int], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        fit_to_model(_data((4,), labels), [4], 10, "data.npz")
    assert str(caught.value).startswith(message)


def test_fit_to_model_refuses_a_model_that_is_not_one_sample() -> None:
    for shape in ([], [0, 3], [-1, 4]):
        with pytest.raises(ValueError, match="is not one sample's shape"):
            fit_to_model(_data((4,)), shape, 3, "data.npz")


def test_fit_split_counts_labels_over_both_parts_and_fits_both() -> None:
    train, test = _data((28, 28), [0, 1, 5, 2]), _data((28, 28), [5, 5])
    with pytest.raises(ValueError, match=r"label 5 out of range: 3 of 6 samples"):
        fit_split(train, test, [1, 28, 28], 5, "local.npz")
    fitted_train, fitted_test = fit_split(train, test, [1, 28, 28], 6, "local.npz")
    assert fitted_train.x.shape == (4, 1, 28, 28) and fitted_test.x.shape == (2, 1, 28, 28)
    empty_test = fit_split(train, train.subset(np.array([], np.int64)), [784], 6, "local.npz")[1]
    assert empty_test.x.shape == (0, 784)


# --- the device's check -------------------------------------------------------------

def _manifest(input_shape: list[int], num_classes: int, name: str = "user-net") -> TierManifest:
    features = int(np.prod(input_shape))
    return TierManifest(
        model=ModelCard(name=name, input_shape=input_shape, num_classes=num_classes), tier="a", rate=1.0,
        optimizer="sgd", input_name=INPUT_NAME, input_shape=["N", *input_shape], output_name=OUTPUT_NAME,
        params=[ParamInfo(name="W", shape=[features, num_classes], trainable=True),
                ParamInfo(name="b", shape=[num_classes], trainable=True)],
        files={}, libraries={})


def _task(round_number: int, tier: str = "a") -> Any:
    """What the device's data check reads of a task."""
    return SimpleNamespace(round=round_number, tier=tier)


@pytest.fixture
def agent(tmp_path: Path) -> DeviceAgent:
    config = ClientConfig(broker=parse_broker("mqtt://127.0.0.1:1"), device_id="dev-1", cache_dir=tmp_path / "cache")
    train, test = _data((40, 49), [0, 1, 2, 3, 0, 1]), _data((40, 49), [2, 3])
    return DeviceAgent(config, train, test, data_name="/data/kws.npz")  # never started: no broker needed


def test_the_device_fits_its_data_to_the_tier_model_once(agent: DeviceAgent) -> None:
    task = _task(3)
    train, test = agent._fit_data(task, _manifest([1, 40, 49], 4))
    assert train.x.shape == (6, 1, 40, 49) and test.x.shape == (2, 1, 40, 49) and len(train) == len(agent.train_data)
    again = agent._fit_data(task, _manifest([1, 40, 49], 4))
    assert again[0] is train and again[1] is test
    flat, _ = agent._fit_data(task, _manifest([1960], 4, name="user-mlp"))
    assert flat.x.shape == (6, 1960)


def test_the_device_skips_a_task_whose_model_its_data_does_not_fit_logged_once(
        agent: DeviceAgent, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_client.agent")
    for round_number in (3, 4, 5):
        with pytest.raises(TaskSkipped, match=r"/data/kws\.npz: x holds samples of shape \[40, 49\] but the model "
                                              r"takes \[3, 32, 32\]"):
            agent._fit_data(_task(round_number, "b"), _manifest([3, 32, 32], 4))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["round 3 (tier b): skipped, this device's data does not fit model user-net: /data/kws.npz: x "
                      "holds samples of shape [40, 49] but the model takes [3, 32, 32]; give this device x of shape "
                      "[N, 3, 32, 32] (N samples of the model's input)"]
    later = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "skipped" in r.getMessage()]
    assert later == [f"round {n} (tier b): skipped, this device's data does not fit model user-net (said above)"
                     for n in (4, 5)]
    caplog.clear()
    with pytest.raises(TaskSkipped, match=r"label 3 out of range: 2 of 8 samples have labels >= 3, but the model "
                                          r"has 3 classes"):
        agent._fit_data(_task(6, "b"), _manifest([40, 49], 3))
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1  # a new model: said again
    train, _ = agent._fit_data(_task(7, "b"), _manifest([40, 49], 4))
    assert train.x.shape == (6, 40, 49)


# --- training on samples that are not images ---------------------------------------------

def _linear_graph(sample: list[int], classes: int, step: bool) -> onnx.ModelProto:
    """A linear softmax classifier of flattened samples: forward (W, b as inputs), or its whole SGD step."""
    features = int(np.prod(sample))
    nodes = [helper.make_node("Flatten", [INPUT_NAME], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["product"]),
             helper.make_node("Add", ["product", "b"], [OUTPUT_NAME])]
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *sample]),
              helper.make_tensor_value_info("W", TensorProto.FLOAT, [features, classes]),
              helper.make_tensor_value_info("b", TensorProto.FLOAT, [classes])]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", classes])]
    initializers = []
    if step:
        initializers = [numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "off_on"),
                        numpy_helper.from_array(np.array([classes], np.int64), "depth"),
                        numpy_helper.from_array(np.array([0], np.int64), "axis0")]
        nodes += [
            helper.make_node("OneHot", ["labels", "depth", "off_on"], ["onehot"], axis=-1),
            helper.make_node("LogSoftmax", [OUTPUT_NAME], ["log_p"], axis=1),
            helper.make_node("Mul", ["onehot", "log_p"], ["picked"]),
            helper.make_node("ReduceSum", ["picked"], ["sample_ll"], keepdims=0),
            helper.make_node("Neg", ["sample_ll"], ["sum_loss"]),
            helper.make_node("Shape", ["labels"], ["batch_shape"]),
            helper.make_node("Cast", ["batch_shape"], ["batch_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["batch_f"], ["batch"], keepdims=0),
            helper.make_node("Div", ["sum_loss", "batch"], ["loss"]),
            helper.make_node("Softmax", [OUTPUT_NAME], ["p"], axis=1),
            helper.make_node("Sub", ["p", "onehot"], ["residual"]),
            helper.make_node("Div", ["residual", "batch"], ["d_logits"]),
            helper.make_node("Transpose", ["flat"], ["flat_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["flat_t", "d_logits"], ["W.grad"]),
            helper.make_node("ReduceSum", ["d_logits", "axis0"], ["b.grad"], keepdims=0),
        ]
        for name in ("W", "b"):
            nodes += [helper.make_node("Mul", ["learning_rate", f"{name}.grad"], [f"{name}.change"]),
                      helper.make_node("Sub", [name, f"{name}.change"], [f"{name}.new"])]
        inputs += [helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"]),
                   helper.make_tensor_value_info("learning_rate", TensorProto.FLOAT, [1])]
        outputs += [helper.make_tensor_value_info("loss", TensorProto.FLOAT, []),
                    helper.make_tensor_value_info("W.new", TensorProto.FLOAT, [features, classes]),
                    helper.make_tensor_value_info("b.new", TensorProto.FLOAT, [classes])]
    graph = helper.make_graph(nodes, "linear", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _numpy_sgd(x: np.ndarray, y: np.ndarray, weights: dict[str, np.ndarray], lr: float,
               epochs: int) -> dict[str, np.ndarray]:
    """Full-batch SGD of the same linear softmax classifier (float64)."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    w, b = weights["W"].astype(np.float64), weights["b"].astype(np.float64)
    for _ in range(epochs):
        logits = flat @ w + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        w, b = w - lr * flat.T @ p / len(y), b - lr * p.mean(axis=0)
    return {"W": w, "b": b}


@pytest.mark.parametrize("sample", [[12], [3, 4], [2, 3, 2]])
def test_the_portable_trainer_feeds_samples_of_any_rank(tmp_path: Path, sample: list[int]) -> None:
    rng = np.random.default_rng(3)
    data = Dataset(rng.standard_normal((20, *sample)).astype(np.float32), rng.integers(0, 4, 20))
    onnx.save(_linear_graph(sample, 4, step=True), tmp_path / STEP_FILE)
    onnx.save(_linear_graph(sample, 4, step=False), tmp_path / FORWARD_FILE)
    trainer = PortableTrainer(tmp_path, _manifest(sample, 4))
    start = {"W": (rng.standard_normal((12, 4)) * 0.1).astype(np.float32), "b": np.zeros(4, np.float32)}
    trainer.set_weights(start)
    before = trainer.evaluate(data, batch_size=7)
    logits = data.x.reshape(20, -1) @ start["W"] + start["b"]
    assert before.samples == 20 and before.accuracy == pytest.approx(np.mean(logits.argmax(axis=1) == data.y))
    stats = trainer.train(data, epochs=3, batch_size=20, learning_rate=0.5, seed=0)
    assert stats.steps == 3 and stats.samples_seen == 60
    expected = _numpy_sgd(data.x, data.y, start, 0.5, 3)
    for name, value in trainer.get_weights().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=1e-5)


def test_the_ort_training_backend_feeds_samples_that_are_not_images(tmp_path: Path) -> None:
    from edge_client.trainer import OrtTrainer
    from models.ort_training import load_training_api

    training = load_training_api()
    rng = np.random.default_rng(4)
    sample = [3, 4]
    start = {"W": (rng.standard_normal((12, 4)) * 0.1).astype(np.float32), "b": np.zeros(4, np.float32)}
    forward = _linear_graph(sample, 4, step=False)
    for name in ("W", "b"):  # the parameters as initializers, as generate_artifacts wants them
        forward.graph.initializer.append(numpy_helper.from_array(start[name], name))
        forward.graph.input.remove(next(i for i in forward.graph.input if i.name == name))
    artifacts = training.artifacts
    artifacts.generate_artifacts(forward, requires_grad=["W", "b"], loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=artifacts.OptimType.SGD, artifact_directory=tmp_path,
                                 additional_output_names=[OUTPUT_NAME])
    data = Dataset(rng.standard_normal((16, *sample)).astype(np.float32), rng.integers(0, 4, 16))
    trainer = OrtTrainer(tmp_path, _manifest(sample, 4))
    trainer.set_weights(start)
    assert trainer.evaluate(data, batch_size=5).samples == 16
    trainer.train(data, epochs=2, batch_size=16, learning_rate=0.5, seed=0)
    expected = _numpy_sgd(data.x, data.y, start, 0.5, 2)
    for name, value in trainer.get_weights().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=1e-5)


def test_run_epochs_batches_tabular_samples() -> None:
    data = _data((5,), list(range(3)) * 4)
    seen: list[tuple[int, ...]] = []

    def step(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        seen.append(x.shape)
        return 1.0, np.eye(3, dtype=np.float32)[y]

    stats = run_epochs(data, 2, 5, 0, step)
    assert seen == [(5, 5), (5, 5), (2, 5)] * 2 and stats.accuracy == 1.0 and stats.samples_seen == 24
    assert sorted(np.concatenate([y for _, y in batches(data, 5, np.random.default_rng(0))]).tolist()) == sorted(data.y)


def test_bn_statistics_of_channel_time_windows(tmp_path: Path) -> None:
    """Per-channel statistics of [N, C, T] windows (a 1-D conv net's BatchNorm), pooled over batches."""
    nodes = [helper.make_node("ReduceMean", [INPUT_NAME], ["bn.batch_mean"], axes=[0, 2], keepdims=0),
             helper.make_node("ReduceMean", [INPUT_NAME], ["mean_kept"], axes=[0, 2], keepdims=1),
             helper.make_node("Sub", [INPUT_NAME, "mean_kept"], ["centred"]),
             helper.make_node("Mul", ["centred", "centred"], ["squares"]),
             helper.make_node("ReduceMean", ["squares"], ["bn.batch_var"], axes=[0, 2], keepdims=0)]
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 6, 50])]
    outputs = [helper.make_tensor_value_info(f"bn.batch_{s}", TensorProto.FLOAT, [6]) for s in ("mean", "var")]
    graph = helper.make_graph(nodes, "statistics", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.save(model, tmp_path / "statistics.onnx")
    x = (np.random.default_rng(5).standard_normal((37, 6, 50)) * np.arange(1, 7)[:, None] + 3).astype(np.float32)
    data = Dataset(x, np.zeros(37, np.int64))
    statistics = measure_bn_statistics(tmp_path / "statistics.onnx", {}, data, batch_size=8)
    np.testing.assert_allclose(statistics["bn.running_mean"], x.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(statistics["bn.running_var"], x.var(axis=(0, 2)), rtol=1e-4)
