"""The aggregator service's receipt of hostile frames, one check at a time (no broker needed: the link is not started)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from aggregator.engines.rounds import EngineConfig, RoundEngine
from aggregator.inbox import Inbox
from aggregator.registry import DeviceRegistry
from aggregator.service import FETCHES_PER_MINUTE, REJECTS_PER_MINUTE, AggregatorService
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from models.export import export_all
from models.zoo import ModelSpec
from protocol.frame import FrameError, encode_frame
from protocol.messages import Fetch, Hello, RejectReason, Status, Update, new_id
from protocol.mqtt.url import parse
from protocol.topics import Topics

FLEET = "f1"
SPEC = ModelSpec(arch="mlp", image_size=8, hidden=(16,))


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art")
    export_all(SPEC, ["a"], out)
    return out


def _service(art: Path, state: Path, registry: DeviceRegistry | None = None) -> AggregatorService:
    engine = RoundEngine(EngineConfig(fleet=FLEET, rounds=3, min_updates=1, round_timeout_s=60.0),
                         FedAvg(min_clients=50, fraction=1.0), ArtifactStore(art), StateStore(state),
                         DeviceRegistry() if registry is None else registry, None)
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
