"""Reverse-mode differentiation of a forward graph, in standard ONNX operators only.

`backward` walks the forward nodes in reverse and asks, node by node, who writes its backward:

- our own rules for what onnx-ad lacks: BatchNormalization in training mode (batch statistics,
  `_batchnorm`; `lower_for_training` emits its forward and the running-statistics update) and
  the weight gradient of a grouped (e.g. depthwise) Conv, which onnx-ad refuses;
- fast hand rules (`HAND_RULES`) for the zoo's operators, where their conditions hold: Gemm
  (transB=1), stride-1 "same" 2-D Conv, Relu, non-overlapping MaxPool, Flatten/Reshape, and
  Mul/Add where the input that needs a gradient has the output's shape;
- onnx-ad (the `onnx-ad` package, imported lazily) for every other node: `_onnx_ad_rule`
  differentiates a one-node model of the node and splices its adjoint nodes into ours.

Convention. A rule is `rule(g, node, dy, wants) -> {input name: gradient name}`: given a
forward `node`, the name `dy` of the loss gradient with respect to its (first) output and the
set `wants` of tensor names that need a gradient, it appends nodes to the builder `g` and
returns a gradient for each input of `node` that is in `wants` (only those), shaped like that
input. Rules read forward tensors by name -- the node's inputs and outputs, and what
`lower_for_training` saved as `saved(output, what)` -- so forward and backward share one graph.

Variable batch size. onnx-ad needs fully known shapes (its Conv, pooling and broadcasting rules
read them) and bakes them into constants (Reshape and Expand targets). So each one-node model is
differentiated twice, with the symbolic batch dimension set to two stand-in sizes
(`STAND_IN_BATCHES`); the two results have the same nodes, and a constant that differs between
them is an affine function of the batch size, `slope * N + offset`, which the spliced graph
computes from the batch's actual size (`GraphBuilder.batch_linear`). Nothing else may differ.

onnx-ad carries a trailing seed axis on every gradient; the splice adds it to the incoming
gradient (Unsqueeze) and removes it from the results (Squeeze), and turns the adjoint's copies
that only move that size-1 axis into Reshapes (`_without_seed_moves`). Conv and AveragePool
geometries whose onnx-ad adjoint is wrong (uneven pads; see `explicit_padding`, which the step
graph applies to the forward first) are differentiated as an explicit Pad/Slice and the op.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from models.spec import IR_VERSION, OPSET

NEW_SUFFIX = ".new"  # an updated state tensor `x` is written to `x.new`
STAND_IN_BATCHES = (9973, 10007)  # primes no real dimension is likely to equal (see the module docstring)
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16})
ONNX_AD_VERSION = "0.3.0"
_SEED = "adj_"  # onnx-ad's names: seed `adj_<output>` in, gradient `adj_<input>` out
_TO_END = 2**62  # a Slice end past any dimension


def saved(tensor: str, what: str) -> str:
    """Name of a forward intermediate that `lower_for_training` keeps for the backward rule."""
    return f"{tensor}.{what}"


def require_onnx_ad() -> types.ModuleType:
    """The onnx-ad module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("onnx_ad")
    except ImportError as error:
        raise ImportError(
            f"building a training-step graph needs onnx-ad: pip install 'tierfl[full]' (or onnx-ad=={ONNX_AD_VERSION}); "
            "it is only needed where models are exported, never on a device"
        ) from error


# ---- shapes ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorTypes:
    """Element type and shape of every tensor of a forward graph whose batch dimension is symbolic.

    `shapes[b]` holds every shape with the batch set to the stand-in size `b` (each of
    STAND_IN_BATCHES); a dimension that differs between the two depends on the batch.
    """

    elem_types: Mapping[str, int]
    shapes: Mapping[int, Mapping[str, tuple[int, ...]]]

    def at(self, name: str, batch: int) -> tuple[int, ...]:
        """The shape of `name` with the batch set to the stand-in size `batch`."""
        return self.shapes[batch][name]

    def shape(self, name: str) -> tuple[int | None, ...]:
        """The shape of `name`, None for every batch-dependent dimension."""
        first, second = (self.shapes[b][name] for b in STAND_IN_BATCHES)
        return tuple(d if d == e else None for d, e in zip(first, second))

    def rank(self, name: str) -> int:
        """The rank of `name`."""
        return len(self.shapes[STAND_IN_BATCHES[0]][name])

    def is_float(self, name: str) -> bool:
        """Whether `name` is a floating-point tensor (one that can carry a gradient)."""
        return self.elem_types.get(name) in FLOAT_TYPES

    def with_tensor(self, name: str, elem_type: int, like: str) -> TensorTypes:
        """These types and one more tensor, `name`, of `elem_type` and shaped like `like`."""
        shapes = {b: types.MappingProxyType({**known, name: known[like]}) for b, known in self.shapes.items()}
        return TensorTypes(types.MappingProxyType({**self.elem_types, name: elem_type}), types.MappingProxyType(shapes))


