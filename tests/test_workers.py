"""Aggregator workers (issue 16): a coordinator and two worker processes sharing the uplink over an MQTT 5 shared
subscription on the real Mosquitto, real devices (`tierfl fleet`: three virtual devices training HeteroFL tiers a and c
on ONNX Runtime), one worker SIGKILLed mid-round.

Every version the coordinator commits equals what one aggregator (the in-process RoundEngine, the code a single
`tierfl aggregator` runs) commits given the same updates, the ones the coordinator's ledger counted, within 1e-6
(absolute and relative): the workers' float32 sums add the same terms in another order. The killed worker's
granted updates are never counted; their devices are asked again and counted once, with their new updates.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from aggregator.coordinator_service import CoordinatorService
from aggregator.engines.base import EngineConfig
from aggregator.engines.coordinated import CoordinatedEngine, partial_problem
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.engines.worker import WorkerEngine
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.robust import update_norm
from aggregator.strategies.tiering import FixedTiers
from aggregator.worker_cli import load_workers
from models.export import export_all
from models.spec import ModelSpec
from protocol.frame import Frame, decode_frame, encode_frame
from protocol.messages import (Hello, PartialSum, Reject, RejectReason, Status, Task, TierShare, Update, WorkerClaim,
                               WorkerFlush, WorkerForward, WorkerGrant, new_id)
from protocol.mqtt.link import MqttLink
from protocol.mqtt.url import parse
from protocol.signing import AGGREGATOR_KEY_FILE, DeviceKey
from protocol.topics import Topics
from tests.conftest import tierfl
from tierfl.cli import main as tierfl_main

TOLERANCE = 1e-6  # float32 sums of the same updates in another order
SAMPLES = 51  # what the scripted device announces
TIERS = {"d1": "a", "d2": "c", "d3": "c", "d4": "a"}  # d4 is scripted here: it answers "unchanged"


class Recorder:
    """A plain (not shared) subscriber: every frame on the given topics, decoded, in order of arrival."""

    def __init__(self, url: str, topics: list[str], name: str) -> None:
        self.frames: list[tuple[str, Frame]] = []
        self._lock = threading.Lock()
        self.link = MqttLink(parse(url), client_id=f"{name}-{new_id()[:8]}", subscriptions=topics,
                             on_frame=self._put, on_bad_frame=lambda topic, exc: None)
        self.link.start()

    def _put(self, topic: str, data: bytes) -> None:
        frame = decode_frame(data)
        with self._lock:
            self.frames.append((topic, frame))

    def bodies(self, kind: type) -> list[tuple[str, Frame]]:
        with self._lock:
            return [(t, f) for t, f in self.frames if isinstance(f.body, kind)]

    def close(self) -> None:
        self.link.stop()


class ScriptedDevice:
    """d4: a device of tier a that answers every task with an "unchanged" update, except the one `hold` names."""

    def __init__(self, url: str, fleet: str, hold: int) -> None:
        self.topics, self.fleet, self.hold = Topics(fleet), fleet, hold
        self.tasks: list[Task] = []
        self.link = MqttLink(parse(url), client_id=f"{fleet}-d4", subscriptions=[self.topics.down("d4")],
                             on_frame=self._on_frame, on_bad_frame=lambda topic, exc: None)
        self.link.start()
        self.link.publish(self.topics.status("d4"), encode_frame(fleet, "d4", Hello(tier="a", num_samples=SAMPLES)),
                          retain=True)

    def _on_frame(self, topic: str, data: bytes) -> None:
        task = decode_frame(data).body
        if not isinstance(task, Task):
            return
        self.tasks.append(task)
        if task.round == self.hold and sum(t.round == self.hold for t in self.tasks) == 1:
            return  # the first task of the held round waits: the round stays open
        update = Update(update_id=new_id(), round=task.round, base_version=task.model_version, tier=task.tier,
                        num_samples=SAMPLES, steps=0, train_loss=1.0, train_accuracy=0.1, train_seconds=0.0,
                        unchanged=True)
        self.link.publish(self.topics.up("d4"), encode_frame(self.fleet, "d4", update))

    def close(self) -> None:
        self.link.clear_retained(self.topics.status("d4"))
        self.link.stop(flush_timeout_s=2)


def _wait_for(predicate: Callable[[], object], timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in logs if p.exists())
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.05)


def _counted(state: Path) -> dict[int, list[tuple[str, str]]]:
    """round -> [(device, update id)] the coordinator's ledger accepted, in order."""
    with sqlite3.connect(state / "ledger.sqlite") as db:
        rows = db.execute("SELECT round, device, update_id FROM received WHERE accepted = 1 AND kind = 'update' "
                          "ORDER BY id").fetchall()
    counted: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for number, device, update_id in rows:
        counted[number].append((device, update_id))
    return counted


