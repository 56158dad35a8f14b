"""RoundEngine driven directly with a fake clock, real exported artifacts and a real state directory."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest

from aggregator.engines.base import EngineConfig, Outgoing
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.evaluate import HeldOutEvaluator
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateMismatch, StateStore
from aggregator.strategies.fedavg import FedAvg
from models.data import Dataset, load_digits
from models.export import export_all
from models.manifest import GLOBAL_MODEL_FILE
from models.spec import ModelSpec
from models.tier_graph import initializer_arrays
from protocol.messages import Reject, RejectReason, RoundSummary, Task, Update, new_id

SPEC = ModelSpec(arch="mlp", image_size=8, hidden=(16,))
SHAPES = {"fc1.weight": (16, 64), "fc1.bias": (16,), "fc2.weight": (10, 16), "fc2.bias": (10,)}
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art")
    export_all(SPEC, ["a"], out)
    return out


class Harness:
    """An engine plus the pieces it was built from."""

    def __init__(self, art: Path, state: Path, devices: Mapping[str, int], rounds: int = 3,
                 fleet: str = "f1", evaluator: HeldOutEvaluator | None = None, min_clients: int = 2) -> None:
        self.artifacts = ArtifactStore(art)
        self.store = StateStore(state)
        self.registry = DeviceRegistry()
        for dev, n in devices.items():
            self.registry.hello(dev, n, 0, None, "ort-training", now=0.0)
        self.config = EngineConfig(fleet=fleet, rounds=rounds, min_updates=1, round_timeout_s=TIMEOUT)
        self.engine = RoundEngine(EngineParts(self.config, FedAvg(min_clients=min_clients, fraction=1.0),
                                              self.artifacts, self.store, self.registry, evaluator))

    def update(self, dev: str, tensors: Mapping[str, np.ndarray], now: float, *, round_number: int | None = None,
               base_version: int | None = None, tier: str = "a", num_samples: int | None = None,
               update_id: str | None = None) -> list[Outgoing]:
        body = Update(
            update_id=update_id or new_id(),
            round=round_number if round_number is not None else self.engine.current_round,
            base_version=base_version if base_version is not None else self.engine.record.version,
            tier=tier,
            num_samples=num_samples if num_samples is not None else getattr(self.registry.get(dev), "num_samples", 1),
            steps=1, train_loss=1.0, train_accuracy=0.5, train_seconds=0.1,
        )
        return self.engine.on_update(dev, new_id(), body, tensors, 1000, now)


def _zeros() -> dict[str, np.ndarray]:
    return {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}


def _random(seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (scale * rng.normal(size=s)).astype(np.float32) for n, s in SHAPES.items()}


def _copy(w: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: np.array(v, copy=True) for n, v in w.items()}


def _assert_weights_equal(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for n in a:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)


def _summary(out: list[Outgoing]) -> RoundSummary:
    assert len(out) == 1 and out[0].device_id is None and isinstance(out[0].body, RoundSummary), out
    return out[0].body


def _reason(out: list[Outgoing], dev: str) -> RejectReason:
    assert len(out) == 1 and out[0].device_id == dev and isinstance(out[0].body, Reject), out
    return out[0].body.reason


def test_param_shapes_are_what_the_tests_assume(art_dir: Path) -> None:
    assert ArtifactStore(art_dir).tiers["a"].shapes == SHAPES


def test_tick_starts_round_with_one_task_per_device(art_dir: Path, tmp_path: Path) -> None:
    h = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30, "d3": 5})
    assert h.engine.current_round is None
    out = h.engine.tick(100.0)
    assert sorted(o.device_id for o in out) == ["d1", "d2", "d3"]
    assert h.engine.current_round == 1
    init = initializer_arrays(onnx.load(art_dir / GLOBAL_MODEL_FILE))  # the export's initial global weights
    tier = h.artifacts.tiers["a"]
    for o in out:
        task = o.body
        assert isinstance(task, Task)
        assert (task.round, task.model_version, task.tier) == (1, 0, "a")
        assert task.deadline == 100.0 + TIMEOUT
        assert task.manifest_sha256 == tier.manifest_sha256
        assert task.artifacts == tier.files and "manifest.json" in task.artifacts
        assert {n: t.shape for n, t in o.tensors.items()} == SHAPES
        _assert_weights_equal(o.tensors, init)
    # A second tick while the round is open sends nothing new.
    assert h.engine.tick(101.0) == []


def test_a_device_that_announces_other_holdings_mid_round_gets_its_task_again_once(art_dir: Path, tmp_path: Path) -> None:
    """A device sent a delta against a version it does not hold refuses it and says what it holds (a hello): its task
    goes again at the next tick, once a round; a device that answered, or holds what it held, gets nothing."""
    h = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30, "d3": 5})
    h.engine.tick(100.0)
    assert h.update("d1", _zeros(), 100.5) == []
    for device in ("d1", "d2"):  # d1 answered already; d2 owes its update
        h.registry.hello(device, 10, 0, None, "ort-training", now=101.0, holds={"a": 7})
    h.registry.hello("d3", 5, 0, None, "ort-training", now=101.0)  # reconnected, holding what it held
    out = h.engine.tick(102.0)
    assert [(o.device_id, o.body.round) for o in out] == [("d2", 1)] and isinstance(out[0].body, Task)
    h.registry.hello("d2", 30, 0, None, "ort-training", now=103.0, holds={"a": 8})
    assert h.engine.tick(104.0) == []  # once a round
    h.update("d2", _zeros(), 105.0)
    assert _summary(h.update("d3", _zeros(), 106.0)).answered == 3


def test_devices_of_one_tier_share_one_copy_of_the_task_weights(art_dir: Path, tmp_path: Path) -> None:
    """A round of thousands of devices (or invented ones) holds the tier's weights once, not once per task."""
    h = Harness(art_dir, tmp_path / "state", {f"d{i}": 10 for i in range(50)})
    out = h.engine.tick(100.0)
    assert len(out) == 50 and len({id(o.tensors) for o in out}) == 1
    for dev in (f"d{i}" for i in range(50)):
        h.update(dev, _random(1), 101.0)
    after = h.engine.tick(102.0)
    tasks = [o for o in after if isinstance(o.body, Task)]
    assert tasks and len({id(o.tensors) for o in tasks}) == 1
    assert not np.array_equal(tasks[0].tensors["fc1.weight"], out[0].tensors["fc1.weight"]), "round 2 has the new weights"