def _inferred(model: onnx.ModelProto, batch_dim: str, batch: int) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Shape inference of `model` with `batch_dim` set to `batch`: name -> (element type, shape)."""
    concrete = onnx.ModelProto()
    concrete.CopyFrom(model)
    for value in concrete.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param == batch_dim:
                dim.dim_value = batch
            elif not dim.HasField("dim_value"):
                raise ValueError(f"input {value.name!r}: only the batch dimension {batch_dim!r} may be symbolic")
    concrete.graph.ClearField("value_info")
    for value in concrete.graph.output:
        value.type.tensor_type.ClearField("shape")
    graph = onnx.shape_inference.infer_shapes(concrete, strict_mode=True, data_prop=True).graph
    known = {t.name: (t.data_type, tuple(t.dims)) for t in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        if tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim):
            known[value.name] = (tensor.elem_type, tuple(d.dim_value for d in tensor.shape.dim))
    return known


def tensor_types(model: onnx.ModelProto, batch_dim: str) -> TensorTypes:
    """Infer the type and shape of every tensor of `model` (graph inputs declare them; only `batch_dim` is symbolic)."""
    inferred = {batch: _inferred(model, batch_dim, batch) for batch in STAND_IN_BATCHES}
    for node in model.graph.node:
        for name in (*node.input, *node.output):
            if name and any(name not in known for known in inferred.values()):
                raise ValueError(f"{node.op_type} {node.name or node.output[0]}: shape inference cannot tell the shape of {name!r}")
    first = inferred[STAND_IN_BATCHES[0]]
    return TensorTypes(
        elem_types=types.MappingProxyType({name: kind for name, (kind, _) in first.items()}),
        shapes=types.MappingProxyType({
            batch: types.MappingProxyType({name: shape for name, (_, shape) in known.items()})
            for batch, known in inferred.items()
        }),
    )


def _window_geometry(node: onnx.NodeProto, sizes: Sequence[int], kernel: Sequence[int]) -> list[tuple[int, int, int]]:
    """Per spatial axis of a Conv/AveragePool: begin pad, end pad and r, the input tail no window reads."""
    attrs, spatial = _attrs(node), len(sizes)
    strides, dilations = attrs.get("strides", [1] * spatial), attrs.get("dilations", [1] * spatial)
    pads = attrs.get("pads", [0] * 2 * spatial)
    geometry = []
    for axis, size in enumerate(sizes):
        begin, end, reach = pads[axis], pads[spatial + axis], (kernel[axis] - 1) * dilations[axis] + 1
        geometry.append((begin, end, (size + begin + end - reach) % strides[axis]))
    return geometry


def explicit_padding(model: onnx.ModelProto, batch_dim: str) -> onnx.ModelProto:
    """`model` with every Conv/AveragePool whose padding onnx-ad's adjoint gets wrong rewritten as Pad, Slice and the op unpadded.

    onnx-ad's adjoint of a Conv or AveragePool is a ConvTranspose given `output_shape`, and with
    an output shape ONNX ignores the pads: the runtime derives its own split of the padding. On
    onnxruntime that is right only when, on every axis, the pads are equal and the input tail no
    window reads is shorter than 2 (measured against PyTorch over kernels 1-3, strides 1-3,
    dilations 1-2, pads 0-2 and lengths 7-9). Other nodes get the pads as an explicit Pad and the
    unread tail cut off by a Slice, so the op reads exactly its input and onnx-ad is right again.
    """
    shapes = tensor_types(model, batch_dim)
    taken = {n for node in model.graph.node for n in (*node.input, *node.output)} | {v.name for v in model.graph.input}
    taken |= {t.name for t in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    constants: list[onnx.TensorProto] = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "AveragePool") or _attrs(node).get("auto_pad", "NOTSET") != "NOTSET":
            nodes.append(node)
            continue
        sizes = shapes.shape(node.input[0])[2:]
        kernel = _attrs(node).get("kernel_shape", shapes.shape(node.input[1])[2:] if node.op_type == "Conv" else [])
        geometry = _window_geometry(node, sizes, kernel)
        if all(begin == end and tail < 2 for begin, end, tail in geometry):
            nodes.append(node)
            continue
        if node.op_type == "AveragePool" and not _attrs(node).get("count_include_pad", 0) and any(b or e for b, e, _ in geometry):
            raise NotImplementedError(f"AveragePool {node.name}: uneven padding with count_include_pad=0 has no exact adjoint here")
        rewritten, more = _explicitly_padded(node, sizes, geometry, taken)
        nodes += rewritten
        constants += more
    result = onnx.ModelProto()
    result.CopyFrom(model)
    result.graph.ClearField("node")
    result.graph.node.extend(nodes)
    result.graph.initializer.extend(constants)
    return result


def _explicitly_padded(
    node: onnx.NodeProto, sizes: Sequence[int], geometry: Sequence[tuple[int, int, int]], taken: set[str]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Pad (when padded) and Slice (when a tail is unread) in front of a copy of `node` without pads; their constants."""
    def fresh(what: str) -> str:
        name, n = f"{node.output[0]}.{what}", 0
        while name in taken:
            n += 1
            name = f"{node.output[0]}.{what}_{n}"
        taken.add(name)
        return name

    def constant(what: str, values: Iterable[int]) -> str:
        constants.append(numpy_helper.from_array(np.array(list(values), np.int64), fresh(what)))
        return constants[-1].name

    spatial, x = len(sizes), node.input[0]
    nodes: list[onnx.NodeProto] = []
    constants: list[onnx.TensorProto] = []
    begins, ends = [b for b, _, _ in geometry], [e for _, e, _ in geometry]
    if any(begins) or any(ends):
        nodes.append(helper.make_node("Pad", [x, constant("pads", [0, 0, *begins, 0, 0, *ends])], [fresh("padded")]))
        x = nodes[-1].output[0]
    if any(tail for _, _, tail in geometry):
        kept = [size + b + e - tail for size, (b, e, tail) in zip(sizes, geometry)]
        bounds = [constant("starts", [0] * spatial), constant("ends", kept), constant("axes", range(2, 2 + spatial))]
        nodes.append(helper.make_node("Slice", [x, *bounds], [fresh("cropped")]))
        x = nodes[-1].output[0]
    unpadded = onnx.NodeProto()
    unpadded.CopyFrom(node)
    unpadded.input[0] = x
    for attribute in unpadded.attribute:
        if attribute.name == "pads":
            attribute.ints[:] = [0] * 2 * spatial
    return [*nodes, unpadded], constants


