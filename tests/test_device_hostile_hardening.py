"""The device's side of issue 13, second pass: a will signed per connect, nothing taken before the aggregator's
key is pinned, throttled refusal logs, a task frame taken once and only from this device's topic, and a
corrupt error-feedback file treated as lost state.

The agent is real (real cache, real ONNX Runtime on an exported 8x8 MLP tier), driven as in
test_device_hostile; the will test keeps the agent's real MQTT link and lets it dial a closed port.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from edge_client import agent as agent_module
from edge_client.agent import ClientConfig, DeviceAgent
from edge_client.compression import ErrorFeedback
from protocol.frame import decode_frame
from protocol.messages import Blob, Status, Update
from protocol.mqtt.url import parse as parse_broker
from protocol.signing import KEY_ANNOUNCEMENT, key_announcement, verify_signature
from protocol.trust import AggregatorTrust
from tests.test_device_hostile import (DEVICE, DOWN, FLEET, Aggregator, data, exported, make_agent, run,  # noqa: F401
                                       working)


def test_the_last_will_is_signed_afresh_at_every_connect(tmp_path, exported, data):
    """A captured will is one connection's: every (re)connect carries a new message id and a later sent_at."""
    aggregator = Aggregator(tmp_path / "agg", exported)
    config = ClientConfig(broker=parse_broker("mqtt://127.0.0.1:1"), device_id=DEVICE, fleet=FLEET,
                          cache_dir=tmp_path / "cache", aggregator_key=aggregator.key.public_hex)
    agent = DeviceAgent(config, *data)
    client = agent.link._client
    wills = []
    for _ in range(3):
        with pytest.raises(OSError):  # nothing listens on port 1: paho set the will, then failed to connect
            client.connect("127.0.0.1", 1)
        assert client.will_topic == f"tierfl/v1/{FLEET}/status/{DEVICE}"
        wills.append(decode_frame(bytes(client.will_payload)))
        time.sleep(0.01)
    for will in wills:
        assert isinstance(will.body, Status) and will.body.online is False and will.body.session == agent.session
        verify_signature(will.header, agent.key.public_hex)
    assert len({will.header.msg_id for will in wills}) == 3
    assert wills[0].header.sent_at < wills[1].header.sent_at < wills[2].header.sent_at


def test_before_a_key_is_pinned_only_the_key_announcement_is_taken(tmp_path, exported, data):
    aggregator = Aggregator(tmp_path / "agg", exported)
    mallory = Aggregator(tmp_path / "mallory", exported)
    agent, link = make_agent(tmp_path, aggregator, data, trusted=False)
    agent._on_frame(DOWN, aggregator.frame(aggregator.task(1), aggregator.weights(), signed=False))
    agent._on_frame(DOWN, mallory.frame(aggregator.task(2), aggregator.weights()))
    agent._on_frame(DOWN, aggregator.frame(aggregator.task(3), aggregator.weights()))  # the real key, not pinned yet
    sha = aggregator.tier.manifest_sha256
    name, content = aggregator.store.read(sha)
    blob = mallory.frame(Blob(sha256=sha, name=name), {"data": np.frombuffer(content, np.uint8)}, "uint8")
    agent._on_frame(DOWN, blob)
    assert agent.refused == {"bad_signature": 4}
    assert not len(agent.inbox) and not agent.cache.has(sha) and link.published == []
    assert not (tmp_path / "cache" / KEY_ANNOUNCEMENT).exists()
    agent._on_frame(DOWN, aggregator.frame(*key_announcement(aggregator.key), "uint8"))
    agent._on_frame(DOWN, aggregator.frame(aggregator.task(4), aggregator.weights()))
    assert len(agent.inbox) == 1 and agent.refused == {"bad_signature": 4}