def test_no_round_with_fewer_than_min_clients(art_dir: Path, tmp_path: Path) -> None:
    h = Harness(art_dir, tmp_path / "state", {"d1": 10})
    assert h.engine.tick(1.0) == []
    assert h.engine.current_round is None
    h.registry.hello("d2", 5, 0, None, "ort-training", now=2.0)
    assert len(h.engine.tick(2.0)) == 2


def test_zero_deltas_commit_version_one_with_unchanged_weights(art_dir: Path, tmp_path: Path) -> None:
    h = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30}, rounds=3)
    before = _copy(h.engine.weights)
    h.engine.tick(0.0)
    assert h.update("d1", _zeros(), 1.0) == []  # round still owes d2
    summary = _summary(h.update("d2", _zeros(), 2.0))
    assert (summary.round, summary.version, summary.selected, summary.answered) == (1, 1, 2, 2)
    assert summary.final is False and summary.accuracy_source == "none"
    assert summary.seconds == 2.0 and summary.bytes_up == 2000
    assert (h.engine.record.version, h.engine.record.round) == (1, 1)
    assert h.engine.current_round is None
    _assert_weights_equal(h.engine.weights, before)
    assert h.store.weights_path(1).exists()
    # the next round dispatches version 1
    tasks = h.engine.tick(3.0)
    assert {t.body.model_version for t in tasks} == {1} and {t.body.round for t in tasks} == {2}


def test_known_deltas_move_weights_by_sample_weighted_mean(art_dir: Path, tmp_path: Path) -> None:
    h = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30})
    before = _copy(h.engine.weights)
    d1, d2 = _random(1), _random(2)
    h.engine.tick(0.0)
    h.update("d1", d1, 1.0)
    _summary(h.update("d2", d2, 1.0))
    for n in SHAPES:
        expected = before[n].astype(np.float64) + (10 * d1[n].astype(np.float64) + 30 * d2[n]) / 40
        np.testing.assert_allclose(h.engine.weights[n], expected, rtol=1e-6, atol=1e-6)
        assert h.engine.weights[n].dtype == np.float32
    # What was committed on disk is what the engine holds, and what round 2 sends out.
    record, on_disk = h.store.load("f1", h.artifacts.identity)
    assert record.version == 1
    _assert_weights_equal(on_disk, h.engine.weights)
    for o in h.engine.tick(2.0):
        _assert_weights_equal(o.tensors, h.engine.weights)


