"""An aggregator that dies mid-round resumes it from its state directory: nothing accepted is lost or counted twice.

Each "process" is a real RoundEngine, StateStore and Ledger on a state directory; a crash is the
process vanishing (its objects dropped, or an exception at the worst instant), a restart is a new
engine on the same directory. The reference is the same updates sent to an engine that never stops.
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from aggregator.engines.base import EngineConfig, Outgoing
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.ledger import Ledger
from aggregator.store.round_spool import Assignment, RoundPlan, RoundSpool, SpoolError
from aggregator.store.state import StateStore
from aggregator.strategies.bn_statistics import statistic_names
from aggregator.strategies.fedavg import FedAvg
from models.export import export_all
from models.spec import ModelSpec
from protocol.frame import decode_frame, encode_frame
from protocol.messages import (BnStatistics, MeasureBnStatistics, Reject, RejectReason, RoundSummary, Task, Update,
                               new_id)
from protocol.quantized import QuantizedTensor, Tensor

MLP = ModelSpec(arch="mlp", hidden=(16,))
SHAPES = {"fc1.weight": (16, 64), "fc1.bias": (16,), "fc2.weight": (10, 16), "fc2.bias": (10,)}  # MLP's, tier a
MLP_BN = ModelSpec(arch="mlp", hidden=(8,), batch_norm=True)
DEVICES = {"d1": 10, "d2": 30, "d3": 7, "d4": 21}  # unequal sample counts: the weighted sum depends on every update
TIMEOUT = 10.0


class _Crash(Exception):
    """The process dies here."""


class _LedgerDyingAfterTheSpool(Ledger):
    """A ledger whose process dies after the third update was spooled, before its accepted row is written."""

    accepted = 0

    def record(self, **row: object) -> None:
        if row["accepted"]:
            self.accepted += 1
            if self.accepted == 3:
                raise _Crash
        super().record(**row)


class Process:
    """One aggregator process: an engine with its ledger on a state directory."""

    def __init__(self, art: Path, state: Path, now: float, devices: Mapping[str, int] = DEVICES,
                 ledger: type[Ledger] = Ledger, hello: bool = True) -> None:
        self.registry = DeviceRegistry()
        if hello:  # what the retained hellos tell a (re)started aggregator
            for device, samples in devices.items():
                self.registry.hello(device, samples, 0, None, "ort-training", now=0.0)
        self.ledger = ledger(state / "ledger.sqlite")
        config = EngineConfig(rounds=3, min_updates=1, round_timeout_s=TIMEOUT)
        self.engine = RoundEngine(EngineParts(config, FedAvg(min_clients=len(devices)), ArtifactStore(art),
                                              StateStore(state), self.registry, ledger=self.ledger), now=now)

    def send(self, device: str, update: Update, tensors: Mapping[str, Tensor], now: float) -> list[Outgoing]:
        return self.engine.on_update(device, new_id(), update, dict(tensors), 1000 + update.num_samples, now)

    def die(self) -> None:
        self.ledger.close()


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art")
    export_all(MLP, ["a"], out)
    assert ArtifactStore(out).tiers["a"].shapes == SHAPES
    return out


@pytest.fixture(scope="module")
def art_bn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art-bn")
    export_all(MLP_BN, ["a"], out)
    return out


def _updates(round_number: int = 1, version: int = 0) -> dict[str, tuple[Update, dict[str, np.ndarray]]]:
    """One update per device with random deltas (float32 sums depend on their order)."""
    out = {}
    for seed, (device, samples) in enumerate(DEVICES.items()):
        rng = np.random.default_rng([round_number, seed])
        body = Update(update_id=new_id(), round=round_number, base_version=version, tier="a", num_samples=samples,
                      steps=3, train_loss=1.0, train_accuracy=0.5, train_seconds=0.1, eval_loss=0.5 + seed,
                      eval_accuracy=0.1 * seed, eval_samples=5)
        out[device] = body, {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in SHAPES.items()}
    return out


def _uninterrupted(art: Path, state: Path, updates: Mapping[str, tuple[Update, Mapping[str, Tensor]]]) -> tuple[RoundEngine, RoundSummary]:
    clean = Process(art, state, now=0.0)
    clean.engine.tick(1.0)
    for device, (body, tensors) in updates.items():
        out = clean.send(device, body, tensors, 2.0)
    clean.die()
    return clean.engine, _summary(out)


def _summary(out: list[Outgoing]) -> RoundSummary:
    assert len(out) == 1 and isinstance(out[0].body, RoundSummary), out
    return out[0].body


def _reason(out: list[Outgoing]) -> RejectReason:
    assert len(out) == 1 and isinstance(out[0].body, Reject), out
    return out[0].body.reason


def _assert_same_weights(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _accepted_rows(state: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(state / "ledger.sqlite")
    try:
        return db.execute("SELECT update_id, COUNT(*) FROM received WHERE kind = 'update' AND accepted = 1 "
                          "GROUP BY update_id ORDER BY MIN(id)").fetchall()
    finally:
        db.close()


def _spool_files(state: Path) -> list[str]:
    """Files of the open round's spool; none once no round is open (the folder goes with its last file)."""
    folder = state / "open_round"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_round_cut_short_resumes_and_commits_what_an_uninterrupted_run_commits(art: Path, tmp_path: Path) -> None:
    updates = _updates()
    clean, clean_summary = _uninterrupted(art, tmp_path / "clean", updates)

    first = Process(art, tmp_path / "state", now=0.0)
    tasks = first.engine.tick(1.0)
    for device in ("d1", "d2"):
        assert first.send(device, *updates[device], 2.0) == []
    assert _spool_files(tmp_path / "state") == ["plan.json", "update-000001.npz", "update-000002.npz"]
    plan = RoundPlan.model_validate_json((tmp_path / "state" / "open_round" / "plan.json").read_bytes())
    assert (plan.round, plan.base_version, plan.deadline) == (1, 0, 1.0 + TIMEOUT)
    assert [a.device_id for a in plan.assignments] == [t.device_id for t in tasks]
    first.die()

    second = Process(art, tmp_path / "state", now=3.0)
    engine = second.engine
    assert (engine.current_round, engine.record.version, engine.record.round) == (1, 0, 0)
    sent_again = engine.tick(3.0)  # the devices still owing get their tasks again: they may have died with us
    assert [(t.device_id, t.body.round, t.body.model_version, t.body.deadline) for t in sent_again] == \
           [("d3", 1, 0, 3.0 + TIMEOUT), ("d4", 1, 0, 3.0 + TIMEOUT)]
    for before, again in zip(tasks[2:], sent_again):
        _assert_same_weights(again.tensors, before.tensors)
    assert engine.tick(3.1) == []  # once
    assert _reason(second.send("d1", *updates["d1"], 4.0)) is RejectReason.DUPLICATE  # a QoS 1 redelivery
    assert second.send("d3", *updates["d3"], 4.0) == []
    summary = _summary(second.send("d4", *updates["d4"], 5.0))

    assert (summary.round, summary.version, summary.answered, summary.selected) == (1, 1, 4, 4)
    assert summary.bytes_up == clean_summary.bytes_up and summary.loss == clean_summary.loss
    _assert_same_weights(engine.weights, clean.weights)
    _assert_same_weights(StateStore(tmp_path / "state").load("default", engine.artifacts.identity)[1], clean.weights)
    assert second.ledger.counts() == {"accepted": 4, "duplicate": 1}
    assert _accepted_rows(tmp_path / "state") == [(updates[d][0].update_id, 1) for d in ("d1", "d2", "d3", "d4")]
    assert _spool_files(tmp_path / "state") == []  # cleared once state.json holds the round
    # The next round starts from the committed version, with the same tasks the clean run sends.
    assert [(t.device_id, t.body.round, t.body.model_version) for t in engine.tick(6.0)] == \
           [(t.device_id, 2, 1) for t in tasks]
    assert _reason(second.send("d2", *updates["d2"], 7.0)) is RejectReason.DUPLICATE  # still, in the next round
    second.die()


