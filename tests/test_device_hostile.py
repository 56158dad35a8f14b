"""A device agent fed hostile downlink frames (issue 13, case 6): it refuses each cleanly and keeps training.

The agent is real (real cache, real ONNX Runtime on an exported 8x8 MLP tier); only its MQTT
link is a stand-in that records what it publishes and answers each Fetch with blobs from the
export, signed by the aggregator's key, the way the aggregator does.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from aggregator.store.artifacts import ArtifactStore
from edge_client.agent import ClientConfig, DeviceAgent
from edge_client.cache import ArtifactCache, CacheFull
from models.data import load_dataset, train_test_split
from models.export import export_all
from models.manifest import TierManifest
from models.zoo import ModelSpec
from protocol.frame import decode_frame, encode_frame
from protocol.messages import (AttachedWeights, Blob, Fetch, Hello, Query, Reject, RejectReason, Status, Task,
                               TrainTask, Update)
from protocol.mqtt.url import parse as parse_broker
from protocol.signing import KEY_ANNOUNCEMENT, DeviceKey, key_announcement

MLP = ModelSpec(arch="mlp", hidden=(16,))
FLEET, DEVICE, AGGREGATOR = "f", "dev", "aggregator"
DOWN = f"tierfl/v1/{FLEET}/down/{DEVICE}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art")
    export_all(MLP, ["a"], out)
    return out


@pytest.fixture(scope="module")
def data():
    return train_test_split(load_dataset("digits").subset(list(range(200))), 0.2, seed=0)


class Aggregator:
    """The aggregator's side of the downlink: a key, the export, and frames signed (or not) like it sends them."""

    def __init__(self, folder: Path, exported: Path) -> None:
        self.key = DeviceKey(folder, file_name="aggregator.key")
        self.store = ArtifactStore(exported)
        self.tier = self.store.tiers["a"]

    def frame(self, body, tensors=None, codec: str = "float32", signer=None, signed: bool = True) -> bytes:
        sign = signer if signer is not None else (self.key.sign if signed else None)
        return encode_frame(FLEET, AGGREGATOR, body, tensors, codec, signer=sign)

    def task(self, round_number: int, **changes) -> Task:
        fields = dict(round=round_number, model_version=round_number - 1, tier="a",
                      manifest_sha256=self.tier.manifest_sha256, artifacts=self.tier.files, epochs=1, batch_size=32,
                      learning_rate=0.1, deadline=time.time() + 60, evaluate=False)
        return TrainTask.model_construct(**(fields | changes))  # unchecked: hostile tasks may break the schema's bounds

    def weights(self, scale: float = 1.0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        return {n: (rng.normal(0, 0.1, s) * scale).astype(np.float32) for n, s in self.tier.shapes.items()}

    def blob(self, sha: str) -> bytes:
        name, content = self.store.read(sha)
        return self.frame(Blob(sha256=sha, name=name), {"data": np.frombuffer(content, np.uint8)}, "uint8")


class Link:
    """Stands in for MqttLink: records what the agent publishes and answers its fetches with signed blobs."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator
        self.agent: DeviceAgent | None = None
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, frame: bytes, retain: bool = False) -> int:
        self.published.append((topic, frame))
        body = decode_frame(frame).body
        if isinstance(body, Fetch) and self.agent is not None:
            for sha in body.sha256:
                if self.aggregator.store.read(sha) is not None:  # the aggregator rejects unknown ones
                    self.agent._on_frame(DOWN, self.aggregator.blob(sha))
        return len(frame)

    def stop(self, flush_timeout_s: float = 0.0) -> None:
        pass

    def bodies(self, kind: type) -> list:
        return [body for body in (decode_frame(frame).body for _, frame in self.published) if isinstance(body, kind)]


def make_agent(tmp_path: Path, aggregator: Aggregator, data, trusted: bool = True, **options) -> tuple[DeviceAgent, Link]:
    config = ClientConfig(broker=parse_broker("mqtt://127.0.0.1:1"), device_id=DEVICE, fleet=FLEET,
                          cache_dir=tmp_path / "cache", aggregator_key=aggregator.key.public_hex if trusted else None,
                          **options)
    agent = DeviceAgent(config, *data)
    link = Link(aggregator)
    agent.link = link  # type: ignore[assignment]
    link.agent = agent
    return agent, link


@contextmanager
def working(agent: DeviceAgent) -> Iterator[threading.Thread]:
    """The agent's device loop, serving its inbox and running tasks until the block ends."""
    worker = threading.Thread(target=agent._loop, daemon=True)
    worker.start()
    try:
        yield worker
    finally:
        agent._closing.set()
        worker.join(30)


def settle(agent: DeviceAgent, timeout: float = 30) -> None:
    """Wait until the device loop has handled everything queued and finished every task it took."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if idle(agent):
            time.sleep(0.05)
            if idle(agent):
                return
        time.sleep(0.02)
    raise AssertionError("the agent did not finish its tasks")


def idle(agent: DeviceAgent) -> bool:
    return not len(agent.inbox) and not agent._tasks and agent._current is None


def run(agent: DeviceAgent, frame: bytes) -> None:
    agent._on_frame(DOWN, frame)
    settle(agent)


def test_unsigned_and_wrongly_signed_downlink_frames_are_refused_and_never_acted_on(tmp_path, exported, data):
    aggregator = Aggregator(tmp_path / "agg", exported)
    mallory = DeviceKey(tmp_path / "mallory")
    agent, link = make_agent(tmp_path, aggregator, data)
    task = aggregator.task(1)
    for signer, signed in ((None, False), (mallory.sign, True)):
        agent._on_frame(DOWN, aggregator.frame(task, aggregator.weights(), signer=signer, signed=signed))
        agent._on_frame(DOWN, aggregator.frame(Reject(reason=RejectReason.UNKNOWN_DEVICE, detail="x"),
                                               signer=signer, signed=signed))
        sha = aggregator.tier.manifest_sha256
        name, content = aggregator.store.read(sha)
        agent._on_frame(DOWN, aggregator.frame(Blob(sha256=sha, name=name), {"data": np.frombuffer(content, np.uint8)},
                                               "uint8", signer=signer, signed=signed))
    assert agent.refused == {"bad_signature": 6}
    assert not len(agent.inbox) and not agent.cache.has(aggregator.tier.manifest_sha256) and link.published == []
    agent._on_frame(DOWN, aggregator.frame(task, aggregator.weights()))  # signed by the trusted key
    assert len(agent.inbox) == 1


def test_trust_on_first_use_pins_the_announced_key_then_refuses_any_other(tmp_path, exported, data, caplog):
    aggregator = Aggregator(tmp_path / "agg", exported)
    impostor = Aggregator(tmp_path / "impostor", exported)
    agent, _ = make_agent(tmp_path, aggregator, data, trusted=False)
    body, tensors = key_announcement(aggregator.key)
    with caplog.at_level(logging.WARNING):
        agent._on_frame(DOWN, aggregator.frame(body, tensors, "uint8"))
    assert "TRUST ON FIRST USE" in caplog.text and aggregator.key.public_hex in caplog.text
    pinned = tmp_path / "cache" / KEY_ANNOUNCEMENT
    assert aggregator.key.public_hex in pinned.read_text()
    body, tensors = key_announcement(impostor.key)
    agent._on_frame(DOWN, impostor.frame(body, tensors, "uint8"))  # a later announcement of another key
    agent._on_frame(DOWN, aggregator.frame(aggregator.task(1), aggregator.weights(), signed=False))
    agent._on_frame(DOWN, impostor.frame(aggregator.task(1), aggregator.weights()))
    assert agent.refused == {"bad_signature": 3} and not len(agent.inbox)
    assert aggregator.key.public_hex in pinned.read_text()
    again, _ = make_agent(tmp_path, aggregator, data, trusted=False)  # the next start keeps the pinned key
    again._on_frame(DOWN, impostor.frame(aggregator.task(1), aggregator.weights()))
    again._on_frame(DOWN, aggregator.frame(aggregator.task(1), aggregator.weights()))
    assert again.refused == {"bad_signature": 1} and len(again.inbox) == 1


def test_malformed_tasks_are_refused_and_the_agent_takes_the_next(tmp_path, exported, data):
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, link = make_agent(tmp_path, aggregator, data)
    good = aggregator.weights()
    name = next(iter(good))
    many = dict(aggregator.tier.files) | {f"x{i}.onnx": hashlib.sha256(b"%d" % i).hexdigest() for i in range(100)}
    with working(agent) as worker:
        run(agent, aggregator.frame(aggregator.task(1, artifacts=many), good))
        assert link.bodies(Fetch) == []  # refused before anything is fetched
        wrong_shape = good | {name: np.zeros((3, 3), np.float32)}
        run(agent, aggregator.frame(aggregator.task(2), wrong_shape))
        run(agent, aggregator.frame(aggregator.task(3), good | {"extra": np.zeros(2, np.float32)}))
        run(agent, aggregator.frame(aggregator.task(4), {n: v.view(np.uint8) for n, v in good.items()}, "uint8"))
        run(agent, aggregator.frame(aggregator.task(5), good | {name: np.full_like(good[name], np.nan)}))
        run(agent, aggregator.frame(aggregator.task(6), good))  # honest: trains, holds version 5
        run(agent, aggregator.frame(aggregator.task(7, weights=AttachedWeights(delta_from=5)), {name: np.zeros(7, np.float32)}))
        run(agent, aggregator.frame(aggregator.task(8, weights=AttachedWeights(delta_from=5)), {name: np.zeros_like(good[name])}))  # honest
        assert worker.is_alive()
    assert agent.refused == {"malformed": 1, "bad_tensor": 5}  # too many artifacts: malformed (schema or agent)  # NaN weights: the float32 decoder refuses them
    assert [u.round for u in link.bodies(Update)] == [6, 8] and agent.tasks_done == 2


def test_a_signed_task_replayed_after_its_deadline_is_refused_as_replayed(tmp_path, exported, data):
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, link = make_agent(tmp_path, aggregator, data)
    with working(agent):
        run(agent, aggregator.frame(aggregator.task(1, deadline=time.time() - 30), aggregator.weights()))
        run(agent, aggregator.frame(aggregator.task(2), aggregator.weights()))  # honest: trains
    assert agent.refused == {"replayed": 1}
    assert link.bodies(Fetch)[0].sha256 and [u.round for u in link.bodies(Update)] == [2]


def test_an_analytics_query_sent_twice_or_after_its_deadline_is_refused_as_replayed(tmp_path, exported, data):
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, _ = make_agent(tmp_path, aggregator, data)
    query = Query(query="0" * 32, round=1, computation="sample_count", deadline=time.time() + 60, input_shape=[1, 8, 8],
                  classes=10)
    frame = aggregator.frame(query)
    agent._on_frame(DOWN, frame)
    agent._on_frame(DOWN, frame)  # the same signed query again: taken already
    agent._on_frame(DOWN, aggregator.frame(query.model_copy(update={"round": 2, "deadline": time.time() - 30})))
    assert agent.refused == {"replayed": 2} and len(agent.inbox) == 1


def test_nan_after_training_abandons_the_round_and_keeps_the_error_feedback_state(tmp_path, exported, data):
    """A lossy codec cannot encode NaN: the round is dropped whole (declined: an update with no tensors), the residual
    of the last round stays."""
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, link = make_agent(tmp_path, aggregator, data, codec="int8")
    residual = tmp_path / "cache" / "residual-a.npz"
    with working(agent) as worker:
        run(agent, aggregator.frame(aggregator.task(1), aggregator.weights()))
        kept = residual.read_bytes()
        run(agent, aggregator.frame(aggregator.task(2, learning_rate=10), aggregator.weights(scale=1e37)))
        assert agent.refused == {"non_finite": 1} and residual.read_bytes() == kept
        run(agent, aggregator.frame(aggregator.task(3), aggregator.weights()))
        assert worker.is_alive()
    assert [(u.round, u.declined) for u in link.bodies(Update)] == [(1, False), (2, True), (3, False)]


def test_an_update_refused_for_what_it_carries_is_declined_once_and_a_stale_one_is_not(tmp_path, exported, data):
    """The aggregator refuses the update of round 2 as an outlier: the device declines round 2 (no tensors), once, and
    takes back the change that update made to its error-feedback residual; a refusal of round 3's update as stale needs
    no answer; a refusal naming no update of ours changes nothing."""
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, link = make_agent(tmp_path, aggregator, data, codec="int8")

    def updates() -> list:
        return [decode_frame(f) for _, f in link.published if isinstance(decode_frame(f).body, Update)]

    def residual() -> dict[str, np.ndarray]:
        with np.load(tmp_path / "cache" / "residual-a.npz") as saved:
            return {name: saved[name] for name in saved.files}

    with working(agent):
        run(agent, aggregator.frame(aggregator.task(1), aggregator.weights()))
        kept = residual()
        run(agent, aggregator.frame(aggregator.task(2), aggregator.weights()))
        assert any(not np.allclose(residual()[n], kept[n], atol=1e-6) for n in kept)
        outlier = Reject(reason=RejectReason.OUTLIER, detail="norm 23", ref_msg_id=updates()[-1].header.msg_id, round=2)
        run(agent, aggregator.frame(outlier))
        for name, value in residual().items():
            np.testing.assert_allclose(value, kept[name], atol=1e-6, err_msg=name)
        run(agent, aggregator.frame(outlier))  # the same refusal again: answered already
        run(agent, aggregator.frame(Reject(reason=RejectReason.OUTLIER, detail="", ref_msg_id="0" * 32, round=2)))
        run(agent, aggregator.frame(aggregator.task(3), aggregator.weights()))
        run(agent, aggregator.frame(Reject(reason=RejectReason.STALE_ROUND, detail="", ref_msg_id=updates()[-1].header.msg_id,
                                           round=3)))
    assert [(u.body.round, u.body.declined, bool(u.tensors)) for u in updates()] == [
        (1, False, True), (2, False, True), (2, True, False), (3, False, True)]


def test_an_exception_inside_a_task_is_logged_and_the_agent_keeps_working(tmp_path, exported, data, caplog, monkeypatch):
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, link = make_agent(tmp_path, aggregator, data)
    with working(agent) as worker:
        run(agent, aggregator.frame(aggregator.task(1), aggregator.weights()))
        trainer = next(iter(agent._trainers.values()))
        monkeypatch.setattr(trainer, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with caplog.at_level(logging.ERROR):
            run(agent, aggregator.frame(aggregator.task(2), aggregator.weights()))
        assert "the task failed and is abandoned" in caplog.text and "RuntimeError: boom" in caplog.text
        monkeypatch.undo()
        run(agent, aggregator.frame(aggregator.task(3), aggregator.weights()))
        assert worker.is_alive()
    assert agent.refused == {"internal_error": 1}
    assert [u.round for u in link.bodies(Update)] == [1, 3]


def test_a_task_whose_artifacts_exceed_the_cache_bound_is_refused_after_its_manifest_only(tmp_path, exported, data):
    aggregator = Aggregator(tmp_path / "agg", exported)
    manifest = aggregator.tier.manifest
    bound_mb = (manifest.artifact_bytes - 1) / 1e6
    agent, link = make_agent(tmp_path, aggregator, data, cache_max_mb=bound_mb)
    with working(agent):
        run(agent, aggregator.frame(aggregator.task(1), aggregator.weights()))
    assert agent.refused == {"oversize": 1}
    assert [f.sha256 for f in link.bodies(Fetch)] == [[aggregator.tier.manifest_sha256]]
    assert agent.cache.size() <= bound_mb * 1e6


def test_blobs_in_use_never_push_the_cache_over_its_bound(tmp_path):
    cache = ArtifactCache(tmp_path, max_bytes=500)
    blobs = {hashlib.sha256(c * 200).hexdigest(): c * 200 for c in (b"a", b"b", b"c")}  # 600 bytes, all in use
    cache.use(blobs)
    stored = list(blobs.items())
    for sha, content in stored[:2]:
        cache.put(sha, content)
    with pytest.raises(CacheFull, match="does not fit beside the artifacts in use"):
        cache.put(*stored[2])
    assert cache.size() == 400 and not cache.has(stored[2][0])


def _hostile_export(exported: Path, out: Path, name: str, content: bytes) -> Path:
    """A copy of the export whose tier a file `name` is `content`, its manifest updated to match."""
    shutil.copytree(exported, out)
    manifest_path = out / "a" / "manifest.json"
    manifest = TierManifest.load(manifest_path)
    (out / "a" / name).write_bytes(content)
    files = dict(manifest.files)
    files[name] = files[name].model_copy(update={"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)})
    manifest.model_copy(update={"files": files}).save(manifest_path)
    return out


def test_an_onnx_file_reading_external_data_is_refused_before_any_session(tmp_path, exported, data):
    from tests.test_onnx_guard import external_tensor, model  # built with the dev venv's onnx; the device has none

    hostile = model([], initializers=[external_tensor("w", "../../device.key")]).SerializeToString()
    aggregator = Aggregator(tmp_path / "agg", _hostile_export(exported, tmp_path / "hostile", "forward.onnx", hostile))
    agent, link = make_agent(tmp_path, aggregator, data, backend="portable")
    with working(agent) as worker:
        run(agent, aggregator.frame(aggregator.task(1), aggregator.weights()))
        assert worker.is_alive()
    assert agent.refused == {"unknown_artifact": 1} and agent._trainers == {} and link.bodies(Update) == []


def test_hello_and_offline_status_carry_a_fresh_session_per_start(tmp_path, exported, data):
    aggregator = Aggregator(tmp_path / "agg", exported)
    first, link = make_agent(tmp_path, aggregator, data)
    first._announce()
    worker = threading.Thread(target=first._loop)
    worker.start()
    first._leave(worker)
    (hello,), (offline,) = link.bodies(Hello), link.bodies(Status)
    assert hello.session == offline.session == first.session and offline.online is False
    second, _ = make_agent(tmp_path, aggregator, data)
    assert second.session != first.session