def test_without_cryptography_unsigned_frames_are_refused_and_the_gap_is_said_once(tmp_path, exported, data, caplog,
                                                                                   monkeypatch):
    """No `cryptography` (a `tierfl[edge]` install): signatures cannot be checked, which the log says once."""
    aggregator = Aggregator(tmp_path / "agg", exported)
    monkeypatch.setattr(agent_module, "device_key", lambda folder: None)
    with caplog.at_level(logging.WARNING):
        agent, _ = make_agent(tmp_path, aggregator, data, trusted=False)
        for round_number in (1, 2):
            agent._on_frame(DOWN, aggregator.frame(aggregator.task(round_number), aggregator.weights(), signed=False))
        agent._on_frame(DOWN, aggregator.frame(aggregator.task(3), aggregator.weights()))
    assert agent.refused == {"bad_signature": 2} and len(agent.inbox) == 1
    warnings = [r.getMessage() for r in caplog.records if "NOT checked against the aggregator's key" in r.getMessage()]
    assert len(warnings) == 1 and "tierfl[signing]" in warnings[0]
    with pytest.raises(ValueError, match="needs the cryptography package"):
        AggregatorTrust(tmp_path / "x", aggregator.key.public_hex, verifiable=False)  # a key it could not honour


def test_refusals_are_logged_once_per_sender_and_reason_per_interval_with_a_count(tmp_path, exported, data, caplog):
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, _ = make_agent(tmp_path, aggregator, data)
    unsigned = aggregator.frame(aggregator.task(1), aggregator.weights(), signed=False)
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            agent._on_frame(DOWN, unsigned)
            agent._on_frame(DOWN, b"garbage")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused a message")]
    assert agent.refused == {"bad_signature": 50, "malformed": 50}
    assert len(lines) == 2, lines
    agent._refusal_log.interval_s = 0.05
    time.sleep(0.1)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        agent._on_frame(DOWN, unsigned)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused a message")]
    assert line.startswith("refused a message: bad_signature") and "(and 49 more like it unlogged" in line


def test_a_task_frame_is_taken_once(tmp_path, exported, data):
    """A QoS 1 redelivery or a replay of the same signed task before its deadline does not train twice."""
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, link = make_agent(tmp_path, aggregator, data)
    task = aggregator.frame(aggregator.task(1), aggregator.weights())
    with working(agent):
        run(agent, task)
        run(agent, task)  # the same frame again, its deadline a minute away
        run(agent, aggregator.frame(aggregator.task(2), aggregator.weights()))  # the next task is taken
    assert [u.round for u in link.bodies(Update)] == [1, 2] and agent.refused == {"replayed": 1}


def test_a_frame_on_another_topic_than_this_devices_downlink_is_refused(tmp_path, exported, data):
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, _ = make_agent(tmp_path, aggregator, data)
    elsewhere = f"tierfl/v1/{FLEET}/down/another-device"
    agent._on_frame(elsewhere, aggregator.frame(aggregator.task(1), aggregator.weights()))
    assert agent.refused == {"unexpected": 1} and not len(agent.inbox)


def test_a_corrupt_residual_file_is_lost_state_not_a_failed_tier(tmp_path, exported, data, caplog):
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, link = make_agent(tmp_path, aggregator, data, codec="int8")
    residual = tmp_path / "cache" / "residual-a.npz"
    with working(agent):
        run(agent, aggregator.frame(aggregator.task(1), aggregator.weights()))
        residual.write_bytes(residual.read_bytes()[:100])  # a disk that filled mid-write, a bad block
        agent._feedback.clear()  # as after a restart
        with caplog.at_level(logging.WARNING):
            run(agent, aggregator.frame(aggregator.task(2), aggregator.weights()))
            run(agent, aggregator.frame(aggregator.task(3), aggregator.weights()))
    assert agent.refused == {} and [u.round for u in link.bodies(Update)] == [1, 2, 3]
    warnings = [r.getMessage() for r in caplog.records if str(residual) in r.getMessage()]
    assert len(warnings) == 1 and "zero residual" in warnings[0]
    assert set(ErrorFeedback(tmp_path / "cache", "a").residual) == set(aggregator.tier.shapes)  # replaced, readable


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"\x93NUMPY garbage", "nan"])
def test_an_unreadable_residual_starts_from_zero_and_is_replaced(tmp_path, caplog, content):
    path = tmp_path / "residual-a.npz"
    if content == "nan":
        np.savez(path, w=np.array([1.0, np.nan], np.float32))
    else:
        path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert ErrorFeedback(tmp_path, "a").residual == {}
        assert ErrorFeedback(tmp_path, "a").residual == {}  # the file was replaced: no second warning
    assert len([r for r in caplog.records if str(path) in r.getMessage()]) == 1