# ---- the builder ----------------------------------------------------------------------------


@dataclasses.dataclass
class GraphBuilder:
    """Nodes and constant initializers of one graph under construction, with unique names.

    `taken` holds every name already in use (graph inputs, outputs, forward tensors); `types`
    the forward tensors' types and shapes; `constants` the forward's constant tensors (onnx-ad
    reads axes, shapes and bounds from them); the batch size is the first dimension of
    `batch_source`. `im2col` picks the Conv weight-gradient form (see _conv).
    """

    taken: set[str]
    types: TensorTypes
    constants: Mapping[str, np.ndarray]
    batch_source: str
    im2col: bool = False
    nodes: list[onnx.NodeProto] = dataclasses.field(default_factory=list)
    initializers: list[onnx.TensorProto] = dataclasses.field(default_factory=list)
    _constants: dict[tuple[str, tuple[int, ...], bytes], str] = dataclasses.field(default_factory=dict)
    _batch_terms: dict[tuple[bytes, bytes, tuple[int, ...]], str] = dataclasses.field(default_factory=dict)
    _batch_size: str = ""

    def fresh(self, hint: str) -> str:
        """A new unique tensor name starting with `hint`."""
        name, n = hint, 0
        while name in self.taken:
            n += 1
            name = f"{hint}_{n}"
        self.taken.add(name)
        return name

    def claim(self, name: str) -> str:
        """Reserve an exact name (a saved intermediate); fails if something already uses it."""
        if name in self.taken:
            raise ValueError(f"tensor name {name!r} is already in use")
        self.taken.add(name)
        return name

    def op(self, op_type: str, inputs: Sequence[str], hint: str = "", outputs: Sequence[str] = (), **attrs: Any) -> str:
        """Append a node; its outputs are `outputs` (names already reserved) or one fresh name. Returns the first."""
        names = list(outputs) or [self.fresh(hint or op_type.lower())]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(f"{op_type}_{names[0]}"), **attrs))
        return names[0]

    def const(self, value: float | Sequence[float] | Sequence[int] | np.ndarray, dtype: type = np.float32) -> str:
        """A constant initializer (shared between equal uses); scalars stay 0-d."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, self._constants[key]))
        return self._constants[key]

    def ints(self, values: Sequence[int]) -> str:
        """A constant int64 vector (axes, shapes)."""
        return self.const(list(values), np.int64)

    def rank(self, name: str) -> int:
        """The rank of a forward tensor."""
        return self.types.rank(name)

    def declare(self, name: str, elem_type: int, like: str) -> None:
        """Record the type of a tensor the training forward adds (shaped like the forward tensor `like`)."""
        self.types = self.types.with_tensor(name, elem_type, like)

    def batch_linear(self, slope: np.ndarray, offset: np.ndarray) -> str:
        """An int64 tensor `slope * N + offset` shaped like `slope`, N the batch size of the run."""
        key = (slope.tobytes(), offset.tobytes(), slope.shape)
        if key not in self._batch_terms:
            if not self._batch_size:
                self._batch_size = self.op("Shape", [self.batch_source], "batch_size", start=0, end=1)
            scaled = self.op("Mul", [self._batch_size, self.const(slope, np.int64)])
            value = self.op("Add", [scaled, self.const(offset, np.int64)], "batch_shape")
            self._batch_terms[key] = value if slope.ndim else self.op("Squeeze", [value, self.ints([0])], "batch_scalar")
        return self._batch_terms[key]


Rule = Callable[[GraphBuilder, onnx.NodeProto, str, frozenset[str]], dict[str, str]]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """The node's attributes as plain Python values (strings decoded)."""
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _channel_view(g: GraphBuilder, vector: str, rank: int) -> str:
    """A per-channel [C] vector shaped to broadcast against an [N, C, ...] tensor of `rank`."""
    return vector if rank == 2 else g.op("Unsqueeze", [vector, g.ints(range(1, rank - 1))])


def _stat_axes(rank: int) -> list[int]:
    """Axes BatchNormalization reduces over: all but the channel axis 1."""
    return [0, *range(2, rank)]


# ---- training-mode forward ------------------------------------------------------------------


