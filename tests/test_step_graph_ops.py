"""Step graphs of hand-made forward graphs (every operator a user's classifier may hold) against finite differences.

Each forward graph is the form `build_step_graph` takes: `input` with a symbolic batch `N`, the
parameters as graph inputs, `logits` [N, classes]. Its step graph's gradients are checked
against central differences of its own loss, one random direction per parameter tensor, at
batch sizes 1 and 5 of one graph; without BatchNorm (whose statistics couple the samples) the
gradient of a batch of 32 is also the size-weighted mean of the gradients of its two parts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import autodiff
from models.step_graph import build_step_graph, step_graph_io

CLASSES = 3


@dataclasses.dataclass
class Net:
    """A forward graph under construction: nodes, parameter inputs (and their initial values), constants."""

    input_shape: tuple[int, ...]
    rng: np.random.Generator = dataclasses.field(default_factory=lambda: np.random.default_rng(0))
    nodes: list[onnx.NodeProto] = dataclasses.field(default_factory=list)
    params: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    frozen: list[str] = dataclasses.field(default_factory=list)
    constants: list[onnx.TensorProto] = dataclasses.field(default_factory=list)
    data: list[onnx.ValueInfoProto] = dataclasses.field(default_factory=list)

    def param(self, name: str, shape: Sequence[int], center: float = 0.0) -> str:
        """A trainable parameter input, initialised around `center` with a fan-in scaled spread."""
        spread = 1.0 / math.sqrt(max(1, math.prod(shape[1:]) if len(shape) > 1 else shape[0]))
        self.params[name] = (center + self.rng.normal(0, spread, shape)).astype(np.float32)
        return name

    def const(self, value: object, dtype: type = np.float32) -> str:
        name = f"const{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], out: str = "", **attrs: object) -> str:
        out = out or f"{op_type.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n{len(self.nodes)}", **attrs))
        return out

    def batch_norm(self, x: str, name: str, channels: int) -> str:
        """Inference-form BatchNormalization; its running statistics are frozen inputs."""
        gamma, beta = self.param(f"{name}.weight", [channels], 1.0), self.param(f"{name}.bias", [channels])
        self.params[f"{name}.running_mean"] = self.rng.normal(0, 0.1, channels).astype(np.float32)
        self.params[f"{name}.running_var"] = (1 + self.rng.random(channels)).astype(np.float32)
        self.frozen += [f"{name}.running_mean", f"{name}.running_var"]
        stats = [f"{name}.running_mean", f"{name}.running_var"]
        return self.op("BatchNormalization", [x, gamma, beta, *stats], epsilon=1e-5, momentum=0.9)

    def data_input(self, name: str, shape: Sequence[int]) -> str:
        self.data.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def model(self) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *self.input_shape]), *self.data]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in self.params.items()]
        output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])
        graph = helper.make_graph(self.nodes, "ops", inputs, [output], initializer=self.constants)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        onnx.checker.check_model(model, full_check=True)
        return model

    @property
    def trainable(self) -> list[str]:
        return [n for n in self.params if n not in self.frozen]


def _linear_gemm(net: Net, x: str, features: int, out: str = "logits", trans_b: int = 1) -> str:
    shape = [CLASSES, features] if trans_b else [features, CLASSES]
    w, b = net.param(f"{out}.w", shape), net.param(f"{out}.b", [CLASSES])
    return net.op("Gemm", [x, w, b], out, transB=trans_b)


def strided_dilated_conv() -> Net:
    """Conv with stride 2, padding and dilation, LeakyRelu, Flatten, Gemm with transB=0."""
    net = Net((2, 9, 9))
    w, b = net.param("conv.weight", [4, 2, 3, 3]), net.param("conv.bias", [4])
    y = net.op("Conv", ["input", w, b], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], dilations=[2, 2])
    y = net.op("Flatten", [net.op("LeakyRelu", [y], alpha=0.1)], axis=1)  # [N, 4 * 4 * 4]
    _linear_gemm(net, y, 64, trans_b=0)
    return net


def depthwise_separable() -> Net:
    """Depthwise Conv, ReLU6 as Clip with constant bounds, pointwise Conv, grouped strided Conv, HardSwish, GAP."""
    net = Net((3, 6, 6))
    w, b = net.param("dw.weight", [3, 1, 3, 3]), net.param("dw.bias", [3])
    y = net.op("Conv", ["input", w, b], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=3)
    y = net.op("Clip", [y, net.const(0.0), net.const(6.0)])
    y = net.op("Conv", [y, net.param("pw.weight", [6, 3, 1, 1])], kernel_shape=[1, 1])
    w = net.param("grouped.weight", [4, 3, 3, 3])
    y = net.op("Conv", [y, w], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0], group=2)
    y = net.op("Flatten", [net.op("GlobalAveragePool", [net.op("HardSwish", [y])])], axis=1)
    _linear_gemm(net, y, 4)
    return net


def conv1d_and_pools() -> Net:
    """1-D Conv, Tanh, overlapping padded MaxPool, strided grouped 1-D Conv, Sigmoid, AveragePool, MatMul + Add."""
    net = Net((2, 16))
    y = net.op("Conv", ["input", net.param("c1.weight", [4, 2, 3]), net.param("c1.bias", [4])], pads=[1, 1])
    y = net.op("MaxPool", [net.op("Tanh", [y])], kernel_shape=[3], strides=[2], pads=[1, 1])  # [N, 4, 8]
    y = net.op("Conv", [y, net.param("c2.weight", [4, 2, 3])], strides=[2], pads=[0, 1], group=2)  # [N, 4, 4]
    y = net.op("AveragePool", [net.op("Sigmoid", [y])], kernel_shape=[2], strides=[2])  # [N, 4, 2]
    y = net.op("MatMul", [net.op("Flatten", [y]), net.param("fc.weight", [8, CLASSES])])
    net.op("Add", [y, net.param("fc.bias", [CLASSES])], "logits")
    return net


def pooling_2d() -> Net:
    """Pre-activation BatchNorm, "same" Conv, overlapping padded MaxPool, padded AveragePool, GlobalMaxPool."""
    net = Net((2, 8, 8))
    y = net.op("Relu", [net.batch_norm("input", "bn0", 2)])
    y = net.op("Conv", [y, net.param("conv.weight", [3, 2, 3, 3]), net.param("conv.bias", [3])], pads=[1, 1, 1, 1])
    y = net.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])  # [N, 3, 4, 4]
    y = net.op("AveragePool", [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
    y = net.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])  # [N, 3, 2, 2]
    y = net.op("Flatten", [net.op("GlobalMaxPool", [y])])
    _linear_gemm(net, y, 3)
    return net


def squeeze_excite_residual() -> Net:
    """Conv, BatchNorm, squeeze-excitation (x * s[N, C, 1, 1]), residual Add, ReduceMean over space."""
    net = Net((4, 5, 5))
    y = net.op("Conv", ["input", net.param("conv.weight", [4, 4, 3, 3])], pads=[1, 1, 1, 1])
    y = net.op("Relu", [net.batch_norm(y, "bn", 4)])
    s = net.op("GlobalAveragePool", [y])
    s = net.op("Relu", [net.op("Conv", [s, net.param("se1.weight", [2, 4, 1, 1]), net.param("se1.bias", [2])])])
    s = net.op("Conv", [s, net.param("se2.weight", [4, 2, 1, 1]), net.param("se2.bias", [4])])
    y = net.op("Add", [net.op("Mul", [y, net.op("HardSigmoid", [s], alpha=0.2, beta=0.5)]), "input"])
    _linear_gemm(net, net.op("ReduceMean", [y], axes=[2, 3], keepdims=0), 4)
    return net


def attention() -> Net:
    """LayerNormalization, self-attention (MatMul, Transpose, Div, Softmax), Erf-form GELU, residual, mean over tokens."""
    net = Net((4, 6))
    x = net.op("LayerNormalization", ["input", net.param("ln.weight", [6], 1.0), net.param("ln.bias", [6])], axis=-1)
    q, k, v = (net.op("MatMul", [x, net.param(f"{n}.weight", [6, 6])]) for n in "qkv")
    scores = net.op("Div", [net.op("MatMul", [q, net.op("Transpose", [k], perm=[0, 2, 1])]), net.const(math.sqrt(6))])
    mixed = net.op("Add", [net.op("MatMul", [net.op("Softmax", [scores], axis=-1), v]), x])
    erf = net.op("Erf", [net.op("Div", [mixed, net.const(math.sqrt(2))])])
    gelu = net.op("Mul", [net.op("Mul", [mixed, net.op("Add", [erf, net.const(1.0)])]), net.const(0.5)])
    pooled = net.op("ReduceMean", [gelu], axes=[1], keepdims=0)
    net.op("Add", [net.op("MatMul", [pooled, net.param("head.weight", [6, CLASSES])]), net.param("head.bias", [CLASSES])],
           "logits")
    return net


def shape_ops() -> Net:
    """Reshape (0 and -1), Transpose, Unsqueeze/Squeeze, Concat, Sub/Div/Pow/Sqrt with constants, Identity, scale and class mask."""
    net = Net((2, 4, 4))
    y = net.op("Reshape", ["input", net.const([0, 2, 16], np.int64)])  # [N, 2, 16]
    y = net.op("Transpose", [net.op("Mul", [y, net.param("gain", [2, 1], 1.0)])], perm=[0, 2, 1])  # [N, 16, 2]
    y = net.op("Unsqueeze", [y, net.const([1], np.int64)])  # [N, 1, 16, 2]
    y = net.op("Transpose", [y], perm=[0, 2, 1, 3])  # [N, 16, 1, 2]: moves a unit axis only
    y = net.op("Squeeze", [y, net.const([2], np.int64)])
    quarter = net.op("Constant", [], value=numpy_helper.from_array(np.array(0.25, np.float32)))  # becomes a constant
    shifted = net.op("Sub", [net.op("Tanh", [y]), quarter])
    y = net.op("Concat", [y, shifted], axis=2)  # [N, 16, 4]
    y = net.op("Reshape", [y, net.const([-1, 64], np.int64)])
    y = net.op("Mul", [net.op("Identity", [y]), net.data_input("scale", [1])])
    w = net.param("fc.weight", [5, 64])
    y = net.op("Div", [net.op("Gemm", [y, w, net.param("fc.bias", [5])], transB=1, alpha=0.5), net.const(2.0)])
    y = net.op("Sqrt", [net.op("Add", [net.op("Pow", [y, net.const(2.0)]), net.const(1.0)])])
    logits = _linear_gemm(net, y, 5, out="masked")
    net.op("Add", [logits, net.data_input("class_mask", [CLASSES])], "logits")
    return net


def batch_norm_features() -> Net:
    """Flatten, MatMul + Add, BatchNorm over [N, C] features, Relu, Dropout (the identity in the step), Gemm."""
    net = Net((1, 4, 4))
    y = net.op("MatMul", [net.op("Flatten", ["input"]), net.param("fc1.weight", [16, 8])])
    y = net.op("Relu", [net.batch_norm(net.op("Add", [y, net.param("fc1.bias", [8])]), "bn1", 8)])
    _linear_gemm(net, net.op("Dropout", [y, net.const(0.5)]), 8)
    return net


CASES: dict[str, Callable[[], Net]] = {f.__name__: f for f in (
    strided_dilated_conv, depthwise_separable, conv1d_and_pools, pooling_2d, squeeze_excite_residual, attention,
    shape_ops, batch_norm_features,
)}


class Step:
    """A step graph (plain SGD, gradients out) of a hand-made forward graph, in a 1-thread session."""

    def __init__(self, net: Net) -> None:
        self.net = net
        model = build_step_graph(net.model(), net.trainable, net.frozen, with_gradients=True, momentum=False)
        onnx.checker.check_model(model, full_check=True)
        assert {n.domain for n in model.graph.node} == {""}
        self.io = step_graph_io(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), options)

    def __call__(self, x: np.ndarray, y: np.ndarray, params: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        feeds = {"input": x, "labels": y, "learning_rate": np.zeros(1, np.float32), "scale": np.array([1.5], np.float32),
                 "class_mask": np.array([0, -2, 0], np.float32), **self.net.params, **(params or {})}
        return dict(zip(self.io.outputs, self.session.run(None, {n: feeds[n] for n in self.io.inputs})))


def _batch(net: Net, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (n, *net.input_shape)).astype(np.float32), rng.integers(0, CLASSES, n)


@pytest.fixture(scope="module", params=list(CASES))
def step(request: pytest.FixtureRequest) -> Step:
    return Step(CASES[request.param]())


def _check_central_differences(step: Step, batch: int) -> None:
    """Per parameter tensor: the derivative along the gradient's own direction u against (L(w + eps u) - L(w - eps u)) / 2 eps.

    Along u the derivative is |g|, the largest signal float32 losses allow; a wrong g would have
    to satisfy g_true . g = |g|^2 to pass. eps trades rounding of the loss against kinks crossed.
    """
    x, y = _batch(step.net, batch, seed=batch)
    grads = step(x, y)
    rng, eps = np.random.default_rng(7), 1e-3
    for name in step.net.trainable:
        weight, grad = step.net.params[name], grads[f"{name}.grad"].astype(np.float64)
        assert grad.shape == weight.shape, name
        norm = np.linalg.norm(grad)
        direction = grad / norm if norm > 1e-6 else rng.normal(0, 1, grad.shape) / math.sqrt(grad.size)
        moved = [float(step(x, y, {name: (weight + sign * eps * direction).astype(np.float32)})["loss"]) for sign in (1, -1)]
        numeric = (moved[0] - moved[1]) / (2 * eps)
        assert float(np.sum(grad * direction)) == pytest.approx(numeric, rel=1e-2, abs=3e-4), name


@pytest.mark.parametrize("batch", [1, 5])
def test_gradients_match_central_differences(step: Step, batch: int):
    _check_central_differences(step, batch)


WINDOWS = [  # (op, kernel, stride, dilation, begin pad, end pad, length): uneven pads, unread tails of 0-2, dilation
    ("Conv", 3, 2, 1, 0, 1, 8), ("Conv", 3, 3, 1, 1, 1, 9), ("Conv", 2, 3, 2, 2, 0, 9), ("Conv", 3, 2, 2, 1, 2, 8),
    ("Conv", 1, 3, 1, 0, 0, 8), ("Conv", 3, 2, 1, 1, 1, 8), ("AveragePool", 3, 3, 1, 2, 1, 8),
    ("AveragePool", 2, 3, 1, 1, 1, 8), ("AveragePool", 3, 2, 1, 1, 1, 9),
]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: "-".join(map(str, w)))
def test_padded_and_strided_windows(window: tuple[str, int, int, int, int, int, int]):
    """Conv and AveragePool geometries onnx-ad's ConvTranspose adjoint gets wrong unless the padding is made explicit."""
    op, kernel, stride, dilation, begin, end, length = window
    net = Net((2, length))
    x = net.op("Mul", ["input", net.param("gain", [2, 1], 1.0)])
    if op == "Conv":
        w = net.param("conv.weight", [3, 2, kernel])
        y = net.op("Conv", [x, w], strides=[stride], dilations=[dilation], pads=[begin, end])
    else:
        y = net.op("AveragePool", [x], kernel_shape=[kernel], strides=[stride], pads=[begin, end], count_include_pad=1)
    steps = (length + begin + end - (kernel - 1) * dilation - 1) // stride + 1
    _linear_gemm(net, net.op("Flatten", [y]), (3 if op == "Conv" else 2) * steps)
    _check_central_differences(Step(net), 3)


