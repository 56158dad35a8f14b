"""Bring your own model: import, width analysis and tier graphs of models exported from PyTorch and hand-made graphs.

PyTorch runs in the torch venv (conftest.torch_python; tests/torch_models.py's command line, one process for the module): it exports the
models, and computes what the narrowed models output and one SGD step of them; this process compares.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.export import MANIFEST_NAME, export_model
from models.manifest import STEP_FILE, ModelCard, TierManifest
from models.onnx_import import UnsupportedModel, import_forward, normalize
from models.ort_lowering import for_ort_training
from models.ort_training import load_training_api
from models.step_graph import step_graph_io
from models.tier_graph import cut_forward, forward_macs, initializer_arrays
from models.widths import analyse
from tests.conftest import run_torch

RATES = (1.0, 0.5, 0.25, 0.0625)
# name (tests/torch_models.py's MODELS) -> one sample's shape
MODELS = {"preresnet": (3, 32, 32), "mobilenet": (3, 32, 32), "conv1d": (40, 49), "mlp_bn": (64,),
          "transformer": (16, 6)}
# one SGD step of tiers a and c of every model on both backends against PyTorch autograd
STEP_TIERS = {"a": 1.0, "c": 0.25}
STEP_BATCH, STEP_LR, STEP_TOLERANCE = 8, 0.1, 1e-4


@pytest.fixture(scope="module")
def torch_side(torch_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of what PyTorch made, per model NAME: NAME/model.onnx with the default export options (BatchNorm
    statistics and affine parameters randomized) and its state NAME/state.npz; the narrowed models' outputs and states
    on x.npy at RATES (NAME/reference.npz); one SGD step on step_x.npy, step_y.npy at the STEP_TIERS' rates
    (NAME/step.npz)."""
    root = tmp_path_factory.mktemp("byom")
    commands = []
    for name, shape in MODELS.items():
        folder = root / name
        folder.mkdir()
        state = str(folder / "state.npz")
        np.save(folder / "x.npy", np.random.default_rng(1).standard_normal((3, *shape), np.float32))
        np.save(folder / "step_x.npy", np.random.default_rng(2).random((STEP_BATCH, *shape), np.float32))
        np.save(folder / "step_y.npy", np.arange(STEP_BATCH, dtype=np.int64) % 5)  # every model has 5 classes or more
        commands += [
            ["export", name, str(folder / "model.onnx"), "--recipe", "merged", "--randomize", "bn", "--state", state,
             "--options", json.dumps({"input_names": ["x"], "output_names": ["y"]})],
            ["reference", name, "--state", state, "--x", str(folder / "x.npy"), "--rates", ",".join(map(str, RATES)),
             "--states", "--out", str(folder / "reference.npz")],
            ["step", name, "--state", state, "--x", str(folder / "step_x.npy"), "--y", str(folder / "step_y.npy"),
             "--rates", ",".join(map(str, STEP_TIERS.values())), "--lr", str(STEP_LR),
             "--out", str(folder / "step.npz")]]
    run_torch(torch_python, root, commands)
    return root


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request: pytest.FixtureRequest, torch_side: Path) -> tuple[str, tuple[int, ...], Path]:
    """(name, sample shape, the folder of its export and PyTorch's files) per model."""
    return request.param, MODELS[request.param], torch_side / request.param


def test_every_tier_computes_what_the_narrowed_pytorch_model_computes(exported):
    name, shape, folder = exported
    imported = import_forward(folder / "model.onnx")
    plan = analyse(imported.forward)
    assert plan.cuttable and not plan.blockers(), plan.blockers()
    assert imported.input_shape == list(shape)
    with np.load(folder / "state.npz") as saved:
        state = {k for k in saved.files if not k.endswith("num_batches_tracked")}
    assert set(plan.trainable) | set(plan.frozen) == state  # merged equal tensors came apart again
    reference = np.load(folder / "reference.npz")
    x = np.load(folder / "x.npy")
    for rate in RATES:
        tier = cut_forward(imported.forward, plan, rate)
        (got,) = ort.InferenceSession(tier.SerializeToString()).run(None, {"input": x})
        np.testing.assert_allclose(got, reference[f"{rate}/logits"], atol=1e-5, err_msg=f"{name} at rate {rate}")
        shapes = plan.param_shapes(rate)
        narrow = {k.removeprefix(f"{rate}/state/"): reference[k].shape for k in reference.files
                  if k.startswith(f"{rate}/state/")}
        assert {k: v for k, v in narrow.items() if k in shapes} == shapes
        lowered = for_ort_training(tier)  # what onnxruntime-training differentiates computes the same
        (same,) = ort.InferenceSession(lowered.SerializeToString()).run(["logits"], {"input": x})
        np.testing.assert_allclose(same, got, atol=1e-6)


