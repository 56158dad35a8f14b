"""A tier's files without a task: the aggregator service's answer to a CatalogueRequest (registered devices only,
within the fetch budget, unknown tiers refused) and the device agent's use of it (ask_tier), no broker needed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.inbox import Inbox
from aggregator.registry import DeviceRegistry
from aggregator.service import FETCHES_PER_MINUTE, AggregatorService
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from edge_client.agent import TaskRefused
from edge_client.onnx_guard import check_onnx_folder
from protocol.frame import decode_frame, encode_frame, read_header
from protocol.messages import Blob, Catalogue, CatalogueRequest, Fetch, Hello, Reject, RejectReason
from protocol.mqtt.url import parse
from protocol.signing import DeviceKey, SignatureCheck
from protocol.topics import Topics
from protocol.trust import AggregatorTrust
from tests.test_device_hostile import DOWN, Aggregator, data, exported, make_agent, working  # noqa: F401 (fixtures)
from tests.test_service_hostile import art_dir  # noqa: F401 (a fixture)

FLEET = "f1"


class Recorder:
    """Stands in for the service's MqttLink: keeps what it publishes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, frame: bytes, retain: bool = False) -> int:
        self.sent.append((topic, frame))
        return len(frame)

    def bodies(self) -> list:
        return [decode_frame(frame).body for _, frame in self.sent]


def _service(art: Path, tmp_path: Path) -> tuple[AggregatorService, Recorder]:
    engine = RoundEngine(EngineParts(EngineConfig(fleet=FLEET, rounds=3, min_updates=1, round_timeout_s=60.0),
                                     FedAvg(min_clients=50, fraction=1.0), ArtifactStore(art), StateStore(tmp_path / "s"),
                                     DeviceRegistry(), None))
    service = AggregatorService(engine, parse("mqtt://127.0.0.1:1883"), inbox=Inbox(),
                                key=DeviceKey(tmp_path / "key", file_name="aggregator.key"))
    recorder = Recorder()
    service.link = recorder  # type: ignore[assignment]
    return service, recorder


def _ask(service: AggregatorService, device: str, tier: str, now: float = 100.0) -> str:
    """Deliver a catalogue request of `device`; its msg_id."""
    frame = encode_frame(FLEET, device, CatalogueRequest(tier=tier))
    service.handle_safely(Topics(FLEET).up(device), frame, now)
    return read_header(frame).header.msg_id


def _hello(service: AggregatorService, device: str) -> None:
    service.handle_safely(Topics(FLEET).status(device), encode_frame(FLEET, device, Hello(num_samples=10)), 99.0)


def test_a_registered_device_gets_the_tiers_files_signed_and_bound_to_its_request(art_dir, tmp_path):
    service, recorder = _service(art_dir, tmp_path)
    _hello(service, "d1")
    recorder.sent.clear()  # the key announcement
    msg_id = _ask(service, "d1", "a")
    (topic, frame), = recorder.sent
    tier = service.artifacts.tiers["a"]
    assert topic == Topics(FLEET).down("d1")
    answer = decode_frame(frame).body
    assert answer == Catalogue(tier="a", manifest_sha256=tier.manifest_sha256, artifacts=tier.files, request=msg_id)
    trust = AggregatorTrust(tmp_path / "device", service.key.public_hex, verifiable=True)
    trust.verify(read_header(frame).header)  # signed with the aggregator's key, as every downlink frame
    assert service.engine.rejected == {} and service.engine.view() is None  # no round was opened for it


def test_an_unregistered_device_gets_no_catalogue(art_dir, tmp_path):
    service, recorder = _service(art_dir, tmp_path)
    _ask(service, "eve", "a")
    assert service.engine.rejected == {"unknown_device": 1}
    assert not [body for body in recorder.bodies() if isinstance(body, Catalogue)]


def test_an_unknown_tier_is_refused_naming_the_request_and_the_tiers_there_are(art_dir, tmp_path):
    service, recorder = _service(art_dir, tmp_path)
    _hello(service, "d1")
    msg_id = _ask(service, "d1", "e")
    refusal, = [body for body in recorder.bodies() if isinstance(body, Reject)]
    assert refusal.reason is RejectReason.UNKNOWN_TIER and refusal.ref_msg_id == msg_id
    assert refusal.detail == "tier 'e' is not exported (have: a)"
    assert not [body for body in recorder.bodies() if isinstance(body, Catalogue)]


