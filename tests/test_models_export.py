"""Per-tier artifact export: manifests, determinism, and real training with onnxruntime-training."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import stat
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sklearn.datasets import load_digits

from models import ort_training
from models.cli import configure_parser, run
from models.export import ARTIFACT_FILES, INDEX_NAME, MANIFEST_NAME, export_all
from models.manifest import GLOBAL_MODEL_FILE, ExportIndex, TierManifest
from models.ort_training import TrainingBackendUnavailable, captured_native_stderr, load_training_api
from models.tiers import TIER_RATES, scaled_width, tier_rate
from models.zoo import ModelSpec, build_forward
from tests.tiers import zoo_plan, zoo_shapes, zoo_weights

MLP = ModelSpec(arch="mlp")
CNN = ModelSpec(arch="cnn")
CNN_BN = ModelSpec(arch="cnn", batch_norm=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All five tiers of the digits MLP."""
    out = tmp_path_factory.mktemp("mlp8")
    export_all(MLP, TIER_RATES, out)
    return out


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits as [N,1,8,8] float32 in [0,1] and int64 labels, fixed 1400/397 split."""
    data = load_digits()
    x = (data.images.reshape(-1, 1, 8, 8) / 16).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def _session(tier_dir: Path) -> tuple[object, object, object]:
    """CheckpointState, Module and Optimizer of one exported tier."""
    api = load_training_api().api
    state = api.CheckpointState.load_checkpoint(str(tier_dir / "checkpoint"))
    module = api.Module(str(tier_dir / "training_model.onnx"), state, str(tier_dir / "eval_model.onnx"))
    return state, module, api.Optimizer(str(tier_dir / "optimizer_model.onnx"), module)


def _call(module, x: np.ndarray, y: np.ndarray, scale: float = 1.0):  # noqa: ANN001, ANN202 - an ORT Module
    """Run the module, feeding HeteroFL's scaler and an all-zero class mask when the graph takes them."""
    feeds = {"input": x, "scale": np.array([scale], np.float32), "class_mask": np.zeros(10, np.float32), "labels": y}
    return module(*(feeds[name] for name in module.input_names()))


def _train_accuracy(tier_dir: Path, digits: tuple, epochs: int, lr: float, batch: int = 32) -> float:
    """Train with api.Module + api.Optimizer on digits; return test accuracy from the eval model."""
    x, y, x_test, y_test = digits
    rate = TierManifest.load(tier_dir / "manifest.json").rate
    _, module, optimizer = _session(tier_dir)
    optimizer.set_learning_rate(lr)
    rng = np.random.default_rng(1)
    for _ in range(epochs):
        module.train()
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            _call(module, x[idx], y[idx], 1.0 / rate)
            optimizer.step()
            module.lazy_reset_grad()
    module.eval()
    loss, logits = _call(module, x_test, y_test)
    assert np.isfinite(loss) and logits.shape == (len(x_test), 10)
    return float((logits.argmax(1) == y_test).mean())


def test_layout_and_manifest_hashes(exported: Path) -> None:
    index = ExportIndex.load(exported / INDEX_NAME)
    assert index.model.recipe == MLP and index.model.input_shape == [1, 8, 8] and list(index.tiers) == list(TIER_RATES)
    assert hashlib.sha256((exported / GLOBAL_MODEL_FILE).read_bytes()).hexdigest() == index.global_model.sha256
    for tier, rel in index.tiers.items():
        manifest = TierManifest.load(exported / rel)
        assert (manifest.tier, manifest.rate, manifest.optimizer) == (tier, tier_rate(tier), "sgd")
        assert manifest.input_shape == ["N", 1, 8, 8] and manifest.output_name == "logits"
        assert set(manifest.files) == set(ARTIFACT_FILES)
        for name, entry in manifest.files.items():
            data = (exported / tier / name).read_bytes()
            assert entry.bytes == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
        w = scaled_width(256, tier_rate(tier))  # mlp8: 64 -> 256 -> 256 -> 10, hidden widths cut
        shapes = {"fc1.weight": (w, 64), "fc1.bias": (w,), "fc2.weight": (w, w), "fc2.bias": (w,),
                  "fc3.weight": (10, w), "fc3.bias": (10,)}
        assert [(p.name, tuple(p.shape)) for p in manifest.params] == list(shapes.items())
        assert set(manifest.libraries) == {"onnx", "onnxruntime", "numpy"}
        assert stat.S_IMODE(os.stat(exported / rel).st_mode) == 0o644
        assert not [p for p in (exported / tier).iterdir() if p.name.startswith(".")]  # no staging left


def test_manifest_save_load_round_trip(exported: Path, tmp_path: Path) -> None:
    manifest = TierManifest.load(exported / "c" / MANIFEST_NAME)
    manifest.save(tmp_path / "m.json")
    assert TierManifest.load(tmp_path / "m.json") == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_onnx_files_valid_ir10(exported: Path) -> None:
    for tier in TIER_RATES:
        for name in ARTIFACT_FILES:
            if not name.endswith(".onnx"):
                continue
            model = onnx.load(exported / tier / name)
            assert model.ir_version == 10, (tier, name)
            # The training graph holds ORT-internal gradient ops (e.g. MaxPoolGrad in the default
            # domain) that onnx.checker does not know; ORT loading it is checked by the training tests.
            if name != "training_model.onnx":
                onnx.checker.check_model(model, full_check=True)


