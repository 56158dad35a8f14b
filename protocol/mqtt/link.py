"""One MQTT connection for either side: frames out in chunks, whole frames in, reconnects by itself.

paho-mqtt runs the network loop in its own thread. Incoming payloads are reassembled there, per
topic and within budgets at O(1) per chunk (protocol.chunking), and
handed to `on_frame(topic, frame_bytes)`; keep that callback short (queue work elsewhere).
Subscriptions are renewed on every (re)connect, so a broker restart loses nothing we asked for.
Every failed attempt to (re)connect waits longer than the last (exponential back-off with jitter,
so a fleet does not come back in lockstep after a broker restart), and says so in the log.
Outbound bytes the broker has not acknowledged yet are bounded (`max_unacked_bytes`): a publish
waits for room, and after `send_wait_s` without room the frame is dropped and counted (and so is
every frame after it until the broker acknowledges something), so a
fleet of thousands of (perhaps invented) devices cannot make us hold a copy of the model for each.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from protocol.chunking import DEFAULT_MAX_MESSAGE_BYTES, Reassembler, split_message
from protocol.frame import FrameError
from protocol.mqtt.url import BrokerAddress, BrokerUnreachable

log = logging.getLogger(__name__)
DEFAULT_MAX_UNACKED_BYTES = 64 << 20  # published, not yet acknowledged by the broker


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for us if we vanish (a callable payload is made afresh for each connect)."""

    topic: str
    payload: bytes | Callable[[], bytes]
    retain: bool = True


