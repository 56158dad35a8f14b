"""Issue 13 leftover: a device's last will replayed after an aggregator restart.

The aggregator forgets on restart which status it applied last, so before this a will captured from an earlier
connection of the same agent run was applied once more (the device dropped, a round cut short). Now a status older
than the device's registered hello is refused as `replayed`: the agent stamps every hello of a connection with the
time taken just before that connection's will is signed, so its real will is never older than its hello, while every
earlier connection's will is. Nothing is kept on disk: the hello a restarted aggregator gets (the retained one, or
the live device's next) is the bound.
"""

from __future__ import annotations

from pathlib import Path

from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.inbox import Inbox
from aggregator.registry import DeviceRegistry
from aggregator.service import AggregatorService
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from protocol.frame import decode_frame, encode_frame
from protocol.messages import Hello, Status
from protocol.mqtt.url import parse
from protocol.signing import DeviceKey, SignatureCheck
from protocol.topics import Topics
from tests.test_device_hostile import DEVICE, FLEET, Aggregator, data, exported, make_agent  # noqa: F401

SESSION = "c" * 32


def _service(art: Path, state: Path, key: DeviceKey | None = None) -> AggregatorService:
    """A freshly started aggregator: an empty registry, nothing remembered of an earlier run."""
    engine = RoundEngine(EngineParts(EngineConfig(fleet=FLEET, rounds=3, min_updates=1, round_timeout_s=60.0),
                                     FedAvg(min_clients=50, fraction=1.0), ArtifactStore(art), StateStore(state),
                                     DeviceRegistry(), None))
    signatures = SignatureCheck({DEVICE: key.public_hex}) if key is not None else None
    return AggregatorService(engine, parse("mqtt://127.0.0.1:1883"), inbox=Inbox(), signatures=signatures)


def _at(body: Hello | Status, sent_at: float, key: DeviceKey) -> bytes:
    return encode_frame(FLEET, DEVICE, body, signer=key.sign, sent_at=sent_at)


def test_after_a_restart_an_earlier_connections_will_is_refused_and_the_real_one_applied(exported, tmp_path):
    key = DeviceKey(tmp_path / "device")
    status_topic = Topics(FLEET).status(DEVICE)
    # one agent run (one session), three connections: each will signed at its connect, its hellos stamped just before
    wills = {k: _at(Status(online=False, session=SESSION), 100.0 * k + 0.001, key) for k in (1, 2, 3)}
    hello3 = _at(Hello(num_samples=10, session=SESSION), 300.0, key)
    service = _service(exported, tmp_path / "state", key)  # the aggregator restarted while connection 3 is live
    service.handle_safely(status_topic, hello3, now=1000.0)  # the retained hello (or the live device's next one)
    for k in (1, 2):
        service.handle_safely(status_topic, wills[k], now=1001.0)  # captured wills of earlier connections, replayed
    info = service.registry.get(DEVICE)
    assert dict(service.engine.rejected) == {"replayed": 2} and info.online and info.status_sent_at is None
    later_hello = _at(Hello(num_samples=10, session=SESSION, holds={"a": 1}), 300.0, key)  # re-announced, same stamp
    service.handle_safely(status_topic, later_hello, now=1002.0)
    assert service.registry.get(DEVICE).holds == {"a": 1}
    service.handle_safely(status_topic, wills[3], now=1003.0)  # the device really went away: its will is applied
    assert not service.registry.get(DEVICE).online and dict(service.engine.rejected) == {"replayed": 2}


def test_the_agent_stamps_each_connections_hellos_between_the_previous_will_and_its_own(tmp_path, exported, data):
    """Each hello of a connection (the first and any re-announcement) is no newer than that connection's will and
    newer than every earlier will, so a service holding any of its hellos refuses the earlier wills only."""
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, link = make_agent(tmp_path, aggregator, data)
    frames, hellos = [], []
    for _ in range(3):  # three connections
        frames.append(agent._will())  # paho asks for the will before each connect
        agent._announce()  # the hello at connect
        agent._announce()  # a re-announcement later on the same connection
        hellos.append([decode_frame(frame) for _, frame in link.published[-2:]])
    wills = [decode_frame(frame) for frame in frames]
    for k, (will, pair) in enumerate(zip(wills, hellos)):
        assert all(isinstance(h.body, Hello) and h.header.sent_at <= will.header.sent_at for h in pair)
        assert all(h.header.sent_at > earlier.header.sent_at for h in pair for earlier in wills[:k])
    service = _service(exported, tmp_path / "state", agent.key)  # a restarted aggregator, fed the agent's frames
    topic = Topics(FLEET).status(DEVICE)
    service.handle_safely(topic, link.published[-1][1], now=1000.0)  # the retained hello: connection 3's last
    for frame in frames[:2]:
        service.handle_safely(topic, frame, now=1001.0)  # earlier connections' wills, replayed
    assert dict(service.engine.rejected) == {"replayed": 2} and service.registry.get(DEVICE).online
    service.handle_safely(topic, frames[2], now=1002.0)  # connection 3's will: the device went away
    assert not service.registry.get(DEVICE).online and dict(service.engine.rejected) == {"replayed": 2}