def test_update_uses_num_samples_from_the_update_not_the_registry(art_dir: Path, tmp_path: Path) -> None:
    h = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 10})
    before = _copy(h.engine.weights)
    d1, d2 = _random(3), _random(4)
    h.engine.tick(0.0)
    h.update("d1", d1, 1.0, num_samples=1)
    h.update("d2", d2, 1.0, num_samples=3)
    for n in SHAPES:
        np.testing.assert_allclose(h.engine.weights[n], before[n] + (d1[n] + 3 * d2[n]) / 4, rtol=1e-6, atol=1e-6)


def test_rejections_have_the_right_reason_and_never_change_weights(art_dir: Path, tmp_path: Path) -> None:
    h = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30, "d3": 20})
    before = _copy(h.engine.weights)
    poison = _random(99, scale=100.0)
    # no round open yet: an update for round 1 is for a closed (not yet open) round
    assert _reason(h.update("d1", poison, 0.0, round_number=1, base_version=0), "d1") is RejectReason.STALE_ROUND
    h.engine.tick(0.0)
    h.registry.hello("late-joiner", 50, 0, None, "ort-training", now=0.5)
    cases: list[tuple[str, dict, dict, RejectReason]] = [
        ("ghost", poison, {}, RejectReason.UNKNOWN_DEVICE),
        ("late-joiner", poison, {}, RejectReason.NOT_SELECTED),
        ("d1", poison, {"round_number": 2}, RejectReason.FUTURE_ROUND),
        ("d1", poison, {"base_version": 1}, RejectReason.WRONG_VERSION),
        ("d1", poison, {"tier": "b"}, RejectReason.UNKNOWN_TIER),
        ("d1", {**poison, "fc1.weight": np.zeros((8, 64), np.float32)}, {}, RejectReason.BAD_TENSOR),
        ("d1", {**poison, "fc2.bias": np.zeros((10,), np.float64)}, {}, RejectReason.BAD_TENSOR),
        ("d1", {n: v for n, v in poison.items() if n != "fc2.bias"}, {}, RejectReason.BAD_TENSOR),
        ("d1", {**poison, "fc3.weight": np.zeros((1,), np.float32)}, {}, RejectReason.BAD_TENSOR),
    ]
    for dev, tensors, kwargs, expected in cases:
        out = h.update(dev, tensors, 1.0, **kwargs)
        assert _reason(out, dev) is expected, (dev, kwargs)
        assert out[0].body.round == (kwargs.get("round_number") or 1)
    # The first good update from d1 is counted; its id and a second update from d1 are duplicates.
    d1, d2, d3 = _random(1), _random(2), _random(3)
    taken = new_id()
    assert h.update("d1", d1, 2.0, update_id=taken) == []
    assert _reason(h.update("d2", poison, 2.0, update_id=taken), "d2") is RejectReason.DUPLICATE
    assert _reason(h.update("d1", poison, 2.0), "d1") is RejectReason.DUPLICATE
    # After the deadline (round not closed by a tick yet) an update is late.
    assert h.update("d2", d2, 3.0) == []
    assert _reason(h.update("d3", d3, TIMEOUT + 0.5), "d3") is RejectReason.LATE
    assert h.engine.current_round == 1
    summary = _summary(h.engine.tick(TIMEOUT + 0.5))
    assert (summary.selected, summary.answered, summary.version) == (3, 2, 1)
    # A straggler's update for round 1 during round 2 is stale.
    h.engine.tick(20.0)
    assert _reason(h.update("d3", poison, 21.0, round_number=1, base_version=0), "d3") is RejectReason.STALE_ROUND

    assert dict(h.engine.rejected) == {
        "stale_round": 2, "unknown_device": 1, "not_selected": 1, "future_round": 1, "wrong_version": 1,
        "unknown_tier": 1, "bad_tensor": 4, "duplicate": 2, "late": 1,
    }
    assert summary.rejected == {**dict(h.engine.rejected), "stale_round": 1}
    # Only d1 and d2 (10 and 30 samples) made it in.
    for n in SHAPES:
        expected = before[n].astype(np.float64) + (10 * d1[n].astype(np.float64) + 30 * d2[n]) / 40
        np.testing.assert_allclose(h.engine.weights[n], expected, rtol=1e-6, atol=1e-6)


