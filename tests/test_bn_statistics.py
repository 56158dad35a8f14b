"""Static batch norm (HeteroFL sBN): the statistics graph, device-side measurement, pooling, the engine's phase."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.bn_statistics import BnStatisticsPool, with_statistics
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.tiering import FixedTiers
from edge_client.bn_statistics import measure_bn_statistics
from models.data import Dataset, load_digits
from models.export import export_all
from models.manifest import STATISTICS_FILE
from models.zoo import ModelSpec
from protocol.messages import (BnStatistics, MeasureBnStatistics, Reject, RejectReason, RoundSummary, Task, Update,
                               new_id)
from tests.tiers import zoo_statistics, zoo_weights

MLP_BN = ModelSpec(arch="mlp", hidden=(32, 16), batch_norm=True)


def _weights(spec: ModelSpec, rate: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (w + rng.normal(0, 0.2, w.shape)).astype(np.float32) for n, w in zoo_weights(spec, rate).items()}


def _numpy_stats(w: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """Train-mode forward of the two-layer BN MLP in float64: each BN normalises with its batch's statistics."""
    h, stats = x.reshape(len(x), -1).astype(np.float64), {}
    for layer in ("1", "2"):
        h = h @ w[f"fc{layer}.weight"].T
        mean, var = h.mean(0), h.var(0)
        stats[f"bn{layer}.running_mean"], stats[f"bn{layer}.running_var"] = mean, var
        h = np.maximum((h - mean) / np.sqrt(var + 1e-5) * w[f"bn{layer}.weight"] + w[f"bn{layer}.bias"], 0)
    return stats


def test_statistics_graph_is_a_train_mode_forward_in_standard_ops():
    weights, x = _weights(MLP_BN, 0.5), load_digits().x[:64]
    graph = zoo_statistics(MLP_BN, 0.5)
    onnx.checker.check_model(graph, full_check=True)
    assert {node.domain for node in graph.graph.node} == {""}
    session = ort.InferenceSession(graph.SerializeToString())
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x, **weights})))
    for name, expected in _numpy_stats(weights, x).items():
        got = outputs[name.replace("running", "batch")]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="no statistics to measure"):
        zoo_statistics(ModelSpec(arch="mlp"), 1.0)


def test_device_measurement_pools_batches_exactly(tmp_path: Path):
    weights, digits = _weights(MLP_BN, 1.0), load_digits()
    path = tmp_path / STATISTICS_FILE
    onnx.save(zoo_statistics(MLP_BN, 1.0), path)
    measured = measure_bn_statistics(path, weights, digits, batch_size=100)
    # The first layer's input does not depend on the batch: pooled batches equal the whole set.
    whole = _numpy_stats(weights, digits.x)
    np.testing.assert_allclose(measured["bn1.running_mean"], whole["bn1.running_mean"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(measured["bn1.running_var"], whole["bn1.running_var"], rtol=1e-4, atol=1e-5)
    assert set(measured) == {"bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"}
    with pytest.raises(ValueError, match="no training data"):
        measure_bn_statistics(path, weights, digits.subset(np.arange(0)))


def test_pool_equals_statistics_of_the_union_and_widest_tier_wins():
    rng = np.random.default_rng(1)
    parts = [rng.normal(loc, 2.0, size=(n, 4)) for loc, n in ((0.0, 30), (3.0, 70))]
    pool = BnStatisticsPool()
    for part in parts:
        pool.add(len(part), {"bn1.running_mean": part.mean(0).astype(np.float32), "bn1.running_var": part.var(0).astype(np.float32)})
    union = np.concatenate(parts)
    pooled = pool.result()
    np.testing.assert_allclose(pooled["bn1.running_mean"], union.mean(0), rtol=1e-5)
    np.testing.assert_allclose(pooled["bn1.running_var"], union.var(0), rtol=1e-5)
    weights = {"bn1.running_mean": np.zeros(4, np.float32)}
    merged = with_statistics(weights, {"a": {"bn1.running_mean": np.full(4, 1, np.float32)},
                                       "c": {"bn1.running_mean": np.full(1, 3, np.float32)}})
    np.testing.assert_array_equal(merged["bn1.running_mean"], [1, 1, 1, 1])


def test_engine_commits_only_after_the_statistics_phase(tmp_path: Path):
    export_all(MLP_BN, ["a", "c"], tmp_path / "art")
    artifacts, registry = ArtifactStore(tmp_path / "art"), DeviceRegistry()
    for device, tier in (("d1", "a"), ("d2", "c")):
        registry.hello(device, 100, 0, tier, "ort-training", now=0.0)
    engine = RoundEngine(EngineParts(EngineConfig(rounds=2, round_timeout_s=10),
                                     FedAvg(min_clients=2, tiers=FixedTiers({"a": 1})), artifacts,
                                     StateStore(tmp_path / "state"), registry))
    tasks = {o.device_id: o for o in engine.tick(1.0)}
    for device, task in tasks.items():
        update = Update(update_id=new_id(), round=1, base_version=0, tier=task.body.tier, num_samples=100, steps=1,
                        train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
        out = engine.on_update(device, new_id(), update, {n: np.full_like(v, 0.01) for n, v in task.tensors.items()}, 100, 2.0)
    statistics_tasks = {o.device_id: o for o in out}
    assert set(statistics_tasks) == {"d1", "d2"} and engine.record.version == 0  # not committed yet
    assert all(isinstance(o.body, MeasureBnStatistics) and o.body.model_version == 1 for o in out)

    def measured(device: str, scale: float) -> dict[str, np.ndarray]:
        shapes = artifacts.tiers[statistics_tasks[device].body.tier].shapes
        return {n: np.full(s, scale, np.float32) for n, s in shapes.items() if "running" in n}

    def send(device: str, tensors: dict[str, np.ndarray], tier: str) -> list:
        body = BnStatistics(round=1, base_version=1, tier=tier, num_samples=100)
        return engine.on_bn_statistics(device, new_id(), body, tensors, 3.0)

    bad = send("d1", {**measured("d1", 1.0), "bn1.running_var": -np.ones(16, np.float32)}, "a")
    assert isinstance(bad[0].body, Reject) and bad[0].body.reason is RejectReason.BAD_TENSOR
    assert send("d2", measured("d2", 4.0), "a")[0].body.reason is RejectReason.WRONG_VERSION  # d2 trains tier c
    assert send("d2", measured("d2", 4.0), "c") == []
    summary = send("d1", measured("d1", 2.0), "a")
    assert isinstance(summary[0].body, RoundSummary) and engine.record.version == 1
    np.testing.assert_array_equal(engine.weights["bn1.running_mean"], np.full(32, 2.0))  # tier a's own statistics
    assert set(engine.bn_statistics) == {"a", "c"}
    c_task = next(o for o in engine.tick(4.0) if o.device_id == "d2")
    np.testing.assert_array_equal(c_task.tensors["bn1.running_mean"], np.full(8, 4.0))  # tier c gets its own