def test_narrower_tiers_cost_less(exported):
    _, _, folder = exported
    imported = import_forward(folder / "model.onnx")
    plan = analyse(imported.forward)
    macs = [forward_macs(cut_forward(imported.forward, plan, rate)) for rate in RATES]
    params = [sum(int(np.prod(s)) for s in plan.param_shapes(rate).values()) for rate in RATES]
    assert macs == sorted(macs, reverse=True) and macs[0] > 4 * macs[2]
    assert params == sorted(params, reverse=True)


def test_the_batch_is_dynamic_after_cutting(exported):
    _, shape, folder = exported
    imported = import_forward(folder / "model.onnx")
    plan = analyse(imported.forward)
    session = ort.InferenceSession(cut_forward(imported.forward, plan, 0.5).SerializeToString())
    for n in (1, 7):
        (logits,) = session.run(None, {"input": np.random.default_rng(n).random((n, *shape), np.float32)})
        assert logits.shape[0] == n


# ---- one training step on each backend matches PyTorch autograd ------------------------------------


def _ort_training_step(tier: Path, x: np.ndarray, y: np.ndarray, classes: int) -> dict[str, np.ndarray]:
    """Trainable weights after one onnxruntime-training SGD step from the tier's checkpoint."""
    api = load_training_api().api
    state = api.CheckpointState.load_checkpoint(str(tier / "checkpoint"))
    module = api.Module(str(tier / "training_model.onnx"), state, str(tier / "eval_model.onnx"))
    optimizer = api.Optimizer(str(tier / "optimizer_model.onnx"), module)
    feeds = {"input": x, "labels": y, "class_mask": np.zeros(classes, np.float32)}
    optimizer.set_learning_rate(STEP_LR)
    module.train()
    module(*(feeds[name] for name in module.input_names()))
    optimizer.step()
    return {name: np.array(p.data) for name, p in state.parameters if p.requires_grad}


def _portable_step(tier: Path, x: np.ndarray, y: np.ndarray, classes: int) -> dict[str, np.ndarray]:
    """Trainable weights after one step of the portable step graph from the tier's weights."""
    graph = onnx.load(str(tier / STEP_FILE))
    io = step_graph_io(graph)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input": x, "labels": y, "class_mask": np.zeros(classes, np.float32),
             "learning_rate": np.array([STEP_LR], np.float32), **io.initial_optimizer_state(),
             **initializer_arrays(onnx.load(str(tier / "inference.onnx")))}
    outputs = dict(zip(io.outputs, session.run(None, {name: feeds[name] for name in io.inputs})))
    trainable = [p.name for p in TierManifest.load(tier / MANIFEST_NAME).params if p.trainable]
    return {name: outputs[io.updates[name]] for name in trainable}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_training_step_on_each_backend_matches_pytorch_autograd(name: str, torch_side: Path, tmp_path: Path):
    """Tiers a and c, plain SGD, BatchNorm on batch statistics: every trainable weight within 1e-4 of PyTorch's.
    (Running statistics are not compared: PyTorch updates running_var with the unbiased variance, ORT the biased.)"""
    folder = torch_side / name
    imported = import_forward(folder / "model.onnx")
    card = ModelCard(name=name, input_shape=imported.input_shape, num_classes=imported.num_classes,
                     batch_norm=any(n.op_type == "BatchNormalization" for n in imported.forward.graph.node))
    export_model(imported.forward, card, list(STEP_TIERS), tmp_path)
    x, y, expected = np.load(folder / "step_x.npy"), np.load(folder / "step_y.npy"), np.load(folder / "step.npz")
    gaps = {}
    for tier, rate in STEP_TIERS.items():
        torch_new = {k.removeprefix(f"{rate}/"): expected[k] for k in expected.files
                     if k.startswith(f"{rate}/") and k != f"{rate}/loss"}
        for backend, step in (("ort-training", _ort_training_step), ("portable", _portable_step)):
            new = step(tmp_path / tier, x, y, card.num_classes)
            assert set(new) == set(torch_new), (tier, backend)
            gaps[tier, backend] = max(float(np.abs(new[k] - torch_new[k]).max()) for k in new)
            moved = max(float(np.abs(torch_new[k] - v).max()) for k, v in initializer_arrays(
                onnx.load(str(tmp_path / tier / "inference.onnx"))).items() if k in torch_new)
            assert moved > 10 * STEP_TOLERANCE, (tier, moved)  # the step moves weights past the tolerance (1e-2 here)
    assert max(gaps.values()) <= STEP_TOLERANCE, gaps