def _one_aggregator(art: Path, state: Path, fleet: str, updates: dict[str, Frame],
                    counted: dict[int, list[tuple[str, str]]]) -> list[dict[str, np.ndarray]]:
    """The versions one aggregator (RoundEngine) commits given, round by round, the updates the ledger counted."""
    registry = DeviceRegistry()
    for device, tier in TIERS.items():
        registry.hello(device, 10**6, 0, tier, "ort-training", now=0.0)  # announced: no bound on the updates
    engine = RoundEngine(EngineParts(EngineConfig(fleet=fleet, rounds=len(counted), round_timeout_s=1e6),
                                     FedAvg(min_clients=4, tiers=FixedTiers({"a": 1.0, "c": 1.0})), ArtifactStore(art),
                                     StateStore(state), registry))
    versions = []
    for number in sorted(counted):
        engine.tick(1.0)
        assert engine.current_round == number
        for device, update_id in counted[number]:
            frame = updates[update_id]
            out = engine.on_update(device, frame.header.msg_id, frame.body, frame.tensors, 1000, 1.0)
            assert not [o.body for o in out if isinstance(o.body, Reject)], (device, out)
        assert engine.record.round == number, f"round {number} did not close on its counted updates"
        versions.append({n: np.array(w) for n, w in engine.weights.items()})
    return versions


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art")
    export_all(ModelSpec(arch="mlp"), ["a", "c"], out)
    return out


