"""The aggregator service's receipt of hostile frames, one check at a time (no broker needed: the link is not started)."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.inbox import Inbox
from aggregator.registry import DeviceRegistry
from aggregator.service import FETCHES_PER_MINUTE, REJECTS_PER_MINUTE, AggregatorService
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from models.export import export_all
from models.zoo import ModelSpec
from protocol.frame import FrameError, encode_frame
from protocol.messages import Fetch, FrameHeader, Hello, RejectReason, Status, Update, new_id
from protocol.mqtt.url import parse
from protocol.signing import DeviceKey, SignatureCheck
from protocol.topics import Topics
from tests.conftest import peak_traced_bytes
from tests.test_secure_round import FLEET as SECURE_FLEET
from tests.test_secure_round import START as SECURE_START
from tests.test_secure_round import Fleet

FLEET = "f1"
SPEC = ModelSpec(arch="mlp", image_size=8, hidden=(16,))


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art")
    export_all(SPEC, ["a"], out)
    return out


def _service(art: Path, state: Path, registry: DeviceRegistry | None = None) -> AggregatorService:
    engine = RoundEngine(EngineParts(EngineConfig(fleet=FLEET, rounds=3, min_updates=1, round_timeout_s=60.0),
                                     FedAvg(min_clients=50, fraction=1.0), ArtifactStore(art), StateStore(state),
                                     DeviceRegistry() if registry is None else registry, None))
    return AggregatorService(engine, parse("mqtt://127.0.0.1:1883"), inbox=Inbox())


def _deliver(service: AggregatorService, topic: str, frame: bytes | FrameError, now: float = 100.0) -> None:
    service.handle_safely(topic, frame, now)


def _hello(device: str, **fields: object) -> bytes:
    return encode_frame(FLEET, device, Hello(num_samples=10, **fields))  # type: ignore[arg-type]


def test_a_refused_update_does_not_touch_the_registry(art_dir: Path, tmp_path: Path) -> None:
    service, topics = _service(art_dir, tmp_path / "state"), Topics(FLEET)
    _deliver(service, topics.status("d1"), _hello("d1"), now=100.0)
    seen = service.registry.get("d1").last_seen
    update = Update(update_id=new_id(), round=7, base_version=0, tier="a", num_samples=10, steps=1, train_loss=1.0,
                    train_accuracy=0.5, train_seconds=0.1)
    _deliver(service, topics.up("d1"), encode_frame(FLEET, "d1", update, {"fc1.weight": np.zeros((2, 2), np.float32)}), 200.0)
    assert service.engine.rejected["bad_tensor"] == 1
    info = service.registry.get("d1")
    assert info.last_seen == seen and info.holds == {}


def test_a_fetch_from_an_unregistered_sender_gets_nothing(art_dir: Path, tmp_path: Path) -> None:
    service, topics = _service(art_dir, tmp_path / "state"), Topics(FLEET)
    sha = next(iter(service.artifacts.tiers["a"].files.values()))
    _deliver(service, topics.up("eve"), encode_frame(FLEET, "eve", Fetch(sha256=[sha])))
    assert service.engine.rejected == {"unknown_device": 1}


def test_fetches_are_rate_limited_per_device(art_dir: Path, tmp_path: Path) -> None:
    service, topics = _service(art_dir, tmp_path / "state"), Topics(FLEET)
    sha = service.artifacts.tiers["a"].manifest_sha256
    _deliver(service, topics.status("d1"), _hello("d1"))
    for _ in range(FETCHES_PER_MINUTE + 5):
        _deliver(service, topics.up("d1"), encode_frame(FLEET, "d1", Fetch(sha256=[sha] * 64)), now=101.0)
    assert service.engine.rejected["rate_limited"] == 5


def test_a_replayed_older_hello_is_refused(art_dir: Path, tmp_path: Path) -> None:
    service, topics = _service(art_dir, tmp_path / "state"), Topics(FLEET)
    old = _hello("d1", session="a" * 32)
    new = _hello("d1", session="b" * 32)
    _deliver(service, topics.status("d1"), new)
    _deliver(service, topics.status("d1"), old)
    assert service.engine.rejected["replayed"] == 1
    assert service.registry.get("d1").session == "b" * 32


def test_a_status_of_another_session_is_refused(art_dir: Path, tmp_path: Path) -> None:
    service, topics = _service(art_dir, tmp_path / "state"), Topics(FLEET)
    _deliver(service, topics.status("d1"), _hello("d1", session="b" * 32))
    _deliver(service, topics.status("d1"), encode_frame(FLEET, "d1", Status(online=False, session="a" * 32)))
    assert service.engine.rejected["replayed"] == 1
    assert service.registry.get("d1").online
    _deliver(service, topics.status("d1"), encode_frame(FLEET, "d1", Status(online=False, session="b" * 32)))
    assert not service.registry.get("d1").online


def test_a_retained_status_of_a_device_never_met_is_not_reported(art_dir: Path, tmp_path: Path, caplog) -> None:
    """An earlier run's devices left their offline statuses retained: a new run says nothing of them."""
    service, topics = _service(art_dir, tmp_path / "state"), Topics(FLEET)
    with caplog.at_level("INFO", logger="aggregator.service"):
        _deliver(service, topics.status("old"), encode_frame(FLEET, "old", Status(online=False)))
    assert "old is offline" not in caplog.text and "old" not in service.registry and not service.engine.rejected


