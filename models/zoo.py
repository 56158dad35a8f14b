"""Model zoo written directly as ONNX graphs (no PyTorch), each buildable at any HeteroFL width rate.

A model is a flat list of layer steps (`_plan`); parameter shapes and the ONNX graph are both read
off that one list, so they cannot disagree. Parameter names are PyTorch-style (`fc1.weight` is
[out, in], `conv1.weight` is [out, in, kh, kw]) and identical across tiers: a tier keeps the
leading ceil(rate * C) channels of every hidden width, all inputs of the first layer and all
classes of the last.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.spec import (BN_EPSILON, BN_MOMENTUM, CLASS_MASK_NAME, INPUT_NAME, OUTPUT_NAME,  # noqa: F401 (re-exported)
                         SCALE_NAME, ModelSpec)
from models.tiers import scaled_width

OPSET = 17
IR_VERSION = 10  # onnxruntime 1.19 refuses IR 11+
_RUNNING_STATS = ("running_mean", "running_var")


@dataclasses.dataclass(frozen=True)
class _Step:
    """One layer step: op is fc | conv | bn | relu | pool | flatten; in/out are channel counts."""

    op: str
    name: str = ""
    fan_in: int = 0
    out: int = 0
    bias: bool = True


def _plan(spec: ModelSpec, rate: float) -> list[_Step]:
    """Lay the model out at `rate` as a list of steps, in ONNX initializer order.

    With batch norm a layer feeding a BN has no bias (PyTorch `bias=False`): BN removes it anyway.
    """
    steps: list[_Step] = []
    widths = [scaled_width(w, rate) for w in spec.widths]
    if spec.arch == "mlp":
        steps.append(_Step("flatten"))
        fan_in = spec.image_size**2
        for i, width in enumerate(widths, start=1):
            steps.append(_Step("fc", f"fc{i}", fan_in, width, bias=not spec.batch_norm))
            if spec.batch_norm:
                steps.append(_Step("bn", f"bn{i}", width, width))
            steps.append(_Step("relu"))
            fan_in = width
        steps.append(_Step("fc", f"fc{len(widths) + 1}", fan_in, spec.num_classes))
        return steps
    channels, side = 1, spec.image_size
    for i, width in enumerate(widths[:-1], start=1):
        steps.append(_Step("conv", f"conv{i}", channels, width, bias=not spec.batch_norm))
        if spec.batch_norm:
            steps.append(_Step("bn", f"bn{i}", width, width))
        steps += [_Step("relu"), _Step("pool")]
        channels, side = width, side // 2
    # Flatten is channel-major, so the leading channels own the leading block of fc1's columns.
    steps += [_Step("flatten"), _Step("fc", "fc1", channels * side * side, widths[-1]), _Step("relu")]
    steps.append(_Step("fc", "fc2", widths[-1], spec.num_classes))
    return steps


def _step_shapes(step: _Step) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one step (empty for parameter-free ops)."""
    if step.op in ("fc", "conv"):
        kernel = (3, 3) if step.op == "conv" else ()
        shapes = {f"{step.name}.weight": (step.out, step.fan_in, *kernel)}
        return shapes | ({f"{step.name}.bias": (step.out,)} if step.bias else {})
    if step.op == "bn":
        return {f"{step.name}.{p}": (step.out,) for p in ("weight", "bias", *_RUNNING_STATS)}
    return {}


def param_shapes(spec: ModelSpec, rate: float = 1.0) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape at `rate`, in ONNX initializer order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for step in _plan(spec, rate):
        shapes.update(_step_shapes(step))
    return shapes


def forward_macs(spec: ModelSpec, rate: float = 1.0) -> int:
    """Multiply-accumulates of one sample's forward pass at `rate` (a device-independent cost unit)."""
    macs, side = 0, spec.image_size
    for step in _plan(spec, rate):
        if step.op == "fc":
            macs += step.fan_in * step.out
        elif step.op == "conv":
            macs += step.fan_in * step.out * 9 * side * side
        elif step.op == "pool":
            side //= 2
    return macs


def frozen_names(spec: ModelSpec) -> list[str]:
    """Parameters that are not trained: the BatchNorm running statistics."""
    return [n for n in param_shapes(spec) if n.rsplit(".", 1)[1] in _RUNNING_STATS]