def test_two_workers_commit_what_one_aggregator_does_and_a_killed_worker_loses_and_doubles_nothing(
        art_dir, tmp_path, mosquitto_url, fleet):
    art = art_dir
    keys = {name: DeviceKey(tmp_path / name, AGGREGATOR_KEY_FILE).public_hex for name in ("coord", "w1", "w2")}
    (tmp_path / "workers.json").write_text(json.dumps({"w1": keys["w1"], "w2": keys["w2"]}))
    topics = Topics(fleet)
    recorder = Recorder(mosquitto_url, [topics.all_up(), topics.all_workers("down")], "recorder")
    logs = [tmp_path / f"{name}.log" for name in ("coord", "w1", "w2", "fleet")]
    common = ("--broker", mosquitto_url, "--fleet", fleet, "--artifacts", str(art))
    coordinator = tierfl("aggregator", *common, "--state-dir", str(tmp_path / "coord"), "--workers",
                         str(tmp_path / "workers.json"), "--min-clients", "4", "--rounds", "3", "--round-timeout", "60",
                         log=logs[0])
    workers = {w: tierfl("aggregator", *common, "--state-dir", str(tmp_path / w), "--id", w, "--worker-of", "aggregator",
                         "--coordinator-key", keys["coord"], log=tmp_path / f"{w}.log") for w in ("w1", "w2")}
    _wait_for(lambda: all(f"aggregator worker {w} joined" in logs[0].read_text() for w in workers), 30, "both workers",
              logs)
    trace = tmp_path / "trace.json"  # three real devices in one `tierfl fleet` process, each training its tier
    trace.write_text(json.dumps({"devices": [{"id": d, "tier": TIERS[d]} for d in ("d1", "d2", "d3")]}))
    devices = [tierfl("fleet", "--broker", mosquitto_url, "--fleet", fleet, "--trace", str(trace), "--data", "digits",
                      "--cache-root", str(tmp_path / "fleet"), log=tmp_path / "fleet.log")]
    scripted = ScriptedDevice(mosquitto_url, fleet, hold=2)
    processes = [coordinator, *workers.values(), *devices]
    try:
        def grants(number: int) -> list[tuple[str, WorkerGrant]]:
            return [(topics.worker_of(t)[0], f.body) for t, f in recorder.bodies(WorkerGrant)  # type: ignore[index]
                    if f.body.round == number and f.body.granted]

        # Round 2: d4 holds its first task, so the workers keep the three real devices' granted updates unflushed.
        _wait_for(lambda: len(grants(2)) == 3, 60, "three grants in round 2", logs)
        held: dict[str, list[str]] = defaultdict(list)
        for worker, grant in grants(2):
            held[worker].append(grant.update_id)
        victim = max(held, key=lambda w: len(held[w]))
        workers[victim].send_signal(signal.SIGKILL)
        survivor = next(w for w in workers if w != victim)
        assert coordinator.wait(90) == 0, logs[0].read_text()[-3000:]

        counted = _counted(tmp_path / "coord")
        assert sorted(counted) == [1, 2, 3]
        for number, rows in counted.items():  # every selected device counted once a round
            assert sorted(d for d, _ in rows) == ["d1", "d2", "d3", "d4"], (number, rows)
        ids_2 = {u for _, u in counted[2]}
        assert not ids_2 & set(held[victim]), "an update of the killed worker was counted"
        assert set(held.get(survivor, [])) <= ids_2, "an update the surviving worker held was lost"
        assert sum(t.round == 2 for t in scripted.tasks) == 2, "d4 was not asked again after the worker died"
        assert f"updates held by worker {victim} are void" in logs[0].read_text()

        # The same updates, one aggregator: the same versions, within float32 reordering.
        updates = {f.body.update_id: f for _, f in recorder.bodies(Update)}
        expected = _one_aggregator(art, tmp_path / "reference", fleet, updates, counted)
        store = StateStore(tmp_path / "coord")
        for version, weights in enumerate(expected, start=1):
            with np.load(store.weights_path(version)) as got:
                for name, value in weights.items():
                    np.testing.assert_allclose(got[name], value, rtol=TOLERANCE, atol=TOLERANCE, err_msg=f"v{version} {name}")
        state = json.loads((tmp_path / "coord" / "state.json").read_text())
        assert [(s["round"], s["selected"], s["answered"]) for s in state["history"]] == [(1, 4, 4), (2, 4, 4), (3, 4, 4)]
    finally:
        scripted.close()
        for worker in workers:  # the workers' retained statuses would outlive the test on the shared broker
            recorder.link.clear_retained(topics.worker(worker, "status"))
        recorder.link.flush(2)
        recorder.close()
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait(10)


# -- the coordinator's decisions, in process ----------------------------------------------------


def _coordinator(art: Path, state: Path, tiers: dict[str, str]) -> CoordinatedEngine:
    """A coordinator (in process) of FedAvg rounds over the devices of `tiers` (device -> its tier), all of them
    selected; no round open yet."""
    registry = DeviceRegistry()
    for device, tier in tiers.items():
        registry.hello(device, 10, 0, tier, "ort-training", now=0.0)
    return CoordinatedEngine(EngineParts(EngineConfig(fleet="f", rounds=3, round_timeout_s=10.0),
                                         FedAvg(min_clients=len(tiers), tiers=FixedTiers({"a": 1.0})),
                                         ArtifactStore(art), StateStore(state), registry), now=0.0)