def test_an_update_spooled_just_before_the_crash_is_counted_once_and_written_to_the_ledger(art: Path, tmp_path: Path) -> None:
    updates = _updates()
    clean, _ = _uninterrupted(art, tmp_path / "clean", updates)
    first = Process(art, tmp_path / "state", now=0.0, ledger=_LedgerDyingAfterTheSpool)
    first.engine.tick(1.0)
    first.send("d1", *updates["d1"], 2.0)
    first.send("d2", *updates["d2"], 2.0)
    with pytest.raises(_Crash):
        first.send("d3", *updates["d3"], 2.0)
    first.die()
    ids = [updates[d][0].update_id for d in ("d1", "d2", "d3")]
    assert _accepted_rows(tmp_path / "state") == [(i, 1) for i in ids[:2]]

    second = Process(art, tmp_path / "state", now=3.0)  # re-adds three updates: their order decides the float sum
    assert _accepted_rows(tmp_path / "state") == [(i, 1) for i in ids]  # d3's row written on resume
    assert _reason(second.send("d3", *updates["d3"], 4.0)) is RejectReason.DUPLICATE
    assert _summary(second.send("d4", *updates["d4"], 4.0)).version == 1
    _assert_same_weights(second.engine.weights, clean.weights)
    assert second.ledger.counts() == {"accepted": 4, "duplicate": 1}
    second.die()


