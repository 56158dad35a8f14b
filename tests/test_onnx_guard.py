"""edge_client.onnx_guard: ONNX files reading external data or using unknown operator domains are refused (issue 13, case 6).

Hostile models are built with the `onnx` package of the dev venv; the guard itself reads the
protobuf wire format, as it must on a device with plain onnxruntime and no `onnx`.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from edge_client.onnx_guard import OnnxRefused, check_onnx_file, check_onnx_folder
from models.export import export_all
from models.zoo import ModelSpec


def external_tensor(name: str, location: str) -> TensorProto:
    """A float tensor whose bytes are said to be in the file `location`."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value=location)
    return tensor


def model(nodes: list[onnx.NodeProto], initializers: list[TensorProto] = (), opsets: dict[str, int] | None = None,
          **fields: object) -> onnx.ModelProto:
    """A one-output model of `nodes` (output `y`); extra ModelProto fields (functions...) in `fields`."""
    nodes = nodes or [helper.make_node("Identity", ["w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              list(initializers))
    opset_imports = [helper.make_opsetid(d, v) for d, v in (opsets or {"": 17}).items()]
    return helper.make_model(graph, opset_imports=opset_imports, **fields)


def _refusal(tmp_path: Path, proto: onnx.ModelProto | bytes) -> str:
    path = tmp_path / "model.onnx"
    path.write_bytes(proto if isinstance(proto, bytes) else proto.SerializeToString())
    with pytest.raises(OnnxRefused) as caught:
        check_onnx_file(path)
    assert str(caught.value).startswith("model.onnx: ")
    return str(caught.value)


def _subgraph_with(tensor: TensorProto) -> onnx.GraphProto:
    return helper.make_graph([helper.make_node("Constant", [], ["c"], value=tensor)], "branch", [],
                             [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])])


def test_external_data_is_refused_wherever_it_hides(tmp_path):
    key = external_tensor("w", "../device.key")
    assert "tensor 'w' refers to external data" in _refusal(tmp_path, model([], [key]))
    constant = helper.make_node("Constant", [], ["y"], value=external_tensor("k", "../device.key"))
    assert "'k' refers to external data" in _refusal(tmp_path, model([constant]))
    sparse = onnx.SparseTensorProto(values=external_tensor("v", "/etc/shadow"), dims=[4])
    sparse.indices.CopyFrom(helper.make_tensor("i", TensorProto.INT64, [1], [0]))
    proto = model([])
    proto.graph.sparse_initializer.append(sparse)
    assert "'v' refers to external data" in _refusal(tmp_path, proto)
    nested = helper.make_node("If", ["cond"], ["y"], then_branch=_subgraph_with(external_tensor("deep", "../x")),
                              else_branch=_subgraph_with(helper.make_tensor("ok", TensorProto.FLOAT, [4], [0] * 4)))
    loop_body = helper.make_graph([nested], "body", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    looped = helper.make_node("Loop", ["n", "cond"], ["y"], body=loop_body)
    assert "'deep' refers to external data" in _refusal(tmp_path, model([looped]))
    location_only = helper.make_tensor("w", TensorProto.FLOAT, [4], [0] * 4)
    location_only.data_location = TensorProto.EXTERNAL  # no external_data entries, still refused
    assert "refers to external data" in _refusal(tmp_path, model([], [location_only]))


def test_operator_domains_outside_the_allow_list_are_refused(tmp_path):
    custom = helper.make_node("Steal", ["w"], ["y"], domain="evil.ops")
    assert "node 'Steal' of operator domain 'evil.ops'" in _refusal(tmp_path, model([custom], opsets={"": 17}))
    assert "operator set domain 'evil.ops'" in _refusal(tmp_path, model([], opsets={"": 17, "evil.ops": 1}))
    function = helper.make_function("local", "f", ["x"], ["y"], [helper.make_node("Steal", ["x"], ["y"], domain="evil.ops")],
                                    [helper.make_opsetid("", 17)])
    assert "'evil.ops'" in _refusal(tmp_path, model([], functions=[function]))


def test_garbage_and_truncated_files_are_refused(tmp_path):
    good = model([]).SerializeToString()
    assert "truncated" in _refusal(tmp_path, good[:-3])
    assert _refusal(tmp_path, b"\xff" * 64)
    assert "no graph" in _refusal(tmp_path, b"")


def test_every_exported_artifact_passes(tmp_path):
    for name, spec in (("mlp", ModelSpec(arch="mlp", hidden=(16,))), ("bn", ModelSpec(arch="mlp", hidden=(8,), batch_norm=True)),
                       ("cnn", ModelSpec(arch="cnn"))):
        export_all(spec, ["a"], tmp_path / name)
        assert len(list((tmp_path / name / "a").glob("*.onnx"))) >= 5
        check_onnx_folder(tmp_path / name / "a")