def test_a_partial_sum_counts_whole_or_not_at_all(art_dir, tmp_path):
    engine = _coordinator(art_dir, tmp_path / "state", {"d1": "a", "d2": "a"})
    assert len(engine.tick(0.0)) == 2
    shapes = ArtifactStore(art_dir).tiers["a"].shapes
    rng = np.random.default_rng(0)
    deltas = {d: {n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in shapes.items()} for d in ("d1", "d2")}
    sessions = {"w1": new_id(), "w2": new_id()}

    def claim(worker: str, device: str) -> tuple[Update, list]:
        update = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=10, steps=1, train_loss=1.0,
                        train_accuracy=0.5, train_seconds=0.1)
        out = engine.on_claim(worker, WorkerClaim(session=sessions[worker], device=device, update=update,
                                                  norm=update_norm(deltas[device]), nbytes=100), 1.0)
        return update, out

    first, _ = claim("w1", "d1")
    second, out = claim("w2", "d1")  # d1 again, through the other worker: refused, never folded
    assert [o.body.reason for o in out] == [RejectReason.DUPLICATE]
    assert [m.body.granted for m in engine.take_worker_messages()] == [True, False]
    other, _ = claim("w2", "d2")
    engine.take_worker_messages()
    # w1 dies: its grant of d1 is void and d1 is asked again; its late partial sum is refused whole.
    again = engine.on_worker_status("w1", sessions["w1"], False, 2.0)
    assert [o.device_id for o in again] == ["d1"] and isinstance(again[0].body, Task)
    refused = engine.on_partial("w1", PartialSum(session=sessions["w1"], round=1, update_ids=[first.update_id]),
                                {n: np.zeros_like(w) for n, w in engine.weights.items()}, 100, 2.0)
    assert refused == [] and engine.open_round.answered == set()
    start = {n: np.array(w) for n, w in engine.weights.items()}
    retrained, _ = claim("w2", "d1")
    engine.take_worker_messages()
    sums = {n: np.zeros_like(w) for n, w in start.items()}
    for device in ("d2", "d1"):
        for n, d in deltas[device].items():
            sums[n][tuple(slice(0, k) for k in d.shape)] += d * np.float32(10)
    done = engine.on_partial("w2", PartialSum(session=sessions["w2"], round=1,
                                              update_ids=[other.update_id, retrained.update_id]), sums, 100, 3.0)
    assert engine.record.round == 1 and any(o.device_id is None for o in done)  # committed: the round's summary
    for name, value in engine.weights.items():
        np.testing.assert_allclose(value, start[name] + (deltas["d1"][name] + deltas["d2"][name]) / 2, atol=1e-7)
    assert engine.voided == 1 and engine.asked_again == 1


def test_a_worker_claims_checked_updates_and_sends_the_granted_ones_summed(art_dir):
    artifacts = ArtifactStore(art_dir)
    worker = WorkerEngine(EngineConfig(fleet="f"), artifacts, DeviceRegistry())
    shapes = artifacts.tiers["c"].shapes
    delta = {n: np.full(s, 0.5, np.float32) for n, s in shapes.items()}

    def update(tier: str = "c") -> Update:
        return Update(update_id=new_id(), round=1, base_version=0, tier=tier, num_samples=10, steps=1, train_loss=1.0,
                      train_accuracy=0.5, train_seconds=0.1)

    wrong = worker.on_update("d1", new_id(), update("a"), delta, 100, 0.0)  # tier c's tensors for a tier-a update
    assert [o.body.reason for o in wrong] == [RejectReason.BAD_TENSOR] and worker.take_outbox() == []
    huge = {n: np.full(s, 3e38, np.float32) for n, s in shapes.items()}  # finite, but an L2 norm over float32's range
    overflow = worker.on_update("d1", new_id(), update(), huge, 100, 0.0)
    assert [o.body.reason for o in overflow] == [RejectReason.NON_FINITE] and worker.take_outbox() == []
    kept, dropped = update(), update()
    assert worker.on_update("d1", new_id(), kept, delta, 100, 0.0) == []
    assert worker.on_update("d2", new_id(), dropped, delta, 100, 0.0) == []
    claims = [body for body, _ in worker.take_outbox()]
    assert [(c.device, c.update.update_id) for c in claims] == [("d1", kept.update_id), ("d2", dropped.update_id)]
    assert claims[0].norm == pytest.approx(float(np.sqrt(sum(0.25 * v.size for v in delta.values()))), rel=1e-6)
    session = worker.session
    worker.on_grant(WorkerGrant(session=session, round=1, device="d1", update_id=kept.update_id, granted=True,
                                samples=10, work=0.5))
    worker.on_grant(WorkerGrant(session=session, round=1, device="d2", update_id=dropped.update_id, granted=False))
    worker.on_flush(WorkerFlush(round=1))
    [(partial, sums)] = worker.take_outbox()
    assert isinstance(partial, PartialSum) and partial.update_ids == [kept.update_id]
    for name, value in sums.items():  # weight 10 samples x 0.5 of the work, on tier c's leading block only
        block = tuple(slice(0, k) for k in shapes[name])
        assert np.all(value[block] == 2.5) and value.sum() == pytest.approx(2.5 * np.prod(shapes[name]))