def test_a_crash_between_the_commit_and_clearing_the_spool_counts_nothing_twice(art: Path, tmp_path: Path) -> None:
    updates = _updates()
    clean, _ = _uninterrupted(art, tmp_path / "clean", updates)
    first = Process(art, tmp_path / "state", now=0.0)
    first.engine.tick(1.0)
    for device in ("d1", "d2", "d3"):
        first.send(device, *updates[device], 2.0)
    spool = tmp_path / "state" / "open_round"
    shutil.copytree(spool, tmp_path / "spool-before-commit")
    assert _summary(first.send("d4", *updates["d4"], 2.0)).version == 1
    first.die()
    shutil.rmtree(spool, ignore_errors=True)  # as if the process died after writing state.json, before clearing the spool
    shutil.copytree(tmp_path / "spool-before-commit", spool)

    second = Process(art, tmp_path / "state", now=3.0)
    assert second.engine.current_round is None and _spool_files(tmp_path / "state") == []
    assert (second.engine.record.version, second.engine.record.round) == (1, 1)
    _assert_same_weights(second.engine.weights, clean.weights)
    assert _reason(second.send("d3", *updates["d3"], 4.0)) is RejectReason.DUPLICATE
    assert {t.body.round for t in second.engine.tick(5.0)} == {2}
    second.die()


def test_a_resumed_round_gets_a_fresh_timeout_and_waits_for_devices_not_yet_heard_from(art: Path, tmp_path: Path) -> None:
    updates = _updates()
    first = Process(art, tmp_path / "state", now=0.0)
    first.engine.tick(1.0)  # deadline 11
    first.send("d1", *updates["d1"], 2.0)
    first.die()

    # Restarted long after the deadline, before any retained hello is back: nobody is known yet.
    second = Process(art, tmp_path / "state", now=500.0, hello=False)
    assert [t.device_id for t in second.engine.tick(500.0)] == ["d2", "d3", "d4"]  # owed tasks again
    assert second.engine.current_round == 1  # unknown devices are awaited, not taken for gone
    assert second.send("d2", *updates["d2"], 505.0) == []  # sent in time, queued at the broker while we were down
    second.registry.hello("d3", 7, 0, None, "ort-training", now=506.0)
    second.registry.set_online("d3", False, 507.0)  # d3's last will
    assert second.engine.tick(500.0 + TIMEOUT - 0.1) == []  # d4 is still owed
    summary = _summary(second.engine.tick(500.0 + TIMEOUT))
    assert (summary.round, summary.version, summary.answered) == (1, 1, 2)
    assert summary.seconds == 500.0 + TIMEOUT - 1.0  # the round's own start, before the crash
    second.die()