def trainable_names(spec: ModelSpec) -> list[str]:
    """Parameters that receive gradients, in ONNX initializer order."""
    frozen = set(frozen_names(spec))
    return [n for n in param_shapes(spec) if n not in frozen]


def init_global_params(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Rate-1 float32 weights, PyTorch-like Kaiming-uniform, deterministic from `spec.seed`."""
    params: dict[str, np.ndarray] = {}
    for step in _plan(spec, 1.0):
        for name, shape in _step_shapes(step).items():
            kind = name.rsplit(".", 1)[1]
            if step.op == "bn":
                fill = 1.0 if kind in ("weight", "running_var") else 0.0
                params[name] = np.full(shape, fill, dtype=np.float32)
                continue
            # PyTorch default: kaiming_uniform(a=sqrt(5)) for weights and U(+-1/sqrt(fan_in)) for
            # bias both reduce to U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in * kh * kw.
            fan_in = step.fan_in * (9 if step.op == "conv" else 1)
            bound = 1.0 / math.sqrt(fan_in)
            # One stream per (seed, name): a tensor's values do not depend on the other layers.
            rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode())])
            params[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return params


def _node(step: _Step, x: str, y: str, index: int) -> onnx.NodeProto:
    """The ONNX node of one step reading tensor `x` and writing tensor `y`."""
    n = step.name
    if step.op in ("fc", "conv"):
        inputs = [x, f"{n}.weight", *([f"{n}.bias"] if step.bias else [])]
        if step.op == "fc":
            return helper.make_node("Gemm", inputs, [y], name=n, transB=1)
        return helper.make_node("Conv", inputs, [y], name=n, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    if step.op == "bn":
        # No training_mode attribute and frozen running stats: the form ORT training handles.
        inputs = [x, *(f"{n}.{p}" for p in ("weight", "bias", *_RUNNING_STATS))]
        return helper.make_node(
            "BatchNormalization", inputs, [y], name=n, epsilon=BN_EPSILON, momentum=BN_MOMENTUM
        )
    if step.op == "relu":
        return helper.make_node("Relu", [x], [y], name=f"relu{index}")
    if step.op == "pool":
        return helper.make_node("MaxPool", [x], [y], name=f"pool{index}", kernel_shape=[2, 2], strides=[2, 2])
    return helper.make_node("Flatten", [x], [y], name=f"flatten{index}", axis=1)


def build_forward(
    spec: ModelSpec,
    rate: float,
    params: dict[str, np.ndarray],
    params_as_inputs: bool = False,
    scaler: bool = False,
    class_mask: bool = False,
) -> onnx.ModelProto:
    """Forward graph `input` [N,1,H,W] -> `logits` [N,classes] with `params` as initializers or inputs.

    With `scaler`, an input `scale` [1] multiplies the output of every hidden fc/conv layer
    (HeteroFL's scaler: the trainer feeds 1/rate while training and 1 when evaluating). With
    `class_mask`, an input `class_mask` [classes] is added to the logits (label-split training
    masks the classes a device has no data for).
    """
    shapes = param_shapes(spec, rate)
    if set(params) != set(shapes):
        missing, extra = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
        raise ValueError(f"params do not match {spec.name} at rate {rate}: missing {missing}, extra {extra}")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(params[name].shape)}")
    steps = _plan(spec, rate)
    nodes: list[onnx.NodeProto] = []
    x = INPUT_NAME
    for index, step in enumerate(steps):
        last = index == len(steps) - 1
        y = OUTPUT_NAME if last and not class_mask else f"{step.op}{index}_out"
        nodes.append(_node(step, x, y, index))
        if scaler and step.op in ("fc", "conv") and not last:
            nodes.append(helper.make_node("Mul", [y, SCALE_NAME], [f"{y}_scaled"], name=f"scaler{index}"))
            y = f"{y}_scaled"
        x = y
    if class_mask:
        nodes.append(helper.make_node("Add", [x, CLASS_MASK_NAME], [OUTPUT_NAME], name="class_mask"))
    size = spec.image_size
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 1, size, size])]
    if scaler:
        inputs.append(helper.make_tensor_value_info(SCALE_NAME, TensorProto.FLOAT, [1]))
    if class_mask:
        inputs.append(helper.make_tensor_value_info(CLASS_MASK_NAME, TensorProto.FLOAT, [spec.num_classes]))
    tensors = [numpy_helper.from_array(np.ascontiguousarray(params[n], dtype=np.float32), n) for n in shapes]
    if params_as_inputs:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in shapes.items()]
        tensors = []
    output = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", spec.num_classes])
    graph = helper.make_graph(nodes, f"{spec.name}_r{rate:g}", inputs, [output], initializer=tensors)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tierfl", ir_version=IR_VERSION
    )



def _batch_stats_nodes(step: _Step, x: str, y: str, axes: list[int]) -> list[onnx.NodeProto]:
    """BatchNorm with the batch's own statistics, from standard ops, exposing them as `<bn>.batch_mean/var`."""
    n = step.name
    mean, var = f"{n}.batch_mean", f"{n}.batch_var"
    keep = [f"{n}_mean_keep", f"{n}_centered", f"{n}_squared", f"{n}_var_keep", f"{n}_std", f"{n}_normed", f"{n}_scaled"]
    shape = f"{n}_channel_shape"
    return [
        helper.make_node("ReduceMean", [x], [keep[0]], axes=axes, keepdims=1),
        helper.make_node("Sub", [x, keep[0]], [keep[1]]),
        helper.make_node("Mul", [keep[1], keep[1]], [keep[2]]),
        helper.make_node("ReduceMean", [keep[2]], [keep[3]], axes=axes, keepdims=1),
        helper.make_node("Flatten", [keep[0]], [f"{mean}_2d"], axis=0),
        helper.make_node("Squeeze", [f"{mean}_2d", f"{n}_axis0"], [mean]),
        helper.make_node("Flatten", [keep[3]], [f"{var}_2d"], axis=0),
        helper.make_node("Squeeze", [f"{var}_2d", f"{n}_axis0"], [var]),
        helper.make_node("Add", [keep[3], f"{n}_eps"], [f"{n}_var_eps"]),
        helper.make_node("Sqrt", [f"{n}_var_eps"], [keep[4]]),
        helper.make_node("Div", [keep[1], keep[4]], [keep[5]]),
        helper.make_node("Reshape", [f"{n}.weight", shape], [f"{n}_gamma"]),
        helper.make_node("Reshape", [f"{n}.bias", shape], [f"{n}_beta"]),
        helper.make_node("Mul", [keep[5], f"{n}_gamma"], [keep[6]]),
        helper.make_node("Add", [keep[6], f"{n}_beta"], [y]),
    ]


def build_statistics_graph(spec: ModelSpec, rate: float) -> onnx.ModelProto:
    """Forward pass in training mode (every BatchNorm uses its batch's statistics) that outputs them.

    Inputs: `input` and every parameter at `rate`; outputs `<bn>.batch_mean` and `<bn>.batch_var`
    (population variance) per BatchNorm layer, in plan order. Standard ONNX operators only, so
    plain onnxruntime runs it: this is how devices measure static BatchNorm statistics (HeteroFL
    sBN) of the global model on their own data.
    """
    if not spec.batch_norm:
        raise ValueError(f"{spec.name} has no batch norm: there are no statistics to measure")
    nodes: list[onnx.NodeProto] = []
    constants: list[onnx.TensorProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    x = INPUT_NAME
    for index, step in enumerate(_plan(spec, rate)):
        y = f"{step.op}{index}_out"
        if step.op != "bn":
            nodes.append(_node(step, x, y, index))
        else:
            spatial = spec.arch == "cnn"
            axes = [0, 2, 3] if spatial else [0]
            nodes += _batch_stats_nodes(step, x, y, axes)
            constants += [
                numpy_helper.from_array(np.array([1, step.out, 1, 1] if spatial else [1, step.out], np.int64), f"{step.name}_channel_shape"),
                numpy_helper.from_array(np.array([0], np.int64), f"{step.name}_axis0"),
                numpy_helper.from_array(np.array(BN_EPSILON, np.float32), f"{step.name}_eps"),
            ]
            outputs += [helper.make_tensor_value_info(f"{step.name}.batch_{s}", TensorProto.FLOAT, [step.out]) for s in ("mean", "var")]
        x = y
    size = spec.image_size
    shapes = param_shapes(spec, rate)
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 1, size, size])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in shapes.items()]
    graph = helper.make_graph(nodes, f"{spec.name}_r{rate:g}_statistics", inputs, outputs, initializer=constants)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tierfl", ir_version=IR_VERSION
    )