def test_a_full_registry_refuses_new_devices_as_rate_limited(art_dir: Path, tmp_path: Path) -> None:
    registry = DeviceRegistry(max_devices=3)
    service, topics = _service(art_dir, tmp_path / "state", registry), Topics(FLEET)
    for i in range(3):
        _deliver(service, topics.status(f"d{i}"), _hello(f"d{i}"))
        registry.answered(f"d{i}", 1.0)  # devices that trained are never evicted
    _deliver(service, topics.status("eve"), _hello("eve"))
    assert dict(service.engine.rejected) == {"rate_limited": 1}, service.engine.rejected
    assert "eve" not in registry and len(registry) == 3


def test_one_topic_cannot_fill_the_inbox() -> None:
    inbox = Inbox(max_bytes=1000, max_topic_bytes=400, wait_s=0.0)
    for _ in range(10):
        inbox.put("up/eve", bytes(100))
    inbox.put("up/d1", bytes(100))
    assert len(inbox) == 5 and inbox.take_dropped() == {"up/eve": 6}
    assert inbox.take_dropped() == {}


def test_a_flood_does_not_delay_an_honest_topic() -> None:
    """Served round-robin by topic: the honest update comes second, not after the flood's 5,000 frames."""
    inbox = Inbox(wait_s=0.0, max_topic_items=5000)
    for i in range(6000):
        inbox.put("up/eve", b"x%d" % i)
    inbox.put("up/d1", b"update")
    assert inbox.take_dropped() == {"up/eve": 1000}
    first, second = inbox.get(0.0), inbox.get(0.0)
    assert first == ("up/eve", b"x0") and second == ("up/d1", b"update")
    assert [inbox.get(0.0)[1] for _ in range(3)] == [b"x1", b"x2", b"x3"], "each topic keeps its order"
    assert len(inbox) == 4996


def test_handler_fuzz_never_raises_and_refusals_never_register(art_dir: Path, tmp_path: Path) -> None:
    """Random bytes and random mutations of real frames: each is refused with a reason, none stops the handler."""
    service, topics = _service(art_dir, tmp_path / "state"), Topics(FLEET)
    rng = random.Random(13)
    seeds = [_hello("d1"), encode_frame(FLEET, "d1", Fetch(sha256=["0" * 64])),
             encode_frame(FLEET, "d1", Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=10,
                                              steps=1, train_loss=1.0, train_accuracy=0.5, train_seconds=0.1))]
    for i in range(3000):
        frame = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        if i % 10 == 0:
            frame = bytearray(rng.randbytes(rng.randint(0, 200)))
        topic = topics.status("d1") if rng.random() < 0.5 else topics.up("d1")
        _deliver(service, topic, bytes(frame))
    assert "internal_error" not in service.engine.rejected
    assert sum(service.engine.rejected.values()) >= 2900