# ---- hand-made graphs: what is refused, what is pinned --------------------------------------


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], shape: list[int],
           classes: int) -> onnx.ModelProto:
    """A forward graph x [2, *shape] -> y [2, classes] of `nodes`."""
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, *shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, classes])],
        initializer=[numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k)
                     for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _weights(*shape: int) -> np.ndarray:
    return np.random.default_rng(len(shape)).normal(0, 0.1, shape).astype(np.float32)


def _conv_head(x: str, channels: int, side: int) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """GlobalAveragePool, Flatten, Gemm to 3 classes."""
    nodes = [helper.make_node("GlobalAveragePool", [x], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc.weight"], ["y"], name="fc", transB=1)]
    return nodes, {"fc.weight": _weights(3, channels)}


def test_an_unsupported_operator_is_refused_naming_the_node(tmp_path: Path):
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["h"], transB=1),
             helper.make_node("Selu", ["h"], ["s"], name="my_selu"),
             helper.make_node("Gemm", ["s", "w2"], ["y"], transB=1)]
    model = _model(nodes, {"w": _weights(8, 4), "w2": _weights(3, 8)}, [4], 3)
    with pytest.raises(UnsupportedModel, match=r"node 'my_selu' \(Selu\) is not supported"):
        normalize(model)


def test_a_second_input_or_output_is_refused():
    model = _model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], {"w": _weights(3, 4)}, [4], 3)
    model.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [2, 4]))
    with pytest.raises(UnsupportedModel, match="2 data inputs"):
        normalize(model)


def test_a_model_that_is_not_onnx_names_the_file(tmp_path: Path):
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\x00not a protobuf at all" * 10)
    with pytest.raises(UnsupportedModel, match="weights.onnx"):
        import_forward(path)


def test_a_malformed_or_oversized_file_is_refused_not_crashed_on(tmp_path: Path):
    gemm = helper.make_node("Gemm", ["x", "w"], ["h"], transB=1)
    cases = {  # file -> (graph, what the refusal says)
        "short.onnx": (_model([gemm, helper.make_node("Identity", [], ["y"])], {"w": _weights(3, 4)}, [4], 3),
                       r"short.onnx is not a valid ONNX model: .*Identity"),
        "empty_constant.onnx": (_model([helper.make_node("Constant", [], ["c"]), gemm, helper.make_node(
            "Add", ["h", "c"], ["y"])], {"w": _weights(3, 4)}, [4], 3), r"Constant needs exactly one value attribute"),
        "huge.onnx": (_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], {"w": _weights(3, 4)}, [1 << 40],
                             3), r"one sample of shape \[1099511627776\] holds"),
    }
    for name, (model, refusal) in cases.items():
        onnx.save(model, tmp_path / name)
        with pytest.raises(UnsupportedModel, match=refusal):
            import_forward(tmp_path / name)


def test_a_final_softmax_is_removed_with_a_note():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Softmax", ["h"], ["y"], axis=1)]
    notes: list[str] = []
    model, _ = normalize(_model(nodes, {"w": _weights(3, 4)}, [4], 3), notes)
    assert [n.op_type for n in model.graph.node] == ["Gemm"] and "Softmax" in notes[0]