def test_a_declining_device_lets_the_round_close_and_nothing_of_it_is_folded(art_dir: Path, tmp_path: Path) -> None:
    """A device with no result (its training diverged, or its update was refused) declines the round: the round waits
    no more for it; a decline carrying tensors, of a device not selected, or of another version is refused and changes
    nothing; once declined, a device's update for that round is a duplicate."""
    h = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30, "d3": 20})
    before = _copy(h.engine.weights)
    h.engine.tick(0.0)
    h.registry.hello("late-joiner", 50, 0, None, "ort-training", now=0.5)

    def decline(dev: str, tensors: Mapping[str, np.ndarray] | None = None, base_version: int = 0) -> list[Outgoing]:
        body = Update(update_id=new_id(), round=1, base_version=base_version, tier="a", num_samples=10, steps=0,
                      train_loss=0.0, train_accuracy=0.0, train_seconds=0.0, declined=True)
        return h.engine.on_update(dev, new_id(), body, tensors or {}, 100, 1.0)

    assert _reason(decline("d2", _random(2)), "d2") is RejectReason.BAD_TENSOR
    assert _reason(decline("late-joiner"), "late-joiner") is RejectReason.NOT_SELECTED
    assert _reason(decline("d2", base_version=3), "d2") is RejectReason.WRONG_VERSION
    assert h.engine.open_round.view().waiting_for == ("d1", "d2", "d3")
    assert decline("d2") == []
    assert h.engine.open_round.view().waiting_for == ("d1", "d3")
    assert _reason(h.update("d2", _random(5), 1.5), "d2") is RejectReason.DUPLICATE
    d1, d3 = _random(1), _random(3)
    assert h.update("d1", d1, 2.0) == []
    summary = _summary(h.update("d3", d3, 3.0))  # well before the deadline at 10
    assert (summary.selected, summary.answered, summary.version, summary.seconds) == (3, 2, 1, 3.0)
    for n in SHAPES:
        expected = before[n].astype(np.float64) + (10 * d1[n].astype(np.float64) + 20 * d3[n]) / 30
        np.testing.assert_allclose(h.engine.weights[n], expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="neither unchanged"):
        Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=10, steps=0, train_loss=0.0,
               train_accuracy=0.0, train_seconds=0.0, declined=True, unchanged=True)


def test_offline_device_lets_round_close_early(art_dir: Path, tmp_path: Path) -> None:
    h = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30, "d3": 20})
    before = _copy(h.engine.weights)
    h.engine.tick(0.0)
    d1, d3 = _random(1), _random(3)
    assert h.update("d1", d1, 1.0) == []
    h.registry.set_online("d2", False, 2.0)
    assert h.engine.tick(2.0) == []  # d3 still owes an update and is online
    summary = _summary(h.update("d3", d3, 3.0))  # well before the deadline at 10
    assert (summary.selected, summary.answered, summary.version, summary.seconds) == (3, 2, 1, 3.0)
    for n in SHAPES:
        expected = before[n].astype(np.float64) + (10 * d1[n].astype(np.float64) + 20 * d3[n]) / 30
        np.testing.assert_allclose(h.engine.weights[n], expected, rtol=1e-6, atol=1e-6)


def test_offline_device_closes_round_on_tick(art_dir: Path, tmp_path: Path) -> None:
    h = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30})
    h.engine.tick(0.0)
    h.update("d1", _zeros(), 1.0)
    h.registry.set_online("d2", False, 2.0)
    summary = _summary(h.engine.tick(2.5))
    assert (summary.answered, summary.version, summary.seconds) == (1, 1, 2.5)
    # only d1 is online now: below min_clients, so round 2 waits
    assert h.engine.tick(3.0) == [] and h.engine.current_round is None


