"""`tierfl broker-config`: the files it writes, and a real Mosquitto run with them (TLS, passwords, ACL)."""

from __future__ import annotations

import base64
import contextlib
import getpass
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from protocol.frame import encode_frame
from protocol.messages import Fetch
from protocol.mqtt.broker_config import (FILES, FleetCredentials, acl_text, check_password, generate, hash_password,
                                         password_file_text)
from protocol.mqtt.link import MqttLink
from protocol.mqtt.url import BrokerAddress, BrokerUnreachable, parse, wait_for_broker
from protocol.topics import Topics
from tierfl.cli import main as tierfl_main

FLEET = "lab"
TOPICS = Topics(FLEET)
DEVICES = ["dev1", "dev2"]


def _passwd_tool() -> str:
    tool = shutil.which("mosquitto_passwd")
    assert tool, "mosquitto_passwd is not on PATH: install Mosquitto (`sudo apt-get install mosquitto`)"
    return tool


def _generate(out: Path, **options: object) -> FleetCredentials:
    return generate(out, FLEET, DEVICES, **{"hosts": ["127.0.0.1"], "mosquitto_passwd": None, **options})


# --- the files -----------------------------------------------------------------------------------


def test_writes_every_file_with_its_permissions(tmp_path):
    credentials = _generate(tmp_path / "broker")
    out = tmp_path / "broker"
    for name, (mode, _) in FILES.items():
        assert stat.S_IMODE((out / name).stat().st_mode) == mode, name
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    assert FleetCredentials.load(out / "credentials.json") == credentials
    conf = (out / "mosquitto.conf").read_text()
    root = out.resolve()
    for line in ("allow_anonymous false", f"password_file {root}/passwd", f"acl_file {root}/acl",
                 f"cafile {root}/ca.crt", f"certfile {root}/server.crt", f"keyfile {root}/server.key",
                 "listener 8883", f"persistence_location {root}/data/"):
        assert line in conf.splitlines(), line
    assert (out / "data").is_dir()


def test_credentials_are_random_and_urls_parse_into_tls_addresses(tmp_path):
    credentials = _generate(tmp_path)
    passwords = {credentials.aggregator.password, *(d.password for d in credentials.devices.values())}
    assert len(passwords) == 3 and all(len(p) >= 40 for p in passwords)
    address = parse(credentials.devices["dev2"].url)
    assert address == BrokerAddress(host="127.0.0.1", port=8883, username="dev2",
                                    password=credentials.devices["dev2"].password, tls=True,
                                    ca_file=str(tmp_path.resolve() / "ca.crt"))
    assert credentials.user("aggregator") == credentials.aggregator
    assert not any(password in repr(credentials) for password in passwords)


def test_password_file_hashes_every_user_in_mosquittos_format(tmp_path):
    credentials = _generate(tmp_path)
    lines = dict(line.split(":", 1) for line in (tmp_path / "passwd").read_text().splitlines())
    assert set(lines) == {"aggregator", *DEVICES}
    for name, hashed in lines.items():
        assert hashed.startswith("$7$101$") and check_password(credentials.user(name).password, hashed)
        assert not check_password("wrong", hashed)


def test_python_hashes_equal_mosquitto_passwd_hashes():
    """The fallback hasher computes exactly what mosquitto_passwd writes, salt for salt."""
    hashed = password_file_text({"dev1": "s3cret-pw"}, _passwd_tool()).strip().split(":", 1)[1]
    assert check_password("s3cret-pw", hashed) and not check_password("s3cret-px", hashed)
    salt = hashed.split("$")[3]
    assert hash_password("s3cret-pw", base64.b64decode(salt)) == hashed


def test_acl_binds_devices_to_their_user_name_and_lists_none():
    acl = acl_text(FLEET)
    rules = [line for line in acl.splitlines() if line and not line.startswith("#")]
    assert rules == [
        "pattern write tierfl/v1/lab/up/%u",
        "pattern write tierfl/v1/lab/status/%u",
        "pattern read tierfl/v1/lab/down/%u",
        "user aggregator",
        "topic read tierfl/v1/lab/up/+",
        "topic read tierfl/v1/lab/status/+",
        "topic write tierfl/v1/lab/down/+",
        "topic readwrite tierfl/v1/lab/rounds",
        "topic read tierfl/v1/lab/workers/+/up",  # the coordinator of aggregator workers
        "topic read tierfl/v1/lab/workers/+/status",
        "topic write tierfl/v1/lab/workers/+/down",
    ]