def test_a_round_measuring_batch_norm_statistics_asks_for_them_again(art_bn: Path, tmp_path: Path) -> None:
    devices = {"d1": 100, "d2": 300}
    shapes = ArtifactStore(art_bn).tiers["a"].shapes
    deltas = {d: {n: np.full(s, 0.01 * (i + 1), np.float32) for n, s in shapes.items()} for i, d in enumerate(devices)}
    stats = {d: {n: np.full(shapes[n], 0.5 + i, np.float32) for n in statistic_names(shapes)} for i, d in enumerate(devices)}

    def train(proc: Process) -> list[Outgoing]:
        proc.engine.tick(1.0)
        for device, samples in devices.items():
            body = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=samples, steps=1,
                          train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
            out = proc.send(device, body, deltas[device], 2.0)
        return out

    def measure(proc: Process, device: str, now: float) -> list[Outgoing]:
        body = BnStatistics(round=1, base_version=1, tier="a", num_samples=devices[device])
        return proc.engine.on_bn_statistics(device, new_id(), body, stats[device], now)

    clean = Process(art_bn, tmp_path / "clean", now=0.0, devices=devices)
    asked = train(clean)
    measure(clean, "d1", 3.0)
    assert _summary(measure(clean, "d2", 3.0)).version == 1

    first = Process(art_bn, tmp_path / "state", now=0.0, devices=devices)
    assert [o.device_id for o in train(first)] == ["d1", "d2"]  # statistics tasks
    assert measure(first, "d1", 3.0) == []
    first.die()

    second = Process(art_bn, tmp_path / "state", now=4.0, devices=devices)
    assert second.engine.current_round == 1
    again = second.engine.tick(4.0)  # the training phase is over: the same statistics tasks again
    assert [o.device_id for o in again] == ["d1", "d2"]
    for before, now in zip(asked, again):
        assert isinstance(now.body, MeasureBnStatistics) and now.body.model_version == 1
        _assert_same_weights(now.tensors, before.tensors)
    measure(second, "d1", 5.0)
    assert _summary(measure(second, "d2", 5.0)).version == 1
    _assert_same_weights(second.engine.weights, clean.engine.weights)
    second.die()


def test_a_spool_that_contradicts_the_state_is_a_clear_error(art: Path, tmp_path: Path) -> None:
    updates = _updates()
    first = Process(art, tmp_path / "state", now=0.0)
    first.engine.tick(1.0)
    first.send("d1", *updates["d1"], 2.0)
    first.die()
    spooled = tmp_path / "state" / "open_round" / "update-000001.npz"
    spooled.write_bytes(spooled.read_bytes()[:100])  # damaged behind our back (atomic writes never do this)
    with pytest.raises(SpoolError, match="update-000001.npz is unreadable.*--recover.*open_round"):
        Process(art, tmp_path / "state", now=3.0)
    plan = tmp_path / "state" / "open_round" / "plan.json"
    plan.write_text(plan.read_text().replace('"round": 1', '"round": 7'))
    with pytest.raises(SpoolError, match="holds round 7 on version 0, but the state is at round 0"):
        Process(art, tmp_path / "state", now=3.0)


# --- quantised updates are spooled quantised ------------------------------------------------------

CODECS_BY_DEVICE = {"d1": "int8", "d2": "int8-row", "d3": "int4", "d4": "int8-row"}


def _quantized_updates() -> dict[str, tuple[Update, dict[str, Tensor]]]:
    """The random updates, each as its device's codec decodes it (QuantizedTensor objects)."""
    out = {}
    for device, (body, deltas) in _updates().items():
        frame = encode_frame("f", device, body, deltas, CODECS_BY_DEVICE[device], rng=np.random.default_rng(len(out)))
        tensors = decode_frame(frame).tensors
        assert all(isinstance(t, QuantizedTensor) for t in tensors.values())
        out[device] = body, tensors
    return out


