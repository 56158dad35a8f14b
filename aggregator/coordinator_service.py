"""The coordinator of aggregator workers: the aggregator service, with its uplink served by worker processes.

It owns the rounds, the state, the ledger and the downlink (every task, blob, catalogue and refusal
to a device is signed with its key, as a single aggregator's), and never subscribes to the devices'
uplink: aggregator workers (aggregator.worker_service) share it. It subscribes to the devices'
status topics (the registry) and to every worker's topics; a worker frame is taken only from a
configured worker (`--workers FILE`: worker id -> Ed25519 public key) and only when signed by its
key, before its payload is hashed or decoded:

- a `WorkerClaim` goes to the engine (aggregator.engines.coordinated), which grants or refuses it;
- a `PartialSum` (tensors: exactly the global tensors, float32) is counted whole or refused whole;
- a `WorkerForward` carries a device's frame (a fetch, a catalogue request, batch-norm statistics),
  which is then checked and served exactly as if it had come on the device's uplink topic;
- a worker's retained `Status` registers its session; offline (its last will) voids its grants.

Grants and flush requests go back on `workers/ID/down`, signed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from aggregator.engines.base import Outgoing
from aggregator.engines.coordinated import CoordinatedEngine
from aggregator.service import AggregatorService
from protocol.frame import FrameError, decode_payload, encode_frame, read_header
from protocol.messages import PartialSum, RejectReason, Status, WorkerClaim, WorkerForward
from protocol.mqtt.url import BrokerAddress
from protocol.signing import PublicKeyHex, SignatureError, verify_signature

log = logging.getLogger(__name__)


class CoordinatorService(AggregatorService):
    """Serves `engine`'s rounds with the uplink folded by the workers whose keys are `workers`."""

    def __init__(self, engine: CoordinatedEngine, broker: BrokerAddress, workers: Mapping[str, PublicKeyHex],
                 **kwargs: Any) -> None:
        self.coordinated = engine
        self.worker_keys = dict(workers)
        super().__init__(engine, broker, **kwargs)

    def subscriptions(self, share_group: str | None) -> list[str]:
        """Every device's status and every worker's uplink and status; not the devices' uplink (the workers')."""
        return [self.topics.all_status, self.topics.all_workers("up"), self.topics.all_workers("status")]

    def _admits(self, topic: str) -> bool:
        """A worker topic gets reassembly and inbox room only when its worker is configured (--workers); a device's
        topic as the aggregator service says."""
        found = self.topics.worker_of(topic)
        return found[0] in self.worker_keys if found is not None else super()._admits(topic)

    def _handle(self, topic: str, item: bytes | FrameError, now: float) -> None:
        found = self.topics.worker_of(topic)
        if found is None:
            super()._handle(topic, item, now)
            return
        worker, direction = found
        try:
            if isinstance(item, FrameError):
                raise item
            raw = read_header(item, self._max_update_bytes)
            header, body = raw.header, raw.body
            if header.fleet != self.topics.fleet or header.sender != worker:
                raise FrameError(RejectReason.SENDER_MISMATCH, f"sender {header.sender!r} of fleet {header.fleet!r} "
                                                               f"on worker {worker}'s topic")
            public = self.worker_keys.get(worker)
            if public is None:
                raise FrameError(RejectReason.NOT_ENROLLED, f"{worker} is not a configured worker (--workers)")
            verify_signature(header, public)
            if direction == "status" and isinstance(body, Status):
                decode_payload(raw, {})
                if body.session is None:
                    raise FrameError(RejectReason.MALFORMED, "a worker's status names its session")
                self._send(self.coordinated.on_worker_status(worker, body.session, body.online, now, header.sent_at))
            elif direction == "up" and isinstance(body, WorkerClaim):
                decode_payload(raw, {})
                self._send(self.coordinated.on_claim(worker, body, now, header.sent_at))
            elif direction == "up" and isinstance(body, PartialSum):
                before = self.coordinated.counted
                try:  # signed by the worker: a partial whose tensors do not decode is refused whole by the engine
                    if any(entry.codec != "float32" for entry in header.tensors):  # plain float32, as workers send
                        raise FrameError(RejectReason.BAD_TENSOR, "a partial sum's tensors are float32, not compressed")
                    shapes = {name: tuple(value.shape) for name, value in self.coordinated.weights.items()}
                    tensors, refused = decode_payload(raw, shapes).tensors, None
                except FrameError as exc:
                    tensors, refused = {}, (exc.reason, f"worker {worker}: {exc.detail}")
                self._send(self.coordinated.on_partial(worker, body, tensors, len(item), now, header.sent_at, refused))
                for _ in range(self.coordinated.counted - before if self.monitor else 0):
                    self.monitor.update_accepted()  # type: ignore[union-attr]
            elif direction == "up" and isinstance(body, WorkerForward):
                entries = raw.header.tensors
                if len(entries) != 1 or entries[0].name != "frame" or entries[0].dtype != "uint8" or len(entries[0].shape) != 1:
                    raise FrameError(RejectReason.BAD_TENSOR, "a forwarded frame is one 1-D uint8 tensor named frame")
                frame = decode_payload(raw, {"frame": tuple(entries[0].shape)})
                inner = frame.tensors["frame"]
                super()._handle(self.topics.up(body.device), inner.tobytes(), now)  # type: ignore[union-attr]
            elif direction != "down":
                raise FrameError(RejectReason.UNEXPECTED, f"a {body.kind!r} message does not belong on {topic}")
        except (FrameError, SignatureError) as exc:
            if self.refusals.should_log(f"worker {worker}", exc.reason, now):
                log.warning("refused a frame from worker %s: %s: %s", worker, exc.reason.value, exc.detail)
            self.engine.count_rejection(exc.reason, f"worker {worker}: {exc.detail}")

    def _send(self, messages: list[Outgoing]) -> None:
        super()._send(messages)
        for message in self.coordinated.take_worker_messages():
            frame = encode_frame(self.topics.fleet, self.aggregator_id, message.body, signer=self._signer)
            self.link.publish(self.topics.worker(message.worker, "down"), frame)
