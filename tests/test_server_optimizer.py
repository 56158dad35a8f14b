"""Server optimizers against a numpy reference of Reddi et al.'s update rules, and across an aggregator restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.server_optimizer import ServerOptimizer, touched_mask
from models.export import export_all
from models.zoo import ModelSpec
from protocol.messages import Update, new_id

B1, B2, TAU, LR = 0.9, 0.99, 1e-3, 0.1


def _reference(kind: str, x: np.ndarray, deltas: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
    """The paper's rules written out element by element in float64, untouched elements skipped."""
    x = x.astype(np.float64).copy()
    m, v = np.zeros_like(x), np.full_like(x, TAU**2)
    for delta, mask in zip(deltas, masks):
        for i in np.ndindex(x.shape):
            if not mask[i]:
                continue
            d = float(delta[i])
            if kind == "sgd":
                x[i] += LR * d
                continue
            if kind == "momentum":
                m[i] = B1 * m[i] + d
                x[i] += LR * m[i]
                continue
            m[i] = B1 * m[i] + (1 - B1) * d
            if kind == "adam":
                v[i] = B2 * v[i] + (1 - B2) * d * d
            elif kind == "yogi":
                v[i] = v[i] - (1 - B2) * d * d * np.sign(v[i] - d * d)
            else:
                v[i] = v[i] + d * d
            x[i] += LR * m[i] / (np.sqrt(v[i]) + TAU)
    return x


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam", "yogi", "adagrad"])
def test_each_optimizer_follows_its_rule_and_skips_untouched_elements(kind: str) -> None:
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=(4, 3)).astype(np.float32)
    optimizer = ServerOptimizer(kind, LR, B1, B2, TAU)
    # Round 1: a narrow tier only (2 x 2 block); round 2: the full width; round 3: narrow again.
    blocks = [{"w": (2, 2)}, {"w": (4, 3)}, {"w": (2, 2)}]
    masks = [touched_mask({"w": (4, 3)}, [b])["w"] for b in blocks]
    deltas = [np.where(mask, rng.normal(size=(4, 3)), 0).astype(np.float32) for mask in masks]
    x, state = {"w": x0}, {}
    for delta, mask in zip(deltas, masks):
        aggregate = {"w": x["w"] + delta}
        x, state = optimizer.step(x, aggregate, {"w": mask}, state)
    np.testing.assert_allclose(x["w"], _reference(kind, x0, deltas, masks), rtol=2e-5, atol=2e-6)
    if kind != "sgd":  # after a narrow round alone, the elements outside its block keep their starting moments
        _, fresh = optimizer.step({"w": x0}, {"w": x0 + deltas[0]}, {"w": masks[0]}, {})
        assert fresh["m/w"][3, 2] == 0 and fresh["m/w"][0, 0] != 0
        if kind != "momentum":
            assert fresh["v/w"][3, 2] == np.float32(TAU**2)


def test_batch_norm_statistics_take_the_aggregate_and_inputs_are_untouched() -> None:
    optimizer = ServerOptimizer("adam", LR)
    x = {"bn.running_mean": np.zeros(3, np.float32), "w": np.ones(3, np.float32)}
    aggregate = {"bn.running_mean": np.full(3, 5.0, np.float32), "w": np.full(3, 2.0, np.float32)}
    masks = {n: np.ones(3, bool) for n in x}
    new, state = optimizer.step(x, aggregate, masks, {})
    assert list(new["bn.running_mean"]) == [5.0] * 3 and "m/bn.running_mean" not in state
    assert list(x["w"]) == [1.0] * 3, "the inputs are not changed"


def test_bad_settings_are_refused() -> None:
    for kwargs in ({"kind": "lamb"}, {"kind": "adam", "lr": 0}, {"kind": "adam", "beta1": 1.0},
                   {"kind": "yogi", "tau": 0}):
        with pytest.raises(ValueError):
            ServerOptimizer(**kwargs)


SPEC = ModelSpec(arch="mlp", image_size=8, hidden=(8,))


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art")
    export_all(SPEC, ["a", "c"], out)
    return out


def _engine(art: Path, state: Path, optimizer: ServerOptimizer) -> RoundEngine:
    registry = DeviceRegistry()
    registry.hello("wide", 10, 0, "a", "ort-training", now=0.0)
    registry.hello("narrow", 30, 0, "c", "ort-training", now=0.0)
    config = EngineConfig(rounds=4, round_timeout_s=60.0, server_optimizer=optimizer)
    return RoundEngine(EngineParts(config, FedAvg(min_clients=2), ArtifactStore(art), StateStore(state), registry))


def _round(engine: RoundEngine, seed: int, now: float) -> None:
    """One round: every task answered with a seeded random delta of its tier's shapes."""
    tasks = engine.tick(now)
    rng = np.random.default_rng(seed)
    for out in tasks:
        delta = {n: (0.05 * rng.normal(size=v.shape)).astype(np.float32) for n, v in sorted(out.tensors.items())}
        body = Update(update_id=new_id(), round=out.body.round, base_version=out.body.model_version, tier=out.body.tier,
                      num_samples=10 if out.device_id == "wide" else 30, steps=1, train_loss=1.0, train_accuracy=0.5,
                      train_seconds=0.1)
        engine.on_update(out.device_id, new_id(), body, delta, 100, now + 1)
    assert engine.current_round is None


@pytest.mark.parametrize("kind", ["momentum", "adam", "yogi"])
def test_a_restart_makes_the_same_next_version_as_no_restart(art_dir: Path, tmp_path: Path, kind: str) -> None:
    optimizer = ServerOptimizer(kind, 0.5 if kind == "momentum" else 0.05)
    straight = _engine(art_dir, tmp_path / "straight", optimizer)
    for r in range(3):
        _round(straight, r, 10.0 * r)
    first = _engine(art_dir, tmp_path / "restarted", optimizer)
    for r in range(2):
        _round(first, r, 10.0 * r)
    second = _engine(art_dir, tmp_path / "restarted", optimizer)  # a new process on the same state folder
    assert second.record.version == 2 and second.optimizer_state, "the moments were committed with version 2"
    _round(second, 2, 20.0)
    assert second.record.version == straight.record.version == 3
    for name, value in straight.weights.items():
        np.testing.assert_array_equal(second.weights[name], value, err_msg=name)
    assert sorted(second.optimizer_state) == sorted(straight.optimizer_state)


def test_without_a_server_optimizer_nothing_is_stored_beside_the_weights(art_dir: Path, tmp_path: Path) -> None:
    registry = DeviceRegistry()
    engine = RoundEngine(EngineParts(EngineConfig(rounds=2), FedAvg(min_clients=1), ArtifactStore(art_dir),
                                     StateStore(tmp_path), registry))
    with np.load(engine.store.weights_path(0)) as stored:
        assert all(not name.startswith("server_optimizer/") for name in stored.files)