def test_run_as_root_it_gives_the_broker_its_files_and_keeps_the_secrets(tmp_path):
    _generate(tmp_path, broker_user="nobody")
    me = os.geteuid()
    broker = pwd.getpwnam("nobody").pw_uid if me == 0 else me  # as anyone else, files stay theirs
    for name in ("server.key", "passwd", "acl", "data"):
        assert (tmp_path / name).stat().st_uid == broker, name
    for name in ("ca.key", "credentials.json"):
        assert (tmp_path / name).stat().st_uid == me, name
    assert "user nobody" in (tmp_path / "mosquitto.conf").read_text().splitlines()


def test_refuses_to_replace_keys_without_force(tmp_path):
    first = _generate(tmp_path)
    key = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(ValueError, match="refusing to replace .*--force"):
        _generate(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == key
    second = _generate(tmp_path, force=True)
    assert (tmp_path / "ca.key").read_bytes() != key and second.aggregator.password != first.aggregator.password


@pytest.mark.parametrize(("devices", "options", "message"), [
    ([], {}, "no devices"),
    (["dev/1"], {}, "invalid device id"),
    (["aggregator"], {}, "aggregator's user name"),
    (["dev1"], {"aggregator_user": "a+b"}, "invalid aggregator user"),
    (["dev1"], {"conf_dir": "relative/dir"}, "absolute path"),
    (["dev1"], {"days": 0}, "at least 1 day"),
])
def test_rejects_bad_input(tmp_path, devices, options, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, FLEET, devices, **options)
    assert not (tmp_path / "ca.key").exists()


def test_cli_writes_the_files_and_refuses_a_second_run(tmp_path, capsys):
    args = ["broker-config", "--fleet", FLEET, "--devices", "dev1, dev2,dev1", "--out", str(tmp_path),
            "--host", "broker.lan", "--port", "18883", "--conf-dir", "/etc/tierfl/broker"]
    assert tierfl_main(args) == 0
    assert "mosquitto -c /etc/tierfl/broker/mosquitto.conf" in capsys.readouterr().out
    credentials = json.loads((tmp_path / "credentials.json").read_text())
    assert list(credentials["devices"]) == DEVICES
    assert credentials["devices"]["dev1"]["url"].startswith("mqtts://dev1:")
    assert credentials["devices"]["dev1"]["url"].endswith("@broker.lan:18883?ca=/etc/tierfl/broker/ca.crt")
    assert "password_file /etc/tierfl/broker/passwd" in (tmp_path / "mosquitto.conf").read_text()
    assert tierfl_main(args) == 1
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("bridge_to,message", [
    ("central.json", "--bridge-to takes CREDENTIALS.json:USER"),
    ("{json}:site-1", "is not a credentials.json written by `tierfl broker-config`"),
])
def test_cli_refuses_a_bridge_to_it_cannot_read_with_a_clear_error(tmp_path, capsys, bridge_to, message):
    (tmp_path / "central.json").write_text('{"fleet": "x"}')
    args = ["broker-config", "--fleet", FLEET, "--devices", "dev1", "--out", str(tmp_path / "site"),
            "--bridge-to", bridge_to.replace("{json}", str(tmp_path / "central.json"))]
    assert tierfl_main(args) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "site").exists()


def test_help_explains_every_file(capsys):
    with pytest.raises(SystemExit):
        tierfl_main(["broker-config", "--help"])
    text = capsys.readouterr().out
    assert "example:" in text and all(name in text for name in FILES)


# --- TLS addresses (protocol.mqtt.url) -----------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("mqtts://host", ("host", 8883, True, None)),
    ("mqtts://d:p@host:9999?ca=/etc/ca.crt", ("host", 9999, True, "/etc/ca.crt")),
    ("MQTTS://host?ca=ca%20dir/ca.crt", ("host", 8883, True, "ca dir/ca.crt")),
    ("mqtt://host", ("host", 1883, False, None)),
])
def test_parse_tls_addresses(url, expected):
    address = parse(url)
    assert (address.host, address.port, address.tls, address.ca_file) == expected
    assert parse(address.url.replace(" ", "%20")) == address.model_copy(update={"password": None})  # logs hide it


@pytest.mark.parametrize(("url", "message"), [
    ("mqtt://host?ca=ca.crt", "only query"),
    ("mqtts://host?ca=", "only query"),
    ("mqtts://host?cafile=x", "only query"),
    ("mqtts://host?ca=a&ca=b", "only query"),
    ("ssl://host", "unsupported scheme 'ssl'"),
])
def test_parse_rejects_bad_tls_addresses(url, message):
    with pytest.raises(ValueError, match=message):
        parse(url)


