"""`tierfl client` as a service: a broker that comes up late, SIGTERM mid-task, JSON logs, a bounded cache.

Real processes against real Mosquitto brokers: the shared one on 127.0.0.1:1883, or one of the
test's own on a free port, started only once the device is already trying to reach it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pty
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from aggregator.store.artifacts import ArtifactStore
from edge_client.cache import ArtifactCache
from protocol.frame import decode_frame
from protocol.logs import JsonFormatter
from protocol.messages import Hello, RoundSummary, Status, Update
from protocol.mqtt.link import Backoff
from protocol.topics import Topics
from tests.conftest import tierfl

pytestmark = pytest.mark.integration

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
ATTEMPT = re.compile(r"attempt (\d+) failed, next in ([\d.]+) s")


def _wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _records(log: Path) -> list[dict]:
    """The JSON log records of a process started with --log-format json; every line must parse."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [json.loads(line) for line in lines if line]


def _messages(log: Path) -> list[str]:
    return [record["message"] for record in _records(log)]


def _attempts(log: Path) -> list[tuple[int, float]]:
    """(attempt number, delay before the next one) of each failed attempt to reach the broker."""
    return [(int(m[1]), float(m[2])) for m in map(ATTEMPT.search, _messages(log)) if m]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _own_mosquitto(tmp_path: Path, port: int) -> Iterator[str]:
    """A Mosquitto of this test's own on `port`; yields its URL."""
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: broker.poll() is not None or _accepts(port), 10, "mosquitto to listen")
        assert broker.poll() is None, f"mosquitto exited with {broker.returncode}"
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        broker.terminate()
        broker.wait(10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Watcher:
    """A plain paho client keeping the decoded frames of the topics it watches, in arrival order."""

    def __init__(self, url: str, topics: list[str]) -> None:
        self.frames: list[tuple[str, object]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
        self.client.on_message = lambda c, u, m: m.payload and self.frames.append((m.topic, decode_frame(m.payload).body))
        host, port = url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def bodies(self, kind: type) -> list:
        return [body for _, body in list(self.frames) if isinstance(body, kind)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _hello_session(watcher: Watcher) -> str:
    """The session of the device's hello: fresh per start, repeated in its statuses."""
    sessions = {hello.session for hello in watcher.bodies(Hello)}
    assert len(sessions) == 1 and None not in sessions, sessions
    return sessions.pop()


def _stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def _client(tmp_path: Path, url: str, fleet: str, device: str, *extra: str) -> subprocess.Popen[bytes]:
    return tierfl("--log-format", "json", "client", "--broker", url, "--fleet", fleet, "--device-id", device, "--data", "digits",
                  "--cache-dir", str(tmp_path / device), *extra, log=tmp_path / f"{device}.log")


def _aggregator(tmp_path: Path, url: str, fleet: str, *extra: str) -> subprocess.Popen[bytes]:
    return tierfl("--log-format", "json", "aggregator", "--broker", url, "--fleet", fleet, "--state-dir", str(tmp_path / "state"),
                  "--min-clients", "1", *extra, log=tmp_path / "aggregator.log")


def test_client_started_before_its_broker_waits_longer_each_time_then_joins(tmp_path, fleet):
    port = _free_port()
    device = _client(tmp_path, f"mqtt://127.0.0.1:{port}", fleet, "early", "--reconnect-max", "4")
    log = tmp_path / "early.log"
    watcher = None
    try:
        _wait_for(lambda: len(_attempts(log)) >= 3, 30, "three failed attempts")
        with _own_mosquitto(tmp_path, port) as url:
            watcher = Watcher(url, [Topics(fleet).status("early")])
            _wait_for(lambda: watcher.bodies(Hello), 15, "the device's hello")
            assert device.poll() is None
            device.send_signal(signal.SIGTERM)
            assert device.wait(15) == 0
            _wait_for(lambda: watcher.bodies(Status), 5, "the offline status")
            (offline,) = watcher.bodies(Status)
            assert offline.online is False and offline.session == _hello_session(watcher)  # this start's session
        attempts = [int(number) for number, _ in _attempts(log)]
        delays = [delay for _, delay in _attempts(log)]
        assert attempts == list(range(1, len(attempts) + 1)) and len(attempts) >= 3
        assert 0.7 <= delays[0] <= 1.0 and all(d <= 4.0 for d in delays), delays
        assert all(later > earlier or earlier >= 3.0 for earlier, later in zip(delays, delays[1:])), delays
        assert "connected to 127.0.0.1:%d" % port in _messages(log)
    finally:
        if watcher:
            watcher.close()
        _stop(device)


@pytest.mark.parametrize("round_timeout,grace,finishes", [(8, 10, True), (60, 2, False)], ids=["finish", "abandon"])
def test_sigterm_mid_task_finishes_within_the_grace_or_abandons_cleanly(
    tmp_path, mosquitto_url, fleet, round_timeout, grace, finishes
):
    """500 epochs never end by themselves: with an 8 s round the task stops at its deadline (2 s before)
    and is sent; with a 60 s round it cannot end within a 2 s grace and is abandoned."""
    topics = Topics(fleet)
    watcher = Watcher(mosquitto_url, [topics.up("busy"), topics.status("busy"), topics.rounds])
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--epochs", "500", "--batch-size", "16",
                             "--round-timeout", str(round_timeout), "--rounds", "2")  # still there after round 1
    device = _client(tmp_path, mosquitto_url, fleet, "busy", "--codec", "int8", "--stop-grace", str(grace))
    log = tmp_path / "busy.log"
    try:
        _wait_for(lambda: any("round 1: training tier" in m for m in _messages(log)), 60, "training to start")
        time.sleep(0.5)
        signalled = time.monotonic()
        device.send_signal(signal.SIGTERM)
        assert device.wait(grace + 10) == 0
        took = time.monotonic() - signalled
        _wait_for(lambda: "busy is offline" in _messages(tmp_path / "aggregator.log"), 10, "the aggregator to see it go")
        _wait_for(lambda: watcher.bodies(RoundSummary), 10, "round 1 to end")
        summary = watcher.bodies(RoundSummary)
        updates = watcher.bodies(Update)
        residual = tmp_path / "busy" / "residual-a.npz"  # int8's error feedback, saved with each sent update
        if finishes:
            assert took < round_timeout, f"took {took:.1f} s"
            assert len(updates) == 1 and 0 < updates[0].steps < 500 * 90  # partial work
            assert summary[0].answered == 1
            with np.load(residual) as saved:
                assert saved.files
        else:
            # The deadline is 58 s away, so an exit near the grace is the abandonment; the process's own exit took up
            # to 4.9 s on a machine at load 30, hence the margin.
            assert took < grace + 8, f"took {took:.1f} s"
            assert "stopping: abandoned round 1 (not finished within 2 s); nothing of it was sent or saved" in _messages(log)
            assert updates == [] and summary[0].answered == 0
            assert not residual.exists()
        arrivals = [type(body) for topic, body in watcher.frames if topic != topics.rounds]
        assert arrivals[-1] is Status and watcher.bodies(Status)[-1].online is False
        assert f"stopped after {int(finishes)} tasks" in _messages(log)
    finally:
        watcher.close()
        _stop(aggregator, device)


def test_logs_are_json_lines_off_a_terminal_and_text_on_one(tmp_path):
    command = [sys.executable, "-m", "tierfl.cli", "client", "--broker", f"mqtt://127.0.0.1:{_free_port()}",
               "--data", "digits", "--device-id", "x", "--cache-dir", str(tmp_path / "cache"), "--connect-timeout", "2"]
    env = {name: value for name, value in os.environ.items() if name != "TIERFL_LOG_FORMAT"}  # auto: by the stream
    piped = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert piped.returncode == 1
    *lines, error = piped.stderr.splitlines()
    assert re.fullmatch(r"tierfl client: error: cannot reach MQTT broker at 127.0.0.1:\d+ \(Connection refused\) "
                        r"after \d attempts", error)
    records = [json.loads(line) for line in lines]
    assert records and all(set(r) == {"time", "level", "logger", "message"} for r in records)
    attempt = next(r for r in records if ATTEMPT.search(r["message"]))
    assert attempt["level"] == "WARNING" and attempt["logger"] == "protocol.mqtt.link"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", attempt["time"])

    controller, terminal = pty.openpty()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    output = b""
    while chunk := _read_terminal(controller):
        output += chunk
    os.close(controller)
    assert process.wait(30) == 1
    text = output.decode().splitlines()
    assert any(re.fullmatch(r"\d\d:\d\d:\d\d WARNING protocol.mqtt.link: cannot reach MQTT broker .* next in [\d.]+ s",
                            line.strip()) for line in text), text
    assert not any(line.startswith("{") for line in text)


def _read_terminal(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the process closed its end of the terminal
        return b""


def test_backoff_doubles_with_jitter_up_to_its_cap():
    backoff, rng = Backoff(first_s=1.0, max_s=60.0, jitter=0.25), random.Random(7)
    for _ in range(200):
        delays = [backoff.delay(n, rng) for n in range(1, 12)]
        assert 0.75 <= delays[0] <= 1.0 and all(45.0 <= d <= 60.0 for d in delays[6:])
        assert all(later > earlier for earlier, later in zip(delays[:6], delays[1:7]))
    assert len({round(backoff.delay(3, rng), 6) for _ in range(50)}) > 40, "devices must not retry in lockstep"
    assert backoff.delay(10_000, rng) <= 60.0
    for bad in [dict(first_s=0), dict(first_s=5, max_s=2), dict(jitter=0.5)]:
        with pytest.raises(ValueError):
            Backoff(**bad)


def test_json_formatter_carries_the_exception():
    try:
        raise ValueError("bad \"input\" ü")
    except ValueError:
        record = logging.LogRecord("tierfl.x", logging.ERROR, __file__, 1, "failed on %s", ("round 3",), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed on round 3" and entry["level"] == "ERROR" and entry["logger"] == "tierfl.x"
    assert entry["exception"].startswith("Traceback") and entry["exception"].endswith('ValueError: bad "input" ü')


def test_cache_stays_within_its_bound_while_the_device_trains(tmp_path, mosquitto_url, fleet):
    """A device with 1.2 MB of stale artifacts and a 1 MB bound trains a round of tier a (0.7 MB of files)."""
    cache_dir = tmp_path / "lean"
    stale_cache = ArtifactCache(cache_dir)
    stale = [bytes([i]) * 400_000 for i in range(3)]
    for data in stale:
        stale_cache.put(_sha(data), data)
    stale_folder = stale_cache.tier_folder({"old.onnx": _sha(stale[2])}, key="old-tier")
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--rounds", "1", "--round-timeout", "30")
    device = _client(tmp_path, mosquitto_url, fleet, "lean", "--cache-max-mb", "1")
    try:
        assert aggregator.wait(90) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        assert "round 1 committed: 1/1 answered" in " ".join(_messages(tmp_path / "aggregator.log"))
        tier_files = ArtifactStore(tmp_path / "state" / "artifacts").tiers["a"].files
        blobs = {p.name: p.stat().st_size for p in (cache_dir / "blobs").iterdir()}
        assert set(tier_files.values()) <= set(blobs)
        assert not {_sha(data) for data in stale} & set(blobs) and not stale_folder.exists()
        assert sum(blobs.values()) <= 1_000_000
        evicted = [m for m in _messages(tmp_path / "lean.log") if m.startswith("cache: evicted artifact")]
        assert len(evicted) == 3
    finally:
        _stop(aggregator, device)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
