"""Model zoo written directly as ONNX graphs (no PyTorch): full-width forward graphs that TierFL cuts into tiers.

Every model is a classifier `input` [N, *spec.input_shape] -> `logits` [N, classes] with
PyTorch-style parameter names (`fc1.weight` is [out, in], `conv1.weight` is [out, in, kh, kw],
`stage1.bn1.running_mean`) and PyTorch's default init, deterministic from the seed. The zoo builds
rate 1 only: tiers are cut from that graph as from a user's model (models.onnx_import.normalize,
models.widths.analyse, models.tier_graph.cut_forward), keeping the leading channels of every hidden
width, all inputs of the first layer and all classes of the last.

Every arch is written into a `_Graph` (its nodes, its parameters' shapes and init, its constants):
- mlp, cnn: small models for 8x8 / 28x28 images (1 channel by default), laid out as a flat list of
  layer steps (`_plan`).
- preresnet, mobilenet, conv1d, transformer: the models edge users need (3x32x32 images, a
  depthwise-separable CNN, 1-D time series, tokens), written top to bottom.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.spec import (BN_EPSILON, BN_MOMENTUM, INPUT_NAME, IR_VERSION, OPSET,  # noqa: F401 (re-exported)
                         OUTPUT_NAME, ModelSpec)


def init_global_params(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Rate-1 float32 weights in graph order, PyTorch's default init, deterministic from `spec.seed`."""
    return {name: param.initial(spec.seed, name) for name, param in _written(spec).params.items()}