def test_a_missing_ca_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load the CA file"):
        wait_for_broker(parse(f"mqtts://127.0.0.1:1?ca={tmp_path}/nope.crt"), 0.1)


# --- a real Mosquitto with the generated configuration ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _mosquitto(out: Path, mosquitto_passwd: str | None) -> Iterator[FleetCredentials]:
    """Generate a configuration into `out`, run Mosquitto with it on a free port, always stop it."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    assert os.access(binary, os.X_OK), "Mosquitto is not installed (`sudo apt-get install mosquitto`)"
    # Mosquitto started as root drops to --broker-user: run it as ourselves, whoever that is.
    credentials = _generate(out, port=_free_port(), bind="127.0.0.1", broker_user=getpass.getuser(),
                            mosquitto_passwd=mosquitto_passwd, workers=["w1", "w2"])
    with open(out / "mosquitto.log", "wb") as log:
        broker = subprocess.Popen([binary, "-c", str(out / "mosquitto.conf"), "-v"], stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_broker(parse(credentials.aggregator.url), 10)
        except BrokerUnreachable:
            raise AssertionError((out / "mosquitto.log").read_text()) from None
        yield credentials
    finally:
        broker.terminate()
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()


@pytest.fixture(scope="module")
def fleet_broker(tmp_path_factory) -> Iterator[FleetCredentials]:
    with _mosquitto(tmp_path_factory.mktemp("broker"), _passwd_tool()) as credentials:
        yield credentials


class Client:
    """A plain paho MQTT 3.1.1 client that records its CONNACK, SUBACKs and messages."""

    def __init__(self, credentials: FleetCredentials, user: str | None, password: str | None = None,
                 tls: bool = True, client_id: str | None = None) -> None:
        address = parse(credentials.aggregator.url)
        self.connack: list[int] = []
        self.subacks: list[list[int]] = []
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{user}-{time.monotonic_ns()}",
                                  protocol=MQTTProtocolVersion.MQTTv311)
        if user is not None:
            self.client.username_pw_set(user, credentials.user(user).password if password is None else password)
        if tls:
            self.client.tls_set(ca_certs=credentials.ca_file)
        self.disconnects: list[int] = []
        self.client.on_connect = lambda c, u, f, reason, p: self.connack.append(reason.value)
        self.client.on_disconnect = lambda c, u, f, reason, p: self.disconnects.append(reason.value)
        self.client.on_subscribe = lambda c, u, mid, reasons, p: self.subacks.append([r.value for r in reasons])
        self.client.on_message = self._on_message
        self.client.connect(address.host, address.port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload))

    def wait(self, predicate, what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def wait_connected(self) -> Client:
        self.wait(lambda: self.connack, "CONNACK")
        assert self.connack == [0], f"connection refused: {self.connack}"
        return self

    def subscribe(self, *topics: str) -> list[list[int]]:
        """Subscribe to each topic at QoS 1; the SUBACK reason codes."""
        before = len(self.subacks)
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        self.wait(lambda: len(self.subacks) == before + len(topics), "SUBACK")
        return self.subacks[before:]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def received(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients(fleet_broker) -> Iterator[Callable[..., Client]]:
    opened: list[Client] = []

    def connect(user: str, **options: object) -> Client:
        client = Client(fleet_broker, user, **options)
        opened.append(client)
        return client.wait_connected()

    yield connect
    for client in opened:
        client.close()


@pytest.mark.integration
def test_device_publishes_its_update_and_status_to_the_aggregator(clients):
    aggregator = clients("aggregator")
    assert aggregator.subscribe(TOPICS.all_up(), TOPICS.all_status) == [[1], [1]]
    device = clients("dev1")
    device.publish(TOPICS.status("dev1"), b"hello")
    device.publish(TOPICS.up("dev1"), b"update")
    aggregator.wait(lambda: len(aggregator.received()) == 2, "the device's status and update")
    assert aggregator.received() == [(TOPICS.status("dev1"), b"hello"), (TOPICS.up("dev1"), b"update")]
    aggregator.close()
    worker = clients("aggregator")  # the aggregator user may read the uplink through a shared subscription
    assert worker.subscribe(TOPICS.all_up(share_group="workers")) == [[1]]
    device.publish(TOPICS.up("dev1"), b"second")
    worker.wait(lambda: worker.received() == [(TOPICS.up("dev1"), b"second")], "the update on the shared subscription")


@pytest.mark.integration
def test_an_aggregator_worker_reads_its_share_of_the_uplink_and_writes_only_its_own_topics(clients):
    coordinator, worker = clients("aggregator"), clients("w1")
    assert coordinator.subscribe(TOPICS.all_workers("up")) == [[1]]
    worker.subscribe(TOPICS.all_up(share_group="aggregator"), TOPICS.worker("w2", "down"), TOPICS.worker("w1", "down"))
    clients("dev1").publish(TOPICS.up("dev1"), b"update")
    coordinator.publish(TOPICS.worker("w2", "down"), b"grant for w2")  # the ACL keeps it from w1
    coordinator.publish(TOPICS.worker("w1", "down"), b"grant for w1")
    worker.wait(lambda: len(worker.received()) == 2, "the update and w1's grant")
    worker.publish(TOPICS.worker("w2", "up"), b"posing as w2")  # dropped by the broker
    worker.publish(TOPICS.worker("w1", "up"), b"claim")
    coordinator.wait(lambda: coordinator.received(), "w1's claim")
    assert sorted(worker.received()) == [(TOPICS.up("dev1"), b"update"), (TOPICS.worker("w1", "down"), b"grant for w1")]
    assert coordinator.received() == [(TOPICS.worker("w1", "up"), b"claim")]


@pytest.mark.integration
def test_a_device_cannot_take_over_the_aggregators_session_by_its_client_id(clients):
    """The broker uses the user name as the client id: a device's credentials never displace the aggregator."""
    aggregator = clients("aggregator", client_id="tierfl-lab-aggregator")
    aggregator.subscribe(TOPICS.all_up())
    mallory = clients("dev1", client_id="tierfl-lab-aggregator")
    mallory.publish(TOPICS.up("dev1"), b"still heard")
    aggregator.wait(lambda: aggregator.received() == [(TOPICS.up("dev1"), b"still heard")], "the device's update")
    assert aggregator.disconnects == [] and aggregator.client.is_connected()
    again = clients("aggregator", client_id="something-else")  # the same user again: this one replaces the first
    aggregator.wait(lambda: aggregator.disconnects, "the first session replaced")
    assert again.client.is_connected()


