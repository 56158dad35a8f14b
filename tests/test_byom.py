"""Bring your own model: import, width analysis and tier graphs of models exported from PyTorch and hand-made graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.onnx_import import UnsupportedModel, import_forward, normalize
from models.ort_lowering import for_ort_training
from models.tier_graph import cut_forward, forward_macs
from models.widths import analyse

torch = pytest.importorskip("torch", reason="PyTorch is a dev extra: pip install torch==2.13.0")
import torch_models as tm  # noqa: E402  (needs torch)

RATES = (1.0, 0.5, 0.25, 0.0625)
MODELS = {
    "preresnet": (lambda: tm.PreResNet(1.0), (3, 32, 32)),
    "mobilenet": (lambda: tm.MobileNetStyle(1.0), (3, 32, 32)),
    "conv1d": (lambda: tm.Conv1dNet(1.0), (40, 49)),
    "mlp-bn": (lambda: tm.MLP(1.0, batch_norm=True, dropout=0.2), (64,)),
    "transformer": (lambda: tm.TinyTransformer(1.0), (16, 6)),
}


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """The model in eval mode with BatchNorm statistics and affine parameters away from their defaults."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(name, PyTorch model, sample shape, the exported file) per model, default export options."""
    torch.manual_seed(0)
    build, shape = MODELS[request.param]
    model = _randomized(build())
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.randn(4, *shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], do_constant_folding=False)
    return request.param, model, shape, path


def test_every_tier_computes_what_the_narrowed_pytorch_model_computes(exported):
    name, model, shape, path = exported
    imported = import_forward(path)
    plan = analyse(imported.forward)
    assert plan.cuttable and not plan.blockers(), plan.blockers()
    assert imported.input_shape == list(shape)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(plan.trainable) | set(plan.frozen) == set(state)  # merged equal tensors came apart again
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    for rate in RATES:
        tier = cut_forward(imported.forward, plan, rate)
        narrow = tm.narrowed(model, rate).eval()
        with torch.no_grad():
            expected = narrow(x).numpy()
        (got,) = ort.InferenceSession(tier.SerializeToString()).run(None, {"input": x.numpy()})
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"{name} at rate {rate}")
        shapes = plan.param_shapes(rate)
        assert {k: tuple(v.shape) for k, v in narrow.state_dict().items() if k in shapes} == shapes
        lowered = for_ort_training(tier)  # what onnxruntime-training differentiates computes the same
        (same,) = ort.InferenceSession(lowered.SerializeToString()).run(["logits"], {"input": x.numpy()})
        np.testing.assert_allclose(same, got, atol=1e-6)


def test_narrower_tiers_cost_less(exported):
    _, _, _, path = exported
    imported = import_forward(path)
    plan = analyse(imported.forward)
    macs = [forward_macs(cut_forward(imported.forward, plan, rate)) for rate in RATES]
    params = [sum(int(np.prod(s)) for s in plan.param_shapes(rate).values()) for rate in RATES]
    assert macs == sorted(macs, reverse=True) and macs[0] > 4 * macs[2]
    assert params == sorted(params, reverse=True)


def test_the_batch_is_dynamic_after_cutting(exported):
    _, _, shape, path = exported
    imported = import_forward(path)
    plan = analyse(imported.forward)
    session = ort.InferenceSession(cut_forward(imported.forward, plan, 0.5).SerializeToString())
    for n in (1, 7):
        (logits,) = session.run(None, {"input": np.random.default_rng(n).random((n, *shape), np.float32)})
        assert logits.shape[0] == n


# ---- hand-made graphs: what is refused, what is pinned --------------------------------------


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], shape: list[int], classes: int) -> onnx.ModelProto:
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
