"""What keeps the aggregator's cost per update O(model) and its pages bounded as the fleet grows (issue 16)."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.monitor import DEVICES_LISTED, Monitor
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.ledger import Ledger
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from models.export import export_all
from models.zoo import ModelSpec
from protocol.messages import Update, new_id


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("art")
    export_all(ModelSpec(arch="mlp", hidden=(4,)), ["a"], folder)
    return folder


def _engine(art: Path, state: Path) -> RoundEngine:
    """A round engine as `tierfl aggregator` builds it: group commit on."""
    registry = DeviceRegistry()
    for device in ("d1", "d2", "d3"):
        registry.hello(device, 10, 0, None, "ort-training", now=0.0)
    store, ledger = StateStore(state), Ledger(state / "ledger.sqlite")
    ledger.group_commit(store.open_round)
    return RoundEngine(EngineParts(EngineConfig(rounds=3), FedAvg(min_clients=3), ArtifactStore(art), store, registry,
                                   ledger=ledger))


def _send(engine: RoundEngine, device: str, update_id: str, zeros: dict[str, np.ndarray]) -> None:
    update = Update(update_id=update_id, round=1, base_version=0, tier="a", num_samples=10, steps=1, train_loss=1.0,
                    train_accuracy=0.5, train_seconds=0.1)
    assert engine.on_update(device, new_id(), update, dict(zeros), 100, 2.0) == [] or device == "d3"


def _rows(state: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(state / "ledger.sqlite") as db:
        return db.execute("SELECT device, update_id FROM received WHERE accepted = 1 ORDER BY id").fetchall()


def test_group_commit_syncs_the_spool_before_the_ledger_and_a_crash_counts_nothing_twice(art, tmp_path):
    state = tmp_path / "state"
    engine = _engine(art, state)
    zeros = {n: np.zeros_like(v) for n, v in engine.tick(1.0)[0].tensors.items()}
    first, second, lost = new_id(), new_id(), new_id()
    _send(engine, "d1", first, zeros)
    spool = state / "open_round"
    assert not list(spool.glob("update-*.npz")) and len(list(spool.glob(".update-*.pending"))) == 1
    assert _rows(state) == []  # accepted in memory only: not durable, so not recorded
    engine.ledger.flush()  # what the service does within 0.2 s
    assert [p.name for p in spool.glob("update-*.npz")] == ["update-000001.npz"] and _rows(state) == [("d1", first)]
    _send(engine, "d2", lost, zeros)  # accepted, then the process dies before the next flush
    engine.ledger._db.close()

    restarted = _engine(art, state)
    restarted.tick(3.0)  # resumes round 1 with d1's update only; d2's pending file is gone, recorded nowhere
    assert restarted.rounds.slot.current.answered == {"d1"} and not list(spool.glob(".*.pending"))
    _send(restarted, "d2", second, zeros)
    _send(restarted, "d3", new_id(), zeros)  # the last answer: the round commits, flushing the ledger first
    assert restarted.record.version == 1 and not spool.exists()
    assert [device for device, _ in _rows(state)] == ["d1", "d2", "d3"] and lost not in {u for _, u in _rows(state)}


def test_the_registry_counts_devices_online_as_they_change():
    registry = DeviceRegistry(max_devices=50)
    rng = random.Random(4)
    for step in range(2000):
        device, now = f"d{rng.randrange(80)}", float(step)
        action = rng.randrange(3)
        if action == 0:
            registry.hello(device, 10, 0, None, "ort-training", now=now)
        elif action == 1:
            registry.set_online(device, rng.random() < 0.5, now)
        else:
            registry.seen(device, now)
        assert registry.online_count == sum(info.online for info in registry.iter_devices())
    assert len(registry) == 50  # evictions happened, and were counted


def test_the_status_page_lists_a_bounded_number_of_devices_and_counts_all(tmp_path):
    registry = DeviceRegistry(max_devices=5000)
    for i in range(3000):
        registry.hello(f"d{i:04d}", 10, 0, "ab"[i % 2], "ort-training", now=float(i))
    for i in range(0, 3000, 3):
        registry.set_online(f"d{i:04d}", False, 3000.0)
    engine = SimpleNamespace(registry=registry, view=lambda: None)
    monitor = Monitor()
    devices, counts = monitor._device_pass(engine, 3000.0)
    assert len(devices) == DEVICES_LISTED and counts.known == 3000 and counts.online == 2000
    assert dict(counts.online_by_tier) == {"a": 1000, "b": 1000}
    assert [d.device_id for d in devices] == [f"d{i:04d}" for i in range(2950, 3000)]  # the most recently seen
    assert monitor._device_pass(engine, 3000.1)[1] is counts  # 3,000 devices are counted at most every 0.3 s


def test_deleting_a_set_aside_spool_that_another_deletion_removed_is_quiet(tmp_path) -> None:
    """A start's sweep and a clear's thread may both delete one set-aside spool: whichever comes second finds nothing."""
    from aggregator.store.round_spool import _remove_spool

    aside = tmp_path / ".open_round.cleared-0a1b2c3d"
    aside.mkdir()
    (aside / "update-000001.npz").write_bytes(b"x")
    _remove_spool(aside)
    assert not aside.exists()
    _remove_spool(aside)  # the second deletion: the folder is gone (it raised FileNotFoundError from glob)