def test_export_is_deterministic(exported: Path, tmp_path: Path) -> None:
    export_all(CNN_BN, ["a"], tmp_path / "other")  # advances onnxblock's global name counter
    export_all(MLP, TIER_RATES, tmp_path / "again")
    for tier in TIER_RATES:
        for name in (*ARTIFACT_FILES, MANIFEST_NAME):
            assert (exported / tier / name).read_bytes() == (tmp_path / "again" / tier / name).read_bytes(), name
    assert (exported / INDEX_NAME).read_bytes() == (tmp_path / "again" / INDEX_NAME).read_bytes()


def test_checkpoint_holds_sliced_global_and_eval_matches_inference(exported: Path, digits: tuple) -> None:
    state, module, _ = _session(exported / "b")
    expected = zoo_weights(MLP, 0.5)
    for name, arr in expected.items():
        np.testing.assert_array_equal(state.parameters[name].data, arr)
    x = digits[2][:50]
    module.eval()
    _, logits = _call(module, x, digits[3][:50])
    session = ort.InferenceSession(str(exported / "b" / "inference.onnx"))
    np.testing.assert_allclose(session.run(None, {"input": x})[0], logits, atol=1e-5)


def test_set_weights_by_name_changes_eval(exported: Path, digits: tuple) -> None:
    state, module, _ = _session(exported / "a")
    x, y = digits[2][:40], digits[3][:40]
    module.eval()
    _, before = _call(module, x, y)
    rng = np.random.default_rng(7)
    new = {n: rng.normal(size=s).astype(np.float32) * 0.1 for n, s in zoo_shapes(MLP).items()}
    for name, arr in new.items():
        state.parameters[name].data = arr
    _, after = _call(module, x, y)
    assert not np.allclose(before, after)
    reference = ort.InferenceSession(build_forward(MLP, new).SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(after, reference, atol=1e-5)


def test_mlp_tier_a_trains_on_digits(exported: Path, digits: tuple) -> None:
    assert _train_accuracy(exported / "a", digits, epochs=8, lr=0.1) > 0.9


@pytest.mark.parametrize("spec", [CNN, CNN_BN], ids=lambda s: s.name)
def test_cnn_trains_on_digits(spec: ModelSpec, digits: tuple, tmp_path: Path) -> None:
    export_all(spec, ["a"], tmp_path)
    assert _train_accuracy(tmp_path / "a", digits, epochs=8, lr=0.2) > 0.9


def test_narrowest_sliced_tier_learns(exported: Path, digits: tuple) -> None:
    """Tier e (16-wide) starts from a 1/16 slice of the global init, so it needs more steps."""
    assert _train_accuracy(exported / "e", digits, epochs=30, lr=0.3) > 0.85


def test_bn_running_stats_move_although_frozen(digits: tuple, tmp_path: Path) -> None:
    """ORT training updates frozen BN running stats in the state; devices must send them back."""
    export_all(CNN_BN, ["c"], tmp_path)
    state, module, optimizer = _session(tmp_path / "c")
    module.train()
    _call(module, digits[0][:64], digits[1][:64], 4.0)
    optimizer.step()
    for name in zoo_plan(CNN_BN).frozen:
        initial = 0.0 if name.endswith("running_mean") else 1.0
        assert not np.allclose(state.parameters[name].data, initial), name


def test_small_tier_with_adamw_learns(digits: tuple, tmp_path: Path) -> None:
    export_all(MLP, ["e"], tmp_path, optimizer="adamw")
    manifest = TierManifest.load(tmp_path / "e" / MANIFEST_NAME)
    assert manifest.optimizer == "adamw"
    assert _train_accuracy(tmp_path / "e", digits, epochs=3, lr=0.01) > 0.8


def test_unknown_tier_rejected_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known tiers"):
        export_all(MLP, ["a", "x"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_training_api_without_torch() -> None:
    training = load_training_api()
    assert {"api", "artifacts", "onnxblock"} <= set(vars(training))
    assert "torch" not in sys.modules


def test_inference_only_build_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime.capi._pybind_state as native

    monkeypatch.delattr(native, "GradientGraphBuilder")
    with pytest.raises(TrainingBackendUnavailable, match="inference-only build.*GradientGraphBuilder"):
        load_training_api()


def test_missing_package_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(TrainingBackendUnavailable, match="not installed.*pip install"):
        ort_training.load_training_api()


def test_native_stderr_replayed_only_on_failure(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    with captured_native_stderr():
        os.write(2, b"native INFO flood\n")
    assert "flood" not in capfd.readouterr().err and not caplog.records
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError), captured_native_stderr():
        os.write(2, b"native failure detail\n")
        raise RuntimeError("boom")
    assert "native failure detail" in caplog.text and "failure detail" not in capfd.readouterr().err


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tierfl export")
    configure_parser(parser)
    args = parser.parse_args(["--arch", "cnn", "--hidden", "8,16,32", "--tiers", "a,e", "--out", str(tmp_path)])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"^a\s+1\s+3,658\s+25,408\s+[\d,]+$", out, re.M) and re.search(r"^e\s+0.0625\s", out, re.M), out
    assert "exported cnn8-h8x16x32 tiers a,e" in out
    assert ExportIndex.load(tmp_path / INDEX_NAME).model.recipe.hidden == (8, 16, 32)
    with pytest.raises(SystemExit):
        parser.parse_args(["--tiers", "a,z"])
