"""The embedded amqtt broker with real paho-mqtt clients, broker URLs and the reachability check."""

from __future__ import annotations

import argparse
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest

from protocol.mqtt.embedded_broker import BrokerStartError, EmbeddedBroker, configure_parser, run
from protocol.mqtt.url import BrokerAddress, BrokerUnreachable, parse, wait_for_broker

pytestmark = pytest.mark.timeout(30)

Message = tuple[str, bytes, int, bool]


class Client:
    """A connected paho client (MQTT 3.1.1, callback API v2) that queues what it receives."""

    def __init__(self, broker: EmbeddedBroker, client_id: str, *, clean_session: bool = True,
                 will: tuple[str, bytes] | None = None, start_loop: bool = True) -> None:
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=mqtt.MQTTv311, clean_session=clean_session)
        self.paho.on_message = lambda _c, _u, m: self.inbox.put((m.topic, m.payload, m.qos, bool(m.retain)))
        connected = threading.Event()
        self.paho.on_connect = lambda *_: connected.set()
        if will:
            self.paho.will_set(will[0], will[1], qos=1, retain=True)
        self.paho.connect(broker.host, broker.port, keepalive=30)
        if start_loop:
            self.paho.loop_start()
            assert connected.wait(5), "no CONNACK"
        else:
            while not connected.is_set():
                self.paho.loop(0.1)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK."""
        acked = threading.Event()
        self.paho.on_subscribe = lambda *_: acked.set()
        self.paho.subscribe(topic, qos)
        assert acked.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the PUBACK."""
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published()

    def next(self, timeout: float = 5) -> Message:
        """The next received message."""
        return self.inbox.get(timeout=timeout)

    def assert_nothing(self, wait: float = 0.3) -> None:
        """Nothing arrives within `wait` seconds."""
        with pytest.raises(queue.Empty):
            self.inbox.get(timeout=wait)

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def connect(broker: EmbeddedBroker) -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(client_id: str, **kwargs: object) -> Client:
        made.append(Client(broker, client_id, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for client in made:
        client.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_url_host_and_port(broker: EmbeddedBroker) -> None:
    assert broker.host == "127.0.0.1"
    assert broker.port > 0
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"


@pytest.mark.parametrize("size", [10, 1_000_000])
def test_qos1_publish_reaches_subscriber(connect: Callable[..., Client], size: int) -> None:
    sub, pub = connect("sub"), connect("pub")
    sub.subscribe("tierfl/v1/f/update/+")
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    pub.publish("tierfl/v1/f/update/dev1", payload)
    topic, got, qos, retain = sub.next()
    assert (topic, qos, retain) == ("tierfl/v1/f/update/dev1", 1, False)
    assert got == payload


def test_retained_message_reaches_late_subscriber_only(connect: Callable[..., Client]) -> None:
    watcher = connect("watcher")
    watcher.subscribe("tierfl/v1/f/status/#")
    connect("pub").publish("tierfl/v1/f/status/dev1", b"online", retain=True)
    assert watcher.next()[1] == b"online"
    bystander = connect("bystander")  # amqtt 0.12.1 would push it the retained message unasked
    late = connect("late")
    late.subscribe("tierfl/v1/f/status/dev1")
    assert late.next() == ("tierfl/v1/f/status/dev1", b"online", 1, True)
    late.assert_nothing()
    bystander.assert_nothing()


def test_last_will_on_abrupt_socket_close(connect: Callable[..., Client], broker: EmbeddedBroker) -> None:
    watcher = connect("aggregator")
    watcher.subscribe("tierfl/v1/f/status/+")
    device = Client(broker, "dev7", will=("tierfl/v1/f/status/dev7", b"offline"), start_loop=False)
    device.paho.socket().close()  # no DISCONNECT: the broker must publish the will
    assert watcher.next() == ("tierfl/v1/f/status/dev7", b"offline", 1, False)
    late = connect("late")
    late.subscribe("tierfl/v1/f/status/dev7")
    assert late.next()[1:] == (b"offline", 1, True)


def test_persistent_session_gets_messages_sent_while_offline(connect: Callable[..., Client],
                                                             broker: EmbeddedBroker) -> None:
    device = Client(broker, "dev3", clean_session=False)
    device.subscribe("tierfl/v1/f/task/dev3")
    device.close()
    connect("aggregator").publish("tierfl/v1/f/task/dev3", b"round 4")
    back = connect("dev3", clean_session=False)
    assert back.next()[:2] == ("tierfl/v1/f/task/dev3", b"round 4")


def test_two_brokers_at_once_are_independent() -> None:
    with EmbeddedBroker() as one, EmbeddedBroker() as two:
        assert one.port != two.port
        clients = [Client(b, name) for b in (one, two) for name in ("sub", "pub")]
        try:
            for sub in clients[0], clients[2]:
                sub.subscribe("t")
            clients[1].publish("t", b"one")
            clients[3].publish("t", b"two")
            assert clients[0].next()[1] == b"one"
            assert clients[2].next()[1] == b"two"
            clients[0].assert_nothing()
            clients[2].assert_nothing()
        finally:
            for client in clients:
                client.close()


def test_stop_disconnects_clients_and_joins_thread() -> None:
    before = set(threading.enumerate())
    broker = EmbeddedBroker().start()
    client = Client(broker, "c")
    lost = threading.Event()
    client.paho.on_disconnect = lambda *_: lost.set()
    start = time.monotonic()
    broker.stop()
    assert time.monotonic() - start < 3
    assert lost.wait(5)
    client.paho.loop_stop()
    assert set(threading.enumerate()) <= before
    broker.stop()  # idempotent
    with pytest.raises(BrokerUnreachable):
        wait_for_broker(parse(broker.url), 0.2)


def test_taken_port_is_a_clear_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(BrokerStartError, match=f"127.0.0.1:{port} is already in use"):
            EmbeddedBroker(port=port).start()
        parser = argparse.ArgumentParser()
        configure_parser(parser)
        assert "Mosquitto" in (parser.description or "")
        assert run(parser.parse_args(["--port", str(port)])) == 1


def test_given_port_is_used() -> None:
    port = _closed_port()
    with EmbeddedBroker(port=port) as b:
        assert b.url == f"mqtt://127.0.0.1:{port}"
        wait_for_broker(BrokerAddress(host="127.0.0.1", port=port), 2)


def test_wait_for_broker_fails_fast_on_closed_port() -> None:
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(BrokerUnreachable) as err:
        wait_for_broker(parse(f"127.0.0.1:{port}"), timeout_s=0.3)
    assert time.monotonic() - start < 1.5
    assert str(err.value) == (f"cannot reach MQTT broker at 127.0.0.1:{port} (connection refused) — "
                              "start Mosquitto or omit --broker to use the embedded one")
    assert isinstance(err.value, ConnectionError)


def test_wait_for_broker_rejects_a_non_mqtt_server() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer_http() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer_http, daemon=True).start()
        with pytest.raises(BrokerUnreachable, match="does not speak MQTT"):
            wait_for_broker(parse(f"127.0.0.1:{port}"), timeout_s=0.05)


@pytest.mark.parametrize(("url", "expected"), [
    ("mqtt://127.0.0.1", ("127.0.0.1", 1883, None, None)),
    ("mqtt://broker.local:1999", ("broker.local", 1999, None, None)),
    ("mqtt://dev:s3cret@10.0.0.5:8883", ("10.0.0.5", 8883, "dev", "s3cret")),
    ("mqtt://dev:p%40ss@host", ("host", 1883, "dev", "p@ss")),
    ("mqtt://dev@host", ("host", 1883, "dev", None)),
    ("MQTT://host:1/", ("host", 1, None, None)),
    ("localhost:1884", ("localhost", 1884, None, None)),
    ("localhost", ("localhost", 1883, None, None)),
    ("[::1]:1883", ("::1", 1883, None, None)),
    (" mqtt://h:2 ", ("h", 2, None, None)),
])
def test_parse_accepts(url: str, expected: tuple[object, ...]) -> None:
    address = parse(url)
    assert (address.host, address.port, address.username, address.password) == expected


@pytest.mark.parametrize(("url", "message"), [
    ("http://host:1883", "unsupported scheme 'http'"),
    ("mqtts://host?x=1", "the only query an address may have"),
    ("mqtt://host:0", "bad port"),
    ("mqtt://host:70000", "bad port"),
    ("host:abc", "bad port"),
    ("mqtt://", "no host"),
    ("", "empty"),
    ("mqtt://host/some/path", "must not have a path"),
    ("user:pw@host:1", "credentials need the mqtt:// form"),
])
def test_parse_rejects(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(url)


def test_address_is_frozen_and_hides_password() -> None:
    address = parse("mqtt://dev:s3cret@host:1999")
    assert address.url == "mqtt://dev@host:1999"
    assert "s3cret" not in repr(address) and "s3cret" not in str(address)
    with pytest.raises(Exception):
        address.port = 1  # type: ignore[misc]