def _batchnorm_forward(g: GraphBuilder, node: onnx.NodeProto) -> None:
    """BatchNormalization with batch statistics; saves xhat and inv_std, updates running stats."""
    x, gamma, beta, running_mean, running_var = node.input
    y, attrs, rank = node.output[0], _attrs(node), g.rank(node.input[0])
    axes, momentum = _stat_axes(rank), attrs.get("momentum", 0.9)
    mean = g.op("ReduceMean", [x], f"{y}.mean", axes=axes, keepdims=1)
    centered = g.op("Sub", [x, mean])
    var = g.op("ReduceMean", [g.op("Mul", [centered, centered])], f"{y}.var", axes=axes, keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const(attrs.get("epsilon", 1e-5))])])
    inv_std = g.op("Reciprocal", [std], outputs=[g.claim(saved(y, "inv_std"))])
    xhat = g.op("Mul", [centered, inv_std], outputs=[g.claim(saved(y, "xhat"))])
    scaled = g.op("Mul", [xhat, _channel_view(g, gamma, rank)])
    g.op("Add", [scaled, _channel_view(g, beta, rank)], outputs=[y])
    for running, batch in ((running_mean, mean), (running_var, var)):
        kept = g.op("Mul", [running, g.const(momentum)])
        fresh = g.op("Mul", [g.op("Reshape", [batch, g.ints([-1])]), g.const(np.float32(1) - np.float32(momentum))])
        g.op("Add", [kept, fresh], outputs=[running + NEW_SUFFIX])


def lower_for_training(g: GraphBuilder, node: onnx.NodeProto) -> None:
    """Append the training-mode forward of `node`: itself, except BatchNormalization and MaxPool.

    BatchNormalization normalises with the batch's statistics (from standard operators) and
    writes its running statistics' new values to `<running stat>.new` (biased batch variance,
    as onnxruntime-training does); MaxPool also outputs the argmax Indices its backward reads.
    """
    if node.op_type == "BatchNormalization":
        _batchnorm_forward(g, node)
    elif node.op_type == "MaxPool":
        outputs = [node.output[0], g.claim(saved(node.output[0], "indices"))]
        g.declare(outputs[1], TensorProto.INT64, like=outputs[0])
        g.op("MaxPool", node.input, outputs=outputs, **_attrs(node))
    else:
        g.nodes.append(node)


def softmax_cross_entropy(g: GraphBuilder, logits: str, labels: str, loss: str) -> str:
    """Write the mean cross-entropy of `logits` [N, C] against int64 `labels` [N] to `loss` []; return dloss/dlogits."""
    log_prob = g.fresh("log_prob")
    g.op("SoftmaxCrossEntropyLoss", [logits, labels], outputs=[loss, log_prob], reduction="mean")
    classes = g.op("Shape", [logits], "classes", start=1, end=2)
    onehot = g.op("OneHot", [labels, classes, g.const([0.0, 1.0])], "onehot", axis=-1)
    inv_n = g.op("Reciprocal", [g.op("Cast", [g.op("Shape", [labels])], to=TensorProto.FLOAT)], "inv_n")
    return g.op("Mul", [g.op("Sub", [g.op("Exp", [log_prob], "softmax"), onehot]), inv_n], f"{logits}.grad")


# ---- our own rules: what onnx-ad lacks ------------------------------------------------------


def _batchnorm(g: GraphBuilder, node: onnx.NodeProto, dy: str, wants: frozenset[str]) -> dict[str, str]:
    """Batch-statistics BN: dgamma = sum dY xhat, dbeta = sum dY, dX = gamma inv_std (dY - mean dY - xhat mean dY xhat)."""
    x, gamma, beta = node.input[:3]
    rank, y = g.rank(x), node.output[0]
    axes, xhat = _stat_axes(rank), saved(y, "xhat")
    dy_xhat = g.op("Mul", [dy, xhat])
    grads = {}
    if gamma in wants:
        grads[gamma] = g.op("ReduceSum", [dy_xhat, g.ints(axes)], f"{gamma}.grad", keepdims=0)
    if beta in wants:
        grads[beta] = g.op("ReduceSum", [dy, g.ints(axes)], f"{beta}.grad", keepdims=0)
    if x in wants:
        mean_dy = g.op("ReduceMean", [dy], axes=axes, keepdims=1)
        mean_dy_xhat = g.op("ReduceMean", [dy_xhat], axes=axes, keepdims=1)
        centered = g.op("Sub", [g.op("Sub", [dy, mean_dy]), g.op("Mul", [xhat, mean_dy_xhat])])
        factor = g.op("Mul", [_channel_view(g, gamma, rank), saved(y, "inv_std")])
        grads[x] = g.op("Mul", [centered, factor], f"{x}.grad")
    return grads


def _conv_geometry(g: GraphBuilder, node: onnx.NodeProto) -> dict[str, list[int]]:
    """Kernel, strides, dilations and begin+end pads of a Conv, defaults filled in."""
    attrs = _attrs(node)
    spatial = g.rank(node.input[0]) - 2
    kernel = list(attrs.get("kernel_shape", g.types.shape(node.input[1])[2:]))
    return {"kernel": kernel, "strides": list(attrs.get("strides", [1] * spatial)),
            "dilations": list(attrs.get("dilations", [1] * spatial)), "pads": list(attrs.get("pads", [0] * 2 * spatial))}