def test_a_concat_of_two_branches_pins_them_and_names_the_node():
    nodes = [helper.make_node("Conv", ["x", "a.weight"], ["a"], name="a", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["x", "b.weight"], ["b"], name="b", kernel_shape=[1, 1]),
             helper.make_node("Concat", ["a", "b"], ["ab"], name="join", axis=1),
             helper.make_node("Relu", ["ab"], ["r"]),
             helper.make_node("Conv", ["r", "c.weight"], ["c"], name="c", kernel_shape=[1, 1])]
    head, head_inits = _conv_head("c", 16, 4)
    model, _ = normalize(_model(nodes + head, {"a.weight": _weights(8, 2, 1, 1), "b.weight": _weights(8, 2, 1, 1),
                                               "c.weight": _weights(16, 16, 1, 1)} | head_inits, [2, 4, 4], 3))
    plan = analyse(model)
    assert plan.param_shapes(0.25)["a.weight"] == (8, 2, 1, 1)  # whole: the Concat
    assert plan.param_shapes(0.25)["c.weight"] == (4, 16, 1, 1)  # its own outputs are still cut
    assert any("'join' (Concat)" in why for why in plan.blockers())
    x = np.random.default_rng(0).random((2, 2, 4, 4), np.float32)
    full = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    tier = ort.InferenceSession(cut_forward(model, plan, 0.25).SerializeToString()).run(None, {"input": x})[0]
    assert full.shape == tier.shape


def test_a_grouped_convolution_is_kept_whole_and_a_depthwise_one_is_cut():
    nodes = [helper.make_node("Conv", ["x", "stem.weight"], ["s"], name="stem", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["s", "dw.weight"], ["d"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=8),
             helper.make_node("Conv", ["d", "g.weight"], ["g"], name="grouped", kernel_shape=[1, 1], group=2)]
    head, head_inits = _conv_head("g", 8, 4)
    model, _ = normalize(_model(nodes + head, {"stem.weight": _weights(8, 3, 1, 1), "dw.weight": _weights(8, 1, 3, 3),
                                               "g.weight": _weights(8, 4, 1, 1)} | head_inits, [3, 4, 4], 3))
    plan = analyse(model)
    assert any("'grouped' (Conv): a grouped convolution" in why for why in plan.blockers())
    assert plan.param_shapes(0.5)["dw.weight"] == (8, 1, 3, 3)  # joined with the grouped conv's whole input
    nodes[2] = helper.make_node("Conv", ["d", "g.weight"], ["g"], name="pointwise", kernel_shape=[1, 1])
    model, _ = normalize(_model(nodes + head, {"stem.weight": _weights(8, 3, 1, 1), "dw.weight": _weights(8, 1, 3, 3),
                                               "g.weight": _weights(8, 8, 1, 1)} | head_inits, [3, 4, 4], 3))
    plan = analyse(model)
    assert not plan.blockers()
    assert plan.param_shapes(0.5)["dw.weight"] == (4, 1, 3, 3)
    tier = cut_forward(model, plan, 0.5)
    assert next(a.i for n in tier.graph.node if n.name == "dw" for a in n.attribute if a.name == "group") == 4
    x = np.random.default_rng(0).random((2, 3, 4, 4), np.float32)
    assert ort.InferenceSession(tier.SerializeToString()).run(None, {"input": x})[0].shape == (2, 3)


def test_a_single_layer_has_nothing_to_cut():
    model, _ = normalize(_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
                                {"w": _weights(3, 4), "b": _weights(3)}, [4], 3))
    plan = analyse(model)
    assert not plan.cuttable
    assert plan.param_shapes(0.0625) == plan.param_shapes(1.0)


