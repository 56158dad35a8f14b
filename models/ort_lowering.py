"""Rewrite a tier's training forward around onnxruntime-training 1.19's gaps, computing the same function.

Measured here: its gradient builder has no HardSwish or HardSigmoid, crashes the process (SIGFPE)
on any AveragePool, and needs LayerNormalization's optional mean and inverse-std outputs. So the
graph given to `generate_artifacts` gets
- HardSigmoid(x) -> Clip(alpha x + beta, 0, 1), HardSwish(x) -> x Clip(x / 6 + 1/2, 0, 1);
- AveragePool -> a depthwise Conv with a constant 1/(kh kw) kernel (times a constant correction
  map where padding is not counted);
- LayerNormalization with its two optional outputs named.
The portable step graph (onnx-ad) and inference keep the original operators.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from models.onnx_import import UnsupportedModel


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    """The node's attributes as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _hard_sigmoid(x: str, y: str, alpha: float, beta: float, prefix: str, consts: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """Nodes computing y = Clip(alpha x + beta, 0, 1)."""
    names = {k: f"{prefix}.{k}" for k in ("alpha", "beta", "zero", "one", "scaled", "shifted")}
    consts += [numpy_helper.from_array(np.array(v, np.float32), names[k])
               for k, v in (("alpha", alpha), ("beta", beta), ("zero", 0.0), ("one", 1.0))]
    return [
        helper.make_node("Mul", [x, names["alpha"]], [names["scaled"]]),
        helper.make_node("Add", [names["scaled"], names["beta"]], [names["shifted"]]),
        helper.make_node("Clip", [names["shifted"], names["zero"], names["one"]], [y]),
    ]


def _average_pool(node: onnx.NodeProto, shapes: dict[str, list[int]], consts: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """A depthwise Conv with a constant averaging kernel computing the same AveragePool."""
    attrs = _attrs(node)
    if attrs.get("ceil_mode", 0) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedModel(f"node {node.name!r} (AveragePool): ceil_mode / auto_pad cannot be trained by "
                               "onnxruntime-training here; export with explicit pads")
    x, y = node.input[0], node.output[0]
    kernel = list(attrs["kernel_shape"])
    channels = shapes[x][1]
    prefix = node.name or y
    weight = np.full([channels, 1, *kernel], 1.0 / math.prod(kernel), np.float32)
    consts.append(numpy_helper.from_array(weight, f"{prefix}.kernel"))
    conv_attrs = {k: attrs[k] for k in ("strides", "pads") if k in attrs}
    pads = list(attrs.get("pads", [0] * 2 * len(kernel)))
    if not any(pads) or attrs.get("count_include_pad", 0):
        return [helper.make_node("Conv", [x, f"{prefix}.kernel"], [y], group=channels, kernel_shape=kernel, **conv_attrs)]
    ones = np.ones([1, 1, *shapes[x][2:]], np.float32)  # how many real cells each window covers
    counts = _window_counts(ones, kernel, list(attrs.get("strides", [1] * len(kernel))), pads)
    consts.append(numpy_helper.from_array((math.prod(kernel) / counts).astype(np.float32), f"{prefix}.correction"))
    return [
        helper.make_node("Conv", [x, f"{prefix}.kernel"], [f"{prefix}.padded_mean"], group=channels,
                         kernel_shape=kernel, **conv_attrs),
        helper.make_node("Mul", [f"{prefix}.padded_mean", f"{prefix}.correction"], [y]),
    ]


def _window_counts(ones: np.ndarray, kernel: list[int], strides: list[int], pads: list[int]) -> np.ndarray:
    """Per output position, the number of input cells (not padding) its window covers."""
    rank = len(kernel)
    padded = np.pad(ones, [(0, 0), (0, 0), *[(pads[i], pads[i + rank]) for i in range(rank)]])
    out_shape = [(padded.shape[2 + i] - kernel[i]) // strides[i] + 1 for i in range(rank)]
    counts = np.zeros([1, 1, *out_shape], np.float32)
    for index in np.ndindex(*out_shape):
        window = tuple(slice(index[i] * strides[i], index[i] * strides[i] + kernel[i]) for i in range(rank))
        counts[(0, 0, *index)] = padded[(0, 0, *window)].sum()
    return counts


def for_ort_training(forward: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a tier's training forward graph that onnxruntime-training 1.19 can differentiate."""
    model = onnx.ModelProto.FromString(forward.SerializeToString())
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.input, *inferred.value_info, *inferred.output)}
    consts: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        prefix = node.name or node.output[0]
        attrs = _attrs(node)
        if node.op_type == "HardSigmoid":
            nodes += _hard_sigmoid(node.input[0], node.output[0], float(attrs.get("alpha", 0.2)),
                                   float(attrs.get("beta", 0.5)), prefix, consts)
        elif node.op_type == "HardSwish":
            gate = f"{prefix}.gate"
            nodes += _hard_sigmoid(node.input[0], gate, 1.0 / 6.0, 0.5, prefix, consts)
            nodes.append(helper.make_node("Mul", [node.input[0], gate], [node.output[0]]))
        elif node.op_type == "AveragePool":
            nodes += _average_pool(node, shapes, consts)
        elif node.op_type == "LayerNormalization" and len(node.output) < 3:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.output.extend([f"{prefix}.mean", f"{prefix}.inv_std_dev"][len(node.output) - 1:])
            nodes.append(copy)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(consts)
    return model