def test_deadline_with_no_updates_fails_the_round(art_dir: Path, tmp_path: Path) -> None:
    h = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30})
    before = _copy(h.engine.weights)
    h.engine.tick(0.0)
    assert h.engine.tick(TIMEOUT - 0.01) == []
    summary = _summary(h.engine.tick(TIMEOUT))
    assert (summary.round, summary.version, summary.answered, summary.selected) == (1, 0, 0, 2)
    assert (h.engine.record.version, h.engine.record.round) == (0, 1)
    _assert_weights_equal(h.engine.weights, before)
    assert not h.store.weights_path(1).exists()
    tasks = h.engine.tick(TIMEOUT + 1)
    assert {t.body.round for t in tasks} == {2} and {t.body.model_version for t in tasks} == {0}
    # the failed round survives a restart too
    again = RoundEngine(EngineParts(h.config, FedAvg(min_clients=2), h.artifacts, StateStore(tmp_path / "state"),
                                    h.registry))
    assert (again.record.version, again.record.round) == (0, 1)
    assert [s.version for s in again.record.history] == [0]


def _numpy_accuracy(weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    h = np.maximum(x.reshape(len(x), -1).astype(np.float64) @ weights["fc1.weight"].T + weights["fc1.bias"], 0)
    logits = h @ weights["fc2.weight"].T + weights["fc2.bias"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()), float((logits.argmax(axis=1) == y).mean())


def test_held_out_evaluator_scores_the_new_global_model(art_dir: Path, tmp_path: Path) -> None:
    test = load_digits().subset(np.arange(200))
    h = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30},
                evaluator=HeldOutEvaluator(test, ArtifactStore(art_dir)))
    h.engine.tick(0.0)
    h.update("d1", _random(1, 0.3), 1.0)
    summary = _summary(h.update("d2", _random(2, 0.3), 1.0))
    assert summary.accuracy_source == "held-out"
    loss, accuracy = _numpy_accuracy(h.engine.weights, test.x, test.y)
    assert summary.accuracy == pytest.approx(accuracy, abs=1e-9)
    assert summary.loss == pytest.approx(loss, rel=1e-4)
    assert 0.0 <= summary.accuracy <= 1.0
    assert summary.accuracy_by_tier == {"a": pytest.approx(accuracy, abs=1e-9)}


def test_held_out_evaluator_runs_each_tier_s_own_forward_graph(tmp_path: Path) -> None:
    export_all(SPEC, ["a", "c"], tmp_path / "art")
    artifacts = ArtifactStore(tmp_path / "art")
    test = load_digits().subset(np.arange(300))
    evaluator = HeldOutEvaluator(test, artifacts)
    weights = {n: w + np.float32(0.2) * np.sign(w) for n, w in artifacts.global_weights().items()}
    narrow = {n: w[tuple(slice(0, d) for d in artifacts.tiers["c"].shapes[n])] for n, w in weights.items()}
    assert narrow["fc1.weight"].shape == (4, 64)
    for rate, tier_weights in ((1.0, weights), (0.25, narrow)):
        loss, accuracy = evaluator.evaluate(tier_weights, rate)
        expected_loss, expected_accuracy = _numpy_accuracy(tier_weights, test.x, test.y)
        assert (loss, accuracy) == (pytest.approx(expected_loss, rel=1e-4), pytest.approx(expected_accuracy, abs=1e-9))
    with pytest.raises(ValueError, match="no exported tier has width rate 0.5"):
        evaluator.evaluate(weights, 0.5)


def test_held_out_evaluator_takes_data_shaped_for_the_card_only(art_dir: Path) -> None:
    digits = load_digits().subset(np.arange(50))
    flat = Dataset(digits.x.reshape(50, 64), digits.y)  # [64] fits a [1, 8, 8] model: reshaped row by row
    artifacts = ArtifactStore(art_dir)
    weights = artifacts.global_weights()
    assert HeldOutEvaluator(flat, artifacts).evaluate(weights) == HeldOutEvaluator(digits, artifacts).evaluate(weights)
    wide = Dataset(np.zeros((5, 3, 8, 8), np.float32), np.zeros(5, np.int64))
    with pytest.raises(ValueError, match=r"held-out.npz: x holds samples of shape \[3, 8, 8\] but the model takes "
                                         r"\[1, 8, 8\]"):
        HeldOutEvaluator(wide, artifacts, source="held-out.npz")