def _entries(file: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A spooled update's metadata (as JSON) and its other entries."""
    with np.load(file, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    return json.loads(arrays.pop("__meta__").tobytes()), arrays


def _rewrite(file: Path, meta: dict, arrays: Mapping[str, np.ndarray]) -> None:
    np.savez(file, **arrays, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8))


def test_a_round_of_quantized_updates_resumes_bit_identical_from_a_quantized_spool(art: Path, tmp_path: Path) -> None:
    updates = _quantized_updates()
    clean, clean_summary = _uninterrupted(art, tmp_path / "clean", updates)

    first = Process(art, tmp_path / "state", now=0.0)
    first.engine.tick(1.0)
    for device in ("d1", "d2", "d3"):
        assert first.send(device, *updates[device], 2.0) == []
    first.die()
    spool = tmp_path / "state" / "open_round"
    kinds = [_entries(spool / f"update-00000{i}.npz")[0]["quantized"] for i in (1, 2, 3)]
    assert [{how["kind"] for how in k.values()} for k in kinds] == [{"int8"}, {"int8-row", "int8"}, {"int4"}]  # biases: one row
    _, arrays = _entries(spool / "update-000003.npz")
    assert set(arrays) == {f"{n}.{part}" for n in SHAPES for part in ("codes", "scales")}
    assert arrays["fc1.weight.codes"].dtype == np.uint8 and arrays["fc1.weight.codes"].size == 16 * 64 // 2

    second = Process(art, tmp_path / "state", now=3.0)
    summary = _summary(second.send("d4", *updates["d4"], 4.0))
    assert (summary.version, summary.answered) == (1, 4) and summary.bytes_up == clean_summary.bytes_up
    _assert_same_weights(second.engine.weights, clean.weights)
    second.die()


def _spool_with(tmp_path: Path, tensors: Mapping[str, Tensor]) -> RoundSpool:
    spool = RoundSpool(tmp_path / "open_round")
    spool.begin(RoundPlan(round=1, base_version=0, started=0.0, deadline=TIMEOUT,
                          assignments=[Assignment("d1", "a", epochs=1, batch_size=8, learning_rate=0.1)]))
    spool.accept("d1", _updates()["d1"][0], 1234, tensors)
    return spool


def _quantized(spec: str, x: np.ndarray, seed: int = 0) -> QuantizedTensor:
    (tensor,) = decode_frame(encode_frame("f", "d1", _updates()["d1"][0], {"t": x}, spec,
                                          rng=np.random.default_rng(seed))).tensors.values()
    assert isinstance(tensor, QuantizedTensor)
    return tensor


@pytest.mark.parametrize("shape", [(30, 20), (7,), (), (0, 3), (3, 0), (2, 3, 5)])
def test_the_spool_gives_back_the_same_codes_scales_and_float32_arrays(tmp_path: Path, shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(9).normal(0, 1, shape).astype(np.float32)
    tensors: dict[str, Tensor] = {f"{spec}": _quantized(spec, x) for spec in ("int8", "int8-row", "int4")}
    tensors["zeros.int4"] = _quantized("int4", np.zeros(shape, np.float32))
    tensors["float32"] = x
    _spool_with(tmp_path, tensors)
    for _ in range(2):  # read back, and once more after spooling what was read (FedBuff re-spools a resumed buffer)
        spooled = RoundSpool(tmp_path / "open_round").load(0, 0)
        assert spooled is not None and len(spooled.updates) == 1
        meta, back = spooled.updates[0]
        assert list(back) == list(tensors) and meta.nbytes == 1234
        assert type(back["float32"]) is np.ndarray and back["float32"].dtype == np.float32
        np.testing.assert_array_equal(back["float32"], x)
        for name, tensor in tensors.items():
            if isinstance(tensor, QuantizedTensor):
                again = back[name]
                assert isinstance(again, QuantizedTensor) and again.shape == tensor.shape
                np.testing.assert_array_equal(again.codes, tensor.codes)
                np.testing.assert_array_equal(again.scales, tensor.scales)
        _spool_with(tmp_path, back)


def test_an_int8_update_is_spooled_at_a_quarter_of_its_float32_size(tmp_path: Path) -> None:
    shapes = {"fc1.weight": (1350, 64), "fc1.bias": (1350,), "fc2.weight": (10, 1350), "fc2.bias": (10,)}  # 101,260
    rng = np.random.default_rng(3)
    deltas = {n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in shapes.items()}
    assert 100_000 <= sum(d.size for d in deltas.values()) <= 102_000
    sizes = {}
    for codec in ("float32", "int8", "int4"):
        tensors = decode_frame(encode_frame("f", "d1", _updates()["d1"][0], deltas, codec, rng=rng)).tensors
        spool = _spool_with(tmp_path / codec, tensors)
        sizes[codec] = (spool.folder / "update-000001.npz").stat().st_size
    assert sizes["float32"] > 4 * 101_260
    assert sizes["int8"] / sizes["float32"] < 0.26
    assert sizes["int4"] / sizes["float32"] < 0.135


@pytest.mark.parametrize("tamper, reason", [
    (lambda meta, arrays: arrays.update({"w.codes": arrays["w.codes"][:-1]}),
     r"tensor 'w' \(int8\): codes are int8\[599\], expected int8\[600\] for shape \[30, 20\]"),
    (lambda meta, arrays: arrays.update({"r.scales": arrays["r.scales"][:-1]}),
     r"tensor 'r' \(int8-row\): scales are float32\[29\], expected float32\[30\]"),
    (lambda meta, arrays: arrays.update({"h.codes": np.append(arrays["h.codes"], np.uint8(0))}),
     r"tensor 'h' \(int4\): codes are uint8\[301\], expected uint8\[300\]"),
    (lambda meta, arrays: meta["quantized"]["w"].update(kind="int3"),
     r"__meta__: quantized.w.kind: Input should be 'int8', 'int8-row' or 'int4'"),
    (lambda meta, arrays: meta["quantized"]["h"].update(kind="int8"),
     r"tensor 'h' \(int8\): codes are uint8\[300\], expected int8\[600\]"),
    (lambda meta, arrays: meta["quantized"]["r"].update(shape=[20, 30]),
     r"tensor 'r' \(int8-row\): scales are float32\[30\], expected float32\[20\]"),
    (lambda meta, arrays: arrays.pop("r.scales"), r"tensor 'r' \(int8-row\): entry r.codes or r.scales is missing"),
    (lambda meta, arrays: arrays.update({"w.codes": arrays["w.codes"].astype(np.int16)}),
     r"tensor 'w' \(int8\): codes are int16\[600\]"),
    (lambda meta, arrays: arrays.update({"w.scales": arrays["w.scales"].astype(np.float64)}),
     r"tensor 'w' \(int8\): scales are float64\[1\]"),
    (lambda meta, arrays: arrays["w.scales"].fill(np.nan), r"tensor 'w' \(int8\): a scale is NaN"),
    (lambda meta, arrays: arrays["r.scales"].__setitem__(3, -1), r"tensor 'r' \(int8-row\): a scale is NaN, Inf, negative"),
    (lambda meta, arrays: arrays["w.codes"].__setitem__(5, -128), r"tensor 'w' \(int8\): a code lies outside \[-127, 127\]"),
    (lambda meta, arrays: arrays["h.codes"].__setitem__(0, 0x80), r"tensor 'h' \(int4\): a code lies outside \[-7, 7\]"),
    (lambda meta, arrays: arrays.update({"w": arrays["p"]}), r"tensor 'w' is stored both quantized and as an array"),
    (lambda meta, arrays: arrays.update({"p": arrays["p"].astype(np.float64)}), r"tensor 'p' is float64, not float32"),
    (lambda meta, arrays: meta["quantized"].update(gone={"kind": "int8", "shape": [2]}),
     r"quantized tensors \['gone'\] have no entries"),
])
def test_an_inconsistent_quantized_spool_is_refused_with_a_clear_error(tmp_path: Path, tamper, reason: str) -> None:
    x = np.random.default_rng(4).normal(0, 1, (30, 20)).astype(np.float32)
    _spool_with(tmp_path, {"w": _quantized("int8", x), "r": _quantized("int8-row", x), "h": _quantized("int4", x), "p": x})
    file = tmp_path / "open_round" / "update-000001.npz"
    meta, arrays = _entries(file)
    assert RoundSpool(tmp_path / "open_round").load(0, 0) is not None  # as written, it reads back
    tamper(meta, arrays)
    _rewrite(file, meta, arrays)
    with pytest.raises(SpoolError, match=f"update-000001.npz is unreadable \\({reason}.*\\); run .*--recover.*open_round"):
        RoundSpool(tmp_path / "open_round").load(0, 0)


def test_a_spool_written_before_quantized_entries_existed_still_reads_back(tmp_path: Path) -> None:
    x = np.random.default_rng(5).normal(0, 1, (4, 3)).astype(np.float32)
    _spool_with(tmp_path, {"w": x})
    file = tmp_path / "open_round" / "update-000001.npz"
    meta, arrays = _entries(file)
    del meta["quantized"]  # what the spool wrote before: every tensor float32, no "quantized" key
    _rewrite(file, meta, arrays)
    spooled = RoundSpool(tmp_path / "open_round").load(0, 0)
    assert spooled is not None
    np.testing.assert_array_equal(spooled.updates[0][1]["w"], x)


def test_an_int4_spool_with_a_non_zero_padding_nibble_is_refused(tmp_path: Path) -> None:
    _spool_with(tmp_path, {"h": _quantized("int4", np.linspace(-1, 1, 7, dtype=np.float32))})
    file = tmp_path / "open_round" / "update-000001.npz"
    meta, arrays = _entries(file)
    arrays["h.codes"][-1] |= 0x10
    _rewrite(file, meta, arrays)
    with pytest.raises(SpoolError, match=r"tensor 'h' \(int4\): the padding nibble is not zero"):
        RoundSpool(tmp_path / "open_round").load(0, 0)


def test_a_spool_entry_claiming_more_than_memory_or_not_decompressing_and_an_unreadable_plan_are_refused(
        tmp_path: Path) -> None:
    _spool_with(tmp_path, {"w": np.zeros(3, np.float32)})
    file = tmp_path / "open_round" / "update-000001.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**16,)})
    with zipfile.ZipFile(file, "a") as archive:  # a 36 PiB array (past any address space), then 16 bytes
        archive.writestr("huge.npy", header.getvalue() + bytes(16))
    with pytest.raises(SpoolError, match=r"update-000001.npz is unreadable \(Unable to allocate.*\); run .*--recover"):
        RoundSpool(tmp_path / "open_round").load(0, 0)  # was a MemoryError traceback
    _spool_with(tmp_path, {"w": np.zeros(3, np.float32)})
    with zipfile.ZipFile(file, "a", zipfile.ZIP_DEFLATED) as archive:  # a deflated entry, its data then damaged
        archive.writestr("deflated.npy", bytes(400))
        start = archive.getinfo("deflated.npy").header_offset + 30 + len("deflated.npy")
    damaged = bytearray(file.read_bytes())
    damaged[start:start + 8] = b"\xff" * 8
    file.write_bytes(bytes(damaged))
    with pytest.raises(SpoolError, match=r"update-000001.npz is unreadable \(Error -3 while decompressing.*\); run"):
        RoundSpool(tmp_path / "open_round").load(0, 0)  # was a zlib.error traceback
    plan = tmp_path / "open_round" / "plan.json"
    plan.unlink()
    plan.mkdir()
    with pytest.raises(SpoolError, match=r"plan.json is unreadable \(\[Errno 21\] Is a directory.*\); run .*--recover"):
        RoundSpool(tmp_path / "open_round").load(0, 0)  # was an IsADirectoryError traceback


def test_an_inconsistent_quantized_spool_stops_the_aggregator_from_starting(art: Path, tmp_path: Path) -> None:
    updates = _quantized_updates()
    first = Process(art, tmp_path / "state", now=0.0)
    first.engine.tick(1.0)
    first.send("d2", *updates["d2"], 2.0)
    first.die()
    file = tmp_path / "state" / "open_round" / "update-000001.npz"
    meta, arrays = _entries(file)
    arrays["fc1.weight.scales"] = arrays["fc1.weight.scales"][:8]
    _rewrite(file, meta, arrays)
    with pytest.raises(SpoolError, match=r"update-000001.npz is unreadable \(tensor 'fc1.weight' \(int8-row\): scales are "
                                         r"float32\[8\], expected float32\[16\]\); run .*--recover.*open_round"):
        Process(art, tmp_path / "state", now=3.0)