def _grouped_conv_weight(g: GraphBuilder, node: onnx.NodeProto, dy: str) -> str:
    """dW of a grouped Conv (any groups, strides, dilations, explicit pads; 1-D or 2-D) as one grouped Conv.

    With batch and channels swapped, the padded input as [C/G, G*N, ...] convolved in G groups,
    strides and dilations exchanged, with dY as the filters [O, N, ...] is dW^T [C/G, O, ...].
    """
    if _attrs(node).get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"Conv {node.name}: auto_pad={_attrs(node)['auto_pad']}; export with explicit pads")
    x, w = node.input[:2]
    geometry, groups = _conv_geometry(g, node), _attrs(node).get("group", 1)
    kernel, pads = geometry["kernel"], geometry["pads"]
    spatial = len(kernel)
    outputs, per_group = g.types.shape(w)[:2]
    padded = g.op("Pad", [x, g.ints([0, 0, *pads[:spatial], 0, 0, *pads[spatial:]])]) if any(pads) else x
    sizes = [d + b + e for d, b, e in zip(g.types.shape(x)[2:], pads[:spatial], pads[spatial:])]
    grouped = g.op("Reshape", [padded, g.ints([0, groups, per_group, *sizes])])  # [N, G, C/G, ...]
    swapped = g.op("Transpose", [grouped], perm=[2, 1, 0, *range(3, 3 + spatial)])  # [C/G, G, N, ...]
    images = g.op("Reshape", [swapped, g.ints([per_group, -1, *sizes])])  # [C/G, G*N, ...]
    out_sizes = g.types.shape(node.output[0])[2:]
    split = g.op("Reshape", [dy, g.ints([0, groups, outputs // groups, *out_sizes])])  # [N, G, O/G, ...]
    moved = g.op("Transpose", [split], perm=[1, 2, 0, *range(3, 3 + spatial)])  # [G, O/G, N, ...]
    filters = g.op("Reshape", [moved, g.ints([outputs, -1, *out_sizes])])  # [O, N, ...]
    product = g.op("Conv", [images, filters], group=groups, strides=geometry["dilations"], dilations=geometry["strides"])
    cropped = g.op("Slice", [product, g.ints([0] * spatial), g.ints(kernel), g.ints(range(2, 2 + spatial))])
    return g.op("Transpose", [cropped], f"{w}.grad", perm=[1, 0, *range(2, 2 + spatial)])


# ---- hand rules: fast forms of the zoo's operators --------------------------------------------


@dataclasses.dataclass(frozen=True)
class HandRule:
    """A fast backward rule for the nodes `applies(g, node, wanted)` accepts; onnx-ad takes the others."""

    applies: Callable[[GraphBuilder, onnx.NodeProto, Sequence[str]], bool]
    gradients: Rule


def _always(g: GraphBuilder, node: onnx.NodeProto, wanted: Sequence[str]) -> bool:
    return True


def _gemm_applies(g: GraphBuilder, node: onnx.NodeProto, wanted: Sequence[str]) -> bool:
    """Y = X W^T + b with a [out] bias (what a Linear layer exports to)."""
    attrs = _attrs(node)
    plain = [attrs.get("transA", 0), attrs.get("transB", 0), attrs.get("alpha", 1.0), attrs.get("beta", 1.0)] == [0, 1, 1, 1]
    bias = node.input[2] if len(node.input) > 2 else ""
    return plain and (not bias or g.types.shape(bias) == g.types.shape(node.output[0])[1:])


def _gemm(g: GraphBuilder, node: onnx.NodeProto, dy: str, wants: frozenset[str]) -> dict[str, str]:
    """Y = X W^T + b: dX = dY W, dW = dY^T X, db = sum_n dY."""
    x, w, *bias = node.input
    grads = {}
    if x in wants:
        grads[x] = g.op("Gemm", [dy, w], f"{x}.grad")
    if w in wants:
        grads[w] = g.op("Gemm", [dy, x], f"{w}.grad", transA=1)
    if bias and bias[0] in wants:
        grads[bias[0]] = g.op("ReduceSum", [dy, g.ints([0])], f"{bias[0]}.grad", keepdims=0)
    return grads


def _conv_applies(g: GraphBuilder, node: onnx.NodeProto, wanted: Sequence[str]) -> bool:
    """A 2-D, stride-1, ungrouped Conv with explicit "same" padding."""
    attrs = _attrs(node)
    if g.rank(node.input[0]) != 4 or attrs.get("group", 1) != 1 or attrs.get("auto_pad", "NOTSET") != "NOTSET":
        return False
    geometry = _conv_geometry(g, node)
    same = [(k - 1) // 2 for k in geometry["kernel"]] * 2
    return geometry["pads"] == same and geometry["strides"] == [1, 1] and geometry["dilations"] == [1, 1]


def _conv_weight_grad(g: GraphBuilder, x: str, dy: str, w: str, kernel: Sequence[int], pads: Sequence[int]) -> str:
    """dW[o, c, i, j] = sum over n, h, w of dY[n, o, h, w] * Xpad[n, c, h + i, w + j], as one Gemm (im2col).

    The padded input, channels first, is cut into one window per kernel offset; the windows are
    stacked to [kh * kw, C, N * H * W] and multiplied with dY as [N * H * W, O] in one MatMul.
    """
    swap = [1, 0, 2, 3]
    padded = g.op("Pad", [x, g.ints([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]])])
    x_t = g.op("Transpose", [padded], perm=swap)  # [C, N, H + 2p, W + 2p]
    windows = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            ends = [-(kernel[0] - 1 - i) or _TO_END, -(kernel[1] - 1 - j) or _TO_END]
            window = g.op("Slice", [x_t, g.ints([i, j]), g.ints(ends), g.ints([2, 3])])  # [C, N, H, W]
            windows.append(g.op("Unsqueeze", [window, g.ints([0])]))
    columns = g.op("Reshape", [g.op("Concat", windows, axis=0), g.ints([0, 0, -1])])  # [kh*kw, C, NHW]
    dy_t = g.op("Transpose", [g.op("Reshape", [g.op("Transpose", [dy], perm=swap), g.ints([0, -1])])])  # [NHW, O]
    product = g.op("MatMul", [columns, dy_t])  # [kh*kw, C, O]
    return g.op("Reshape", [g.op("Transpose", [product], perm=[2, 1, 0]), g.op("Shape", [w])], f"{w}.grad")


def _conv(g: GraphBuilder, node: onnx.NodeProto, dy: str, wants: frozenset[str]) -> dict[str, str]:
    """Stride-1 "same" 2-D Conv: dX = ConvTranspose(dY, W); dW as im2col or as a Conv over transposed tensors.

    Measured on onnxruntime's CPU: im2col (_conv_weight_grad) is 10-20% faster per step on 28x28
    inputs and slower on 8x8 ones, where its nine slices cost more than the H x W Conv kernel.
    """
    kernel = _conv_geometry(g, node)["kernel"]
    pads = [(k - 1) // 2 for k in kernel] * 2
    x, w, *bias = node.input
    grads = {}
    if x in wants:
        grads[x] = g.op("ConvTranspose", [dy, w], f"{x}.grad", kernel_shape=kernel, pads=pads)
    if w in wants and g.im2col:
        grads[w] = _conv_weight_grad(g, x, dy, w, kernel, pads)
    elif w in wants:
        swap = [1, 0, 2, 3]
        x_t, dy_t = g.op("Transpose", [x], perm=swap), g.op("Transpose", [dy], perm=swap)
        grads[w] = g.op("Transpose", [g.op("Conv", [x_t, dy_t], pads=pads)], f"{w}.grad", perm=swap)
    if bias and bias[0] in wants:
        grads[bias[0]] = g.op("ReduceSum", [dy, g.ints([0, 2, 3])], f"{bias[0]}.grad", keepdims=0)
    return grads


def _relu(g: GraphBuilder, node: onnx.NodeProto, dy: str, wants: frozenset[str]) -> dict[str, str]:
    """dX = dY where Y > 0."""
    positive = g.op("Cast", [g.op("Greater", [node.output[0], g.const(0.0)])], to=TensorProto.FLOAT)
    return {node.input[0]: g.op("Mul", [dy, positive], f"{node.input[0]}.grad")}


def _maxpool_applies(g: GraphBuilder, node: onnx.NodeProto, wanted: Sequence[str]) -> bool:
    """Windows that neither overlap nor pad (kernel = stride), dilation 1, floor mode."""
    attrs = _attrs(node)
    kernel = list(attrs["kernel_shape"])
    spatial = len(kernel)
    return (list(attrs.get("strides", [1] * spatial)) == kernel and not any(attrs.get("pads", []))
            and list(attrs.get("dilations", [1] * spatial)) == [1] * spatial and attrs.get("ceil_mode", 0) == 0
            and attrs.get("storage_order", 0) == 0 and attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))


def _maxpool(g: GraphBuilder, node: onnx.NodeProto, dy: str, wants: frozenset[str]) -> dict[str, str]:
    """MaxPool: MaxUnpool puts dY at the argmax positions the forward saved, zeros elsewhere.

    Exact (one position per window, like onnxruntime-training's MaxPoolGrad) when windows do not
    overlap; several times faster than ConstantOfShape + ScatterElements on onnxruntime's CPU.
    """
    kernel = _attrs(node)["kernel_shape"]
    x = node.input[0]
    indices, shape = saved(node.output[0], "indices"), g.op("Shape", [x])
    return {x: g.op("MaxUnpool", [dy, indices, shape], f"{x}.grad", kernel_shape=kernel, strides=kernel)}


def _reshape(g: GraphBuilder, node: onnx.NodeProto, dy: str, wants: frozenset[str]) -> dict[str, str]:
    """Flatten/Reshape: dX = dY reshaped to X's shape."""
    x = node.input[0]
    return {x: g.op("Reshape", [dy, g.op("Shape", [x])], f"{x}.grad")}


def _unbroadcast_applies(g: GraphBuilder, node: onnx.NodeProto, wanted: Sequence[str]) -> bool:
    """Two distinct inputs, and every one that needs a gradient has the output's shape."""
    output = g.types.shape(node.output[0])
    return len(set(node.input)) == 2 and all(g.types.shape(x) == output for x in wanted)


def _mul(g: GraphBuilder, node: onnx.NodeProto, dy: str, wants: frozenset[str]) -> dict[str, str]:
    """Y = A * B: dA = dY * B (an input that needs a gradient has Y's shape)."""
    a, b = node.input
    return {x: g.op("Mul", [dy, other], f"{x}.grad") for x, other in ((a, b), (b, a)) if x in wants}


def _add(g: GraphBuilder, node: onnx.NodeProto, dy: str, wants: frozenset[str]) -> dict[str, str]:
    """Y = A + B: dA = dY (an input that needs a gradient has Y's shape)."""
    return {x: dy for x in node.input if x in wants}


HAND_RULES: Mapping[str, HandRule] = types.MappingProxyType({
    "Gemm": HandRule(_gemm_applies, _gemm),
    "Conv": HandRule(_conv_applies, _conv),
    "Relu": HandRule(_always, _relu),
    "MaxPool": HandRule(_maxpool_applies, _maxpool),
    "Flatten": HandRule(_always, _reshape),
    "Reshape": HandRule(_always, _reshape),
    "Mul": HandRule(_unbroadcast_applies, _mul),
    "Add": HandRule(_unbroadcast_applies, _add),
})


# ---- onnx-ad, one node at a time ------------------------------------------------------------


def _one_node_model(g: GraphBuilder, node: onnx.NodeProto, batch: int) -> tuple[onnx.ModelProto, dict[str, str]]:
    """`node` alone as a model under local names, shapes at the stand-in `batch`; also forward name -> local name."""
    local: dict[str, str] = {}
    for i, name in enumerate(n for n in (*node.input, *node.output) if n):
        local.setdefault(name, f"t{i}")
    inputs, initializers = [], []
    for name in dict.fromkeys(n for n in node.input if n):
        if name in g.constants:
            initializers.append(numpy_helper.from_array(g.constants[name], local[name]))
        else:
            inputs.append(helper.make_tensor_value_info(local[name], g.types.elem_types[name], g.types.at(name, batch)))
    outputs = [helper.make_tensor_value_info(local[n], g.types.elem_types[n], g.types.at(n, batch)) for n in node.output if n]
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.ClearField("input")
    copy.input.extend(local.get(n, "") for n in node.input)
    copy.ClearField("output")
    copy.output.extend(local.get(n, "") for n in node.output)
    graph = helper.make_graph([copy], "node", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION), local


def _with_saved_indices(node: onnx.NodeProto) -> onnx.NodeProto:
    """A MaxPool node with the Indices output `lower_for_training` gave it (onnx-ad's rule reads it)."""
    if node.op_type != "MaxPool" or len(node.output) > 1:
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.output.append(saved(node.output[0], "indices"))
    return copy


def _without_seed_moves(adjoint: onnx.ModelProto) -> onnx.ModelProto:
    """`adjoint` with its copies that only move size-1 axes gone: such a Transpose becomes a Reshape, such an Expand an Identity.

    onnx-ad moves its seed axis (size 1 here: one seed) to the front and back around Gemm, MatMul,
    Conv and pooling, and widens gradients to their full shape; on onnxruntime each of those is a
    copy of the tensor. Shapes come from shape inference with the seed count set to 1.
    """
    model = onnx.ModelProto()
    model.CopyFrom(adjoint)
    for value in model.graph.input:
        if value.name.startswith(_SEED):
            value.type.tensor_type.shape.dim[-1].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for value in (*inferred.input, *inferred.value_info, *inferred.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    primal = {v.name for v in model.graph.output if not v.name.startswith(_SEED)}
    taken = {*shapes, *(n for node in model.graph.node for n in (*node.input, *node.output))}
    nodes = []
    for node in model.graph.node:
        source, target = shapes.get(node.input[0]) if node.input else None, shapes.get(node.output[0])
        if source is None or target is None or node.output[0] in primal:
            nodes.append(node)
        elif node.op_type == "Expand" and source == target:
            nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]]))
        elif node.op_type == "Transpose" and _moves_only_unit_axes(source, _attrs(node).get("perm")):
            shape = f"{node.output[0]}_shape"
            while shape in taken:
                shape += "_"
            taken.add(shape)
            model.graph.initializer.append(numpy_helper.from_array(np.array(target, np.int64), shape))
            nodes.append(helper.make_node("Reshape", [node.input[0], shape], [node.output[0]]))
        else:
            nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return model


def _moves_only_unit_axes(shape: Sequence[int], perm: Sequence[int] | None) -> bool:
    """Whether a Transpose by `perm` keeps the order of every axis longer than 1 (so it is a Reshape)."""
    order = list(reversed(range(len(shape)))) if perm is None else list(perm)
    moved = [axis for axis in order if shape[axis] != 1]
    return moved == sorted(moved)


def _structure(node: onnx.NodeProto) -> tuple[str, tuple[str, ...], tuple[str, ...], tuple[bytes, ...]]:
    """What must agree between the two stand-in builds: op, names and attributes (a Constant's value aside)."""
    attrs = () if node.op_type == "Constant" else tuple(a.SerializeToString() for a in node.attribute)
    return node.op_type, tuple(node.input), tuple(node.output), attrs


def constant_value(node: onnx.NodeProto) -> np.ndarray:
    """The value of a Constant node, in any of its spellings."""
    attribute = node.attribute[0]
    value = helper.get_attribute_value(attribute)
    if attribute.name == "value":
        return numpy_helper.to_array(value)
    return np.asarray(value, np.float32 if attribute.name.startswith("value_float") else np.int64)


def _spliced_constant(g: GraphBuilder, first: np.ndarray, second: np.ndarray, where: str) -> str:
    """A constant of the adjoint: as it is, or, where it differs between the stand-in builds, `slope * N + offset`."""
    if first.shape == second.shape and first.dtype == second.dtype and np.array_equal(first, second):
        return g.const(first, first.dtype)
    if first.dtype != np.int64 or second.dtype != np.int64 or first.shape != second.shape:
        raise NotImplementedError(f"{where}: onnx-ad baked the batch size into a {first.dtype} constant")
    high, low = STAND_IN_BATCHES
    slope, rest = np.divmod(first - second, high - low)
    if np.any(rest):
        raise NotImplementedError(f"{where}: onnx-ad baked the batch size into a constant that is not affine in it")
    return g.batch_linear(slope, first - slope * high)


def _onnx_ad_rule(g: GraphBuilder, node: onnx.NodeProto, dys: Mapping[str, str], wanted: Sequence[str]) -> dict[str, str]:
    """Gradients of `wanted` inputs of `node` given the gradients `dys` of its outputs, from onnx-ad."""
    onnx_ad = require_onnx_ad()
    node = _with_saved_indices(node)
    where = f"{node.op_type} {node.name or node.output[0]}"
    builds = []
    for batch in STAND_IN_BATCHES:
        model, local = _one_node_model(g, node, batch)
        try:
            adjoint = onnx_ad.reverse(model, inputs=[local[x] for x in wanted], outputs=[local[y] for y in dys],
                                      prefix=_SEED, layout="onnx")
        except onnx_ad.UnsupportedOperator as error:
            raise NotImplementedError(f"{where}: {error}") from error
        builds.append(_without_seed_moves(adjoint))
    first, second = (b.graph for b in builds)
    if [_structure(n) for n in first.node] != [_structure(n) for n in second.node]:
        raise NotImplementedError(f"{where}: onnx-ad's adjoint depends on the batch size beyond its constants")
    names = {v: k for k, v in local.items()}  # local -> ours
    names |= {_SEED + local[y]: g.op("Unsqueeze", [dy, g.ints([-1])], f"{dy}.seed") for y, dy in dys.items()}
    others = {t.name: numpy_helper.to_array(t) for t in second.initializer}
    for tensor in first.initializer:
        if tensor.name not in names:
            names[tensor.name] = _spliced_constant(g, numpy_helper.to_array(tensor), others[tensor.name], where)
    hint = node.output[0]
    primal = [i for i, n in enumerate(first.node) if tuple(n.output) == tuple(local.get(o, "") for o in node.output)]
    if len(primal) != 1 or first.node[primal[0]].op_type != node.op_type:
        raise NotImplementedError(f"{where}: onnx-ad rewrote the forward node")
    for index, (one, other) in enumerate(zip(first.node, second.node)):
        if index == primal[0]:
            continue
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in one.attribute):
            raise NotImplementedError(f"{where}: onnx-ad's adjoint has a subgraph")
        if one.op_type == "Constant":
            pair = [constant_value(n) for n in (one, other)]
            names[one.output[0]] = _spliced_constant(g, *pair, where)
            continue
        _splice(g, one, names, hint)
    return {x: g.op("Squeeze", [names[_SEED + local[x]], g.ints([-1])], f"{x}.grad") for x in wanted}


