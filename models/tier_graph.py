"""Cut a normalized forward graph to a tier: the width plan's leading blocks, a dynamic batch, the graphs' extra inputs.

`cut_forward` is the one way a tier's forward graph is made, for the zoo and for a user's model
alike: every parameter becomes the leading block of the global one (models.widths), a Reshape's
constant shape and a depthwise Conv's `group` follow the kept channels, and the batch axis
becomes `N`. Options add what training graphs take: the class mask (added to the logits), the
HeteroFL scaler (every cut layer's output times `scale`), parameters as inputs (the portable
backend and evaluation feed weights each call). `statistics_graph` is the training-mode forward
that measures BatchNorm statistics on a device; `forward_macs` the cost of one sample.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.slicing import slice_params
from models.spec import (BN_EPSILON, CLASS_MASK_NAME, INPUT_NAME, IR_VERSION, OPSET, OUTPUT_NAME, RUNNING_MEAN,
                         SCALE_NAME)
from models.widths import WidthPlan

_PARAMETRIC = {"Conv": 1, "Gemm": 1, "MatMul": -1}  # op -> its output's channel axis


def initializer_arrays(model: onnx.ModelProto, names: list[str] | tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The graph's initializers as float arrays by name (only `names`, in that order, when given)."""
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return arrays if names is None else {n: arrays[n] for n in names}


def _rate_shape(plan: WidthPlan, tensor: str, rate: float) -> list[int]:
    """A tensor's shape at `rate`, -1 on the batch axis."""
    return [plan.kept(a, full, rate) for a, full in zip(plan.labels[tensor], plan.shapes[tensor])]


def _rewrite_nodes(graph: onnx.GraphProto, plan: WidthPlan, rate: float) -> None:
    """Reshape shapes and depthwise Conv groups at `rate`."""
    extra = []
    for node in graph.node:
        if node.op_type == "Reshape":
            shape = np.array(_rate_shape(plan, node.output[0], rate), np.int64)
            name = f"{node.output[0]}.shape"
            extra.append(numpy_helper.from_array(shape, name))
            node.input[1] = name
        elif node.op_type == "Conv":
            for attr in node.attribute:
                if attr.name == "group" and 1 < attr.i == plan.shapes[node.input[0]][1]:
                    attr.i = _rate_shape(plan, node.input[0], rate)[1]  # depthwise: one group per kept channel
    graph.initializer.extend(extra)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]  # a Reshape's shape at rate 1 is no longer read
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _add_scaler(graph: onnx.GraphProto, plan: WidthPlan) -> None:
    """Multiply the output of every layer whose output channels are cut by the `scale` input."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        axis = _PARAMETRIC.get(node.op_type)
        if axis is None or node.output[0] == OUTPUT_NAME:
            continue
        label = plan.labels[node.output[0]][axis]
        name = plan.group_names.get(label.group)
        if name is None or plan.groups[name][1] is not None:
            continue
        raw = f"{node.output[0]}.unscaled"
        scaled = node.output[0]
        node.output[0] = raw
        nodes.append(helper.make_node("Mul", [raw, SCALE_NAME], [scaled], name=f"{node.name or scaled}.scaler"))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info(SCALE_NAME, TensorProto.FLOAT, [1]))


def _add_class_mask(graph: onnx.GraphProto, classes: int) -> None:
    """logits = the model's output + `class_mask` [classes]."""
    for node in graph.node:
        node.output[:] = [f"{OUTPUT_NAME}.unmasked" if o == OUTPUT_NAME else o for o in node.output]
    graph.node.append(helper.make_node("Add", [f"{OUTPUT_NAME}.unmasked", CLASS_MASK_NAME], [OUTPUT_NAME], name="class_mask"))
    graph.input.append(helper.make_tensor_value_info(CLASS_MASK_NAME, TensorProto.FLOAT, [classes]))


def _params_to_inputs(graph: onnx.GraphProto, names: list[str]) -> None:
    """Move the named initializers to graph inputs (same name, shape and type)."""
    wanted = set(names)
    moved = {t.name: list(t.dims) for t in graph.initializer if t.name in wanted}
    kept = [t for t in graph.initializer if t.name not in wanted]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, moved[n]) for n in names)


