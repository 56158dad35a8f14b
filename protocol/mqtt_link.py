"""One MQTT connection for either side: frames out in chunks, whole frames in, reconnects by itself.

paho-mqtt runs the network loop in its own thread. Incoming payloads are reassembled there and
handed to `on_frame(topic, frame_bytes)`; keep that callback short (queue work elsewhere).
Subscriptions are renewed on every (re)connect, so a broker restart loses nothing we asked for.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from protocol.chunking import DEFAULT_MAX_MESSAGE_BYTES, Reassembler, split_message
from protocol.frame import FrameError
from protocol.mqtt_url import BrokerAddress, BrokerUnreachable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for us if we vanish."""

    topic: str
    payload: bytes
    retain: bool = True


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
        will: Will | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_frame_bytes: int = 64 << 20,
        keepalive_s: int = 30,
    ) -> None:
        self.address = address
        self._subscriptions = list(subscriptions)
        self._on_frame = on_frame
        self._on_bad_frame = on_bad_frame
        self._on_connect_hook = on_connect
        self._max_message_bytes = max_message_bytes
        self._keepalive_s = keepalive_s
        self._reassembler = Reassembler(max_frame_bytes=max_frame_bytes)
        self._connected = threading.Event()
        self._connack_failure: str | None = None
        self._stopping = False
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,  # the broker keeps our QoS 1 messages while we are away
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        if address.username:
            self._client.username_pw_set(address.username, address.password)
        context = address.ssl_context()
        if context is not None:  # mqtts://: verify the broker's certificate and host name
            self._client.tls_set_context(context)
        if will:
            self._client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout_s: float = 10.0) -> None:
        """Connect and start the network thread; BrokerUnreachable with a clear reason on failure."""
        where = f"{self.address.host}:{self.address.port}"
        try:
            self._client.connect(self.address.host, self.address.port, keepalive=self._keepalive_s)
        except OSError as exc:
            raise BrokerUnreachable(f"cannot reach MQTT broker at {where} ({exc.strerror or exc})") from None
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self.stop()
            reason = self._connack_failure or f"no CONNACK within {timeout_s:.0f} s"
            raise BrokerUnreachable(f"MQTT broker at {where} refused the connection: {reason}")

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, frame: bytes, retain: bool = False) -> int:
        """Queue `frame` for `topic` at QoS 1, chunked if large; returns the bytes queued."""
        sent = 0
        for message in split_message(frame, self._max_message_bytes):
            self._client.publish(topic, message, qos=1, retain=retain)
            sent += len(message)
        return sent

    def clear_retained(self, topic: str) -> None:
        """Delete the retained message of `topic` (an empty retained publish, per MQTT)."""
        self._client.publish(topic, b"", qos=1, retain=True)

    def _handle_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            self._connack_failure = str(reason)
            log.error("broker refused connection: %s", reason)
            return
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._connected.set()
        log.info("connected to %s:%s", self.address.host, self.address.port)
        if self._on_connect_hook:
            self._on_connect_hook()

    def _handle_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if self._connected.is_set() and not self._stopping:
            log.warning("disconnected from broker (%s); reconnecting", reason)
        self._connected.clear()

    def _handle_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return  # a retained message being cleared
        try:
            frame = self._reassembler.feed(message.topic, message.payload)
        except FrameError as exc:
            self._on_bad_frame(message.topic, exc)
            return
        if frame is not None:
            try:
                self._on_frame(message.topic, frame)
            except Exception:  # a bug in a handler must not kill the network thread
                log.exception("frame handler failed on %s", message.topic)
