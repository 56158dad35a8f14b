"""A user's ONNX classifier after `tierfl export --model`: the aggregator, the report and the bench run it from the
export's own files and card (no zoo ModelSpec anywhere), on data of the model's own input shape."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.evaluate import HeldOutEvaluator
from aggregator.registry import DeviceRegistry
from aggregator.report import load_run, render
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.tiering import FixedTiers
from models.data import Dataset, save_npz
from models.slicing import slice_params
from protocol.messages import RoundSummary, Task, Update, new_id
from tierfl.cli import main

FEATURES, HIDDEN, CLASSES = 12, 8, 3


def _write_model(path: Path) -> dict[str, np.ndarray]:
    """A two-layer classifier of 12 features into 3 classes, as an exporter writes it (own names, batch 1)."""
    rng = np.random.default_rng(0)
    weights = {"encoder.w": rng.normal(0, 0.5, (HIDDEN, FEATURES)).astype(np.float32),
               "encoder.b": rng.normal(0, 0.1, HIDDEN).astype(np.float32),
               "head.w": rng.normal(0, 0.5, (CLASSES, HIDDEN)).astype(np.float32),
               "head.b": rng.normal(0, 0.1, CLASSES).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["features", "encoder.w", "encoder.b"], ["hidden"], transB=1),
             helper.make_node("Relu", ["hidden"], ["active"]),
             helper.make_node("Gemm", ["active", "head.w", "head.b"], ["scores"], transB=1)]
    graph = helper.make_graph(nodes, "own", [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, FEATURES])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, CLASSES])],
                              [numpy_helper.from_array(v, n) for n, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return weights


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """(export folder, the file's weights) of the model exported as tiers a and c by `tierfl export --model`."""
    root = tmp_path_factory.mktemp("own")
    weights = _write_model(root / "own.onnx")
    assert main(["export", "--model", str(root / "own.onnx"), "--tiers", "a,c", "--out", str(root / "art")]) == 0
    return root / "art", weights


def _data(samples: int, shape: tuple[int, ...], seed: int = 1) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(rng.normal(0, 1, (samples, *shape)).astype(np.float32), rng.integers(0, CLASSES, samples))


def _numpy_scores(weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the two-layer model on flat samples, in float64."""
    hidden = np.maximum(x.reshape(len(x), -1) @ weights["encoder.w"].T.astype(np.float64) + weights["encoder.b"], 0)
    logits = hidden @ weights["head.w"].T + weights["head.b"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean()), float((logits.argmax(axis=1) == y).mean())


def test_the_store_gives_the_card_and_the_file_s_own_weights(own: tuple[Path, dict[str, np.ndarray]]) -> None:
    art, weights = own
    store = ArtifactStore(art)
    card = store.card
    assert (card.name, card.input_shape, card.num_classes, card.recipe) == ("own", [FEATURES], CLASSES, None)
    assert card.source_sha256 == hashlib.sha256((art.parent / "own.onnx").read_bytes()).hexdigest()
    assert store.identity.startswith("own:")
    start = store.global_weights()
    assert set(start) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(start[name], value, err_msg=name)
    assert store.tiers["c"].shapes["encoder.w"] == (2, FEATURES)  # the hidden width is cut; features and classes not
    assert store.macs["a"] == HIDDEN * FEATURES + CLASSES * HIDDEN and 0 < store.macs["c"] < store.macs["a"]


def test_a_round_starts_from_the_file_s_weights_and_is_scored_on_data_of_the_model_s_shape(
        own: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    art, weights = own
    artifacts = ArtifactStore(art)
    test = _data(200, (3, 4))  # [3, 4] samples hold the 12 features: flattened for the model
    registry = DeviceRegistry()
    for device, tier in (("d1", "a"), ("d2", "c")):
        registry.hello(device, 10, 0, tier, "ort-training", now=0.0)
    engine = RoundEngine(EngineParts(EngineConfig(rounds=1, min_updates=1, round_timeout_s=10.0),
                                     FedAvg(min_clients=2, tiers=FixedTiers({"a": 1.0})), artifacts,
                                     StateStore(tmp_path / "state"), registry, HeldOutEvaluator(test, artifacts)))
    tasks = {out.device_id: out for out in engine.tick(1.0)}
    assert {d: out.body.tier for d, out in tasks.items() if isinstance(out.body, Task)} == {"d1": "a", "d2": "c"}
    for device, tier in (("d1", "a"), ("d2", "c")):
        expected = slice_params(weights, artifacts.tiers[tier].shapes)
        assert set(tasks[device].tensors) == set(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(tasks[device].tensors[name], value, err_msg=f"{tier} {name}")
    summary = None
    for device, out in tasks.items():
        body = Update(update_id=new_id(), round=1, base_version=0, tier=out.body.tier, num_samples=10, steps=1,
                      train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
        zeros = {n: np.zeros_like(v) for n, v in out.tensors.items()}
        for sent in engine.on_update(device, new_id(), body, zeros, 100, 2.0):
            summary = sent.body
    assert isinstance(summary, RoundSummary) and summary.accuracy_source == "held-out"
    loss, accuracy = _numpy_scores(weights, test.x, test.y)
    assert (summary.loss, summary.accuracy) == (pytest.approx(loss, rel=1e-4), pytest.approx(accuracy, abs=1e-9))
    narrow = slice_params(weights, artifacts.tiers["c"].shapes)  # tier c: its own forward.onnx at rate 1/4
    assert summary.accuracy_by_tier["c"] == pytest.approx(_numpy_scores(narrow, test.x, test.y)[1], abs=1e-9)
    with pytest.raises(ValueError, match=r"held-out.npz: x holds samples of shape \[5\] but the model takes \[12\]"):
        HeldOutEvaluator(_data(10, (5,)), artifacts, source="held-out.npz")


def test_the_report_shows_the_card_of_a_user_s_model(own: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    art, _ = own
    artifacts = ArtifactStore(art)
    registry = DeviceRegistry()
    registry.hello("d1", 10, 0, None, "ort-training", now=0.0)
    RoundEngine(EngineParts(EngineConfig(rounds=1), FedAvg(min_clients=1), artifacts, StateStore(tmp_path / "state"),
                            registry))  # commits version 0 for this export
    page = render(load_run(tmp_path / "state", art))
    for label, value in (("model", "own"), ("input", "12"), ("classes", "3"), ("batch norm", "no"),
                         ("origin", "ONNX file"),
                         ("source sha256", f"<code>{artifacts.card.source_sha256}</code>")):
        assert f"<tr><th>{label}</th><td>{value}</td></tr>" in page, label
    assert "architecture" not in page and "init seed" not in page


def test_bench_measures_a_user_s_model_on_its_own_data(own: tuple[Path, dict[str, np.ndarray]], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    art, _ = own
    save_npz(tmp_path / "local.npz", _data(64, (FEATURES,)))
    assert main(["bench", "--artifacts", str(art), "--data", str(tmp_path / "local.npz"), "--steps", "2",
                 "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["model"]["name"] == "own" and report["model"]["input_shape"] == [FEATURES]
    assert [t["tier"] for t in report["tiers"]] == ["a", "c"] and report["samples"] == 64
    assert all(t["torch_step_p50_ms"] is None and t["epochs_seconds"] > 0 for t in report["tiers"])  # zoo graphs only
    capsys.readouterr()
    assert main(["bench", "--artifacts", str(art), "--out", str(tmp_path / "none")]) == 2  # a usage error
    assert "the model takes samples of shape [12], which no built-in data set holds" in capsys.readouterr().err
    save_npz(tmp_path / "images.npz", _data(8, (1, 8, 8)))
    assert main(["bench", "--artifacts", str(art), "--data", str(tmp_path / "images.npz"), "--steps", "1",
                 "--out", str(tmp_path / "wrong")]) == 1
    assert "x holds samples of shape [1, 8, 8] but the model takes [12]" in capsys.readouterr().err