def cut_forward(
    forward: onnx.ModelProto,
    plan: WidthPlan,
    rate: float,
    weights: Mapping[str, np.ndarray] | None = None,
    *,
    class_mask: bool = False,
    scaler: bool = False,
    params_as_inputs: bool = False,
) -> onnx.ModelProto:
    """The forward graph of the tier at `rate` (batch axis `N`), its parameters cut from `weights` (default: the graph's)."""
    model = onnx.ModelProto.FromString(forward.SerializeToString())
    graph = model.graph
    del graph.value_info[:]
    params = [*plan.trainable, *plan.frozen]
    full = dict(weights) if weights is not None else initializer_arrays(forward, params)
    cut = slice_params(full, plan.param_shapes(rate))
    kept = [t for t in graph.initializer if t.name not in cut]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(cut[n], np.float32), n) for n in params)
    _rewrite_nodes(graph, plan, rate)
    dims = [-1 if d == -1 else d for d in _rate_shape(plan, INPUT_NAME, rate)]
    graph.input[0].CopyFrom(helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *dims[1:]]))
    classes = plan.shapes[OUTPUT_NAME][1]
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", classes]))
    if scaler:
        _add_scaler(graph, plan)
    if class_mask:
        _add_class_mask(graph, classes)
    if params_as_inputs:
        _params_to_inputs(graph, params)
    graph.name = f"{graph.name or 'model'}_r{rate:g}"
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def params_as_inputs(model: onnx.ModelProto, names: list[str] | tuple[str, ...]) -> onnx.ModelProto:
    """A copy of `model` that takes the named initializers as inputs (fed each run)."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    _params_to_inputs(copy.graph, list(names))
    return copy


def _batch_statistics(node: onnx.NodeProto, rank: int, constants: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """BatchNorm with the batch's own statistics, exposing them as `<layer>.batch_mean` / `<layer>.batch_var`."""
    x, gamma, beta, running_mean = node.input[:4]
    y = node.output[0]
    layer = running_mean.removesuffix(RUNNING_MEAN)
    axes = [0, *range(2, rank)]
    view = f"{layer}.channel_view"
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), BN_EPSILON)
    constants += [
        numpy_helper.from_array(np.array([1, -1, *[1] * (rank - 2)], np.int64), view),
        numpy_helper.from_array(np.array(eps, np.float32), f"{layer}.eps"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{layer}.flat"),
    ]
    t = {k: f"{layer}.{k}" for k in ("mean_keep", "centered", "squared", "var_keep", "std", "normed", "scaled",
                                     "gamma", "beta", "var_eps")}
    return [
        helper.make_node("ReduceMean", [x], [t["mean_keep"]], axes=axes, keepdims=1),
        helper.make_node("Sub", [x, t["mean_keep"]], [t["centered"]]),
        helper.make_node("Mul", [t["centered"], t["centered"]], [t["squared"]]),
        helper.make_node("ReduceMean", [t["squared"]], [t["var_keep"]], axes=axes, keepdims=1),
        helper.make_node("Reshape", [t["mean_keep"], f"{layer}.flat"], [f"{layer}.batch_mean"]),
        helper.make_node("Reshape", [t["var_keep"], f"{layer}.flat"], [f"{layer}.batch_var"]),
        helper.make_node("Add", [t["var_keep"], f"{layer}.eps"], [t["var_eps"]]),
        helper.make_node("Sqrt", [t["var_eps"]], [t["std"]]),
        helper.make_node("Div", [t["centered"], t["std"]], [t["normed"]]),
        helper.make_node("Reshape", [gamma, view], [t["gamma"]]),
        helper.make_node("Reshape", [beta, view], [t["beta"]]),
        helper.make_node("Mul", [t["normed"], t["gamma"]], [t["scaled"]]),
        helper.make_node("Add", [t["scaled"], t["beta"]], [y]),
    ]


def statistics_graph(tier_forward: onnx.ModelProto) -> onnx.ModelProto:
    """The forward in training mode (BatchNorm on batch statistics) that outputs every layer's batch mean and variance.

    Takes a tier's forward graph with parameters as inputs; outputs `<layer>.batch_mean` and
    `<layer>.batch_var` (population variance) per BatchNorm, standard operators only: how devices
    measure static BatchNorm statistics (HeteroFL sBN) of the global model on their own data.
    """
    inferred = onnx.shape_inference.infer_shapes(tier_forward)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.graph.input, *inferred.graph.value_info)}
    channels = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in tier_forward.graph.input}
    nodes: list[onnx.NodeProto] = []
    constants: list[onnx.TensorProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    for node in tier_forward.graph.node:
        if node.op_type != "BatchNormalization":
            nodes.append(node)
            continue
        nodes += _batch_statistics(node, ranks[node.input[0]], constants)
        layer = node.input[3].removesuffix(RUNNING_MEAN)
        outputs += [helper.make_tensor_value_info(f"{layer}.batch_{s}", TensorProto.FLOAT, channels[node.input[3]])
                    for s in ("mean", "var")]
    if not outputs:
        raise ValueError("the model has no BatchNormalization: there are no statistics to measure")
    graph = helper.make_graph(nodes, f"{tier_forward.graph.name}_statistics", list(tier_forward.graph.input), outputs,
                              initializer=[*tier_forward.graph.initializer, *constants])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tierfl",
                              ir_version=IR_VERSION)
    return _prune(model)


def live(
    nodes: Sequence[onnx.NodeProto], constants: Sequence[onnx.TensorProto], outputs: Sequence[str]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes (in order) and constants that the named outputs depend on."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1], [c for c in constants if c.name in needed]


def _prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes (and initializers) that no graph output needs."""
    graph = model.graph
    nodes, constants = live(graph.node, graph.initializer, [o.name for o in graph.output])
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(constants)
    return model


def forward_macs(tier_forward: onnx.ModelProto) -> int:
    """Multiply-accumulates of one sample's forward pass (Conv, Gemm and MatMul)."""
    model = onnx.ModelProto.FromString(tier_forward.SerializeToString())
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    macs = 0
    for node in graph.node:
        out = shapes.get(node.output[0])
        if node.op_type == "Conv" and out:
            weight = shapes[node.input[1]]
            macs += math.prod(out) * math.prod(weight[1:])
        elif node.op_type == "Gemm" and out:
            transposed = any(a.name == "transA" and a.i for a in node.attribute)
            a = shapes[node.input[0]]
            macs += math.prod(out) * (a[0] if transposed else a[1])
        elif node.op_type == "MatMul" and out:
            macs += math.prod(out) * shapes[node.input[0]][-1]
    return macs