@pytest.mark.parametrize("options,message", [
    (["--workers", "w.json", "--strategy", "fedbuff"], "--workers runs synchronous rounds of the element-wise mean"),
    (["--workers", "w.json", "--robust", "median"], "--workers runs synchronous rounds of the element-wise mean"),
    (["--workers", "w.json", "--personal-layers", "fc3.*"], "--workers with --personal-layers"),
    (["--workers", "w.json", "--worker-of", "aggregator"], "exclude each other"),
    (["--worker-of", "aggregator"], "--worker-of needs --coordinator-key"),
    (["--workers", "w.json", "--flush-wait", "nan"], "--flush-wait must be positive and finite"),
])
def test_worker_options_that_do_not_combine_exit_2_before_anything_is_written(tmp_path, capsys, options, message):
    state = tmp_path / "state"
    assert tierfl_main(["aggregator", "--state-dir", str(state), *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tierfl aggregator: error: ") and message in err[-1], err
    assert not state.exists()


def test_a_restarted_coordinator_asks_the_round_again_and_refuses_partial_sums_of_its_old_grants(art_dir, tmp_path):
    def coordinator() -> CoordinatedEngine:
        return _coordinator(art_dir, tmp_path / "state", {"d1": "a", "d2": "a"})

    def update() -> Update:
        return Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=10, steps=1, train_loss=1.0,
                      train_accuracy=0.5, train_seconds=0.1)

    session = new_id()
    old = coordinator()
    old.tick(0.0)
    before = update()
    old.on_claim("w1", WorkerClaim(session=session, device="d1", update=before, norm=1.0), 1.0)
    # The coordinator dies here; the worker folded d1's update and keeps it. The new process resumes round 1 from its
    # plan with nothing counted and asks both devices again.
    new = coordinator()
    assert new.open_round is not None and new.open_round.number == 1
    assert sorted(o.device_id for o in new.tick(2.0)) == ["d1", "d2"]
    after = update()
    new.on_claim("w1", WorkerClaim(session=session, device="d2", update=after, norm=1.0), 2.0)
    new.take_worker_messages()
    zeros = {n: np.zeros_like(w) for n, w in new.weights.items()}
    out = new.on_partial("w1", PartialSum(session=session, round=1, update_ids=[before.update_id, after.update_id]),
                         zeros, 100, 3.0)  # one grant of the old process, one of the new: refused whole
    assert sorted(o.device_id for o in out) == ["d1", "d2"]  # d2's grant is void too: both asked again
    assert new.grants == {} and new.open_round.answered == set() and new.voided == 1


def test_partial_sums_beyond_their_grants_and_frames_of_stale_sessions_are_refused(art_dir, tmp_path):
    engine = _coordinator(art_dir, tmp_path / "state", {"d1": "a", "d2": "c"})
    engine.tick(0.0)
    artifacts = ArtifactStore(art_dir)
    rng = np.random.default_rng(1)
    deltas = {d: {n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in artifacts.tiers[t].shapes.items()}
              for d, t in (("d1", "a"), ("d2", "c"))}
    live, old = new_id(), new_id()
    updates = {}
    for sent_at, (device, tier) in zip((1.0, 1.1), (("d1", "a"), ("d2", "c"))):
        updates[device] = Update(update_id=new_id(), round=1, base_version=0, tier=tier, num_samples=10, steps=1,
                                 train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
        engine.on_claim("w1", WorkerClaim(session=live, device=device, update=updates[device],
                                          norm=update_norm(deltas[device]), nbytes=100), 1.0, sent_at=sent_at)
    start = {n: np.array(w) for n, w in engine.weights.items()}
    sums = {n: np.zeros_like(w) for n, w in start.items()}
    for delta in deltas.values():
        for n, d in delta.items():
            sums[n][tuple(slice(0, k) for k in d.shape)] += d * np.float32(10)
    grants = engine.grants
    assert partial_problem(sums, list(grants.values())) is None
    # What d2's grant (tier c, the leading block) cannot hold: anything outside its block, or more than weight x norm.
    only_c = {n: np.zeros_like(w) for n, w in start.items()}
    for n, d in deltas["d2"].items():
        only_c[n][tuple(slice(0, k) for k in d.shape)] = d * np.float32(10)
    assert partial_problem(only_c, [grants["d2"]]) is None
    outside = {n: v.copy() for n, v in only_c.items()}
    name = next(n for n, d in deltas["d2"].items() if d.shape != start[n].shape)
    outside[name].flat[-1] = 1e-3
    assert partial_problem(outside, [grants["d2"]])[0] == RejectReason.BAD_TENSOR
    assert partial_problem({n: v * np.float32(1.01) for n, v in only_c.items()}, [grants["d2"]])[0] == RejectReason.OUTLIER
    # Frames of another session sent before the live session's newest one (a replay, or a dead process's late frame)
    # are refused and change nothing: no session switch, no grant voided, nothing counted.
    zeros = {n: np.zeros_like(w) for n, w in start.items()}
    assert engine.on_worker_status("w1", old, True, 2.0, sent_at=0.5) == []
    assert engine.on_claim("w1", WorkerClaim(session=old, device="d1", update=updates["d1"], norm=0.0), 2.0,
                           sent_at=0.9) == []
    assert engine.on_partial("w1", PartialSum(session=old, round=1, update_ids=[updates["d1"].update_id]), zeros, 100,
                             2.0, sent_at=1.05) == []
    assert engine.rejected["replayed"] == 2 and engine.sessions["w1"] == live and sorted(engine.grants) == ["d1", "d2"]
    assert engine.voided == 0 and engine.take_worker_messages()[2:] == []  # the two grants only
    # Another worker naming w1's session (and so its grants) is refused too.
    assert engine.on_partial("w2", PartialSum(session=live, round=1, update_ids=[updates["d1"].update_id]), zeros, 100,
                             2.0, sent_at=5.0) == []
    assert engine.rejected["sender_mismatch"] == 1 and "w2" not in engine.sessions and sorted(engine.grants) == ["d1", "d2"]
    done = engine.on_partial("w1", PartialSum(session=live, round=1, update_ids=[u.update_id for u in updates.values()]),
                             sums, 100, 3.0, sent_at=2.0)
    assert engine.record.round == 1 and any(o.device_id is None for o in done)
    # The worker side: a grant naming another session leaves the claim pending; the right one folds it.
    worker = WorkerEngine(EngineConfig(fleet="f"), artifacts, DeviceRegistry())
    update = Update(update_id=new_id(), round=1, base_version=0, tier="c", num_samples=10, steps=1, train_loss=1.0,
                    train_accuracy=0.5, train_seconds=0.1)
    worker.on_update("d2", new_id(), update, deltas["d2"], 100, 0.0)
    for session in (new_id(), worker.session):
        worker.on_grant(WorkerGrant(session=session, round=1, device="d2", update_id=update.update_id, granted=True,
                                    samples=10))
    assert worker.folded == 1


def test_the_coordinator_service_checks_a_worker_frame_before_anything_else(art_dir, tmp_path):
    """Hostile worker frames, through the coordinator service's handler (its link never started): each refused with
    its reason and counted, nothing granted, voided or counted."""
    engine = _coordinator(art_dir, tmp_path / "state", {"d1": "a", "d2": "a"})
    engine.tick(0.0)
    w1, stranger = DeviceKey(tmp_path / "w1", AGGREGATOR_KEY_FILE), DeviceKey(tmp_path / "x", AGGREGATOR_KEY_FILE)
    service = CoordinatorService(engine, parse("mqtt://127.0.0.1:1"), {"w1": w1.public_hex},
                                 key=DeviceKey(tmp_path / "coord", AGGREGATOR_KEY_FILE))
    topics = Topics("f")
    session, update = new_id(), Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=10, steps=1,
                                       train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
    claim = WorkerClaim(session=session, device="d1", update=update, norm=1.0)
    zeros = {n: np.zeros_like(w) for n, w in engine.weights.items()}
    partial = PartialSum(session=session, round=1, update_ids=[update.update_id])
    cases = [  # (worker topic, frame, reason)
        ("w1", encode_frame("f", "w1", claim), "bad_signature"),  # unsigned
        ("w1", encode_frame("f", "w1", claim, signer=stranger.sign), "bad_signature"),
        ("w2", encode_frame("f", "w2", claim, signer=stranger.sign), "not_enrolled"),
        ("w1", encode_frame("f", "w2", claim, signer=w1.sign), "sender_mismatch"),
        ("w1", encode_frame("other", "w1", claim, signer=w1.sign), "sender_mismatch"),
        ("w1", encode_frame("f", "w1", partial, zeros, "int8", signer=w1.sign), "bad_tensor"),
        ("w1", encode_frame("f", "w1", partial, {n: v[:1] for n, v in zeros.items()}, signer=w1.sign), "bad_tensor"),
        ("w1", encode_frame("f", "w1", Status(online=False), signer=w1.sign), "malformed"),  # no session
    ]
    for number, (worker, frame, reason) in enumerate(cases):
        service._handle(topics.worker(worker, "status" if isinstance(decode_frame(frame).body, Status) else "up"), frame,
                        1.0)
        assert engine.rejected[reason] >= 1, (number, reason, dict(engine.rejected))
    assert sum(engine.rejected.values()) == len(cases), dict(engine.rejected)
    assert engine.grants == {} and engine.voided == 0 and engine.take_worker_messages() == []
    assert engine.sessions == {"w1": session}  # the signed, undecodable partial sums said w1's session is live
    # A claim of the live session is granted; a replayed frame of an earlier session (sent before it) changes nothing.
    service._handle(topics.worker("w1", "up"), encode_frame("f", "w1", claim, signer=w1.sign, sent_at=10.0), 1.0)
    assert list(engine.grants) == ["d1"]
    engine.take_worker_messages()
    old = WorkerClaim(session=new_id(), device="d2", update=update.model_copy(update={"update_id": new_id()}), norm=1.0)
    service._handle(topics.worker("w1", "up"), encode_frame("f", "w1", old, signer=w1.sign, sent_at=9.0), 1.0)
    assert engine.rejected["replayed"] == 1 and list(engine.grants) == ["d1"] and engine.sessions == {"w1": session}
    # A partial sum whose tensors do not decode (NaN) is refused whole: the grant it names can no longer be counted,
    # so d1 is asked again (with every other device not yet counted nor granted).
    nan = {n: np.full_like(v, np.nan) for n, v in zeros.items()}
    before = engine.asked_again
    service._handle(topics.worker("w1", "up"), encode_frame("f", "w1", partial, nan, signer=w1.sign, sent_at=11.0), 1.0)
    assert engine.rejected["bad_tensor"] == 3 and engine.grants == {} and engine.voided == 1
    assert engine.asked_again - before == 2 and engine.open_round.answered == set()


def test_a_claim_naming_unexported_contributors_and_an_update_forwarded_whole_are_refused(art_dir, tmp_path):
    """A worker's claim whose relay contributors name a tier that is not exported is refused unknown_tier (it raised
    KeyError); a device's update forwarded whole by a worker is refused unexpected, never folded beside the grants."""
    engine = _coordinator(art_dir, tmp_path / "state", {"d1": "a", "d2": "a"})
    engine.tick(0.0)
    w1 = DeviceKey(tmp_path / "w1", AGGREGATOR_KEY_FILE)
    service = CoordinatorService(engine, parse("mqtt://127.0.0.1:1"), {"w1": w1.public_hex},
                                 key=DeviceKey(tmp_path / "coord", AGGREGATOR_KEY_FILE))
    relayed = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=10, steps=1, train_loss=1.0,
                     train_accuracy=0.5, train_seconds=0.1, contributors={"zz": TierShare(samples=10, devices=1)})
    out = engine.on_claim("w1", WorkerClaim(session=new_id(), device="d1", update=relayed, norm=1.0), 1.0)
    assert [o.body.reason for o in out] == [RejectReason.UNKNOWN_TIER] and engine.grants == {}
    update = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=10, steps=1, train_loss=1.0,
                    train_accuracy=0.5, train_seconds=0.1)
    shapes = ArtifactStore(art_dir).tiers["a"].shapes
    inner = encode_frame("f", "d2", update, {n: np.zeros(s, np.float32) for n, s in shapes.items()})
    forward = encode_frame("f", "w1", WorkerForward(device="d2"), {"frame": np.frombuffer(inner, np.uint8)}, "uint8",
                           signer=w1.sign)
    service._handle(Topics("f").worker("w1", "up"), forward, 1.0)
    assert engine.rejected["unexpected"] == 1 and engine.open_round.answered == set() and engine.grants == {}
    # Both devices decline (d1 after its refusal above), through a worker: the round waits for nobody and closes.
    worker = WorkerEngine(EngineConfig(fleet="f"), ArtifactStore(art_dir), DeviceRegistry())
    for device in ("d1", "d2"):
        decline = update.model_copy(update={"update_id": new_id(), "declined": True, "steps": 0})
        assert worker.on_update(device, new_id(), decline, {}, 100, 2.0) == []
    claims = [body for body, _ in worker.take_outbox()]
    assert [(c.device, c.update.declined) for c in claims] == [("d1", True), ("d2", True)]
    out = engine.on_claim("w1", claims[0].model_copy(update={"session": worker.session}), 2.0)  # a new w1 session:
    assert not any(isinstance(o.body, Reject) for o in out)  # (its tasks are asked again, as for any restarted worker)
    assert engine.open_round.view().waiting_for == ("d2",)
    out = engine.on_claim("w1", claims[1].model_copy(update={"session": worker.session}), 2.0)
    assert engine.record.round == 1 and engine.record.version == 0 and any(o.device_id is None for o in out)
    # Chunks on the topics of a worker that is not configured get no reassembly room.
    assert service._admits(Topics("f").worker("w1", "up")) and not service._admits(Topics("f").worker("w2", "up"))


def test_a_workers_file_that_is_not_an_id_to_key_map_is_an_error_naming_it(tmp_path):
    path = tmp_path / "workers.json"
    path.write_text('["w1"]')
    with pytest.raises(ValueError, match=f"{path} is not JSON of id -> hex Ed25519 public key"):
        load_workers(path)
