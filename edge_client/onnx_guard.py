"""Check a cached ONNX file before any ONNX Runtime session opens it: no external data, known operator domains only.

The pinned onnxruntime (1.19.2) predates its own checks of external-data paths, so a graph whose
tensor says "my bytes are in ../device.key" would be read from outside the cache. Devices run
plain onnxruntime without the `onnx` package, so this reads the protobuf wire format itself:
ModelProto -> GraphProto (also inside node attributes, training info and functions) -> NodeProto,
TensorProto, SparseTensorProto, AttributeProto, with field numbers from onnx.proto3. Any tensor
with `external_data` entries or `data_location` EXTERNAL is refused, and so is any operator-set
import or node outside the allow-lists below (what the exported MLP and CNN tiers use).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

# Nodes may only use these domains ("" and "ai.onnx" are the standard operators).
NODE_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft", "ai.onnx.preview.training"})
# onnxruntime-training's artifact generator also declares these operator sets in training_model.onnx.
OPSET_DOMAINS = NODE_DOMAINS | {"ai.onnx.ml", "ai.onnx.training", "com.microsoft.experimental",
                                "com.microsoft.nchwc", "org.pytorch.aten"}
MAX_DEPTH = 32  # graphs nested in attributes deeper than this are refused (no real model comes close)
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
Field = tuple[int, int, int | memoryview]  # (field number, wire type, value: an integer or the bytes)


class OnnxRefused(ValueError):
    """An ONNX file that must not be loaded: which file, and why."""


def check_onnx_file(path: Path) -> None:
    """Raise OnnxRefused (naming `path`) unless it is a well-formed model with no external data and allowed domains."""
    try:
        _model(memoryview(path.read_bytes()))
    except _Bad as exc:
        raise OnnxRefused(f"{path.name}: {exc}") from None


def check_onnx_folder(folder: Path) -> None:
    """check_onnx_file on every .onnx file of `folder`."""
    for path in sorted(folder.glob("*.onnx")):
        check_onnx_file(path)


class _Bad(Exception):
    pass


def _fields(data: memoryview) -> Iterator[Field]:
    """The (number, wire type, value) fields of one protobuf message."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == _BYTES:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise _Bad("truncated protobuf (a field runs past the end)")
            yield number, wire, data[pos : pos + length]
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
            if pos > end:
                raise _Bad("truncated protobuf (a fixed-size field runs past the end)")
        else:
            raise _Bad(f"not an ONNX model (protobuf wire type {wire})")


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Bad("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _messages(data: memoryview, wanted: int) -> Iterator[memoryview]:
    """The length-delimited values of field `wanted` (the sub-messages of a repeated message field)."""
    for number, wire, value in _fields(data):
        if number == wanted:
            if wire != _BYTES:
                raise _Bad(f"field {number} is not a message")
            yield value  # type: ignore[misc]


def _text(value: int | memoryview) -> str:
    if not isinstance(value, memoryview):
        raise _Bad("a string field is not length-delimited")
    try:
        return bytes(value).decode()
    except UnicodeDecodeError:
        raise _Bad("a string field is not UTF-8") from None


def _opset(data: memoryview, where: str) -> None:
    """OperatorSetIdProto: 1 domain."""
    for number, _, value in _fields(data):
        if number == 1 and (domain := _text(value)) not in OPSET_DOMAINS:
            raise _Bad(f"{where} imports operator set domain {domain!r}, not in the allow-list")


def _model(data: memoryview) -> None:
    """ModelProto: 7 graph, 8 opset_import, 20 training_info, 25 functions."""
    graphs = 0
    for number, wire, value in _fields(data):
        if wire != _BYTES:
            continue
        assert isinstance(value, memoryview)
        if number == 8:
            _opset(value, "the model")
        elif number == 7:
            graphs += 1
            _graph(value, 0)
        elif number == 20:  # TrainingInfoProto: 1 initialization, 2 algorithm (graphs)
            for sub, sub_wire, graph in _fields(value):
                if sub in (1, 2) and isinstance(graph, memoryview):
                    _graph(graph, 1)
        elif number == 25:
            _function(value)
    if graphs != 1:
        raise _Bad("not an ONNX model (no graph)")


def _function(data: memoryview) -> None:
    """FunctionProto: 7 node, 9 opset_import, 10 domain, 11 attribute_proto."""
    for number, _, value in _fields(data):
        if number == 7 and isinstance(value, memoryview):
            _node(value, 1)
        elif number == 9 and isinstance(value, memoryview):
            _opset(value, "a function")
        elif number == 11 and isinstance(value, memoryview):
            _attribute(value, 1)


def _graph(data: memoryview, depth: int) -> None:
    """GraphProto: 1 node, 5 initializer, 15 sparse_initializer."""
    if depth > MAX_DEPTH:
        raise _Bad(f"graphs nested more than {MAX_DEPTH} deep")
    for number, _, value in _fields(data):
        if not isinstance(value, memoryview):
            continue
        if number == 1:
            _node(value, depth)
        elif number == 5:
            _tensor(value)
        elif number == 15:
            _sparse(value)


def _node(data: memoryview, depth: int) -> None:
    """NodeProto: 4 op_type, 5 attribute, 7 domain."""
    op_type = domain = ""
    for number, _, value in _fields(data):
        if number == 4:
            op_type = _text(value)
        elif number == 7:
            domain = _text(value)
        elif number == 5 and isinstance(value, memoryview):
            _attribute(value, depth)
    if domain not in NODE_DOMAINS:
        raise _Bad(f"node {op_type!r} of operator domain {domain!r}, not in the allow-list")


def _attribute(data: memoryview, depth: int) -> None:
    """AttributeProto: 5 t, 10 tensors (TensorProto); 6 g, 11 graphs (GraphProto); 22, 23 sparse tensors."""
    for number, _, value in _fields(data):
        if not isinstance(value, memoryview):
            continue
        if number in (5, 10):
            _tensor(value)
        elif number in (6, 11):
            _graph(value, depth + 1)
        elif number in (22, 23):
            _sparse(value)


def _sparse(data: memoryview) -> None:
    """SparseTensorProto: 1 values, 2 indices (TensorProto)."""
    for number, _, value in _fields(data):
        if number in (1, 2) and isinstance(value, memoryview):
            _tensor(value)


def _tensor(data: memoryview) -> None:
    """TensorProto: 8 name, 13 external_data, 14 data_location."""
    name, external = "", False
    for number, _, value in _fields(data):
        if number == 8:
            name = _text(value)
        elif number == 13 or (number == 14 and value == EXTERNAL):
            external = True
    if external:
        raise _Bad(f"tensor {name!r} refers to external data (a file outside the model)")