def test_catalogue_requests_share_the_devices_fetch_budget(art_dir, tmp_path):
    service, recorder = _service(art_dir, tmp_path)
    _hello(service, "d1")
    sha = service.artifacts.tiers["a"].manifest_sha256
    for _ in range(FETCHES_PER_MINUTE - 1):
        service.handle_safely(Topics(FLEET).up("d1"), encode_frame(FLEET, "d1", Fetch(sha256=[sha])), 100.0)
    _ask(service, "d1", "a")  # the budget's last
    msg_id = _ask(service, "d1", "a")
    assert service.engine.rejected == {"rate_limited": 1}
    assert len([body for body in recorder.bodies() if isinstance(body, Catalogue)]) == 1
    assert [body.ref_msg_id for body in recorder.bodies() if isinstance(body, Reject)] == [msg_id]
    _ask(service, "d1", "a", now=161.0)  # a minute later
    assert len([body for body in recorder.bodies() if isinstance(body, Catalogue)]) == 2


class CatalogueLink:
    """The device's link, answering catalogue requests as the aggregator does (or with `answer`)."""

    def __init__(self, link, aggregator: Aggregator, answer=None) -> None:
        self.link, self.aggregator, self.answer = link, aggregator, answer

    def publish(self, topic: str, frame: bytes, retain: bool = False) -> int:
        body = decode_frame(frame).body
        if isinstance(body, CatalogueRequest):
            tier = self.aggregator.tier
            msg_id = read_header(frame).header.msg_id
            reply = self.answer(body, msg_id) if self.answer else Catalogue(
                tier=body.tier, manifest_sha256=tier.manifest_sha256, artifacts=tier.files, request=msg_id)
            self.link.agent._on_frame(DOWN, self.aggregator.frame(reply) if not isinstance(reply, bytes) else reply)
        return self.link.publish(topic, frame, retain)

    def stop(self, flush_timeout_s: float = 0.0) -> None:
        pass


def _asking_agent(tmp_path, exported, data, answer=None):  # noqa: F811
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, link = make_agent(tmp_path, aggregator, data)
    agent.link = CatalogueLink(link, aggregator, answer)  # type: ignore[assignment]
    agent._announce()
    return agent, link, aggregator


def test_the_device_fetches_an_asked_tier_into_its_cache_and_checks_it(tmp_path, exported, data):  # noqa: F811
    agent, link, aggregator = _asking_agent(tmp_path, exported, data)
    with working(agent):
        folder = agent.ask_tier("a", 30).result(30)
    assert sorted(p.name for p in folder.iterdir()) == sorted(aggregator.tier.files)
    check_onnx_folder(folder)
    assert not agent.cache.missing(aggregator.tier.files)
    assert link.bodies(Fetch)[0].sha256 == [aggregator.tier.manifest_sha256] and len(link.bodies(Fetch)) == 2
    assert agent.refused == {}


def test_the_device_refuses_a_catalogue_of_a_request_it_did_not_make_and_a_wrong_signature(tmp_path, exported, data):  # noqa: F811
    impostor = DeviceKey(tmp_path / "impostor", file_name="aggregator.key")

    def forged(body, msg_id):
        tier = aggregator_.tier
        return encode_frame("f", "aggregator", Catalogue(tier=body.tier, manifest_sha256=tier.manifest_sha256,
                                                         artifacts=tier.files, request=msg_id), signer=impostor.sign)

    aggregator_ = Aggregator(tmp_path / "agg", exported)
    agent, link, _ = _asking_agent(tmp_path, exported, data, answer=forged)
    with working(agent):
        asked = agent.ask_tier("a", 2)
        with pytest.raises(Exception) as failed:
            asked.result(10)
        assert not isinstance(failed.value, TaskRefused)  # nothing came: it timed out
        tier = aggregator_.tier
        agent._on_frame(DOWN, aggregator_.frame(Catalogue(tier="a", manifest_sha256=tier.manifest_sha256,
                                                          artifacts=tier.files, request="0" * 32)))
        deadline = time.monotonic() + 10
        while not agent.refused["replayed"] and time.monotonic() < deadline:
            time.sleep(0.02)
    assert agent.refused["bad_signature"] == 1 and agent.refused["replayed"] == 1
    assert link.bodies(Fetch) == [] and link.bodies(Blob) == []


def test_the_device_fails_an_ask_the_aggregator_refuses(tmp_path, exported, data):  # noqa: F811
    agent, link, aggregator = _asking_agent(
        tmp_path, exported, data,
        answer=lambda body, msg_id: Reject(reason=RejectReason.UNKNOWN_TIER, detail="no", ref_msg_id=msg_id))
    with working(agent):
        with pytest.raises(TaskRefused) as refused:
            agent.ask_tier("e", 30).result(30)
    assert refused.value.reason is RejectReason.UNKNOWN_TIER and link.bodies(Fetch) == []
