"""The PyTorch models of the bring-your-own-model tests: widths per rate, narrowing, and the export recipe.

PyTorch runs in the torch venv (conftest.torch_python; tests/torch_models.py's command line, one process for the module); this process
reads what it wrote with numpy, onnx and onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.conftest import run_torch

# name (tests/torch_models.py's MODELS) -> one sample's shape
SHAPES: dict[str, tuple[int, ...]] = {
    "preresnet": (3, 32, 32), "mobilenet": (3, 32, 32), "mobilenet_mnist": (1, 28, 28), "conv1d": (40, 49),
    "conv1d_imu": (6, 128), "mlp": (64,), "mlp_bn": (64,), "transformer": (16, 6),
}
RATES = (1.0, 0.5, 0.0625)
UNTRAINED = ("preresnet", "transformer")


@pytest.fixture(scope="module")
def torch_side(torch_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of what PyTorch made, per model NAME: NAME.onnx and its state NAME.npz (norms randomized), the
    narrowed models' outputs on NAME.x.npy and their states at RATES (NAME.ref.npz), fresh models' shapes per rate
    (NAME.json); untrained exports (NAME.fresh.onnx), a "merged" export (merged.onnx) and an MLP of 30 (mlp30.json)."""
    folder = tmp_path_factory.mktemp("torch_models")
    rates = ",".join(map(str, RATES))
    commands = []
    for name, shape in SHAPES.items():
        np.save(folder / f"{name}.x.npy", np.random.default_rng(0).standard_normal((4, *shape), np.float32))
        state = str(folder / f"{name}.npz")
        commands += [
            ["export", name, str(folder / f"{name}.onnx"), "--randomize", "norms", "--state", state],
            ["reference", name, "--state", state, "--x", str(folder / f"{name}.x.npy"), "--rates", rates, "--states",
             "--out", str(folder / f"{name}.ref.npz")],
            ["describe", name, "--rates", rates, "--out", str(folder / f"{name}.json")]]
    commands += [["export", name, str(folder / f"{name}.fresh.onnx"), "--state", str(folder / f"{name}.fresh.npz")]
                 for name in UNTRAINED]
    commands += [["export", "mlp_bn", str(folder / "merged.onnx"), "--recipe", "merged", "--config", '{"dropout": 0}'],
                 ["describe", "mlp", "--config", '{"hidden": [30]}', "--rates", "0.5",
                  "--out", str(folder / "mlp30.json")]]
    run_torch(torch_python, folder, commands)
    return folder


def _state(path: Path) -> dict[str, np.ndarray]:
    """A state_dict written by torch_models.py, as numpy arrays."""
    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files}


def _fresh(folder: Path, name: str) -> dict[str, dict]:
    """describe's output: per rate, the shapes and conv groups of a model built at that rate."""
    return json.loads((folder / f"{name}.json").read_text())


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("name", SHAPES)
def test_model_runs_at_rate(name: str, rate: float, torch_side: Path) -> None:
    logits = np.load(torch_side / f"{name}.ref.npz")[f"{rate}/logits"]
    assert logits.shape == (4, _fresh(torch_side, name)[str(rate)]["num_classes"])
    assert np.isfinite(logits).all()


def test_rate_scales_hidden_channels_only(torch_side: Path) -> None:
    tiny = _fresh(torch_side, "preresnet")["0.0625"]["shapes"]
    assert tiny["conv1.weight"] == [1, 3, 3, 3]  # input channels whole, 16 -> 1
    assert tiny["fc.weight"] == [10, 4]  # classes whole, 64 -> 4
    assert _fresh(torch_side, "mlp30")["0.5"]["shapes"]["fc.weight"] == [10, 15]
    assert _fresh(torch_side, "mobilenet")["0.0625"]["groups"]["block1.0"] == 1


@pytest.mark.parametrize("name", SHAPES)
def test_narrowed_at_full_rate_is_the_model(name: str, torch_side: Path) -> None:
    full, reference = _state(torch_side / f"{name}.npz"), np.load(torch_side / f"{name}.ref.npz")
    assert not reference["1.0/training"]
    assert {k for k in reference.files if k.startswith("1.0/state/")} == {f"1.0/state/{k}" for k in full}
    for key, tensor in full.items():
        np.testing.assert_array_equal(reference[f"1.0/state/{key}"], tensor, err_msg=key)
    np.testing.assert_array_equal(reference["1.0/logits"], reference["full"])


@pytest.mark.parametrize("name", SHAPES)
def test_narrowed_keeps_leading_blocks(name: str, torch_side: Path) -> None:
    full, reference = _state(torch_side / f"{name}.npz"), np.load(torch_side / f"{name}.ref.npz")
    fresh = _fresh(torch_side, name)["0.5"]
    half = {k.removeprefix("0.5/state/"): reference[k] for k in reference.files if k.startswith("0.5/state/")}
    assert set(half) == set(fresh["shapes"])
    for key, tensor in half.items():
        assert list(tensor.shape) == fresh["shapes"][key], key
        np.testing.assert_array_equal(tensor, full[key][tuple(slice(0, n) for n in tensor.shape)], err_msg=key)
    assert reference["0.5/logits"].shape == (4, fresh["num_classes"])


@pytest.mark.parametrize("name", SHAPES)
def test_export_matches_pytorch_in_onnxruntime(name: str, torch_side: Path) -> None:
    path = torch_side / f"{name}.onnx"
    proto = onnx.load(str(path))
    assert proto.ir_version <= 10 and proto.opset_import[0].version == 17
    weights = {t.name for t in proto.graph.initializer}
    assert [i.name for i in proto.graph.input if i.name not in weights] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the warning per weight listed as a graph input
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": np.load(torch_side / f"{name}.x.npy")})
    np.testing.assert_allclose(got, np.load(torch_side / f"{name}.ref.npz")["full"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SHAPES)
def test_export_keeps_every_batchnorm_and_parameter_name(name: str, torch_side: Path) -> None:
    graph, state = onnx.load(str(torch_side / f"{name}.onnx")).graph, _state(torch_side / f"{name}.npz")
    bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == sum(k.endswith(".running_mean") for k in state)  # one per BatchNorm module
    assert all(len(n.output) == 1 and not any(a.name == "training_mode" and a.i for a in n.attribute) for n in bns)
    assert not [n.op_type for n in graph.node if n.op_type == "Dropout"]
    names = {i.name for i in graph.initializer}
    assert {k for k in state if not k.endswith("num_batches_tracked")} == names


@pytest.mark.parametrize("name", UNTRAINED)
def test_untrained_model_keeps_equal_tensors_apart(name: str, torch_side: Path) -> None:
    """A fresh model's equal tensors (BN weight and running_var: ones) stay separate initializers."""
    graph = onnx.load(str(torch_side / f"{name}.fresh.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "Identity"]
    names = {i.name for i in graph.initializer}
    assert {k for k in _state(torch_side / f"{name}.fresh.npz") if not k.endswith("num_batches_tracked")} == names


def test_default_export_merges_equal_tensors(torch_side: Path) -> None:
    """Why the recipe keeps initializers as inputs: without it, equal tensors become one initializer + Identity."""
    graph = onnx.load(str(torch_side / "merged.onnx")).graph
    identities = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    assert identities["body.1.running_var"] == "body.1.weight"
    assert "body.1.running_var" not in {i.name for i in graph.initializer}