@pytest.mark.integration
def test_device_cannot_publish_as_another_device_or_as_the_aggregator(clients):
    aggregator = clients("aggregator")
    aggregator.subscribe(TOPICS.all_up(), TOPICS.all_status, TOPICS.rounds)
    victim = clients("dev2")
    victim.subscribe(TOPICS.down("dev2"))
    mallory = clients("dev1")
    mallory.publish(TOPICS.up("dev1"), b"first")  # positive control before ...
    for topic in (TOPICS.up("dev2"), TOPICS.status("dev2"), TOPICS.down("dev2"), TOPICS.rounds):
        mallory.publish(topic, b"forged")  # Mosquitto acknowledges a forbidden QoS 1 publish, then drops it
    mallory.publish(TOPICS.up("dev1"), b"last")  # ... and after: one publisher's messages arrive in order
    aggregator.wait(lambda: (TOPICS.up("dev1"), b"last") in aggregator.received(), "the control message")
    assert aggregator.received() == [(TOPICS.up("dev1"), b"first"), (TOPICS.up("dev1"), b"last")]
    aggregator.publish(TOPICS.down("dev2"), b"task")  # the aggregator may write any device's task topic
    victim.wait(lambda: victim.received(), "the aggregator's task")
    assert victim.received() == [(TOPICS.down("dev2"), b"task")]


@pytest.mark.integration
def test_device_cannot_read_another_devices_tasks_or_updates(clients):
    aggregator = clients("aggregator")
    dev2 = clients("dev2")
    snoop = clients("dev1")
    # Mosquitto 2.0 grants any subscription (newer releases may refuse one): what counts is delivery.
    snoop.subscribe(TOPICS.down("dev2"), f"{TOPICS.base}/down/+", TOPICS.all_up(), TOPICS.all_status,
                    TOPICS.down("dev1"))
    dev2.publish(TOPICS.up("dev2"), b"dev2's update")
    dev2.publish(TOPICS.status("dev2"), b"dev2's status")
    aggregator.publish(TOPICS.down("dev2"), b"dev2's task")
    aggregator.publish(TOPICS.down("dev1"), b"dev1's task")  # positive control, published last
    snoop.wait(lambda: snoop.received(), "dev1's own task")
    time.sleep(0.2)  # a copy through the down/+ subscription would follow at once
    assert {topic for topic, _ in snoop.received()} == {TOPICS.down("dev1")}


