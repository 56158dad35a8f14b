"""Read a user's ONNX classifier into the one form every later step takes: the normalized forward graph.

What comes in is a forward graph as `torch.onnx.export` (TorchScript or dynamo) or tf2onnx writes
it: one float input, one logits output, weights as initializers, BatchNorm running statistics as
initializers. What goes out (`ImportedModel.forward`) has

- the input named `input` and the output named `logits`, a trailing Softmax/LogSoftmax removed
  (training adds its own cross-entropy; the note says so);
- Constant nodes folded into initializers, Identity and (inference) Dropout nodes removed;
- BatchNorm running statistics named `<layer>.running_mean` / `<layer>.running_var` (what the
  aggregator's and the device's statistics code look for);
- opset 17 and IR version 10 (what onnxruntime 1.19 and its training API take);
- the batch size the file was exported with (its shapes stay static until tiering makes the batch
  dynamic: the width analysis needs concrete sizes).

Anything outside SUPPORTED_OPS is refused before anything is written, naming the node and its op; a
file onnx.checker finds invalid (a node short of inputs, ...) is refused with the checker's reason,
and one whose sample or exported batch is too large to run before the comparison allocates it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from models.spec import INPUT_NAME, IR_VERSION, OPSET, OUTPUT_NAME, RUNNING_MEAN, RUNNING_VAR

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 1 << 31  # protobuf's own limit: a bigger model cannot be one file
MAX_NAME = 200  # characters of a parameter name (it travels in every frame)
MAX_SAMPLE_VALUES = 1 << 26  # values of one input sample (a tensor's bound: protocol.messages.MAX_TENSOR_ELEMENTS)
MAX_BATCH_VALUES = 1 << 28  # values of the exported batch the import runs the file on (1 GiB of float32)
SUPPORTED_OPS = frozenset({
    "Conv", "Gemm", "MatMul", "BatchNormalization", "LayerNormalization",
    "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Erf", "Tanh",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
    "Add", "Sub", "Mul", "Div", "Sqrt", "Pow", "Softmax",
    "Concat", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
})
_DROPPED = frozenset({"Identity", "Dropout"})  # removed: inference-time no-ops
_FINAL = frozenset({"Softmax", "LogSoftmax"})  # removed when they produce the output
_NEVER_FOLDED = frozenset({"Dropout", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                           "Multinomial", "Bernoulli"})


class UnsupportedModel(ValueError):
    """The file cannot be federated as it is; the message names the node (or the part) and the way out."""


@dataclasses.dataclass(frozen=True)
class ImportedModel:
    """A normalized forward graph (static batch `batch`), the sha256 of its source, and what import changed."""

    forward: onnx.ModelProto
    batch: int
    source_sha256: str
    notes: tuple[str, ...]

    @property
    def input_shape(self) -> list[int]:
        """One sample's shape (the input's shape without its batch axis)."""
        dims = self.forward.graph.input[0].type.tensor_type.shape.dim
        return [d.dim_value for d in dims[1:]]

    @property
    def num_classes(self) -> int:
        """Classes of the logits output."""
        return self.forward.graph.output[0].type.tensor_type.shape.dim[1].dim_value


def _describe(node: onnx.NodeProto) -> str:
    """`node 'name' (Op)` for messages."""
    return f"node {node.name or node.output[0]!r} ({node.op_type})"


def _fold_constants(graph: onnx.GraphProto) -> None:
    """Constant nodes become initializers of the same name."""
    kept = []
    for node in graph.node:
        if node.op_type != "Constant":
            kept.append(node)
            continue
        if len(node.attribute) != 1:
            raise UnsupportedModel(f"{_describe(node)}: a Constant needs exactly one value attribute, it has "
                                   f"{len(node.attribute)}")
        attr = node.attribute[0]
        if attr.name == "value":
            array = numpy_helper.to_array(attr.t)
        elif attr.name in ("value_float", "value_int"):
            array = np.array(helper.get_attribute_value(attr), np.float32 if attr.name == "value_float" else np.int64)
        elif attr.name in ("value_floats", "value_ints"):
            array = np.array(helper.get_attribute_value(attr), np.float32 if attr.name == "value_floats" else np.int64)
        else:
            raise UnsupportedModel(f"{_describe(node)}: a constant of kind {attr.name} is not supported")
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Tensor shapes that shape inference can tell in full (no symbolic or unknown axis)."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def _fold_constant_nodes(model: onnx.ModelProto) -> bool:
    """Replace every node computable at export time (constant inputs, or a Shape of a static tensor) by its value.

    Returns whether anything was folded (a folded Shape can make a later one static: call again until not).

    Exporters write shape arithmetic (Shape, Gather, Unsqueeze, Concat) and casts of constants;
    with static shapes these are constants, and the width analysis needs them as such.
    """
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    shapes = _static_shapes(model)
    kept = []
    for node in graph.node:
        if node.op_type == "Shape" and node.input[0] in shapes:
            attrs = {a.name: a.i for a in node.attribute}
            dims = shapes[node.input[0]][attrs.get("start", 0):attrs.get("end", None)]
            values = [np.array(dims, np.int64)]
        elif (node.input and all(not i or i in constants for i in node.input) and node.op_type not in _NEVER_FOLDED
              and not any(_is_parameter(constants[i]) for i in node.input if i)):
            try:
                values = ReferenceEvaluator(_single_node(node, constants)).run(None, {})
            except Exception as exc:  # the reference evaluator raises whatever the op raises
                raise UnsupportedModel(f"{_describe(node)}: its constant inputs do not evaluate ({exc})") from exc
        else:
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            constants[name] = np.asarray(value)
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    folded = len(kept) < len(graph.node)
    del graph.node[:]
    graph.node.extend(kept)
    return folded


def _is_parameter(value: np.ndarray) -> bool:
    """A float tensor of more than one element: what training changes (never folded away)."""
    return value.dtype == np.float32 and value.size > 1


def _shared_parameters(graph: onnx.GraphProto, notes: list[str]) -> None:
    """Note every parameter that feeds several nodes: it is trained as one tensor."""
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in set(node.input):
            uses[name] = uses.get(name, 0) + 1
    for tensor in graph.initializer:
        if uses.get(tensor.name, 0) > 1 and _is_parameter(numpy_helper.to_array(tensor)):
            notes.append(f"initializer {tensor.name!r} feeds {uses[tensor.name]} nodes and is trained as one tensor "
                         "(torch.onnx.export merges equal initializers unless keep_initializers_as_inputs=True)")


def _single_node(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A model of one node whose inputs are the given constants (for the reference evaluator)."""
    inits = [numpy_helper.from_array(constants[i], i) for i in dict.fromkeys(node.input) if i]
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = helper.make_graph([node], "fold", [], outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename tensor `old` to `new` everywhere in `graph`."""
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new
    for tensor in graph.initializer:
        if tensor.name == old:
            tensor.name = new


def _drop_pass_through(graph: onnx.GraphProto, notes: list[str]) -> None:
    """Remove Identity and Dropout nodes, and a Softmax/LogSoftmax that writes the graph output.

    An Identity of an initializer is how torch.onnx.export merges equal tensors (a fresh model's
    BatchNorm weights, say): it becomes a copy of the initializer under its own name, so the tensors
    train apart as they did in PyTorch.
    """
    for finals in (False, True):  # pass-through nodes first: a Softmax before an Identity is still the final one
        _drop_nodes(graph, notes, finals)


def _drop_nodes(graph: onnx.GraphProto, notes: list[str], finals: bool) -> None:
    """One pass of `_drop_pass_through`: Identity and Dropout nodes, or the final Softmax/LogSoftmax."""
    output = graph.output[0].name
    initializers = {t.name: t for t in graph.initializer}
    for node in list(graph.node):
        if not finals and node.op_type == "Identity" and node.input[0] in initializers:  # an exporter's merge
            graph.node.remove(node)
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            continue
        final = node.op_type in _FINAL and node.output[0] == output
        if not (final if finals else node.op_type in _DROPPED):
            continue
        if node.op_type == "Dropout" and len(node.input) > 2:
            raise UnsupportedModel(f"{_describe(node)}: a Dropout with a training_mode input; export in eval mode")
        if final:
            notes.append(f"removed the final {node.op_type} ({node.name or output}): training adds its own "
                         "cross-entropy and the device reports logits")
        graph.node.remove(node)
        source, target = node.input[0], node.output[0]
        if target == output:  # keep the output's name: the producer writes it now
            _rename(graph, source, target)
        else:
            _rename(graph, target, source)
        if node.op_type == "Dropout" and len(node.output) > 1 and any(node.output[1] in n.input for n in graph.node):
            raise UnsupportedModel(f"{_describe(node)}: its mask output is used")


def _one_input_one_output(graph: onnx.GraphProto) -> None:
    """Exactly one float data input and one output, renamed to `input` and `logits`."""
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UnsupportedModel(f"the model has {len(inputs)} data inputs ({[i.name for i in inputs]}); "
                               "TierFL trains classifiers of one float input")
    if len(graph.output) != 1:
        raise UnsupportedModel(f"the model has {len(graph.output)} outputs ({[o.name for o in graph.output]}); "
                               "export only the logits")
    if inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise UnsupportedModel(f"input {inputs[0].name!r} is not float32")
    del graph.input[:]
    graph.input.append(inputs[0])
    _rename(graph, inputs[0].name, INPUT_NAME)
    _rename(graph, graph.output[0].name, OUTPUT_NAME)


def _static_batch(graph: onnx.GraphProto) -> int:
    """The input's batch size, made concrete (a symbolic batch becomes 2) so shapes infer to numbers."""
    dims = graph.input[0].type.tensor_type.shape.dim
    if len(dims) < 2 or len(dims) > 4:
        raise UnsupportedModel(f"input of rank {len(dims)}; expected [N, C, H, W], [N, C, T] or [N, F]")
    for i, dim in enumerate(dims[1:], start=1):
        if not dim.HasField("dim_value") or dim.dim_value < 1:
            raise UnsupportedModel(f"input axis {i} has no fixed size ({dim.dim_param or '?'}); "
                                   "export with a fixed sample shape")
    if not dims[0].HasField("dim_value") or dims[0].dim_value <= 1:  # symbolic, or 1: the analysis takes 2
        dims[0].Clear()
        dims[0].dim_value = 2
    return dims[0].dim_value


def _check_ops(graph: onnx.GraphProto) -> None:
    """Refuse any operator outside SUPPORTED_OPS, and non-default domains, naming the node."""
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedModel(f"{_describe(node)} is in domain {node.domain!r}; only standard ONNX operators "
                                   "can be tiered")
        if node.op_type not in SUPPORTED_OPS:
            raise UnsupportedModel(f"{_describe(node)} is not supported; supported operators: "
                                   f"{', '.join(sorted(SUPPORTED_OPS))}")


def _name_running_statistics(graph: onnx.GraphProto) -> None:
    """Name every BatchNorm's running statistics `<layer>.running_mean` / `<layer>.running_var`."""
    taken = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            continue
        if len(node.output) > 1 or any(a.name == "training_mode" and a.i for a in node.attribute):
            raise UnsupportedModel(f"{_describe(node)} is in training mode; export in eval mode "
                                   "(see the README's \"Your own model\")")
        kept = [a for a in node.attribute if a.name != "training_mode"]  # onnxruntime-training wants none
        del node.attribute[:]
        node.attribute.extend(kept)
        scale = node.input[1]
        layer = scale.removesuffix(".weight") if scale.endswith(".weight") else (node.name or scale)
        for source, suffix in ((node.input[3], RUNNING_MEAN), (node.input[4], RUNNING_VAR)):
            target = layer + suffix
            if source == target:
                continue
            if sum(source in n.input for n in graph.node) > 1 or target in taken:
                raise UnsupportedModel(f"{_describe(node)}: its running statistic {source!r} is shared or "
                                       f"{target!r} is taken")
            _rename(graph, source, target)
            taken.add(target)


def _check_initializers(graph: onnx.GraphProto) -> None:
    """Every initializer feeds a node, has a bounded name, and float ones are float32."""
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for tensor in kept:
        if len(tensor.name) > MAX_NAME:
            raise UnsupportedModel(f"initializer name of {len(tensor.name)} characters (at most {MAX_NAME}): "
                                   f"{tensor.name[:60]}...")
        if tensor.data_location == TensorProto.EXTERNAL:
            raise UnsupportedModel(f"initializer {tensor.name!r} is stored outside the file; "
                                   "save the model as one file")
        if tensor.data_type in (TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16):
            raise UnsupportedModel(f"initializer {tensor.name!r} is {TensorProto.DataType.Name(tensor.data_type)}; "
                                   "export in float32")


def _to_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset 17 (converted when it was exported at another opset)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise UnsupportedModel("the model imports no standard ONNX opset")
    if opset != OPSET:
        _constants_as_nodes(model.graph)  # the converter reads attributes such as ReduceMean's axes only from nodes
        try:
            model = onnx.version_converter.convert_version(model, OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors from C++
            unknown = [_describe(n) for n in model.graph.node
                       if n.op_type not in SUPPORTED_OPS | _DROPPED | _FINAL | {"Constant"}]
            raise UnsupportedModel(f"the model is at opset {opset} and could not be converted to {OPSET} ({exc}); "
                                   f"export with opset_version={OPSET}"
                                   + (f"; operators it may need folded or cannot have: {', '.join(unknown[:5])}"
                                      if unknown else "")) from exc
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", OPSET))
    model.ir_version = IR_VERSION
    return model


def _constants_as_nodes(graph: onnx.GraphProto) -> None:
    """Integer initializers (axes, shapes, pads) become Constant nodes, as exporters at opset 17 write them."""
    kept, nodes = [], []
    for tensor in graph.initializer:
        if tensor.data_type in (TensorProto.INT64, TensorProto.INT32):
            nodes.append(helper.make_node("Constant", [], [tensor.name], value=tensor))
        else:
            kept.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    original = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *original])