def test_resume_continues_at_same_version_round_and_weights(art_dir: Path, tmp_path: Path) -> None:
    h = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30}, rounds=5)
    for r in range(2):
        h.engine.tick(50.0 * r)
        h.update("d1", _random(10 + r), 50.0 * r + 1)
        _summary(h.update("d2", _random(20 + r), 50.0 * r + 1))
    h.engine.tick(100.0)  # round 3 opens, then the process "dies"
    assert h.engine.current_round == 3
    again = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30}, rounds=5)
    resumed = again.engine
    assert (resumed.record.version, resumed.record.round) == (2, 2)
    assert [s.round for s in resumed.record.history] == [1, 2]
    _assert_weights_equal(resumed.weights, h.engine.weights)
    assert resumed.current_round == 3  # the open round resumes from its spool (tests/test_crash_recovery.py)
    again_sent = resumed.tick(200.0)  # the owed tasks once more, in case they died with the old process
    assert [(t.device_id, t.body.round, t.body.model_version) for t in again_sent] == [("d1", 3, 2), ("d2", 3, 2)]
    for t in again_sent:
        _assert_weights_equal(t.tensors, h.engine.weights)
    assert resumed.tick(200.5) == []
    again.update("d1", _random(30), 201.0)
    assert _summary(again.update("d2", _random(31), 201.0)).round == 3
    assert (resumed.record.version, resumed.record.round) == (3, 3)


def test_state_dir_of_another_fleet_or_model_raises(art_dir: Path, tmp_path: Path) -> None:
    Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30}, fleet="f1")
    with pytest.raises(StateMismatch, match="f1"):
        Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30}, fleet="f2")
    other = tmp_path / "other-art"
    export_all(ModelSpec(arch="mlp", image_size=8, hidden=(8,)), ["a"], other)
    with pytest.raises(StateMismatch):
        Harness(other, tmp_path / "state", {"d1": 10, "d2": 30}, fleet="f1")


def test_finished_after_configured_rounds(art_dir: Path, tmp_path: Path) -> None:
    h = Harness(art_dir, tmp_path / "state", {"d1": 10, "d2": 30}, rounds=2)
    finals = []
    for r in range(2):
        assert not h.engine.finished
        h.engine.tick(10.0 * r)
        h.update("d1", _zeros(), 10.0 * r + 1)
        finals.append(_summary(h.update("d2", _zeros(), 10.0 * r + 1)).final)
    assert finals == [False, True]
    assert h.engine.finished
    assert h.engine.tick(100.0) == [] and h.engine.current_round is None
    assert (h.engine.record.version, h.engine.record.round) == (2, 2)


def test_without_held_out_set_accuracy_is_the_federated_sample_weighted_mean(art_dir: Path, tmp_path: Path) -> None:
    h = Harness(art_dir, tmp_path / "state", {"d1": 100, "d2": 300})
    h.engine.tick(0.0)
    out = []
    for dev, (loss, acc, n) in {"d1": (2.0, 0.5, 10), "d2": (1.0, 0.9, 30)}.items():
        body = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=50, steps=1,
                      train_loss=1.0, train_accuracy=0.5, train_seconds=0.1,
                      eval_loss=loss, eval_accuracy=acc, eval_samples=n)
        out = h.engine.on_update(dev, new_id(), body, _zeros(), 1000, 1.0)
    summary = _summary(out)
    assert summary.accuracy_source == "federated"
    assert summary.accuracy == pytest.approx((0.5 * 10 + 0.9 * 30) / 40)
    assert summary.loss == pytest.approx((2.0 * 10 + 1.0 * 30) / 40)
    assert summary.accuracy_by_tier == {"a": pytest.approx(0.8)}


def test_unchanged_update_counts_as_a_zero_update_and_must_carry_no_tensors(art_dir: Path, tmp_path: Path) -> None:
    h = Harness(art_dir, tmp_path / "state", {"d1": 100, "d2": 100})
    h.engine.tick(0.0)
    start = _copy(h.engine.weights)

    def unchanged(dev: str, tensors: dict) -> list[Outgoing]:
        body = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=100, steps=3,
                      train_loss=1.0, train_accuracy=0.5, train_seconds=0.1, unchanged=True)
        return h.engine.on_update(dev, new_id(), body, tensors, 300, 1.0)

    assert _reason(unchanged("d1", _zeros()), "d1") == RejectReason.BAD_TENSOR
    assert unchanged("d1", {}) == []
    delta = _random(3)
    summary = _summary(h.update("d2", delta, 1.5))
    assert summary.answered == 2 and summary.version == 1
    for name in SHAPES:  # d1's zero update halves d2's delta in the sample-weighted mean
        np.testing.assert_allclose(h.engine.weights[name], start[name] + delta[name] / 2, rtol=1e-6, atol=1e-7)
