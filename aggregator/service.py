"""The aggregator service: binds an engine (aggregator.engines) to MQTT.

paho's network thread only reassembles chunks and queues what arrives, within per-sender byte
budgets (protocol.chunking, aggregator.inbox); the topics of devices this service knows are
admitted first (`_admits`: reassembly room, and inbox room ahead of unknown senders), judged from
thread-safe snapshots only (the registry's `knows`, a frozen copy of the open round's devices).
One loop in `run` checks each frame, cheapest first, before anything is hashed or decoded:
size and header (protocol.frame.read_header), topic, fleet, sender, known device, signature,
then the tensor table against the shapes that message may carry (a secure-aggregation message:
the exact uint8 bytes of its masked tensors, or none); only then the payload's sha256 and its
tensors (decode_payload). It routes what passed (status -> registry, fetch -> artifact files,
catalogue request -> a tier's file list, update -> engine), publishes what the engine returns, signed with the aggregator's key, and
ticks the engine. Nothing refused touches the registry or the engine's state; a status older
than the last one applied is a replay. Refusals are logged and answered at a bounded rate per
sender (protocol.refusals, aggregator.refusals). A single thread owns all state, so there are no locks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.downlink import DEFAULT_TOLERANCE, DEFAULT_VERSIONS, Downlink
from aggregator.engines.base import Engine, Outgoing
from aggregator.engines.personal import carried_personal, update_shapes
from aggregator.inbox import Inbox
from aggregator.refusals import RateLimiter
from aggregator.registry import DeviceRegistry, RegistryFull
from aggregator.store.artifacts import ArtifactStore
from aggregator.strategies.bn_statistics import statistic_names
from protocol.chunking import DEFAULT_MAX_MESSAGE_BYTES
from protocol.frame import Frame, FrameError, RawFrame, decode_payload, encode_frame, read_header
from protocol.messages import (Answer, Blob, BnStatistics, Catalogue, CatalogueRequest, Fetch, FrameHeader, Hello,
                               Reject, RejectReason, SecAgg, Status, Task, Update)
from protocol.mqtt.link import MqttLink
from protocol.mqtt.url import BrokerAddress
from protocol.refusals import RefusalLog
from protocol.signing import DeviceKey, SignatureCheck, SignatureError, key_announcement
from protocol.topics import Topics

if TYPE_CHECKING:
    from aggregator.analytics import AnalyticsDesk
    from aggregator.monitor import Monitor

log = logging.getLogger(__name__)
FETCHES_PER_MINUTE = 30  # Fetch and CatalogueRequest messages one device may send per minute (a tier is two or three)
REJECTS_PER_MINUTE = 30  # Reject messages sent back to one sender per minute; the rest are counted and logged only
JOINS_LOGGED_PER_10_S = 20  # "joined" log lines per 10 s; the rest are counted in the next one


class AggregatorService:
    """Runs the engine against a broker until the configured rounds are done (or `stop` is set)."""

    def __init__(
        self,
        engine: Engine,
        broker: BrokerAddress,
        aggregator_id: str = "aggregator",
        share_group: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_update_bytes: int = 64 << 20,
        downlink: str = "float32",
        downlink_versions: int = DEFAULT_VERSIONS,
        downlink_tolerance: float = DEFAULT_TOLERANCE,
        downlink_full: str = "float16",
        signatures: SignatureCheck | None = None,
        monitor: Monitor | None = None,
        key: DeviceKey | None = None,
        inbox: Inbox | None = None,
        analytics: AnalyticsDesk | None = None,
    ) -> None:
        """`analytics`: answers operators' queries (aggregator.analytics), posted to `monitor`'s status server."""
        self.engine = engine
        self.analytics = analytics
        self._analytics_seen = -1  # the desk's change count last copied to the status page
        self.registry: DeviceRegistry = engine.registry
        self.artifacts: ArtifactStore = engine.artifacts
        self.aggregator_id = aggregator_id
        self.topics = Topics(engine.config.fleet)
        self._max_update_bytes = max_update_bytes
        self._signatures = signatures  # None: an open fleet, signatures not required
        self.monitor = monitor  # metrics and the status page; fed from this service's thread
        self.key = key  # signs every frame we send; devices pin or are given its public half
        self._signer = key.sign if key else None
        self.downlink = Downlink(engine.config.fleet, aggregator_id, downlink, engine.config.seed, signer=self._signer,
                                 versions=downlink_versions, tolerance=downlink_tolerance, full=downlink_full)
        self._announcement = (encode_frame(engine.config.fleet, aggregator_id, *key_announcement(key), "uint8",
                                           signer=key.sign) if key else None)
        self._announced: set[str] = set()  # devices sent the key announcement since they said hello
        self.inbox = inbox if inbox is not None else Inbox()  # an empty Inbox is falsy
        if self.inbox.admit is None:
            self.inbox.admit = self._admits
        self._device_topics = (f"{self.topics.base}/up/", f"{self.topics.base}/status/")
        self._round_devices: frozenset[str] = frozenset()  # the open round's devices, for the network thread
        self._round_seen: tuple[int, int] | None = None  # (number, devices) of the open round when copied
        self._refresh_round_devices()
        self.refusals = RefusalLog()
        self._rejects = RateLimiter(REJECTS_PER_MINUTE, 60.0)
        self._fetches = RateLimiter(FETCHES_PER_MINUTE, 60.0)
        self._join_log = RateLimiter(JOINS_LOGGED_PER_10_S, 10.0)  # a flood of hellos is not a flood of log lines
        self._unlogged_joins = 0
        self._last_flush = 0.0
        self.link = MqttLink(
            broker,
            client_id=f"tierfl-{engine.config.fleet}-{aggregator_id}",
            subscriptions=self.subscriptions(share_group),
            on_frame=self.inbox.put,
            on_bad_frame=self.inbox.put,
            max_message_bytes=max_message_bytes,
            max_frame_bytes=max_update_bytes,
            admit_chunks=self._admits,
            **self.link_options(),
        )

    def subscriptions(self, share_group: str | None) -> list[str]:
        """What the link subscribes to: every device's uplink (through `share_group`'s shared subscription if given)
        and status; a subclass (a coordinator of workers, a worker) changes it."""
        return [self.topics.all_up(share_group), self.topics.all_status]

    def link_options(self) -> dict[str, Any]:
        """More MqttLink options of a subclass (a worker's last will, MQTT 5); none here."""
        return {}

    def run(self, stop: threading.Event, tick_s: float = 0.1) -> None:
        """Serve until every round is done or `stop` is set."""
        self.link.start()
        try:
            while not stop.is_set() and not self.engine.finished:
                step_started = time.perf_counter()
                item = self.inbox.get(timeout=tick_s)
                now = time.time()
                if item is not None:
                    self.handle_safely(*item, now)
                for topic, count in self.inbox.take_dropped().items():
                    self._refuse(self.topics.device_of(topic), RejectReason.RATE_LIMITED,
                                 f"{count} messages on {topic} dropped: over the inbox budget")
                self._send(self.engine.tick(now))
                self._serve_analytics_safely(now)
                self._refresh_round_devices()
                self._flush_ledger(now)
                if self.monitor:
                    self.monitor.observe(self.engine, time.time(), time.perf_counter() - step_started)
        finally:
            self._flush_ledger(float("inf"))
            time.sleep(0.2)  # let the last QoS 1 publishes leave
            self.link.stop()

    def _serve_analytics_safely(self, now: float) -> None:
        """Serve the analytics desk; a bug met there is logged (at most every 10 s) and the rounds go on."""
        try:
            self._serve_analytics(now)
        except Exception:  # an operator's query must never stop training
            if self.refusals.should_log(None, RejectReason.INTERNAL_ERROR, now):
                log.exception("internal error in the analytics desk; the training rounds go on")

    def _serve_analytics(self, now: float) -> None:
        """Take the queries posted to the status server, run the desk, copy its results to the status page."""
        if self.analytics is None:
            return
        if self.monitor:
            for query_id, request in self.monitor.take_queries():
                self.analytics.submit(request, now, query_id)
        self._send(self.analytics.tick(now))
        if self.monitor and self.analytics.changes != self._analytics_seen:
            self._analytics_seen = self.analytics.changes
            self.monitor.show_analytics(list(self.analytics.results.values()))

    def handle_safely(self, topic: str, item: bytes | FrameError, now: float) -> None:
        """Handle one inbox item; a bug met on the way is logged, counted as internal_error and survived."""
        try:
            self._handle(topic, item, now)
        except Exception as exc:  # the last resort: no message may stop the service
            device = self.topics.device_of(topic)
            if self.refusals.should_log(device, RejectReason.INTERNAL_ERROR, now):
                log.exception("internal error while handling a message from %s on %s", device or "an unknown sender", topic)
            self.engine.count_rejection(RejectReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"[:500], device)

    def _handle(self, topic: str, item: bytes | FrameError, now: float) -> None:
        device = self.topics.device_of(topic)
        if self.monitor and isinstance(item, bytes):
            self.monitor.received(len(item))
        try:
            if isinstance(item, FrameError):
                raise item
            raw = read_header(item, self._max_update_bytes)
            problem = self._header_problem(topic, device, raw.header)
            if problem is not None:
                self._refuse(device, *problem)
                return
            assert device is not None
            frame = decode_payload(raw, self._expected_tensors(raw, now))
        except FrameError as exc:
            self._refuse(device, exc.reason, exc.detail)
            return
        self._route(topic, device, frame, now)

    def _header_problem(self, topic: str, device: str | None, header: FrameHeader) -> tuple[RejectReason, str] | None:
        """Why a frame must be refused on its header alone (cheapest checks first), or None."""
        body = header.body
        fleet = self.engine.config.fleet
        if device is None:
            return RejectReason.MALFORMED, f"message on unexpected topic {topic!r}"
        if header.fleet != fleet:
            return RejectReason.WRONG_FLEET, f"fleet {header.fleet!r}, this is {fleet!r}"
        if header.sender != device:
            return RejectReason.SENDER_MISMATCH, f"sender {header.sender!r} on {device!r}'s topic"
        if topic == self.topics.up(device) and not self._known(device):
            return RejectReason.UNKNOWN_DEVICE, f"{device} has not announced itself"
        if self._signatures is not None:
            try:
                self._signatures.verify(header)
            except SignatureError as exc:
                return exc.reason, exc.detail
        if isinstance(body, (Update, BnStatistics)) and body.tier not in self.artifacts.tiers:
            return RejectReason.UNKNOWN_TIER, f"tier {body.tier!r} is not exported"
        return None

    def _known(self, device: str) -> bool:
        """A registered device, or one of the open round's (after a restart its hello may lag behind its update)."""
        return device in self.registry or self.engine.asked(device)

    def _admits(self, topic: str) -> bool:
        """Whether a message on `topic` gets reassembly room, and inbox room ahead of unknown senders: a known
        device's (registered, or of the open round) up or status topic, or a topic that is none of our devices'
        (a subclass's own subscription). Called on the network thread: reads only thread-safe snapshots."""
        if not topic.startswith(self._device_topics):
            return True
        device = self.topics.device_of(topic)
        return device is not None and (self.registry.knows(device) or device in self._round_devices)

    def _refresh_round_devices(self) -> None:
        """Copy the open round's devices for `_admits` when the round (or its size) changed."""
        seen = self.engine.round_key()
        if seen != self._round_seen:
            current = self.engine.view()
            self._round_devices = frozenset(current.tiers) if current is not None else frozenset()
            self._round_seen = seen

    def _expected_tensors(self, raw: RawFrame, now: float) -> Mapping[str, tuple[int, ...]]:
        """The tensor names and shapes this message may carry; FrameError if it is refused on its kind alone."""
        body = raw.body
        if isinstance(body, Update):
            personal = self.engine.config.personal_layers  # FedPer: never sent, so refused by name when they are
            if problem := carried_personal((entry.name for entry in raw.header.tensors), personal):
                raise FrameError(*problem)
            if body.unchanged or body.declined:
                return {}
            return update_shapes(self.artifacts.tiers[body.tier].shapes, personal)  # SCAFFOLD too: delta c_i is derived
        if isinstance(body, BnStatistics):
            shapes = self.artifacts.tiers[body.tier].shapes
            return {name: shapes[name] for name in statistic_names(shapes)}
        if isinstance(body, SecAgg):
            return self._secagg_tensors(raw, now)
        if isinstance(body, Answer):
            if self.analytics is None:
                raise FrameError(RejectReason.UNEXPECTED, "this aggregator runs no analytics queries")
            return self.analytics.expected_tensors(raw.header.sender, body, now)
        return {}  # hello, status, fetch and the rest carry no tensors

    def _secagg_tensors(self, raw: RawFrame, now: float) -> Mapping[str, tuple[int, ...]]:
        """A secure-aggregation message's tensors: the exact uint8 bytes of the open session's masked tensors for a
        masked input the secure engine expects, none otherwise; FrameError with the reason for any other."""
        body = raw.body
        assert isinstance(body, SecAgg)
        if self.analytics is not None and self.analytics.owns(body.session):  # a secure analytics query's
            expected = self.analytics.masked_tensors(raw.header.sender, body, now)
        else:
            expected = self.engine.masked_tensors(raw.header.sender, body, now)
        for entry in raw.header.tensors:
            if entry.dtype != "uint8" or entry.codec != "uint8":
                raise FrameError(RejectReason.BAD_TENSOR, f"masked tensor {entry.name!r} is {entry.codec} "
                                                          f"({entry.dtype}), not the raw uint8 bytes of ring integers")
        return expected

    def _route(self, topic: str, device: str, frame: Frame, now: float) -> None:
        header, body = frame.header, frame.body
        on_status, on_up = topic == self.topics.status(device), topic == self.topics.up(device)
        if on_status and isinstance(body, Hello):
            self._on_hello(device, header, body, now)
        elif on_status and isinstance(body, Status):
            self._on_status(device, header, body, now)
        elif on_up and isinstance(body, Fetch):
            self._on_fetch(device, body, now)
        elif on_up and isinstance(body, CatalogueRequest):
            self._on_catalogue_request(device, header.msg_id, body, now)
        elif on_up and isinstance(body, Update):
            outgoing = self.engine.on_update(device, header.msg_id, body, frame.tensors, frame.nbytes, now)
            if not _refused(outgoing, device):
                self.registry.seen(device, now)
                self.registry.holds(device, body.tier, body.base_version)
                if self.monitor:
                    self.monitor.update_accepted()
            self._send(outgoing)
        elif on_up and isinstance(body, SecAgg) and self.analytics is not None and self.analytics.owns(body.session):
            self._send(self.analytics.on_secagg(device, header.msg_id, body, frame.tensors, now))
        elif on_up and isinstance(body, SecAgg):
            outgoing = self.engine.on_secagg(device, header.msg_id, body, frame.tensors, frame.nbytes, now)
            if not _refused(outgoing, device):
                self.registry.seen(device, now)
                if self.monitor and body.phase == "masked_input":
                    self.monitor.update_accepted()
            self._send(outgoing)
        elif on_up and isinstance(body, Answer) and self.analytics is not None:
            self._send(self.analytics.on_answer(device, header.msg_id, body, frame.tensors, now))
        elif on_up and isinstance(body, BnStatistics):
            outgoing = self.engine.on_bn_statistics(device, header.msg_id, body, frame.tensors, now)
            if not _refused(outgoing, device):
                self.registry.seen(device, now)
                self.registry.holds(device, body.tier, body.base_version)
            self._send(outgoing)
        else:
            self._refuse(device, RejectReason.UNEXPECTED, f"a {body.kind!r} message does not belong on {topic}")

    def _on_hello(self, device: str, header: FrameHeader, hello: Hello, now: float) -> None:
        if hello.tier is not None and hello.tier not in self.artifacts.tiers:
            known = ", ".join(sorted(self.artifacts.tiers))
            self._refuse(device, RejectReason.UNKNOWN_TIER, f"tier {hello.tier!r} is not exported (have: {known})")
            return
        old = self.registry.get(device)
        if old is not None and old.hello_sent_at is not None and header.sent_at < old.hello_sent_at:
            self._refuse(device, RejectReason.REPLAYED, f"a hello sent at {header.sent_at:.3f}, older than the one "
                         f"registered ({old.hello_sent_at:.3f})")
            return
        try:
            self.registry.hello(device, hello.num_samples, hello.num_test_samples, hello.tier, hello.backend, now,
                                hello.holds, hello.seconds_per_sample, session=hello.session, sent_at=header.sent_at)
        except RegistryFull as exc:
            self._refuse(device, RejectReason.RATE_LIMITED, str(exc))
            return
        if old is None or old.session != hello.session:
            if self._join_log.allow("joined", now):
                more, self._unlogged_joins = self._unlogged_joins, 0
                log.info("%s joined: %d samples, tier %s, backend %s%s", device, hello.num_samples, hello.tier or "any",
                         hello.backend, f" ({more} more joined unlogged before)" if more else "")
            else:
                self._unlogged_joins += 1
            self._announced.discard(device)
        self._announce_key(device)

    def _on_status(self, device: str, header: FrameHeader, status: Status, now: float) -> None:
        info = self.registry.get(device)
        if info is not None and info.session is not None and status.session != info.session:
            self._refuse(device, RejectReason.REPLAYED, f"a status of session {status.session}, not of the running "
                         f"agent's session {info.session}")
            return
        if info is None:  # a retained status of a device this run has not met (an earlier run's): nothing to say
            return
        if info.status_sent_at is not None and header.sent_at <= info.status_sent_at:
            self._refuse(device, RejectReason.REPLAYED, f"a status sent at {header.sent_at:.3f}, not newer than the "
                         f"last one applied ({info.status_sent_at:.3f})")
            return
        if info.session is not None and info.hello_sent_at is not None and header.sent_at < info.hello_sent_at:
            # an agent stamps every hello of a connection just before signing that connection's will, so a will older
            # than the registered hello is an earlier connection's: this bound holds after a restart of ours too
            self._refuse(device, RejectReason.REPLAYED, f"a status sent at {header.sent_at:.3f}, older than the "
                         f"device's current hello ({info.hello_sent_at:.3f}): an earlier connection's")
            return
        self.registry.set_online(device, status.online, now, sent_at=header.sent_at)
        log.info("%s is %s", device, "online" if status.online else "offline")

    def _announce_key(self, device: str) -> None:
        """Send our public key, signed by itself, once per device session: devices without --aggregator-key pin it."""
        if self._announcement is not None and device not in self._announced:
            self._announced.add(device)
            sent = self.link.publish(self.topics.down(device), self._announcement)
            if self.monitor:
                self.monitor.sent(sent)

    def _on_fetch(self, device: str, fetch: Fetch, now: float) -> None:
        if device not in self.registry:
            self._refuse(device, RejectReason.UNKNOWN_DEVICE, f"{device} has not announced itself")
            return
        if not self._fetches.allow(device, now):
            self._refuse(device, RejectReason.RATE_LIMITED, f"more than {FETCHES_PER_MINUTE} fetches in a minute")
            return
        self.registry.seen(device, now)
        for sha in dict.fromkeys(fetch.sha256):  # each file once, however often it is listed
            found = self.artifacts.read(sha)
            if found is None:
                self._refuse(device, RejectReason.UNKNOWN_ARTIFACT, f"no exported file has sha256 {sha}")
                continue
            name, data = found
            self._send([Outgoing(device, Blob(sha256=sha, name=name), {"data": np.frombuffer(data, np.uint8)})])

    def _on_catalogue_request(self, device: str, msg_id: str, request: CatalogueRequest, now: float) -> None:
        """A registered device asks for a tier's files: answered with what a task of that tier would name (signed,
        bound to the request's msg_id), within the device's fetch budget; refusals name the request."""
        if device not in self.registry:
            self._refuse(device, RejectReason.UNKNOWN_DEVICE, f"{device} has not announced itself", ref=msg_id)
            return
        if not self._fetches.allow(device, now):
            self._refuse(device, RejectReason.RATE_LIMITED, f"more than {FETCHES_PER_MINUTE} fetches in a minute",
                         ref=msg_id)
            return
        self.registry.seen(device, now)
        tier = self.artifacts.tiers.get(request.tier)
        if tier is None:
            known = ", ".join(sorted(self.artifacts.tiers))
            self._refuse(device, RejectReason.UNKNOWN_TIER, f"tier {request.tier!r} is not exported (have: {known})",
                         ref=msg_id)
            return
        self._send([Outgoing(device, Catalogue(tier=request.tier, manifest_sha256=tier.manifest_sha256,
                                               artifacts=tier.files, request=msg_id))])

    def _refuse(self, device: str | None, reason: RejectReason, detail: str, ref: str | None = None) -> None:
        """Count a refusal decided here (the engine counts its own), then log and answer it (naming the message
        refused, `ref`, when the sender waits for an answer to it)."""
        self.engine.count_rejection(reason, detail, device)
        self._answer_refusal(device, Reject(reason=reason, detail=detail, ref_msg_id=ref))

    def _answer_refusal(self, device: str | None, body: Reject) -> None:
        """Every refusal, the service's or the engine's: logged once per sender and reason per interval, shown on
        the status page, and sent back at a bounded rate per sender."""
        now = time.time()
        if self.refusals.should_log(device, body.reason, now):
            more = self.refusals.suppressed(device, body.reason)
            log.warning("rejected a message from %s: %s: %s%s", device or "an unknown sender", body.reason.value,
                        body.detail, f" (and {more} more like it in the last {self.refusals.interval_s:.0f} s)" if more else "")
        if self.monitor:
            self.monitor.rejected(device, body.reason, body.detail, now)
        if device is not None and self._rejects.allow(device, now):
            self._publish(Outgoing(device, body))

    def _flush_ledger(self, now: float) -> None:
        """Write the rows buffered in the ledger: refusals at most once a second; acceptances (group commit,
        aggregator.store.ledger) within 0.2 s, so many updates share one sync."""
        ledger = self.engine.ledger
        if ledger is not None and (now - self._last_flush >= 1.0
                                   or (ledger.pending_acceptances and now - self._last_flush >= 0.2)):
            self.engine.ledger.flush()
            self._last_flush = now

    def _send(self, messages: list[Outgoing]) -> None:
        for message in messages:
            if isinstance(message.body, Reject):
                self._answer_refusal(message.device_id, message.body)
            else:
                self._publish(message)

    def _publish(self, message: Outgoing) -> None:
        """Encode, sign and publish one message (to its device, or retained on the rounds topic)."""
        frame = self._frame(message)
        if message.device_id is None:
            sent = self.link.publish(self.topics.rounds, frame, retain=True)
        else:
            self._announce_key(message.device_id)
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
        return encode_frame(self.engine.config.fleet, self.aggregator_id, body, tensors, codec, signer=self._signer)


def _refused(outgoing: list[Outgoing], device: str) -> bool:
    """Whether the engine's answer to `device` is a refusal."""
    return any(isinstance(m.body, Reject) and m.device_id == device for m in outgoing)