def _explicit_squeeze_axes(model: onnx.ModelProto) -> None:
    """Give every Squeeze without axes the size-1 axes of its static input, so a tier's size-1 channels stay."""
    squeezes = [n for n in model.graph.node if n.op_type == "Squeeze" and (len(n.input) < 2 or not n.input[1])]
    shapes = _static_shapes(model) if squeezes else {}  # shape inference only when some Squeeze needs it
    for node in squeezes:
        shape = shapes.get(node.input[0])
        if shape is None:
            raise UnsupportedModel(f"{_describe(node)}: a Squeeze of a tensor whose shape is not static")
        axes = [i for i, size in enumerate(shape) if size == 1 and i != 0]  # never the batch
        name = f"{node.output[0]}.axes"
        model.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), name))
        del node.input[1:]
        node.input.append(name)


def infer_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """The static shape of every tensor of `model` (inputs, initializers, intermediates, outputs)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise UnsupportedModel(f"shape inference failed: {exc}") from exc
    graph = inferred.graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    for node in graph.node:
        for out in node.output:
            if out not in shapes or any(d < 1 for d in shapes[out]):
                raise UnsupportedModel(f"{_describe(node)}: the shape of {out!r} is not static "
                                       f"({shapes.get(out, 'unknown')}); export with fixed shapes")
    return shapes


def normalize(model: onnx.ModelProto, notes: list[str] | None = None) -> tuple[onnx.ModelProto, int]:
    """The normalized copy of an in-memory forward graph and its static batch (see the module docstring)."""
    notes = [] if notes is None else notes
    model = _to_opset(onnx.ModelProto.FromString(model.SerializeToString()))
    graph = model.graph
    del graph.value_info[:]
    _one_input_one_output(graph)
    _fold_constants(graph)
    _drop_pass_through(graph, notes)
    first = graph.input[0].type.tensor_type.shape.dim
    exported_batch = first[0].dim_value if first and first[0].HasField("dim_value") else 0
    _static_batch(graph)
    while _fold_constant_nodes(model):  # a folded Shape can make the next one static
        pass
    _check_ops(graph)
    _explicit_squeeze_axes(model)
    _name_running_statistics(graph)
    _check_initializers(graph)
    _shared_parameters(graph, notes)
    batch = _static_batch(graph)
    graph.output[0].type.tensor_type.ClearField("shape")  # re-inferred below, with the static batch
    shapes = infer_shapes(model)
    logits = shapes[OUTPUT_NAME]
    if len(logits) == 2 and logits[0] != batch and exported_batch == 1:  # a reshape to [1, ...] fixes the batch
        raise UnsupportedModel("the model was exported with a batch of 1 that its reshapes keep; export it with a "
                               "sample batch of 2 or more (e.g. torch.randn(4, ...)): TierFL makes the batch dynamic")
    if len(logits) != 2 or logits[0] != batch or logits[1] < 2:
        raise UnsupportedModel(f"the output has shape {logits}; a classifier's logits are [N, classes>=2]")
    graph.output[0].CopyFrom(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, logits))
    return model, batch


def _check_same_function(original: onnx.ModelProto, forward: onnx.ModelProto, batch: int, notes: list[str]) -> None:
    """Run the file as written and as normalized on one seeded batch; UnsupportedModel if they disagree."""
    copy = onnx.ModelProto.FromString(original.SerializeToString())
    copy.ir_version = min(copy.ir_version, IR_VERSION)
    initializers = {t.name for t in copy.graph.initializer}
    data = next(i for i in copy.graph.input if i.name not in initializers)
    shape = [batch, *(d.dim_value for d in data.type.tensor_type.shape.dim[1:])]
    if math.prod(shape[1:]) > MAX_SAMPLE_VALUES:
        raise UnsupportedModel(f"one sample of shape {shape[1:]} holds {math.prod(shape[1:]):,} values, more than "
                               f"{MAX_SAMPLE_VALUES:,}; export the model for smaller inputs")
    if math.prod(shape) > MAX_BATCH_VALUES:
        raise UnsupportedModel(f"the exported batch {shape} holds {math.prod(shape):,} values, more than "
                               f"{MAX_BATCH_VALUES:,}; export with a sample batch of 2 (TierFL makes the batch "
                               "dynamic)")
    x = np.random.default_rng(0).random(shape, np.float32)
    try:
        (written,) = onnxruntime.InferenceSession(copy.SerializeToString()).run(None, {data.name: x})[:1]
    except Exception as exc:  # onnxruntime cannot run the file as written (opset, batch baked in): nothing to compare
        log.info("the file as written does not run at batch %d here (%s); not compared", batch, exc)
        return
    (ours,) = onnxruntime.InferenceSession(forward.SerializeToString()).run(None, {INPUT_NAME: x})
    if np.shape(written) != ours.shape:
        raise UnsupportedModel(f"the file outputs shape {list(np.shape(written))} on a batch of {batch}, the "
                               f"normalized model {list(ours.shape)}; please report this model")
    final = next((n.split()[2] for n in notes if n.startswith("removed the final ")), None)
    if final in ("Softmax", "LogSoftmax"):
        shifted = ours - ours.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        ours = np.exp(log_p) if final == "Softmax" else log_p
    gap = float(np.abs(np.asarray(written, np.float32) - ours).max())
    if not np.isfinite(gap) or gap > 1e-4 * (1 + float(np.abs(written).max())):
        raise UnsupportedModel(f"the normalized model computes something else than the file (max difference {gap:.3g} "
                               "on a random batch); please report this model")


def _refuse_malformed(path: Path, model: onnx.ModelProto) -> None:
    """UnsupportedModel naming what onnx.checker finds wrong with the file's graph, if anything."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise UnsupportedModel(f"{path} is not a valid ONNX model: {' '.join(str(exc).split())}; export it again "
                               "(onnx.checker.check_model tells what is wrong)") from None


def import_forward(path: str | os.PathLike[str], notes: Sequence[str] = ()) -> ImportedModel:
    """Read and normalize the ONNX classifier at `path`; UnsupportedModel says what blocks it."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise UnsupportedModel(f"{path} is {size} bytes, more than one ONNX file can hold")
    data = path.read_bytes()
    try:
        model = onnx.ModelProto.FromString(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UnsupportedModel(f"{path} is not an ONNX model ({exc})") from exc
    if not model.graph.node:
        raise UnsupportedModel(f"{path} holds no graph (is it an ONNX model?)")
    found = list(notes)
    try:
        forward, batch = normalize(model, found)
    except UnsupportedModel:
        raise
    except Exception:  # a malformed graph (a node short of inputs, ...) breaks some step: the checker says what
        _refuse_malformed(path, model)
        raise  # a valid file that breaks a step is a bug here: keep the traceback
    _check_same_function(model, forward, batch, found)
    for note in found:
        log.info("%s: %s", path.name, note)
    return ImportedModel(forward, batch, hashlib.sha256(data).hexdigest(), tuple(found))