def _splice(g: GraphBuilder, node: onnx.NodeProto, names: dict[str, str], hint: str) -> None:
    """Append an adjoint node of onnx-ad under our names; its outputs get fresh ones (recorded in `names`)."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.ClearField("input")
    copy.input.extend(names[n] if n else "" for n in node.input)
    for name in node.output:
        if name:
            names[name] = g.fresh(f"{hint}.{name}")
    copy.ClearField("output")
    copy.output.extend(names[n] if n else "" for n in node.output)
    copy.name = g.fresh(f"{node.op_type}_{copy.output[0]}")
    g.nodes.append(copy)


# ---- the backward walk ----------------------------------------------------------------------


def _node_gradients(g: GraphBuilder, node: onnx.NodeProto, dys: Mapping[str, str], wanted: Sequence[str]) -> dict[str, str]:
    """Gradients of the `wanted` inputs of `node`: our rule, a hand rule or onnx-ad (see the module docstring)."""
    wants, dy = frozenset(wanted), dys.get(node.output[0], "")
    if node.op_type == "BatchNormalization":
        return _batchnorm(g, node, dy, wants)
    hand = HAND_RULES.get(node.op_type)
    if hand is not None and dy and len(dys) == 1 and hand.applies(g, node, wanted):
        return hand.gradients(g, node, dy, wants)
    if node.op_type == "Conv" and _attrs(node).get("group", 1) != 1 and node.input[1] in wants:
        rest = [x for x in wanted if x != node.input[1]]
        grads = _onnx_ad_rule(g, node, dys, rest) if rest else {}
        return grads | {node.input[1]: _grouped_conv_weight(g, node, dy)}
    return _onnx_ad_rule(g, node, dys, wanted)


def _dependents(g: GraphBuilder, nodes: Sequence[onnx.NodeProto], wrt: Iterable[str]) -> frozenset[str]:
    """Every floating-point tensor that depends on a tensor in `wrt` (those included)."""
    found = set(wrt)
    for node in nodes:  # nodes are in topological order
        if any(i in found for i in node.input):
            found.update(o for o in node.output if o and g.types.is_float(o))
    return frozenset(found)


def _total(g: GraphBuilder, tensor: str, contributions: dict[str, list[str]]) -> str:
    """The gradient of `tensor`: its one contribution, or the Sum of several."""
    parts = contributions[tensor]
    return parts[0] if len(parts) == 1 else g.op("Sum", parts, f"{tensor}.grad")


def backward(
    g: GraphBuilder, nodes: Sequence[onnx.NodeProto], seeds: Mapping[str, str], wrt: Sequence[str]
) -> dict[str, str]:
    """Append the backward pass of the forward `nodes` (topological order) given loss gradients `seeds`.

    Returns {name: gradient tensor} for every name in `wrt` that the seeds depend on.
    """
    wants = _dependents(g, nodes, wrt)
    contributions: dict[str, list[str]] = {t: [dt] for t, dt in seeds.items()}
    for node in reversed(nodes):
        wanted = [x for x in dict.fromkeys(node.input) if x in wants]
        reached = [y for y in node.output if y in contributions]
        if not wanted or not reached:
            continue
        dys = {y: _total(g, y, contributions) for y in reached}
        for x, dx in _node_gradients(g, node, dys, wanted).items():
            contributions.setdefault(x, []).append(dx)
    return {w: _total(g, w, contributions) for w in wrt if w in contributions}