@pytest.mark.integration
@pytest.mark.parametrize(("user", "password"), [(None, None), ("dev1", "wrong-password"), ("nobody", "x")])
def test_unauthenticated_and_wrong_password_clients_are_refused(fleet_broker, user, password):
    client = Client(fleet_broker, user, password=password)
    try:
        client.wait(lambda: client.connack, "CONNACK")
        assert client.connack == [135]  # MQTT 3.1.1 CONNACK 5, "not authorized", as paho reports it
    finally:
        client.close()
    address = parse(fleet_broker.aggregator.url).model_copy(update={"username": user, "password": password})
    with pytest.raises(BrokerUnreachable, match="not authorized"):
        wait_for_broker(address, 0.3)


@pytest.mark.integration
def test_a_client_without_tls_or_without_the_ca_cannot_connect(fleet_broker):
    client = Client(fleet_broker, "dev1", tls=False)
    try:
        time.sleep(1.0)
        assert client.connack == [] and not client.client.is_connected()
    finally:
        client.close()
    address = parse(fleet_broker.devices["dev1"].url)
    with pytest.raises(BrokerUnreachable, match="closed by the server|reset"):
        wait_for_broker(address.model_copy(update={"tls": False, "ca_file": None}), 0.3)
    with pytest.raises(BrokerUnreachable, match="certificate is not trusted"):
        wait_for_broker(address.model_copy(update={"ca_file": None}), 0.3)  # the system's CAs never signed it


@pytest.mark.integration
def test_a_link_with_the_wrong_ca_fails_at_once_with_a_clear_error(fleet_broker):
    """Retrying cannot make a certificate verify: the link says so instead of trying forever."""
    address = parse(fleet_broker.devices["dev1"].url).model_copy(update={"ca_file": None})  # the system's CAs
    link = MqttLink(address, "dev1", [], lambda *_: None, lambda *_: None)
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable, match="TLS certificate of the MQTT broker at .* does not verify.*check the \\?ca="):
        link.start(timeout_s=5, retry_for_s=60)
    assert time.monotonic() - started < 10


@pytest.mark.integration
def test_mqtt_links_speak_tls_with_the_generated_urls(fleet_broker):
    """The aggregator and a device connect with their mqtts:// URLs from credentials.json."""
    frames: list[tuple[str, bytes]] = []
    received = threading.Event()

    def on_frame(topic: str, frame: bytes) -> None:
        frames.append((topic, frame))
        received.set()

    def link(user: str, subscriptions: list[str], on_frame=lambda topic, frame: None) -> MqttLink:
        return MqttLink(parse(fleet_broker.user(user).url), f"link-{user}-{time.monotonic_ns()}", subscriptions,
                        on_frame, on_bad_frame=lambda topic, error: None)

    aggregator = link("aggregator", [TOPICS.all_up("workers")], on_frame)
    device = link("dev2", [TOPICS.down("dev2")])
    aggregator.start(5)
    try:
        device.start(5)
        try:
            frame = encode_frame(FLEET, "dev2", Fetch(sha256=["00" * 32]))
            device.publish(TOPICS.up("dev2"), frame)
            assert received.wait(5), "the aggregator received nothing"
            assert frames == [(TOPICS.up("dev2"), frame)]
        finally:
            device.stop()
    finally:
        aggregator.stop()


@pytest.mark.integration
def test_mosquitto_accepts_passwords_hashed_without_mosquitto_passwd(tmp_path):
    with _mosquitto(tmp_path, mosquitto_passwd=None) as credentials:  # started only once the aggregator got in
        Client(credentials, "dev1").wait_connected().close()
        refused = Client(credentials, "dev1", password=credentials.devices["dev2"].password)
        refused.wait(lambda: refused.connack, "CONNACK")
        refused.close()
        assert refused.connack == [135]


def test_a_link_that_vanishes_while_not_connected_does_not_raise(monkeypatch):
    link = MqttLink(parse("mqtt://127.0.0.1:1"), "dev1", [], lambda *_: None, lambda *_: None)
    link.vanish()  # no socket yet
    with socket.socket() as unconnected:  # a socket paho holds but that is not (or no longer) connected
        monkeypatch.setattr(link.client, "socket", lambda: unconnected)
        link.vanish()
