"""An aggregator worker process: one of several that share the devices' uplink for one coordinator.

The worker subscribes to every device's uplink through the MQTT 5 shared subscription
`$share/COORDINATOR/tierfl/v1/FLEET/up/+` (the broker hands each message to one worker of the group)
and to the devices' status topics (its registry, for the cheap "known device" check). It runs the
aggregator service's receipt checks on each frame (header, fleet, sender, known device, signature,
tier, tensor table, then the payload), then:

- an update goes to its engine (aggregator.engines.worker): tensors checked, claimed from the
  coordinator, folded into the round's partial sum once granted;
- anything else a device sends on its uplink (a fetch, a catalogue request, batch-norm statistics)
  is passed on whole to the coordinator (`WorkerForward`), which answers the device: only the
  coordinator signs for the aggregator, so a worker never publishes to a device;
- a refusal is passed to the coordinator (a `WorkerClaim` with `refused`), which records and answers it.

Its own topics: `workers/ID/up` (claims, partial sums, forwards, signed with the worker's key), `workers/ID/down`
(grants and flush requests, taken only when signed by the coordinator's key), `workers/ID/status` (retained
Status with the worker's session; offline is its last will, signed afresh at each connect).
MQTT 5 with a clean start and no session expiry: messages the broker assigned to a dead worker die with it
instead of waiting for its return (the coordinator asks their devices again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from aggregator.engines.base import Outgoing
from aggregator.engines.worker import WorkerEngine
from aggregator.service import AggregatorService
from protocol.frame import FrameError, decode_payload, encode_frame, read_header
from protocol.messages import (Body, Reject, RejectReason, Status, Update, WorkerClaim, WorkerFlush, WorkerForward,
                               WorkerGrant)
from protocol.mqtt.link import Will
from protocol.mqtt.url import BrokerAddress
from protocol.signing import DeviceKey, PublicKeyHex, SignatureError, verify_signature

log = logging.getLogger(__name__)
_HEX32 = frozenset("0123456789abcdef")


class WorkerService(AggregatorService):
    """Serves its share of the uplink for the coordinator `coordinator_id`, whose key it takes grants from."""

    def __init__(self, engine: WorkerEngine, broker: BrokerAddress, worker_id: str, coordinator_id: str,
                 coordinator_key: PublicKeyHex, key: DeviceKey, **kwargs: Any) -> None:
        self.worker_engine = engine
        self.coordinator_id, self.coordinator_key = coordinator_id, coordinator_key
        self.worker_key = key
        self.forwarded = 0
        super().__init__(engine, broker, aggregator_id=worker_id, share_group=coordinator_id, key=None, **kwargs)
        self._worker_down = self.topics.worker(worker_id, "down")

    def subscriptions(self, share_group: str | None) -> list[str]:
        """The shared uplink, every device's status, and our downlink from the coordinator."""
        return [self.topics.all_up(share_group), self.topics.all_status, self.topics.worker(self.aggregator_id, "down")]

    def link_options(self) -> dict[str, Any]:
        """MQTT 5 (shared subscriptions), a clean start, and our signed offline status as the last will."""
        return {"mqtt5": True, "on_connect": lambda: self.inbox.put("", b""),
                "will": Will(self.topics.worker(self.aggregator_id, "status"), lambda: self._status(False))}

    def run(self, stop: threading.Event, tick_s: float = 0.1) -> None:
        """Serve until `stop` is set; say we are offline on the way out (the coordinator voids what we held)."""
        stopping = threading.Event()

        def say_offline() -> None:
            stop.wait()
            if self.link.connected:
                self.link.publish(self.topics.worker(self.aggregator_id, "status"), self._status(False), retain=True)
            stopping.set()

        threading.Thread(target=say_offline, name="tierfl-worker-stop", daemon=True).start()
        try:
            super().run(stopping, tick_s)
        finally:
            stop.set()
            log.info("worker %s: %d claimed, %d folded, %d partial sums sent, %d frames forwarded", self.aggregator_id,
                     self.worker_engine.claimed, self.worker_engine.folded, self.worker_engine.flushed, self.forwarded)

    def _handle(self, topic: str, item: bytes | FrameError, now: float) -> None:
        if topic == "":  # (re)connected: say we are online, with our session
            self.link.publish(self.topics.worker(self.aggregator_id, "status"), self._status(True), retain=True)
        elif topic == self._worker_down:
            self._from_coordinator(item, now)
        elif isinstance(item, bytes) and (device := self.topics.device_of(topic)) and topic == self.topics.up(device):
            self._from_device(topic, item, now)
        else:
            super()._handle(topic, item, now)
        self._to_coordinator()

    def _from_device(self, topic: str, item: bytes, now: float) -> None:
        """An uplink frame: an update is ours to check; anything else goes to the coordinator whole, once its header
        passed the cheap checks (a hostile frame is refused here, not forwarded)."""
        device = self.topics.device_of(topic)
        try:
            raw = read_header(item, self._max_update_bytes)
            if problem := self._header_problem(topic, device, raw.header):
                raise FrameError(*problem)
            assert device is not None
            if not isinstance(raw.body, Update):
                self._publish_up(WorkerForward(device=device), {"frame": np.frombuffer(item, np.uint8)})
                self.forwarded += 1
                return
            frame = decode_payload(raw, self._expected_tensors(raw, now))  # the header read once, as the service would
        except FrameError as exc:
            self._refuse(device, exc.reason, exc.detail)
            return
        self._route(topic, device, frame, now)

    def _from_coordinator(self, item: bytes | FrameError, now: float) -> None:
        """A grant or flush request: taken only when the coordinator signed it."""
        try:
            if isinstance(item, FrameError):
                raise item
            raw = read_header(item, self._max_update_bytes)
            if raw.header.fleet != self.topics.fleet or raw.header.sender != self.coordinator_id:
                raise SignatureError(RejectReason.SENDER_MISMATCH, f"a frame from {raw.header.sender!r} of fleet "
                                                                   f"{raw.header.fleet!r}, not our coordinator's")
            verify_signature(raw.header, self.coordinator_key)
            body = decode_payload(raw, {}).body
        except (FrameError, SignatureError) as exc:
            if self.refusals.should_log("coordinator", exc.reason, now):
                hint = (" (is --coordinator-key the key of the coordinator's --state-dir?)"
                        if exc.reason is RejectReason.BAD_SIGNATURE else "")
                log.warning("ignored a frame on our downlink: %s: %s%s", exc.reason.value, exc.detail, hint)
            return
        if isinstance(body, WorkerGrant):
            self.worker_engine.on_grant(body)
        elif isinstance(body, WorkerFlush):
            self.worker_engine.on_flush(body)
        else:
            log.warning("ignored an unexpected %r message from the coordinator", body.kind)

    def _to_coordinator(self) -> None:
        """Publish what the engine has for the coordinator: claims and partial sums."""
        for body, tensors in self.worker_engine.take_outbox():
            self._publish_up(body, tensors)

    def _publish_up(self, body: Body, tensors: Mapping[str, np.ndarray] | None) -> None:
        codec = "uint8" if isinstance(body, WorkerForward) else "float32"
        frame = encode_frame(self.topics.fleet, self.aggregator_id, body, tensors, codec, signer=self.worker_key.sign)
        self.link.publish(self.topics.worker(self.aggregator_id, "up"), frame)

    def _status(self, online: bool) -> bytes:
        return encode_frame(self.topics.fleet, self.aggregator_id, Status(online=online, session=self.worker_engine.session),
                            signer=self.worker_key.sign)

    def _announce_key(self, device: str) -> None:
        """A worker never speaks to devices: the coordinator announces the aggregator's key."""

    def _answer_refusal(self, device: str | None, body: Reject) -> None:
        """Log a refusal and pass it to the coordinator (at a bounded rate per device), which records and answers it."""
        now = time.time()
        if self.refusals.should_log(device, body.reason, now):
            log.warning("refused a message from %s: %s: %s", device or "an unknown sender", body.reason.value, body.detail)
        if device is None or not self._rejects.allow(device, now):
            return
        ref = body.ref_msg_id if body.ref_msg_id and len(body.ref_msg_id) == 32 and set(body.ref_msg_id) <= _HEX32 else None
        self._publish_up(WorkerClaim(session=self.worker_engine.session, device=device, ref_msg_id=ref,
                                     refused=body.reason, detail=body.detail), None)

    def _send(self, messages: list[Outgoing]) -> None:
        for message in messages:
            if isinstance(message.body, Reject):
                self._answer_refusal(message.device_id, message.body)
