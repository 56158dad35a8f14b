"""The round ledger: every decision recorded with its reason; accepted ids stay duplicates across restarts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.ledger import Ledger
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from models.export import export_all
from models.zoo import ModelSpec
from protocol.messages import Reject, RejectReason, Update, new_id


def _engine(art: Path, state: Path) -> RoundEngine:
    registry = DeviceRegistry()
    for device in ("d1", "d2"):
        registry.hello(device, 10, 0, None, "ort-training", now=0.0)
    return RoundEngine(EngineParts(EngineConfig(rounds=3), FedAvg(min_clients=2), ArtifactStore(art),
                                   StateStore(state), registry, ledger=Ledger(state / "ledger.sqlite")))


def _update(engine: RoundEngine, update_id: str, round_number: int) -> Update:
    return Update(update_id=update_id, round=round_number, base_version=engine.record.version, tier="a", num_samples=10,
                  steps=1, train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)


def test_ledger_records_decisions_and_replays_stay_duplicates_after_a_restart(tmp_path):
    export_all(ModelSpec(arch="mlp", hidden=(4,)), ["a"], tmp_path / "art")
    engine = _engine(tmp_path / "art", tmp_path / "state")
    tasks = engine.tick(1.0)
    zeros = {n: np.zeros_like(v) for n, v in tasks[0].tensors.items()}
    first, second = new_id(), new_id()
    engine.on_update("d1", new_id(), _update(engine, first, 1), dict(zeros), 100, 2.0)
    refused = engine.on_update("d1", new_id(), _update(engine, first, 1), dict(zeros), 100, 2.0)
    assert isinstance(refused[0].body, Reject) and refused[0].body.reason is RejectReason.DUPLICATE
    engine.on_update("d2", new_id(), _update(engine, second, 1), dict(zeros), 100, 2.0)  # round 1 commits
    engine.count_rejection(RejectReason.MALFORMED, "not a frame", "d9")
    assert engine.ledger.counts() == {"accepted": 2, "duplicate": 1, "malformed": 1}
    rows = sqlite3.connect(tmp_path / "state" / "ledger.sqlite").execute(
        "SELECT device, kind, accepted, reason, round FROM received ORDER BY id").fetchall()
    assert rows == [("d1", "update", 1, None, 1), ("d1", "update", 0, "duplicate", 1), ("d2", "update", 1, None, 1),
                    ("d9", "frame", 0, "malformed", None)]

    restarted = _engine(tmp_path / "art", tmp_path / "state")  # a new process on the same state directory
    restarted.tick(3.0)
    replay = restarted.on_update("d1", new_id(), _update(restarted, first, 2), dict(zeros), 100, 4.0)
    assert replay[0].body.reason is RejectReason.DUPLICATE  # a QoS 1 redelivery is never counted twice


def test_an_update_accepted_in_a_round_cut_short_stays_counted_after_a_restart(tmp_path):
    export_all(ModelSpec(arch="mlp", hidden=(4,)), ["a"], tmp_path / "art")
    engine = _engine(tmp_path / "art", tmp_path / "state")
    zeros = {n: np.zeros_like(v) for n, v in engine.tick(1.0)[0].tensors.items()}
    kept = new_id()
    engine.on_update("d1", new_id(), _update(engine, kept, 1), dict(zeros), 100, 2.0)  # then the process dies
    restarted = _engine(tmp_path / "art", tmp_path / "state")
    assert restarted.current_round == 1  # resumed from the open-round spool, with d1's update in it
    replay = restarted.on_update("d1", new_id(), _update(restarted, kept, 1), dict(zeros), 100, 4.0)
    assert replay[0].body.reason is RejectReason.DUPLICATE
    assert restarted.ledger.counts() == {"accepted": 1, "duplicate": 1}