def test_a_batch_of_one_is_taken_unless_a_reshape_keeps_it():
    model = _model([helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)],
                   {"w": _weights(3, 4)}, [4], 3)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    normalized, batch = normalize(model)
    assert batch == 2
    tier = cut_forward(normalized, analyse(normalized), 1.0)
    session = ort.InferenceSession(tier.SerializeToString())
    assert session.run(None, {"input": np.ones((5, 4), np.float32)})[0].shape == (5, 3)
    kept = _model([helper.make_node("Reshape", ["x", "shape"], ["f"]),
                   helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)],
                  {"w": _weights(3, 4), "shape": np.array([1, 4], np.int64)}, [4], 3)
    for value in (kept.graph.input[0], kept.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(UnsupportedModel, match="batch of 1 that its reshapes keep; export it with a sample batch of 2"):
        normalize(kept)


def _runs(model: onnx.ModelProto, rates: tuple[float, ...], x: np.ndarray) -> list[tuple[int, ...]]:
    """The logits' shape of every tier of a normalized model on `x`."""
    plan = analyse(model)
    return [ort.InferenceSession(cut_forward(model, plan, r).SerializeToString()).run(None, {"input": x})[0].shape
            for r in rates]


def test_a_grouped_convolution_runs_at_every_rate():
    nodes = [helper.make_node("Conv", ["x", "stem.weight"], ["s"], name="stem", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["s", "g.weight"], ["g"], name="grouped", kernel_shape=[1, 1], group=2)]
    head, head_inits = _conv_head("g", 8, 4)
    model, _ = normalize(_model(nodes + head, {"stem.weight": _weights(8, 3, 1, 1), "g.weight": _weights(8, 4, 1, 1)}
                                | head_inits, [3, 4, 4], 3))
    assert _runs(model, RATES, np.ones((2, 3, 4, 4), np.float32)) == [(2, 3)] * len(RATES)


def test_a_squeeze_without_axes_keeps_a_tier_s_single_channel_and_the_batch():
    nodes = [helper.make_node("Conv", ["x", "c.weight"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Squeeze", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.weight"], ["y"], transB=1)]
    model, _ = normalize(_model(nodes, {"c.weight": _weights(16, 3, 1, 1), "fc.weight": _weights(3, 16)}, [3, 4, 4], 3))
    assert _runs(model, (1.0, 0.0625), np.ones((1, 3, 4, 4), np.float32)) == [(1, 3), (1, 3)]


def test_a_final_softmax_behind_an_identity_is_removed():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Softmax", ["h"], ["p"], axis=1),
             helper.make_node("Identity", ["p"], ["y"])]
    model, _ = normalize(_model(nodes, {"w": _weights(3, 4)}, [4], 3))
    assert [n.op_type for n in model.graph.node] == ["Gemm"]


def test_a_flattened_tensor_added_to_a_layer_s_output_stays_whole_and_runs():
    nodes = [helper.make_node("Conv", ["x", "c.weight"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Flatten", ["c"], ["h"]), helper.make_node("Gemm", ["h", "fc.weight"], ["f"], transB=1),
             helper.make_node("Add", ["h", "f"], ["a"], name="a"),
             helper.make_node("Gemm", ["a", "out.weight"], ["y"], transB=1)]
    model, _ = normalize(_model(nodes, {"c.weight": _weights(8, 3, 1, 1), "fc.weight": _weights(128, 128),
                                        "out.weight": _weights(3, 128)}, [3, 4, 4], 3))
    assert any("'a' (Add): channels of different sizes meet" in why for why in analyse(model).blockers())
    assert _runs(model, (0.5,), np.ones((2, 3, 4, 4), np.float32)) == [(2, 3)]


def test_an_opset_18_model_with_initializer_axes_computes_the_same_after_import(tmp_path: Path):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
             helper.make_node("ReduceMean", ["h", "axes"], ["m"]),
             helper.make_node("Sub", ["h", "m"], ["c"]), helper.make_node("Gemm", ["c", "w2"], ["y"], transB=1)]
    model = _model(nodes, {"w": _weights(8, 4), "w2": _weights(3, 8), "axes": np.array([-1], np.int64)}, [4], 3)
    model.opset_import[0].version = 18
    onnx.save(model, tmp_path / "m.onnx")
    imported = import_forward(tmp_path / "m.onnx")  # compares the file and the import on a batch itself
    x = np.random.default_rng(0).random((2, 4), np.float32)
    (expected,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    tier = cut_forward(imported.forward, analyse(imported.forward), 1.0)
    (got,) = ort.InferenceSession(tier.SerializeToString()).run(None, {"input": x})
    np.testing.assert_allclose(got, expected, atol=1e-6)
