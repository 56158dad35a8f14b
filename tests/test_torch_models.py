"""The PyTorch models of the bring-your-own-model tests: widths per rate, narrowing, and the export recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tests.torch_models import (MLP, Conv1dNet, MobileNetStyle, PreResNet, Scalable, TinyTransformer,  # noqa: E402
                                export_onnx, narrowed)

# name -> (model at a rate, one sample's shape)
MODELS: dict[str, tuple[Callable[[float], Scalable], tuple[int, ...]]] = {
    "preresnet": (lambda r: PreResNet(r), (3, 32, 32)),
    "mobilenet": (lambda r: MobileNetStyle(r), (3, 32, 32)),
    "mobilenet_mnist": (lambda r: MobileNetStyle(r, in_channels=1), (1, 28, 28)),
    "conv1d_kws": (lambda r: Conv1dNet(r), (40, 49)),
    "conv1d_imu": (lambda r: Conv1dNet(r, in_channels=6, num_classes=6), (6, 128)),
    "mlp": (lambda r: MLP(r), (64,)),
    "mlp_bn": (lambda r: MLP(r, batch_norm=True, dropout=0.2), (64,)),
    "transformer": (lambda r: TinyTransformer(r), (16, 6)),
}
RATES = (1.0, 0.5, 0.0625)
BN_TYPES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
# export_onnx uses the TorchScript exporter on purpose (see docs/notes/torch-export.md)
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning",
                                        "ignore:The feature will be removed:DeprecationWarning")


def build(name: str, rate: float = 1.0) -> Scalable:
    """Return the named model at ``rate`` in eval mode, its norm statistics and affine parameters made non-trivial.

    (A fresh model's equal-valued tensors, e.g. every BN weight of ones, share one initializer on export.)
    """
    torch.manual_seed(0)
    model = MODELS[name][0](rate)
    for module in model.modules():
        if isinstance(module, BN_TYPES):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
        if isinstance(module, BN_TYPES + (torch.nn.LayerNorm,)):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def sample(name: str, batch: int = 4) -> torch.Tensor:
    """Return a random input batch for the named model."""
    return torch.randn(batch, *MODELS[name][1])


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("name", MODELS)
def test_model_runs_at_rate(name: str, rate: float) -> None:
    model = build(name, rate)
    with torch.no_grad():
        logits = model(sample(name))
    assert logits.shape == (4, model.config["num_classes"])
    assert torch.isfinite(logits).all()


def test_rate_scales_hidden_channels_only() -> None:
    tiny = PreResNet(0.0625)
    assert tiny.conv1.weight.shape == (1, 3, 3, 3)  # input channels whole, 16 -> 1
    assert tiny.fc.weight.shape == (10, 4)  # classes whole, 64 -> 4
    assert MLP(0.5, hidden=(30,)).fc.weight.shape == (10, 15)
    assert MobileNetStyle(0.0625).block1[0].groups == 1


@pytest.mark.parametrize("name", MODELS)
def test_narrowed_at_full_rate_is_the_model(name: str) -> None:
    full = build(name)
    same = narrowed(full, 1.0)
    assert type(same) is type(full) and not same.training
    for key, tensor in full.state_dict().items():
        assert torch.equal(same.state_dict()[key], tensor), key
    x = sample(name)
    with torch.no_grad():
        assert torch.equal(same(x), full(x))


@pytest.mark.parametrize("name", MODELS)
def test_narrowed_keeps_leading_blocks(name: str) -> None:
    full = build(name)
    half = narrowed(full, 0.5)
    fresh = MODELS[name][0](0.5).state_dict()
    for key, tensor in half.state_dict().items():
        assert tensor.shape == fresh[key].shape, key
        assert torch.equal(tensor, full.state_dict()[key][tuple(slice(0, n) for n in tensor.shape)]), key
    with torch.no_grad():
        assert half(sample(name)).shape == (4, full.config["num_classes"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Scalable, Path, onnx.ModelProto]]:
    """Return a function giving the named model (as ``build`` makes it), its ONNX file and proto, exported once."""
    folder = tmp_path_factory.mktemp("torch_export")
    done: dict[str, tuple[Scalable, Path, onnx.ModelProto]] = {}

    def export(name: str) -> tuple[Scalable, Path, onnx.ModelProto]:
        if name not in done:
            model, path = build(name), folder / f"{name}.onnx"
            done[name] = (model, path, export_onnx(model, path, MODELS[name][1]))
        return done[name]
    return export


@pytest.mark.parametrize("name", MODELS)
def test_export_matches_pytorch_in_onnxruntime(name: str, exported: Callable) -> None:
    model, path, proto = exported(name)
    assert proto.ir_version <= 10 and proto.opset_import[0].version == 17
    weights = {t.name for t in proto.graph.initializer}
    assert [i.name for i in proto.graph.input if i.name not in weights] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the warning per weight listed as a graph input
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = sample(name)
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_export_keeps_every_batchnorm_and_parameter_name(name: str, exported: Callable) -> None:
    model, _, proto = exported(name)
    graph = proto.graph
    bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == sum(isinstance(m, BN_TYPES) for m in model.modules())
    assert all(len(n.output) == 1 and not any(a.name == "training_mode" and a.i for a in n.attribute) for n in bns)
    assert not [n.op_type for n in graph.node if n.op_type == "Dropout"]
    names = {i.name for i in graph.initializer}
    assert {k for k in model.state_dict() if not k.endswith("num_batches_tracked")} == names


@pytest.mark.parametrize("name", ["preresnet", "transformer"])
def test_untrained_model_keeps_equal_tensors_apart(name: str, tmp_path: Path) -> None:
    """A fresh model's equal tensors (BN weight and running_var: ones) stay separate initializers."""
    torch.manual_seed(0)
    model = MODELS[name][0](1.0).eval()
    graph = export_onnx(model, tmp_path / "model.onnx", MODELS[name][1]).graph
    assert not [n for n in graph.node if n.op_type == "Identity"]
    names = {i.name for i in graph.initializer}
    assert {k for k in model.state_dict() if not k.endswith("num_batches_tracked")} == names


def test_default_export_merges_equal_tensors(tmp_path: Path) -> None:
    """Why the recipe keeps initializers as inputs: without it, equal tensors become one initializer + Identity."""
    torch.onnx.export(MLP(batch_norm=True).eval(), (torch.randn(4, 64),), str(tmp_path / "model.onnx"),
                      dynamo=False, opset_version=17, do_constant_folding=False)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    identities = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    assert identities["body.1.running_var"] == "body.1.weight"
    assert "body.1.running_var" not in {i.name for i in graph.initializer}