def build_forward(spec: ModelSpec, params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Full-width forward graph `input` [N, *spec.input_shape] -> `logits` [N, classes], `params` as initializers."""
    g = _written(spec)
    shapes = {name: param.shape for name, param in g.params.items()}
    if set(params) != set(shapes):
        missing, extra = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
        raise ValueError(f"params do not match {spec.name}: missing {missing}, extra {extra}")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(params[name].shape)}")
    return g.model(params)


def _uniform(seed: int, name: str, shape: tuple[int, ...], fan_in: int, gain: float = 1.0) -> np.ndarray:
    """PyTorch's default init of a weight or bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), float32; `gain` times that
    bound (sqrt(6): He et al.'s kaiming_uniform for a layer a ReLU follows).

    kaiming_uniform(a=sqrt(5)) for weights and U(+-1/sqrt(fan_in)) for biases both reduce to it,
    fan_in = in * kh * kw. One stream per (seed, name): a tensor's values do not depend on the other layers.
    """
    bound = gain / math.sqrt(fan_in)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Param:
    """A parameter's shape and init: U(+-gain/sqrt(fan_in)) when fan_in > 0, else filled with `fill`."""

    shape: tuple[int, ...]
    fan_in: int = 0
    fill: float = 0.0
    gain: float = 1.0

    def initial(self, seed: int, name: str) -> np.ndarray:
        """The parameter's initial value."""
        if self.fan_in:
            return _uniform(seed, name, self.shape, self.fan_in, self.gain)
        return np.full(self.shape, self.fill, np.float32)


class _Graph:
    """A rate-1 forward graph being written: its nodes in order, its parameters and its constants.

    Each layer method adds its nodes and parameters and returns the name of the tensor it writes
    (named after the layer unless told otherwise, so `stage1.bn1` writes the tensor `stage1.bn1`).
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.nodes: list[onnx.NodeProto] = []
        self.params: dict[str, _Param] = {}
        self.constants: dict[str, np.ndarray] = {}

    def node(self, op: str, inputs: Sequence[str], name: str, output: str = "", **attrs: Any) -> str:
        """Add node `name` writing the tensor `output` (default: `name`)."""
        output = output or name
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=name, **attrs))
        return output

    def param(self, name: str, shape: tuple[int, ...], fan_in: int = 0, fill: float = 0.0, gain: float = 1.0) -> str:
        """Declare a parameter."""
        self.params[name] = _Param(shape, fan_in, fill, gain)
        return name

    def const(self, name: str, value: float) -> str:
        """A float32 scalar constant (shared by every node that names it)."""
        self.constants[name] = np.array(value, np.float32)
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
             bias: bool = False, dims: int = 2) -> str:
        """Conv `kernel`^dims with 'same' padding; groups=cin is depthwise. No bias by default (a BatchNorm follows)."""
        fan_in = cin // groups * kernel**dims
        weight = self.param(f"{name}.weight", (cout, cin // groups, *[kernel] * dims), fan_in)
        inputs = [x, weight, *([self.param(f"{name}.bias", (cout,), fan_in)] if bias else [])]
        return self.node("Conv", inputs, name, kernel_shape=[kernel] * dims, strides=[stride] * dims,
                         pads=[kernel // 2] * 2 * dims, group=groups)

    def batch_norm(self, x: str, name: str, channels: int, output: str = "") -> str:
        """BatchNorm in inference form (no training_mode): ORT training and the tier cutter take it so."""
        fills = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
        inputs = [x, *(self.param(f"{name}.{p}", (channels,), fill=v) for p, v in fills.items())]
        return self.node("BatchNormalization", inputs, name, output, epsilon=BN_EPSILON, momentum=BN_MOMENTUM)

    def layer_norm(self, x: str, name: str, width: int) -> str:
        """LayerNorm over the last axis."""
        scale, shift = self.param(f"{name}.weight", (width,), fill=1.0), self.param(f"{name}.bias", (width,))
        return self.node("LayerNormalization", [x, scale, shift], name, axis=-1, epsilon=BN_EPSILON)  # PyTorch's 1e-5

    def linear(self, x: str, name: str, fan_in: int, out: int) -> str:
        """Fully connected layer on [N, fan_in]."""
        weight, bias = self.param(f"{name}.weight", (out, fan_in), fan_in), self.param(f"{name}.bias", (out,), fan_in)
        return self.node("Gemm", [x, weight, bias], name, transB=1)

    def token_linear(self, x: str, name: str, fan_in: int, out: int) -> str:
        """Fully connected layer on every token of [N, T, fan_in] (x @ weight^T + bias, weight [out, in] as PyTorch)."""
        weight, bias = self.param(f"{name}.weight", (out, fan_in), fan_in), self.param(f"{name}.bias", (out,), fan_in)
        product = self.node("MatMul", [x, self.node("Transpose", [weight], f"{name}.weight_t", perm=[1, 0])],
                            f"{name}.product")
        return self.node("Add", [product, bias], name)

    def relu(self, x: str) -> str:
        """max(x, 0)."""
        return self.node("Relu", [x], f"{x}.relu")

    def relu6(self, x: str) -> str:
        """min(max(x, 0), 6)."""
        return self.node("Clip", [x, self.const("relu6.min", 0.0), self.const("relu6.max", 6.0)], f"{x}.relu6")

    def gelu(self, x: str) -> str:
        """x/2 (1 + erf(x / sqrt 2)), the exact GELU (opset 17 has no Gelu operator)."""
        erf = self.node("Erf", [self.node("Div", [x, self.const("gelu.sqrt2", math.sqrt(2))], f"{x}.div")], f"{x}.erf")
        gate = self.node("Mul", [self.node("Add", [erf, self.const("gelu.one", 1.0)], f"{x}.erf1"),
                                 self.const("gelu.half", 0.5)], f"{x}.gate")
        return self.node("Mul", [x, gate], f"{x}.gelu")

    def global_pool(self, x: str, name: str) -> str:
        """Mean over every axis after the channels: [N, C, ...] -> [N, C]."""
        return self.node("Flatten", [self.node("GlobalAveragePool", [x], f"{name}.mean")], name, axis=1)

    def model(self, params: dict[str, np.ndarray]) -> onnx.ModelProto:
        """The ONNX model: `input` [N, *input_shape] -> `logits` [N, classes], `params` as initializers."""
        spec = self.spec
        nodes = [onnx.NodeProto.FromString(node.SerializeToString()) for node in self.nodes]
        nodes[-1].output[0] = OUTPUT_NAME
        inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *spec.input_shape])]
        weights = [numpy_helper.from_array(np.ascontiguousarray(params[n], np.float32), n) for n in self.params]
        constants = [numpy_helper.from_array(value, name) for name, value in self.constants.items()]
        output = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", spec.num_classes])
        graph = helper.make_graph(nodes, self.name, inputs, [output], initializer=[*weights, *constants])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tierfl",
                                 ir_version=IR_VERSION)


@dataclasses.dataclass(frozen=True)
class _Step:
    """One layer step of mlp or cnn: op is fc | conv | bn | relu | pool | flatten; in/out are channel counts."""

    op: str
    name: str = ""
    fan_in: int = 0
    out: int = 0
    bias: bool = True
    gain: float = 1.0  # of the weight's init bound (ModelSpec.init)


def _plan(spec: ModelSpec) -> list[_Step]:
    """Lay mlp or cnn out as a list of steps.

    With batch norm a layer feeding a BN has no bias (PyTorch `bias=False`): BN removes it anyway.
    With init "kaiming" every fc and conv but the output layer (all of them a ReLU follows) draws its
    weights with gain sqrt(6).
    """
    steps = _layers(spec)
    if spec.init == "kaiming":
        hidden = [i for i, step in enumerate(steps) if step.op in ("fc", "conv")][:-1]
        steps = [dataclasses.replace(step, gain=math.sqrt(6.0)) if i in hidden else step for i, step in enumerate(steps)]
    return steps


def _layers(spec: ModelSpec) -> list[_Step]:
    """The steps of mlp or cnn, every init at PyTorch's default."""
    steps: list[_Step] = []
    if spec.arch == "mlp":
        steps.append(_Step("flatten"))
        fan_in = spec.channels * spec.image_size**2
        for i, width in enumerate(spec.widths, start=1):
            steps.append(_Step("fc", f"fc{i}", fan_in, width, bias=not spec.batch_norm))
            if spec.batch_norm:
                steps.append(_Step("bn", f"bn{i}", width, width))
            steps.append(_Step("relu"))
            fan_in = width
        steps.append(_Step("fc", f"fc{len(spec.widths) + 1}", fan_in, spec.num_classes))
        return steps
    channels, side = spec.channels, spec.image_size
    for i, width in enumerate(spec.widths[:-1], start=1):
        steps.append(_Step("conv", f"conv{i}", channels, width, bias=not spec.batch_norm))
        if spec.batch_norm:
            steps.append(_Step("bn", f"bn{i}", width, width))
        steps += [_Step("relu"), _Step("pool")]
        channels, side = width, side // 2
    # Flatten is channel-major, so the leading channels own the leading block of fc1's columns.
    steps += [_Step("flatten"), _Step("fc", "fc1", channels * side * side, spec.widths[-1]), _Step("relu")]
    steps.append(_Step("fc", "fc2", spec.widths[-1], spec.num_classes))
    return steps


def _stepped(g: _Graph, spec: ModelSpec) -> str:
    """mlp, cnn: the steps of `_plan` in order, step i writing the tensor `<op><i>_out`."""
    g.name = f"{spec.name}_r1"  # the name these graphs always had: their exports stay byte for byte the same
    x = INPUT_NAME
    for index, step in enumerate(_plan(spec)):
        x = _step(g, step, x, f"{step.op}{index}_out", index)
    return x


def _step(g: _Graph, step: _Step, x: str, y: str, index: int) -> str:
    """Add the node and parameters of one step reading tensor `x` and writing tensor `y`."""
    n = step.name
    if step.op in ("fc", "conv"):
        kernel = [3, 3] if step.op == "conv" else []
        fan_in = step.fan_in * math.prod(kernel)
        inputs = [x, g.param(f"{n}.weight", (step.out, step.fan_in, *kernel), fan_in, gain=step.gain)]
        if step.bias:
            inputs.append(g.param(f"{n}.bias", (step.out,), fan_in))
        if step.op == "fc":
            return g.node("Gemm", inputs, n, y, transB=1)
        return g.node("Conv", inputs, n, y, kernel_shape=kernel, pads=[1, 1, 1, 1])
    if step.op == "bn":
        return g.batch_norm(x, n, step.out, y)
    if step.op == "relu":
        return g.node("Relu", [x], f"relu{index}", y)
    if step.op == "pool":
        return g.node("MaxPool", [x], f"pool{index}", y, kernel_shape=[2, 2], strides=[2, 2])
    return g.node("Flatten", [x], f"flatten{index}", y, axis=1)


def _preresnet(g: _Graph, spec: ModelSpec) -> str:
    """HeteroFL's CIFAR PreResNet: 3x3 stem, one pre-activation block per stage (stride 2 from stage 2),
    BN-ReLU, mean, fc."""
    widths = spec.widths
    x, cin = g.conv(INPUT_NAME, "stem", spec.channels, widths[0]), widths[0]
    for i, width in enumerate(widths, start=1):
        x, cin = _preact_block(g, x, f"stage{i}", cin, width, stride=1 if i == 1 else 2), width
    x = g.relu(g.batch_norm(x, "bn", cin))
    return g.linear(g.global_pool(x, "pool"), "fc", cin, spec.num_classes)


def _preact_block(g: _Graph, x: str, name: str, cin: int, cout: int, stride: int) -> str:
    """a = relu(bn1(x)); conv2(relu(bn2(conv1(a)))) + x, or + a strided 1x1 conv of a when the shape changes."""
    a = g.relu(g.batch_norm(x, f"{name}.bn1", cin))
    h = g.conv(a, f"{name}.conv1", cin, cout, stride=stride)
    h = g.conv(g.relu(g.batch_norm(h, f"{name}.bn2", cout)), f"{name}.conv2", cout, cout)
    skip = x if stride == 1 and cin == cout else g.conv(a, f"{name}.shortcut", cin, cout, kernel=1, stride=stride)
    return g.node("Add", [h, skip], name)


def _mobilenet(g: _Graph, spec: ModelSpec) -> str:
    """MobileNet-style: stride-2 3x3 stem, depthwise-separable blocks with squeeze-excitation (stride 2 from
    the second block), ReLU6 throughout, mean, fc."""
    stem, *widths = spec.widths
    x = g.relu6(g.batch_norm(g.conv(INPUT_NAME, "stem.conv", spec.channels, stem, stride=2), "stem.bn", stem))
    cin = stem
    for i, width in enumerate(widths, start=1):
        x, cin = _separable_block(g, x, f"block{i}", cin, width, stride=1 if i == 1 else 2), width
    return g.linear(g.global_pool(x, "pool"), "fc", cin, spec.num_classes)


def _separable_block(g: _Graph, x: str, name: str, cin: int, cout: int, stride: int) -> str:
    """Depthwise 3x3 (stride), BN, ReLU6, squeeze-excitation, pointwise 1x1, BN, ReLU6."""
    h = g.relu6(g.batch_norm(g.conv(x, f"{name}.depthwise", cin, cin, stride=stride, groups=cin), f"{name}.bn1", cin))
    h = _squeeze_excite(g, h, f"{name}.se", cin)
    return g.relu6(g.batch_norm(g.conv(h, f"{name}.pointwise", cin, cout, kernel=1), f"{name}.bn2", cout))


def _squeeze_excite(g: _Graph, x: str, name: str, channels: int) -> str:
    """x times a per-channel gate hardsigmoid(expand(relu(reduce(mean of x)))), reducing to channels / 4."""
    hidden = max(2, channels // 4)
    s = g.relu(g.conv(g.node("GlobalAveragePool", [x], f"{name}.mean"), f"{name}.reduce", channels, hidden,
                      kernel=1, bias=True))
    expand = g.conv(s, f"{name}.expand", hidden, channels, kernel=1, bias=True)
    gate = g.node("HardSigmoid", [expand], f"{name}.gate", alpha=1.0 / 6.0, beta=0.5)  # PyTorch's hardsigmoid
    return g.node("Mul", [x, gate], name)


def _conv1d(g: _Graph, spec: ModelSpec) -> str:
    """1-D CNN over [channels, length]: (conv k=3, BN, ReLU, 2x max pool) per width, mean over time, fc."""
    x, cin = INPUT_NAME, spec.channels
    for i, width in enumerate(spec.widths, start=1):
        x = g.relu(g.batch_norm(g.conv(x, f"conv{i}", cin, width, dims=1), f"bn{i}", width))
        x, cin = g.node("MaxPool", [x], f"pool{i}", kernel_shape=[2], strides=[2]), width
    return g.linear(g.global_pool(x, "pool"), "fc", cin, spec.num_classes)


def _transformer(g: _Graph, spec: ModelSpec) -> str:
    """One pre-norm single-head transformer layer over [length, channels] tokens, then LayerNorm, mean, fc.

    Embedding plus learned positions; attention scaled by 1/sqrt(width) of the full width, a
    constant every tier keeps; a GELU MLP.
    """
    dim, mlp = spec.widths
    x = g.token_linear(INPUT_NAME, "embed", spec.channels, dim)
    x = g.node("Add", [x, g.param("pos.weight", (spec.length, dim), fan_in=dim)], "embed.pos")
    h = g.layer_norm(x, "norm1", dim)
    q, k, v = (g.token_linear(h, f"attn.{p}", dim, dim) for p in "qkv")
    scores = g.node("MatMul", [q, g.node("Transpose", [k], "attn.k_t", perm=[0, 2, 1])], "attn.qk")
    scores = g.node("Mul", [scores, g.const("attn.scale", 1.0 / math.sqrt(dim))], "attn.scores")
    attention = g.node("Softmax", [scores], "attn.weights", axis=-1)
    mixed = g.node("MatMul", [attention, v], "attn.mix")
    x = g.node("Add", [x, g.token_linear(mixed, "attn.out", dim, dim)], "attn.residual")
    h = g.gelu(g.token_linear(g.layer_norm(x, "norm2", dim), "mlp.fc1", dim, mlp))
    x = g.node("Add", [x, g.token_linear(h, "mlp.fc2", mlp, dim)], "mlp.residual")
    x = g.node("ReduceMean", [g.layer_norm(x, "norm", dim)], "mean", axes=[1], keepdims=0)
    return g.linear(x, "fc", dim, spec.num_classes)


_WRITERS = {"mlp": _stepped, "cnn": _stepped, "preresnet": _preresnet, "mobilenet": _mobilenet, "conv1d": _conv1d,
            "transformer": _transformer}


def _written(spec: ModelSpec) -> _Graph:
    """The model written at rate 1."""
    g = _Graph(spec)
    _WRITERS[spec.arch](g, spec)
    return g