@dataclass(frozen=True)
class Backoff:
    """Waits between connection attempts: `first_s` doubling up to `max_s`, each shortened by up to `jitter` of it."""

    first_s: float = 1.0
    max_s: float = 60.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ValueError(f"reconnect delays need 0 < first ({self.first_s} s) <= max ({self.max_s} s)")
        if not 0 <= self.jitter < 0.5:  # below 1/2 every delay stays longer than the one before, until the cap
            raise ValueError(f"reconnect jitter {self.jitter} is not in [0, 0.5)")

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after `failures` (1, 2, ...) failed attempts in a row."""
        base = min(self.max_s, self.first_s * 2.0 ** min(failures - 1, 64))
        return base * (1.0 - self.jitter * rng.random())


class MqttLink:
    """A paho-mqtt client speaking TierFL frames."""

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        subscriptions: Sequence[str],
        on_frame: Callable[[str, bytes], None],
        on_bad_frame: Callable[[str, FrameError], None],
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[float | None], None] | None = None,  # the back-off delay, None when stopping
        will: Will | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_frame_bytes: int = 64 << 20,
        admit_chunks: Callable[[str], bool] | None = None,  # which topics get reassembly room (protocol.chunking)
        keepalive_s: int = 30,
        backoff: Backoff = Backoff(),
        max_unacked_bytes: int = DEFAULT_MAX_UNACKED_BYTES,
        send_wait_s: float = 10.0,
        mqtt5: bool = False,
    ) -> None:
        """`mqtt5`: speak MQTT 5 with a clean start and no session kept (an aggregator worker on a shared
        subscription: messages the broker assigned to it die with it instead of waiting for its return);
        otherwise MQTT 3.1.1 with a persistent session (the broker keeps our QoS 1 messages while we are away)."""
        self.address = address
        self._mqtt5 = mqtt5
        self.backoff = backoff
        self._subscriptions = list(subscriptions)
        self._on_frame = on_frame
        self._on_bad_frame = on_bad_frame
        self._on_connect_hook = on_connect
        self._on_disconnect_hook = on_disconnect
        self._max_message_bytes = max_message_bytes
        self._keepalive_s = keepalive_s
        self._reassembler = Reassembler(max_frame_bytes=max_frame_bytes, admit=admit_chunks)
        self._connected = threading.Event()
        self._connack_failure: str | None = None
        self._stopping = False
        self._failures = 0  # failed attempts since the last accepted connection
        self._rng = random.Random()
        self._max_unacked_bytes, self._send_wait_s = max_unacked_bytes, send_wait_s
        self._acknowledged = threading.Condition()
        self._unacked: dict[int, int] = {}  # message id -> bytes, of QoS 1 publishes not acknowledged yet
        self._unacked_bytes = 0
        self._early_acks: set[int] = set()  # acknowledgements that came before publish() returned the id
        self._congested = False  # the last wait for room timed out: drop at once until an acknowledgement
        self.dropped_frames = 0  # frames dropped for want of outbound room
        if mqtt5:
            self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                       protocol=MQTTProtocolVersion.MQTTv5)
        else:
            self._client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                clean_session=False,  # the broker keeps our QoS 1 messages while we are away
                protocol=MQTTProtocolVersion.MQTTv311,
            )
        self._client.max_queued_messages_set(0)
        if address.username:
            self._client.username_pw_set(address.username, address.password)
        context = address.ssl_context()
        if context is not None:  # mqtts://: verify the broker's certificate and host name
            self._client.tls_set_context(context)
        if will:
            self._client.on_pre_connect = lambda client, userdata: client.will_set(
                will.topic, will.payload() if callable(will.payload) else will.payload, qos=1, retain=will.retain)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_connect_fail = self._handle_connect_fail
        self._client.on_message = self._handle_message
        self._client.on_publish = self._handle_publish

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def client(self) -> mqtt.Client:
        """The paho client, for a network loop of its own that drives many links (edge_client.fleet)."""
        return self._client

    def open(self) -> None:
        """Connect without a network thread: the caller's loop drives `client` (loop_read, loop_write, loop_misc, and
        reconnect after `on_disconnect`'s delay). OSError when the broker cannot be reached."""
        self._stopping = False
        self._client.connect(self.address.host, self.address.port, keepalive=self._keepalive_s)

    def reopen(self) -> None:
        """Connect again after a disconnect, driven by the caller's loop as after `open`; OSError if unreachable."""
        self._stopping = False
        self._client.reconnect()

    def vanish(self) -> None:
        """Drop the connection without a DISCONNECT, as a device that lost power: the broker publishes our will."""
        self._stopping = True
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):  # not connected (any more): nothing to drop
                sock.shutdown(2)  # socket.SHUT_RDWR: the caller's loop reads the end and lets paho close the socket

    def start(self, timeout_s: float = 10.0, retry_for_s: float | None = 0.0, stop: threading.Event | None = None) -> bool:
        """Connect and start the network thread; True once the broker accepted us, False if `stop` was set first.

        A broker that cannot be reached is tried again with back-off for `retry_for_s` seconds
        (None: until it answers), then BrokerUnreachable with the reason. A broker that refuses us
        is BrokerUnreachable at once; so is one that gives no CONNACK within `timeout_s`, unless
        we are still within `retry_for_s`.
        """
        where = f"{self.address.host}:{self.address.port}"
        give_up_at = None if retry_for_s is None else time.monotonic() + retry_for_s
        while True:
            try:
                if self._mqtt5:  # session expiry 0: the broker forgets the session when the connection ends
                    self._client.connect(self.address.host, self.address.port, keepalive=self._keepalive_s, clean_start=True)
                else:
                    self._client.connect(self.address.host, self.address.port, keepalive=self._keepalive_s)
                break
            except ssl.SSLCertVerificationError as exc:  # retrying will not make the certificate verify
                raise BrokerUnreachable(
                    f"the TLS certificate of the MQTT broker at {where} does not verify: {exc.verify_message or exc}; "
                    "check the ?ca= file of the broker URL (the fleet's ca.crt) and the host name devices use") from None
            except OSError as exc:
                reason = exc.strerror or str(exc)
            self._failures += 1
            delay = self.backoff.delay(self._failures, self._rng)
            if give_up_at is not None and time.monotonic() + delay > give_up_at:
                tries = f" after {self._failures} attempts" if self._failures > 1 else ""
                raise BrokerUnreachable(f"cannot reach MQTT broker at {where} ({reason}){tries}")
            log.warning("cannot reach MQTT broker at %s (%s): attempt %d failed, next in %.1f s",
                        where, reason, self._failures, delay)
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                return False
        self._client.loop_start()
        connack_by = max(time.monotonic() + timeout_s, give_up_at or 0.0)
        while not self._connected.wait(0.1):
            if self._connack_failure or (give_up_at is not None and time.monotonic() > connack_by):
                self.stop()
                if self._connack_failure:
                    raise BrokerUnreachable(f"MQTT broker at {where} refused the connection: {self._connack_failure}")
                raise BrokerUnreachable(f"MQTT broker at {where} accepted TCP but gave no CONNACK within {timeout_s:.0f} s "
                                        "(is it an MQTT broker, and does the URL's scheme, mqtt:// or mqtts://, match "
                                        "the port?)")
            if stop is not None and stop.is_set():
                self.stop()
                return False
        return True

    def stop(self, flush_timeout_s: float = 0.0) -> None:
        """Wait up to `flush_timeout_s` for the broker to acknowledge our messages, disconnect cleanly
        (no last will) and stop the network thread."""
        if flush_timeout_s > 0 and self.connected and not self.flush(flush_timeout_s):
            log.warning("the broker did not acknowledge every message within %.0f s", flush_timeout_s)
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    def flush(self, timeout_s: float) -> bool:
        """True once the broker has acknowledged every message published so far; False after `timeout_s`."""
        with self._acknowledged:
            return self._acknowledged.wait_for(lambda: not self._unacked, timeout=timeout_s)

    def publish(self, topic: str, frame: bytes, retain: bool = False) -> int:
        """Queue `frame` for `topic` at QoS 1, chunked if large; returns the bytes queued (0: dropped, no room)."""
        if not self._wait_for_room(len(frame)):
            self.dropped_frames += 1
            log.warning("dropped a %d-byte frame for %s: %d bytes still unacknowledged by the broker after %.0f s",
                        len(frame), topic, self._unacked_bytes, self._send_wait_s)
            return 0
        sent = 0
        for message in split_message(frame, self._max_message_bytes):
            self._track(self._client.publish(topic, message, qos=1, retain=retain).mid, len(message))
            sent += len(message)
        return sent

    def clear_retained(self, topic: str) -> None:
        """Delete the retained message of `topic` (an empty retained publish, per MQTT)."""
        self._track(self._client.publish(topic, b"", qos=1, retain=True).mid, 0)

    def _wait_for_room(self, size: int) -> bool:
        """Wait until `size` more bytes fit the unacknowledged budget (any frame fits an empty one)."""
        def room() -> bool:
            return not self._unacked or self._unacked_bytes + size <= self._max_unacked_bytes
        with self._acknowledged:
            fits = self._acknowledged.wait_for(room, timeout=0.0 if self._congested else self._send_wait_s)
            self._congested = not fits
            return fits

    def _track(self, mid: int, size: int) -> None:
        """Count a publish until its acknowledgement (paho reuses a message id only once it is acknowledged)."""
        with self._acknowledged:
            if mid in self._early_acks:
                self._early_acks.discard(mid)
                return
            self._unacked[mid] = size
            self._unacked_bytes += size

    def _handle_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: object, props: object) -> None:
        with self._acknowledged:
            size = self._unacked.pop(mid, None)
            if size is None:
                self._early_acks.add(mid)
            else:
                self._unacked_bytes -= size
            self._congested = False
            self._acknowledged.notify_all()

    def _next_attempt_in(self) -> float:
        """Count a failed attempt and make paho wait the back-off's delay before the next one."""
        self._failures += 1
        delay = self.backoff.delay(self._failures, self._rng)
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]  # paho waits float seconds fine
        return delay

    def _handle_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            self._connack_failure = str(reason)
            log.error("broker refused connection: %s", reason)
            return
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._failures = 0
        self._connected.set()
        log.info("connected to %s:%s", self.address.host, self.address.port)
        if self._on_connect_hook:
            self._on_connect_hook()

    def _handle_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        delay = None
        if not self._stopping:
            delay = self._next_attempt_in()
            if self._connected.is_set():
                log.warning("disconnected from broker (%s); reconnecting in %.1f s", reason, delay)
            else:
                log.warning("connection to broker ended (%s): attempt %d failed, next in %.1f s", reason, self._failures, delay)
        self._connected.clear()
        if self._on_disconnect_hook:
            self._on_disconnect_hook(delay)

    def _handle_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        if not self._stopping:
            delay = self._next_attempt_in()
            log.warning("cannot reach MQTT broker at %s:%s: attempt %d failed, next in %.1f s",
                        self.address.host, self.address.port, self._failures, delay)

    def _handle_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        """On the network thread: O(1) work per message (reassembly within its budgets), then the callbacks."""
        if not message.payload:
            return  # a retained message being cleared
        try:
            try:
                frame = self._reassembler.feed(message.topic, message.payload)
            except FrameError as exc:
                self._on_bad_frame(message.topic, exc)
                return
            if frame is not None:
                self._on_frame(message.topic, frame)
        except Exception:  # a bug in a handler must not kill the network thread
            log.exception("frame handler failed on %s", message.topic)
