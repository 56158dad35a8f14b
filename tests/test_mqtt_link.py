"""The MQTT link against a real Mosquitto: outbound bytes the broker has not acknowledged stay bounded."""

from __future__ import annotations

import time

import pytest

from protocol.frame import FrameError
from protocol.mqtt.link import MqttLink
from protocol.mqtt.url import parse
from tests.test_integration import Mosquitto, own_mosquitto  # noqa: F401  (a fixture)

pytestmark = pytest.mark.integration


def _link(url: str, **options: object) -> MqttLink:
    def ignore(topic: str, item: bytes | FrameError) -> None:
        pass
    link = MqttLink(parse(url), "link-test", [], ignore, ignore, **options)  # type: ignore[arg-type]
    assert link.start(timeout_s=10)
    return link


def test_many_publishes_are_all_acknowledged(own_mosquitto: Mosquitto) -> None:
    link = _link(own_mosquitto.url)
    try:
        assert sum(link.publish("t/many", bytes(100)) for _ in range(3000)) == 300_000
        assert link.flush(20)
        assert link.dropped_frames == 0
    finally:
        link.stop()


def test_a_broker_that_stops_acknowledging_bounds_what_we_hold(own_mosquitto: Mosquitto) -> None:
    link = _link(own_mosquitto.url, max_unacked_bytes=1 << 20, send_wait_s=1.0)
    frame = bytes(600 << 10)
    try:
        own_mosquitto.freeze(True)
        assert link.publish("t/big", frame) == len(frame), "an empty budget takes any frame"
        started = time.monotonic()
        assert link.publish("t/big", frame) == 0, "no room: dropped after the wait"
        assert time.monotonic() - started >= 0.9
        started = time.monotonic()
        assert link.publish("t/big", frame) == 0, "still congested: dropped at once"
        assert time.monotonic() - started < 0.2
        assert link.dropped_frames == 2
        assert not link.flush(0.5)
        own_mosquitto.freeze(False)
        assert link.flush(20), "the broker acknowledges what it held"
        assert link.publish("t/big", frame) == len(frame), "room again"
        assert link.flush(20)
    finally:
        own_mosquitto.freeze(False)
        link.stop()
