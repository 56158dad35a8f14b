"""The relay service (aggregator.relay_service): its link to the parent, as a device's link to its aggregator."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.relay import FollowTask, RelayEngine
from aggregator.registry import DeviceRegistry
from aggregator.relay_service import RELAY_BACKEND, RelayService
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from models.export import export_all
from protocol.frame import decode_frame
from protocol.messages import Hello, Status
from protocol.mqtt.url import parse as parse_broker
from protocol.signing import DeviceKey, verify_signature
from tests.test_engine import SPEC


def test_the_relays_last_will_is_signed_afresh_at_every_connect(tmp_path: Path) -> None:
    """A captured will is one connection's: every (re)connect to the parent carries a new message id and sent_at."""
    export_all(SPEC, ["a"], tmp_path / "art")
    engine = RelayEngine(EngineParts(EngineConfig(fleet="site1"), FollowTask(), ArtifactStore(tmp_path / "art"),
                                     StateStore(tmp_path / "relay"), DeviceRegistry()))
    key = DeviceKey(tmp_path / "relay")
    nowhere = parse_broker("mqtt://127.0.0.1:1")
    service = RelayService(engine, nowhere, nowhere, "site1", parent_fleet="lab", key=key)
    client = service.parent._client
    wills = []
    for _ in range(3):
        with pytest.raises(OSError):  # nothing listens on port 1: paho set the will, then failed to connect
            client.connect("127.0.0.1", 1)
        assert client.will_topic == "tierfl/v1/lab/status/site1"
        wills.append(decode_frame(bytes(client.will_payload)))
        time.sleep(0.01)
    for will in wills:
        assert isinstance(will.body, Status) and will.body.online is False
        assert (will.header.fleet, will.header.sender) == ("lab", "site1")
        verify_signature(will.header, key.public_hex)
    assert len({will.header.msg_id for will in wills}) == 3
    assert wills[0].header.sent_at < wills[1].header.sent_at < wills[2].header.sent_at


def test_a_parent_takes_the_relays_hello_under_its_new_and_old_backend_name() -> None:
    """Relays announce backend "relay"; a parent may still hold a retained hello of an older relay saying "edge"."""
    for backend in (RELAY_BACKEND, "edge"):
        assert Hello.model_validate({"kind": "hello", "tier": "a", "num_samples": 30, "backend": backend}).backend == backend
