"""The relay service (the middle tier of hierarchical FL): an aggregator to its local group, a device to its parent.

One thread, like the aggregator service it extends: frames from both brokers land in the same
inbox. A task on the relay's downlink from the parent starts a local round (aggregator.engines.relay);
when that round closes, its combined update goes up to the parent. The relay announces itself
to the parent with its group's total samples, and again whenever that total changes. Frames from
the parent are checked like a device checks its downlink: header first, then the parent's
signature (protocol.trust: a given --parent-key, or the one pinned on first contact), only then
the payload.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from aggregator.engines.base import Outgoing
from aggregator.engines.relay import RelayEngine
from aggregator.service import AggregatorService
from protocol.frame import FrameError, decode_payload, encode_frame, read_header
from protocol.messages import Blob, Body, Hello, Reject, RejectReason, Status, Task
from protocol.mqtt.link import MqttLink, Will
from protocol.mqtt.url import BrokerAddress
from protocol.signing import KEY_ANNOUNCEMENT, DeviceKey, SignatureError
from protocol.topics import Topics
from protocol.trust import AggregatorTrust

log = logging.getLogger(__name__)
RELAY_BACKEND = "relay"  # the backend a relay's hello announces; releases before the rename said "edge"


class RelayService(AggregatorService):
    """Serves a local group with `engine` and forwards its combined updates to the parent fleet."""

    def __init__(self, engine: RelayEngine, local_broker: BrokerAddress, parent_broker: BrokerAddress, relay_id: str,
                 parent_fleet: str, parent_id: str = "aggregator", tier: str | None = "a", key: DeviceKey | None = None,
                 parent_trust: AggregatorTrust | None = None, **kwargs: Any) -> None:
        super().__init__(engine, local_broker, aggregator_id=relay_id, key=key, **kwargs)  # signs toward its devices too
        self.relay: RelayEngine = engine
        self.parent_topics = Topics(parent_fleet)
        self.parent_id, self.tier, self.key = parent_id, tier, key
        self.parent_trust = parent_trust  # None: the parent's frames are taken unverified
        self._announced_samples = -1
        self.forwarded = 0  # combined updates sent to the parent
        self.parent = MqttLink(
            parent_broker,
            client_id=f"tierfl-{parent_fleet}-{relay_id}",
            subscriptions=[self.parent_topics.down(relay_id)],
            on_frame=self.inbox.put,
            on_bad_frame=self.inbox.put,
            on_connect=lambda: self.inbox.put("", b""),  # re-announce from the service thread
            will=Will(self.parent_topics.status(relay_id), self._offline_status),  # signed afresh at each (re)connect
        )

    def run(self, stop: threading.Event, tick_s: float = 0.1) -> None:
        """Serve both sides until `stop` is set."""
        self.parent.start()
        try:
            super().run(stop, tick_s)
        finally:
            self.parent.publish(self.parent_topics.status(self.aggregator_id), self._offline_status(), retain=True)
            self.parent.stop()

    def _handle(self, topic: str, item: bytes | FrameError, now: float) -> None:
        if topic == "":  # (re)connected to the parent
            self._announce(force=True)
        elif topic == self.parent_topics.down(self.aggregator_id):
            self._from_parent(item, now)
        else:
            super()._handle(topic, item, now)

    def _send(self, messages: list[Outgoing]) -> None:
        super()._send(messages)
        if combined := self.relay.take_combined():
            update, tensors = combined
            sent = self.parent.publish(self.parent_topics.up(self.aggregator_id), self._parent_frame(update, tensors))
            self.forwarded += 1
            log.info("forwarded round %d to %s: %d samples, %d bytes", update.round, self.parent_id, update.num_samples, sent)
        self._announce()

    def _from_parent(self, item: bytes | FrameError, now: float) -> None:
        try:
            if isinstance(item, FrameError):
                raise item
            raw = read_header(item, self._max_update_bytes)
            header = raw.header
            if header.fleet != self.parent_topics.fleet or header.sender != self.parent_id:
                log.warning("ignored a frame from %r of fleet %r on our parent downlink", header.sender, header.fleet)
                return
            announcement = isinstance(header.body, Blob) and header.body.name == KEY_ANNOUNCEMENT
            if self.parent_trust is not None and not announcement:
                self.parent_trust.verify(header)  # before the payload is hashed or decoded
            frame = decode_payload(raw)
            if announcement:
                if self.parent_trust is not None:
                    data = frame.tensors.get("data")
                    self.parent_trust.announced(header, data if isinstance(data, np.ndarray) else None)
                return
        except (SignatureError, FrameError) as exc:
            if self.refusals.should_log(f"parent {self.parent_id}", exc.reason, now):
                log.warning("ignored a frame from the parent: %s: %s", exc.reason.value, exc.detail)
            return
        body = frame.body
        if isinstance(body, Task):
            try:
                self._send(self.relay.start(body, frame.tensors, now))
            except ValueError as exc:
                log.warning("refused the parent's task of round %d: %s", body.round, exc)
                reject = Reject(reason=RejectReason.UNEXPECTED, detail=str(exc), ref_msg_id=frame.header.msg_id, round=body.round)
                self.parent.publish(self.parent_topics.up(self.aggregator_id), self._parent_frame(reject))
        elif isinstance(body, Reject):
            log.warning("the parent refused our message%s: %s: %s", f" of round {body.round}" if body.round is not None else "",
                        body.reason.value, body.detail)
            if body.reason is RejectReason.UNKNOWN_DEVICE:
                self._announce(force=True)
        elif not isinstance(body, Blob):
            log.warning("ignored an unexpected %r message from the parent", body.kind)

    def _announce(self, force: bool = False) -> None:
        """Publish the relay's hello to the parent: the group's samples, when they changed (or `force`)."""
        group = self.registry.available()
        samples = sum(d.num_samples for d in group)
        if samples == 0 or (samples == self._announced_samples and not force):
            return
        hello = Hello(tier=self.tier, num_samples=samples, num_test_samples=sum(d.num_test_samples for d in group), backend=RELAY_BACKEND)
        self.parent.publish(self.parent_topics.status(self.aggregator_id), self._parent_frame(hello), retain=True)
        self._announced_samples = samples
        log.info("announced to %s: %d devices, %d samples", self.parent_id, len(group), samples)

    def _offline_status(self) -> bytes:
        """Our offline status, signed now: the will at each connect (the parent's broker publishes it if we vanish)
        and the last word of a clean stop."""
        return self._parent_frame(Status(online=False))

    def _parent_frame(self, body: Body, tensors: dict | None = None) -> bytes:
        return encode_frame(self.parent_topics.fleet, self.aggregator_id, body, tensors,
                            signer=self.key.sign if self.key else None)