def test_refusals_the_engine_decides_are_answered_at_the_bounded_rate_too(art_dir: Path, tmp_path: Path, caplog) -> None:
    """A registered sender flooding updates for a closed round: every one counted, a few answered, one log line."""
    service, topics = _service(art_dir, tmp_path / "state"), Topics(FLEET)
    _deliver(service, topics.status("d1"), _hello("d1"))
    shapes = service.artifacts.tiers["a"].shapes
    sent: list[str] = []
    service._publish = lambda message: sent.append(message.device_id)  # type: ignore[method-assign]  # what goes out
    with caplog.at_level("WARNING", logger="aggregator.service"):
        for _ in range(100):
            update = Update(update_id=new_id(), round=7, base_version=0, tier="a", num_samples=10, steps=1,
                            train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
            tensors = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
            _deliver(service, topics.up("d1"), encode_frame(FLEET, "d1", update, tensors), now=200.0)
    assert service.engine.rejected["stale_round"] == 100
    assert sent == ["d1"] * REJECTS_PER_MINUTE
    assert caplog.text.count("rejected a message from d1: stale_round") == 1


# -- secure-aggregation frames: their tensor table is checked before anything is hashed or decoded ----------------

def _raw_frame(sender: str, body: dict, entries: list[dict], payload: bytes, sent_at: float | None = None,
               fleet: str = FLEET) -> bytes:
    """Frame bytes around a hand-written header, as a hostile publisher builds them."""
    header = {"protocol": 1, "fleet": fleet, "sender": sender, "msg_id": new_id(),
              "sent_at": time.time() if sent_at is None else sent_at, "body": body, "tensors": entries,
              "payload_sha256": hashlib.sha256(payload).hexdigest()}
    raw = json.dumps(header).encode()
    return b"TFL1" + struct.pack("<I", len(raw)) + raw + payload


def _sparse_bomb(n: int) -> tuple[dict, bytes]:
    """One top-k tensor entry of `n` float32 elements keeping a single zero: a few KB on the wire, 4n bytes decoded."""
    bitmap = bytearray((n + 7) // 8)
    bitmap[0] = 0x80
    piece = struct.pack("<I", 1) + zlib.compress(bytes(bitmap) + np.float32(0).tobytes(), 9)
    return {"name": "fc1.weight", "codec": "topk", "dtype": "float32", "shape": [n], "nbytes": len(piece)}, piece


def _masked_input_body(round_number: int, session: str, device: str) -> dict:
    payload = {"kind": "secagg_masked_input", "round": round_number, "device": device, "weight": 1.0, "tensors": {}}
    return {"kind": "secagg", "round": round_number, "session": session, "phase": "masked_input",
            "payload": json.dumps(payload)}


def test_a_secagg_frame_without_secure_rounds_may_carry_no_tensors(art_dir: Path, tmp_path: Path) -> None:
    """An 8.6 KB secure-aggregation frame declaring a 2^26-element tensor decoded into 256 MiB before being refused."""
    service, topics = _service(art_dir, tmp_path / "state"), Topics(FLEET)
    _deliver(service, topics.status("d1"), _hello("d1"))
    entry, piece = _sparse_bomb(1 << 26)
    frame = _raw_frame("d1", _masked_input_body(1, "0" * 32, "d1"), [entry], piece)
    assert len(frame) < 16_000
    peak = peak_traced_bytes(lambda: _deliver(service, topics.up("d1"), frame))
    assert dict(service.engine.rejected) == {"bad_tensor": 1}, service.engine.rejected
    assert peak < 16 << 20, f"refusing a secagg frame traced {peak} bytes"


@pytest.fixture(scope="module")
def secure_art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("secure-art")
    export_all(SPEC, ["a", "b", "c"], out)
    return out


@pytest.fixture()
def secure_fleet(secure_art: Path, tmp_path: Path) -> tuple[Fleet, AggregatorService]:
    """A secure round of four devices in its masked-input phase, its engine served by an (unstarted) service."""
    fleet = Fleet(secure_art, tmp_path / "secure-state", threshold=0.5)
    assert fleet.tick(SECURE_START) == []  # tasks, keys advertised, roster, shares delivered
    service = AggregatorService(fleet.engine, parse("mqtt://127.0.0.1:1883"), inbox=Inbox())
    service._publish = lambda message: None  # type: ignore[method-assign]  # nothing goes out
    return fleet, service


def test_a_masked_input_carries_exactly_its_sessions_uint8_bytes(secure_fleet: tuple[Fleet, AggregatorService]) -> None:
    """Refused before decoding: a top-k bomb, a wrong size, float32 instead of uint8, tensors on another phase."""
    fleet, service = secure_fleet
    topics, engine = Topics(SECURE_FLEET), fleet.engine
    current = engine.view()
    session = fleet.tasks["d1"].secure.session
    shapes = fleet.artifacts.tiers["a"].shapes  # d1 trains tier a; a 32-bit ring: 4 bytes an element
    exact = {name: int(np.prod(shape)) * 4 for name, shape in shapes.items()}

    def send(entries: list[dict], payload: bytes, body: dict | None = None) -> None:
        body = body or _masked_input_body(current.number, session, "d1")
        service.handle_safely(topics.up("d1"), _raw_frame("d1", body, entries, payload, fleet=SECURE_FLEET),
                              SECURE_START + 1)

    bomb, piece = _sparse_bomb(1 << 26)
    peak = peak_traced_bytes(lambda: send([bomb], piece))
    assert peak < 16 << 20, f"refusing a masked input traced {peak} bytes"
    longer = [{"name": n, "codec": "uint8", "dtype": "uint8", "shape": [size + 4], "nbytes": size + 4}
              for n, size in exact.items()]
    send(longer, bytes(sum(e["nbytes"] for e in longer)))  # one ring integer too many in each tensor
    floats = [{"name": n, "codec": "float32", "dtype": "float32", "shape": [size], "nbytes": 4 * size}
              for n, size in exact.items()]
    send(floats, bytes(sum(e["nbytes"] for e in floats)))  # the right sizes, at 4 bytes an element
    advertise = {"kind": "secagg", "round": current.number, "session": session, "phase": "advertise", "payload": "{}"}
    send(longer[:1], bytes(longer[0]["nbytes"]), advertise)  # other phases carry no tensors
    assert dict(engine.rejected) == {"bad_tensor": 4}, engine.rejected
    send([bomb], piece, _masked_input_body(current.number, "f" * 32, "d1"))  # another session's: refused for that
    assert dict(engine.rejected) == {"bad_tensor": 4, "stale_round": 1} and engine.view().answered == 0
    fleet.clients["d1"].trained(fleet.tasks["d1"], {n: np.zeros(s, np.float32) for n, s in shapes.items()}, None)
    ((device, honest),) = fleet.uplink
    service.handle_safely(topics.up(device), honest, SECURE_START + 1)  # the real one, exactly its sizes: taken
    assert engine.view().answered == 1 and sum(engine.rejected.values()) == 5, engine.rejected


# -- signed offline statuses: a replay of an earlier one is refused ---------------------------------------------------

def _signed_at(device: str, body: Status, sent_at: float, key: DeviceKey) -> bytes:
    header = FrameHeader(fleet=FLEET, sender=device, sent_at=sent_at, body=body)
    header = header.model_copy(update={"signature": key.sign(header)})
    raw = header.model_dump_json().encode()
    return b"TFL1" + struct.pack("<I", len(raw)) + raw


def test_a_replayed_signed_offline_status_does_not_drop_the_device(art_dir: Path, tmp_path: Path) -> None:
    """The device's last will is one signed frame: captured once, it dropped the device whenever it was sent again."""
    key = DeviceKey(tmp_path / "device")
    engine = RoundEngine(EngineParts(EngineConfig(fleet=FLEET, rounds=3, min_updates=1, round_timeout_s=60.0),
                                     FedAvg(min_clients=50, fraction=1.0), ArtifactStore(art_dir),
                                     StateStore(tmp_path / "state"), DeviceRegistry(), None))
    service = AggregatorService(engine, parse("mqtt://127.0.0.1:1883"), inbox=Inbox(),
                                signatures=SignatureCheck({"d1": key.public_hex}))
    topics, session = Topics(FLEET), "b" * 32
    hello = encode_frame(FLEET, "d1", Hello(num_samples=10, session=session), signer=key.sign, sent_at=85.0)
    _deliver(service, topics.status("d1"), hello, now=100.0)  # stamped at connect, just before the will is signed
    will = _signed_at("d1", Status(online=False, session=session), 90.0, key)  # signed at connect
    _deliver(service, topics.status("d1"), will, now=200.0)  # the broker publishes it: the device went away
    assert not service.registry.get("d1").online and not engine.rejected
    _deliver(service, topics.status("d1"), hello, now=300.0)  # it reconnects (same agent, same session)
    info = service.registry.get("d1")
    assert info.online and info.last_seen == 300.0
    _deliver(service, topics.status("d1"), will, now=400.0)  # the captured will, sent again
    older = _signed_at("d1", Status(online=False, session=session), 80.0, key)  # an earlier connection's will
    _deliver(service, topics.status("d1"), older, now=401.0)
    assert dict(engine.rejected) == {"replayed": 2}, engine.rejected
    after = service.registry.get("d1")
    assert after.online and after.last_seen == 300.0 and after.status_sent_at == 90.0  # refused: nothing changed
    fresh = _signed_at("d1", Status(online=False, session=session), 350.0, key)
    _deliver(service, topics.status("d1"), fresh, now=500.0)
    assert not service.registry.get("d1").online  # its next will, signed afresh at its reconnect, is applied


# -- admission: known devices' topics get reassembly and inbox room first -----------------------------------------

def test_the_service_admits_only_known_devices_topics_from_a_snapshot(art_dir: Path, tmp_path: Path) -> None:
    service, topics = _service(art_dir, tmp_path / "state"), Topics(FLEET)
    assert not service._admits(topics.up("d1")) and not service._admits(topics.status("d1"))
    _deliver(service, topics.status("d1"), _hello("d1"))
    assert service._admits(topics.up("d1")) and service._admits(topics.status("d1"))
    assert not service._admits(topics.up("eve")) and not service._admits(f"{topics.base}/up/bad id")
    assert service._admits("tierfl/v1/parent/down/edge-1")  # not one of our devices' topics (an edge's parent link)
    reassembler = service.link._reassembler
    assert reassembler.admit == service._admits and service.inbox.admit == service._admits


def test_a_crowd_of_unknown_topics_cannot_fill_the_inbox_against_a_known_device() -> None:
    """Many topics each within its own share filled the whole inbox; a known device's update was then dropped."""
    known = {"up/d1"}
    inbox = Inbox(max_bytes=1000, max_topic_bytes=400, wait_s=0.0, admit=known.__contains__)
    for i in range(20):
        inbox.put(f"up/eve-{i}", bytes(100))  # the last 10 find no room: dropped
    inbox.put("up/d1", bytes(300))  # the 3 newest guests' items give way
    dropped = inbox.take_dropped()
    assert sum(dropped.values()) == 13 and "up/d1" not in dropped
    assert {f"up/eve-{i}" for i in (7, 8, 9)} <= set(dropped)
    out = [inbox.get(0.0) for _ in range(len(inbox))]
    assert ("up/d1", bytes(300)) in out and len(out) == 8
    inbox.put("up/eve-0", bytes(100))
    inbox.put("up/eve-1", bytes(900))  # guests never displace anything, not even each other
    assert inbox.take_dropped() == {"up/eve-1": 1}


def test_a_flood_of_invented_hellos_evicts_only_devices_that_never_trained(art_dir: Path, tmp_path: Path) -> None:
    """--max-devices on an unenrolled fleet: trained devices, and those with a task out, stay; invented ones churn."""
    registry = DeviceRegistry(max_devices=10)
    service, topics = _service(art_dir, tmp_path / "state", registry), Topics(FLEET)
    for i, device in enumerate(["trained", "busy", "idle"]):
        _deliver(service, topics.status(device), _hello(device), now=float(i))
    registry.asked("trained", 1)
    registry.answered("trained", 1.0)
    registry.asked("busy", 2)  # its task is out: not answered, not missed yet
    for i in range(100):
        _deliver(service, topics.status(f"eve-{i}"), _hello(f"eve-{i}"), now=10.0 + i)
    assert len(registry) == 10 and not service.engine.rejected
    assert "trained" in registry and "busy" in registry and "idle" not in registry
    assert registry.knows("busy") and not registry.knows("idle") and not registry.knows("eve-0")
    assert {d.device_id for d in registry.devices()} == {"trained", "busy", *(f"eve-{i}" for i in range(92, 100))}
    assert service._admits(topics.up("eve-99")) and not service._admits(topics.up("eve-0"))


class _BrokenDesk:
    """An analytics desk with a bug: every tick raises."""

    changes = 0
    results: dict = {}

    def tick(self, now: float) -> list:
        raise RuntimeError("a bug in the desk")


def test_a_bug_in_the_analytics_desk_is_logged_and_the_service_goes_on(art_dir, tmp_path, caplog) -> None:
    service = _service(art_dir, tmp_path / "state")
    service.analytics = _BrokenDesk()  # type: ignore[assignment]
    service._serve_analytics_safely(100.0)  # raised out of the service loop before
    service._serve_analytics_safely(101.0)  # logged once per 10 s
    assert [r.message for r in caplog.records if "analytics desk" in r.message] == [
        "internal error in the analytics desk; the training rounds go on"]