def test_one_graph_takes_any_batch_size(step: Step):
    """Batches of 1, 7 and 32 through one graph; without BatchNorm, g(32) is the size-weighted mean of g(7) and g(25)."""
    x, y = _batch(step.net, 32, seed=3)
    full = step(x, y)
    for n in (1, 7):
        out = step(x[:n], y[:n])
        assert out["logits"].shape == (n, CLASSES) and all(np.isfinite(v).all() for v in out.values())
    if step.net.frozen:
        return
    head, tail = step(x[:7], y[:7]), step(x[7:], y[7:])
    for name in step.net.trainable:
        mean = (7 * head[f"{name}.grad"] + 25 * tail[f"{name}.grad"]) / 32
        np.testing.assert_allclose(full[f"{name}.grad"], mean, rtol=1e-4, atol=1e-6, err_msg=name)


def test_onnx_ad_alone_gives_the_hybrid_gradients(step: Step, monkeypatch: pytest.MonkeyPatch):
    """The hand rules are only a faster form: without them (onnx-ad for every node but BatchNorm) nothing changes."""
    monkeypatch.setattr(autodiff, "HAND_RULES", {})
    alone = Step(step.net)
    x, y = _batch(step.net, 6, seed=11)
    ours, theirs = step(x, y), alone(x, y)
    for name in step.net.trainable:
        np.testing.assert_allclose(ours[f"{name}.grad"], theirs[f"{name}.grad"], rtol=1e-4, atol=1e-6, err_msg=name)


def test_dropout_is_the_identity():
    """A step graph trains as if Dropout were not there (exported eval graphs have none; a kept one does nothing)."""
    net = batch_norm_features()
    dropout = next(n for n in net.nodes if n.op_type == "Dropout")
    nodes = [copy.deepcopy(n) for n in net.nodes if n is not dropout]
    for node in nodes:
        node.input[:] = [dropout.input[0] if name == dropout.output[0] else name for name in node.input]
    without = Net(net.input_shape, nodes=nodes, params=net.params, frozen=net.frozen, constants=net.constants)
    assert "Dropout" in {n.op_type for n in net.model().graph.node} - {n.op_type for n in without.model().graph.node}
    x, y = _batch(net, 6, seed=2)
    ours, theirs = Step(net)(x, y), Step(without)(x, y)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
