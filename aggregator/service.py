"""The aggregator service: binds the round engine to MQTT.

paho's network thread only queues what arrives; one loop in `run` validates each frame
(fleet, sender, kind), routes it (status -> registry, fetch -> artifact files, update ->
engine), publishes what the engine returns, and ticks the engine. A single thread owns all
state, so there are no locks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from aggregator.artifacts import ArtifactStore
from aggregator.downlink import Downlink
from aggregator.engine import Outgoing, RoundEngine, reject
from aggregator.registry import DeviceRegistry
from aggregator.secure_engine import SecureRoundEngine
from protocol.chunking import DEFAULT_MAX_MESSAGE_BYTES
from protocol.frame import FrameError, decode_frame, encode_frame
from protocol.messages import Blob, Fetch, FrameHeader, Hello, Reject, RejectReason, SecAgg, Statistics, Status, Task, Update
from protocol.mqtt_link import MqttLink
from protocol.mqtt_url import BrokerAddress
from protocol.signing import SignatureCheck, SignatureError
from protocol.topics import Topics

if TYPE_CHECKING:
    from aggregator.monitor import Monitor

log = logging.getLogger(__name__)


class AggregatorService:
    """Runs the engine against a broker until the configured rounds are done (or `stop` is set)."""

    def __init__(
        self,
        engine: RoundEngine,
        broker: BrokerAddress,
        aggregator_id: str = "aggregator",
        share_group: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_update_bytes: int = 64 << 20,
        downlink: str = "float32",
        signatures: SignatureCheck | None = None,
        monitor: Monitor | None = None,
    ) -> None:
        self.engine = engine
        self.registry: DeviceRegistry = engine.registry
        self.artifacts: ArtifactStore = engine.artifacts
        self.aggregator_id = aggregator_id
        self.topics = Topics(engine.config.fleet)
        self._max_update_bytes = max_update_bytes
        self._signatures = signatures  # None: an open fleet, signatures not required
        self.monitor = monitor  # metrics and the status page; fed from this service's thread
        self.downlink = Downlink(engine.config.fleet, aggregator_id, downlink, engine.config.seed)
        self._inbox: queue.Queue[tuple[str, bytes | FrameError]] = queue.Queue()
        self.link = MqttLink(
            broker,
            client_id=f"tierfl-{engine.config.fleet}-{aggregator_id}",
            subscriptions=[self.topics.all_up(share_group), self.topics.all_status],
            on_frame=lambda topic, data: self._inbox.put((topic, data)),
            on_bad_frame=lambda topic, error: self._inbox.put((topic, error)),
            max_message_bytes=max_message_bytes,
            max_frame_bytes=max_update_bytes,
        )

    def run(self, stop: threading.Event, tick_s: float = 0.1) -> None:
        """Serve until every round is done or `stop` is set."""
        self.link.start()
        try:
            while not stop.is_set() and not self.engine.finished:
                step_started = time.perf_counter()
                try:
                    topic, item = self._inbox.get(timeout=tick_s)
                except queue.Empty:
                    pass
                else:
                    self._handle(topic, item, time.time())
                self._send(self.engine.tick(time.time()))
                if self.monitor:
                    self.monitor.observe(self.engine, time.time(), time.perf_counter() - step_started)
        finally:
            time.sleep(0.2)  # let the last QoS 1 publishes leave
            self.link.stop()

    def _handle(self, topic: str, item: bytes | FrameError, now: float) -> None:
        device = self.topics.device_of(topic)
        if self.monitor and isinstance(item, bytes):
            self.monitor.received(len(item))
        if isinstance(item, FrameError):
            self._refuse(device, item.reason, item.detail)
            return
        try:
            frame = decode_frame(item, self._max_update_bytes)
        except FrameError as exc:
            self._refuse(device, exc.reason, exc.detail)
            return
        header, body = frame.header, frame.body
        if device is None:
            self._refuse(None, RejectReason.MALFORMED, f"message on unexpected topic {topic!r}")
        elif header.fleet != self.engine.config.fleet:
            self._refuse(device, RejectReason.WRONG_FLEET, f"fleet {header.fleet!r}, this is {self.engine.config.fleet!r}")
        elif header.sender != device:
            self._refuse(device, RejectReason.SENDER_MISMATCH, f"sender {header.sender!r} on {device!r}'s topic")
        elif problem := self._signature_problem(frame.header):
            self._refuse(device, problem.reason, problem.detail)
        elif topic == self.topics.status(device) and isinstance(body, Hello):
            self._on_hello(device, body, now)
        elif topic == self.topics.status(device) and isinstance(body, Status):
            self.registry.set_online(device, body.online, now)
            log.info("%s is %s", device, "online" if body.online else "offline")
        elif topic == self.topics.up(device) and isinstance(body, Fetch):
            self.registry.seen(device, now)
            self._serve_files(device, body)
        elif topic == self.topics.up(device) and isinstance(body, Update):
            self.registry.seen(device, now)
            self.registry.holds(device, body.tier, body.base_version)
            outgoing = self.engine.on_update(device, header.msg_id, body, frame.tensors, frame.nbytes, now)
            if self.monitor and not any(isinstance(m.body, Reject) for m in outgoing):
                self.monitor.update_accepted()
            self._send(outgoing)
        elif topic == self.topics.up(device) and isinstance(body, SecAgg) and isinstance(self.engine, SecureRoundEngine):
            self.registry.seen(device, now)
            outgoing = self.engine.on_secagg(device, header.msg_id, body, frame.tensors, frame.nbytes, now)
            if self.monitor and body.phase == "masked_input" and not any(isinstance(m.body, Reject) for m in outgoing):
                self.monitor.update_accepted()
            self._send(outgoing)
        elif topic == self.topics.up(device) and isinstance(body, Statistics):
            self.registry.seen(device, now)
            self.registry.holds(device, body.tier, body.base_version)
            self._send(self.engine.on_statistics(device, header.msg_id, body, frame.tensors, now))
        else:
            self._refuse(device, RejectReason.UNEXPECTED, f"a {body.kind!r} message does not belong on {topic}")

    def _signature_problem(self, header: FrameHeader) -> SignatureError | None:
        if self._signatures is None:
            return None
        try:
            self._signatures.verify(header)
        except SignatureError as exc:
            return exc
        return None

    def _on_hello(self, device: str, hello: Hello, now: float) -> None:
        if hello.tier is not None and hello.tier not in self.artifacts.tiers:
            known = ", ".join(sorted(self.artifacts.tiers))
            self._refuse(device, RejectReason.UNKNOWN_TIER, f"tier {hello.tier!r} is not exported (have: {known})")
            return
        self.registry.hello(device, hello.num_samples, hello.num_test_samples, hello.tier, hello.backend, now,
                            hello.holds, hello.seconds_per_sample)
        log.info("%s joined: %d samples, tier %s, backend %s", device, hello.num_samples, hello.tier or "any", hello.backend)

    def _serve_files(self, device: str, fetch: Fetch) -> None:
        for sha in fetch.sha256:
            found = self.artifacts.read(sha)
            if found is None:
                self._refuse(device, RejectReason.UNKNOWN_ARTIFACT, f"no exported file has sha256 {sha}")
                continue
            name, data = found
            self._send([Outgoing(device, Blob(sha256=sha, name=name), {"data": np.frombuffer(data, np.uint8)})])

    def _refuse(self, device: str | None, reason: RejectReason, detail: str) -> None:
        self.engine.count_rejection(reason, detail, device)
        log.warning("rejected a message from %s: %s: %s", device or "an unknown sender", reason.value, detail)
        if device is not None:
            self._send([reject(device, reason, detail)])  # the monitor sees it go out
        elif self.monitor:
            self.monitor.rejected(None, reason, detail, time.time())

    def _send(self, messages: list[Outgoing]) -> None:
        for message in messages:
            frame = self._frame(message)
            if self.monitor and isinstance(message.body, Reject):
                self.monitor.rejected(message.device_id, message.body.reason, message.body.detail, time.time())
            if message.device_id is None:
                sent = self.link.publish(self.topics.rounds, frame, retain=True)
            else:
                sent = self.link.publish(self.topics.down(message.device_id), frame)
                self.engine.note_bytes(down=sent)
            if self.monitor:
                self.monitor.sent(sent)

    def _frame(self, message: Outgoing) -> bytes:
        body, tensors = message.body, message.tensors
        if isinstance(body, Task) and tensors is not None and message.device_id is not None:
            info = self.registry.get(message.device_id)
            held = info.holds.get(body.tier) if info else None
            return self.downlink.task_frame(message.device_id, body, tensors, held)
        codec = "uint8" if isinstance(body, Blob) else "float32"
        return encode_frame(self.engine.config.fleet, self.aggregator_id, body, tensors, codec)
