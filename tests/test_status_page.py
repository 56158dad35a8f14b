"""The aggregator's status server on a real federation: Prometheus metrics, /status.json, and the page
rendered by headless Chromium (Debian's `chromium`; `make test` installs it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.monitor import Monitor
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.fedmut import FedMut
from models.export import export_all
from models.spec import ModelSpec
from protocol.messages import RejectReason, Update, new_id
from protocol.topics import Topics
from tests.conftest import tierfl
from tests.test_integration import Watcher, _stop, _wait_for

# The page's colors (aggregator/static/status.html): the accuracy line, its per-round markers, the byte bars.
ACCURACY_LINE, MARKER, BYTES_UP, BYTES_DOWN = (37, 99, 235), (30, 58, 138), (13, 148, 136), (245, 158, 11)


class Federation:
    """An aggregator serving its status page, with two digits devices over Mosquitto; d1 can be paused."""

    def __init__(self, tmp_path: Path, broker: str, fleet: str) -> None:
        self.log = tmp_path / "aggregator.log"
        self.aggregator = tierfl(
            "aggregator", "--broker", broker, "--fleet", fleet, "--state-dir", str(tmp_path / "state"),
            "--eval-data", "digits", "--min-clients", "2", "--rounds", "30", "--round-timeout", "60",
            "--status-port", "0", log=self.log)
        self.devices = [tierfl("client", "--broker", broker, "--fleet", fleet, "--device-id", f"d{i}", "--data", "digits",
                               "--cache-dir", str(tmp_path / f"d{i}"), log=tmp_path / f"d{i}.log") for i in range(2)]
        self.url = ""

    def wait_until_serving(self) -> None:
        served = re.compile(r"status page at (http://127\.0\.0\.1:\d+/)")
        _wait_for(lambda: served.search(self.log.read_text()), 60, "the status page")
        self.url = served.search(self.log.read_text()).group(1)

    def get(self, path: str) -> tuple[str, bytes]:
        """Content type and body of one page of the status server."""
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return response.headers["Content-Type"], response.read()

    def status(self) -> dict:
        return json.loads(self.get("status.json")[1])

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of /metrics by (name, labels)."""
        return _parse(self.get("metrics")[1])

    def pause_after(self, rounds: int) -> dict:
        """Stop d1 once `rounds` rounds are done; return the status once the open round waits for it."""
        _wait_for(lambda: self._ready() and self.status()["round"] >= rounds, 60, f"{rounds} finished rounds")
        self.devices[1].send_signal(signal.SIGSTOP)
        stalled: list[dict] = []

        def waiting_for_d1() -> bool:  # steadily, so no update of d1's was still on its way
            status = self.status()
            if not (status["current"] and status["current"]["waiting_for"] == ["d1"]):
                stalled.clear()
                return False
            stalled.append(status)
            return len(stalled) >= 5 and stalled[-5]["round"] == status["round"]

        _wait_for(waiting_for_d1, 30, "the open round to wait for the paused device")
        return stalled[-1]

    def _ready(self) -> bool:
        try:
            self.status()
        except urllib.error.HTTPError:  # 503 until the service's first step
            return False
        return True

    def resume(self) -> None:
        self.devices[1].send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        _stop([self.aggregator, *self.devices])


@pytest.fixture
def federation(tmp_path, mosquitto_url, fleet):
    running = Federation(tmp_path, mosquitto_url, fleet)
    try:
        running.wait_until_serving()
        yield running
    finally:
        running.stop()


def _value(metrics: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return metrics[(name, frozenset(labels.items()))]


def _parse(metrics_text: bytes) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(metrics_text.decode()) for s in family.samples}


def test_monitor_follows_an_engine_and_serves_strict_json(tmp_path):
    """A real engine driven with a fake clock: rounds, rejections and a diverged loss (NaN: null in JSON)."""
    export_all(ModelSpec(arch="mlp", image_size=8, hidden=(8,)), ["a"], tmp_path / "art")
    artifacts = ArtifactStore(tmp_path / "art")
    registry = DeviceRegistry()
    for device in ("d0", "d1"):
        registry.hello(device, 50, 10, None, "portable", now=0.0)
    strategy = FedMut(min_clients=2, alpha=1.5)  # a strategy with numbers of its own, exported as tierfl_strategy_metric
    engine = RoundEngine(EngineParts(EngineConfig(fleet="f", rounds=3, round_timeout_s=10), strategy,
                                     artifacts, StateStore(tmp_path / "state"), registry))
    zeros = {n: np.zeros(s, np.float32) for n, s in artifacts.tiers["a"].shapes.items()}
    monitor = Monitor(refresh_s=60)  # refreshes anyway whenever a round finishes
    monitor.observe(engine, 1.0)
    assert json.loads(monitor.snapshot().json_bytes)["current"] is None
    engine.tick(2.0)
    monitor.observe(engine, 2.0)
    assert monitor.snapshot().current is None, "no round finished and the refresh interval has not passed"
    loss = 1e12  # the largest a device may report (protocol.messages.MAX_LOSS)
    for device in ("d0", "d1"):
        update = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=50, steps=2, train_loss=loss,
                        train_accuracy=0.1, train_seconds=0.1, eval_loss=loss, eval_accuracy=0.25, eval_samples=10)
        registry.holds(device, "a", 0)  # as the service does on every update
        engine.on_update(device, new_id(), update, zeros, 1234, 3.0)
        monitor.update_accepted()
    monitor.rejected("d9", RejectReason.UNKNOWN_DEVICE, "d9 has not announced itself", 3.5)
    monitor.observe(engine, 4.0, step_seconds=0.02)
    status = json.loads(monitor.snapshot().json_bytes)
    assert status["round"] == status["version"] == 1 and status["current"] is None
    assert status["model_card"] == {"name": "mlp8-h8", "input_shape": [1, 8, 8], "num_classes": 10, "batch_norm": False,
                                    "origin": "mlp", "tiers": {"a": {"rate": 1.0, "params": 610, "macs": 592}}}
    [round1] = status["history"]
    assert (round1["accuracy"], round1["loss"], round1["committed"], round1["bytes_up"]) == (0.25, 1e12, True, 2468)
    assert [(d["device_id"], d["tier"], d["online"]) for d in status["devices"]] == [("d0", "a", True), ("d1", "a", True)]
    assert status["rejections"] == [{"time": 3.5, "device": "d9", "reason": "unknown_device",
                                     "detail": "d9 has not announced itself"}]
    metrics = _parse(generate_latest(monitor.registry))
    assert _value(metrics, "tierfl_rounds_finished_total", outcome="committed") == 1
    assert _value(metrics, "tierfl_updates_accepted_total") == 2
    assert _value(metrics, "tierfl_rejections_total", reason="unknown_device") == 1
    assert _value(metrics, "tierfl_accuracy") == 0.25 and _value(metrics, "tierfl_loss") == 1e12
    assert _value(metrics, "tierfl_aggregation_seconds_sum") == pytest.approx(0.02)
    assert _value(metrics, "tierfl_strategy_metric", metric="fedmut_alpha") == 1.5
    engine.tick(5.0)
    monitor.observe(engine, 70.0)  # the refresh interval passed: the open round shows
    current = json.loads(monitor.snapshot().json_bytes)["current"]
    assert current == {"number": 2, "phase": "training", "selected": 2, "answered": 0, "started": 5.0, "deadline": 15.0,
                       "waiting_for": ["d0", "d1"]}


def test_status_server_refuses_bad_ports_clearly():
    with pytest.raises(ValueError, match="status port 70000 is not a TCP port"):
        Monitor(port=70000)
    with Monitor() as taken, pytest.raises(OSError, match=f"cannot serve the status page on 127.0.0.1:{taken.port}"):
        Monitor(port=taken.port).start()


@pytest.mark.integration
def test_metrics_and_status_follow_the_rounds(federation, mosquitto_url, fleet):
    first = federation.pause_after(2)
    m1 = federation.metrics()
    done = first["round"]
    history = first["history"]
    assert [r["round"] for r in history] == list(range(1, done + 1))
    assert _value(m1, "tierfl_round") == done and _value(m1, "tierfl_model_version") == first["version"] == done
    assert _value(m1, "tierfl_rounds_finished_total", outcome="committed") == done
    assert _value(m1, "tierfl_rounds_finished_total", outcome="failed") == 0
    assert _value(m1, "tierfl_round_duration_seconds_count") == _value(m1, "tierfl_aggregation_seconds_count") == done
    accepted = sum(r["answered"] for r in history) + first["current"]["answered"]
    assert _value(m1, "tierfl_updates_accepted_total") == first["totals"]["updates_accepted"] == accepted == 2 * done + 1
    assert _value(m1, "tierfl_devices_online", tier="a") == 2 and _value(m1, "tierfl_devices_known") == 2
    assert _value(m1, "tierfl_accuracy") == pytest.approx(history[-1]["accuracy"]) and history[-1]["accuracy"] > 0.3
    assert _value(m1, "tierfl_loss") == pytest.approx(history[-1]["loss"])
    assert _value(m1, "tierfl_tier_accuracy", tier="a") == pytest.approx(history[-1]["accuracy_by_tier"]["a"])
    assert _value(m1, "tierfl_rejections_total", reason="malformed") == 0
    # Devices send at least their float32 updates (the MLP has 85,002 weights), the aggregator at least its tasks,
    # whose weights are int8 deltas (the default --downlink int8-delta): a byte a weight.
    assert _value(m1, "tierfl_received_bytes_total") >= sum(r["bytes_up"] for r in history) > done * 2 * 340_000
    assert _value(m1, "tierfl_sent_bytes_total") >= sum(r["bytes_down"] for r in history) > done * 2 * 85_000
    assert [(d["device_id"], d["tier"], d["online"], d["backend"]) for d in first["devices"]] == \
        [("d0", "a", True, "ort-training"), ("d1", "a", True, "ort-training")]
    current = first["current"]
    assert (current["number"], current["phase"], current["selected"], current["answered"]) == (done + 1, "training", 2, 1)
    assert current["started"] <= first["now"] < current["deadline"] == pytest.approx(current["started"] + 60)

    watcher = Watcher(mosquitto_url, [])
    try:
        watcher.publish(Topics(fleet).up("mallory"), b"\x00garbage that is no frame")
        _wait_for(lambda: federation.status()["rejections"], 15, "the rejection on the status page")
    finally:
        watcher.close()
    federation.resume()
    second = federation.pause_after(done + 2)
    m2 = federation.metrics()
    assert second["round"] >= done + 2 and _value(m2, "tierfl_model_version") == second["version"] == second["round"]
    assert _value(m2, "tierfl_rounds_finished_total", outcome="committed") == second["round"]
    assert _value(m2, "tierfl_updates_accepted_total") == 2 * second["round"] + 1
    for counter in ("tierfl_received_bytes_total", "tierfl_sent_bytes_total", "tierfl_aggregation_seconds_sum"):
        assert _value(m2, counter) > _value(m1, counter)
    assert _value(m2, "tierfl_rejections_total", reason="malformed") == 1
    assert second["rejected_by_reason"] == {"malformed": 1}
    [rejection] = second["rejections"]
    assert (rejection["device"], rejection["reason"]) == ("mallory", "malformed") and rejection["detail"]
    assert first["now"] < rejection["time"] < second["now"]
    assert [r["round"] for r in second["history"]] == list(range(1, second["round"] + 1))
    assert all(r["committed"] and r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in second["history"])

    content_type, page = federation.get("")
    assert content_type.startswith("text/html") and b"<canvas" in page
    assert b"http://" not in page and b"https://" not in page, "the page must load nothing from elsewhere"
    assert federation.get("metrics")[0].startswith("text/plain; version=")
    with pytest.raises(urllib.error.HTTPError, match="404"):
        federation.get("nothing-here")


# -- the page in a browser -----------------------------------------------------------------------

@pytest.fixture
def chromium() -> str:
    """Path of Debian's chromium; fails in CI (where `make test` installs it) and skips elsewhere when missing."""
    found = shutil.which("chromium")
    if found is None:
        message = "chromium is not installed: `apt-get install chromium` (`make test` does it when run as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def _screenshot(chromium: str, url: str, out: Path) -> np.ndarray:
    """The page at `url` as Chromium renders it after a few seconds of (virtual) time, as RGB integers."""
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--no-first-run", f"--user-data-dir={out.parent / 'chromium-profile'}", "--window-size=1280,1000",
         "--virtual-time-budget=3000", f"--screenshot={out}", url],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and out.exists(), f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
    return (imread(out)[..., :3] * 255).round().astype(np.int16)


def _near(image: np.ndarray, color: tuple[int, int, int], tolerance: int = 24) -> np.ndarray:
    return np.abs(image - np.array(color)).max(axis=-1) <= tolerance


def _blobs(mask: np.ndarray, min_pixels: int = 12) -> list[tuple[float, float]]:
    """Centres (x, y) of the 4-connected groups of at least `min_pixels` pixels of `mask`."""
    unvisited = set(zip(*np.nonzero(mask)))
    centres = []
    while unvisited:
        stack = [unvisited.pop()]
        group = []
        while stack:
            y, x = stack.pop()
            group.append((y, x))
            for neighbour in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if neighbour in unvisited:
                    unvisited.remove(neighbour)
                    stack.append(neighbour)
        if len(group) >= min_pixels:
            ys, xs = zip(*group)
            centres.append((sum(xs) / len(xs), sum(ys) / len(ys)))
    return sorted(centres)


@pytest.mark.integration
def test_browser_chart_renders_and_grows_across_rounds(chromium, federation, tmp_path):
    def shot(after: int) -> tuple[int, np.ndarray]:
        """Rounds finished and the page's screenshot, with the federation paused after `after` rounds."""
        status = federation.pause_after(after)
        image = _screenshot(chromium, federation.url, tmp_path / f"round{status['round']}.png")
        assert federation.status()["round"] == status["round"], "the federation must stay paused during the screenshot"
        federation.resume()
        return status["round"], image

    rounds1, image1 = shot(2)
    rounds2, image2 = shot(rounds1 + 3)
    markers1, markers2 = _blobs(_near(image1, MARKER)), _blobs(_near(image2, MARKER))
    assert len(markers1) == rounds1 and len(markers2) == rounds2, "one accuracy marker per finished round"
    # Same rounds on the same axis: the first markers stay put, the new ones lie to their right.
    assert np.allclose(markers2[:rounds1], markers1, atol=1.5)
    assert min(x for x, _ in markers2[rounds1:]) > max(x for x, _ in markers1) + 10
    # Accuracy rises, so markers of later rounds sit higher (smaller y) than round 1's.
    assert markers2[-1][1] < markers2[0][1]
    for color in (ACCURACY_LINE, BYTES_UP, BYTES_DOWN):
        assert _near(image2, color).sum() > _near(image1, color).sum() > 50, f"the chart in {color} must grow"


def test_linger_keeps_the_status_page_up_after_the_last_round(tmp_path, mosquitto_url, fleet):
    log = tmp_path / "aggregator.log"
    aggregator = tierfl("aggregator", "--broker", mosquitto_url, "--fleet", fleet, "--state-dir", str(tmp_path / "state"),
                        "--min-clients", "1", "--rounds", "1", "--status-port", "0", "--linger", "4", log=log)
    device = tierfl("client", "--broker", mosquitto_url, "--fleet", fleet, "--device-id", "d0", "--data", "digits",
                    "--cache-dir", str(tmp_path / "d0"), log=tmp_path / "d0.log")
    try:
        lingering = re.compile(r"the status page stays up at (http://127\.0\.0\.1:\d+/) for 4 s")
        _wait_for(lambda: lingering.search(log.read_text()), 90, "the last round and the linger")
        with urllib.request.urlopen(lingering.search(log.read_text()).group(1) + "status.json", timeout=10) as response:
            assert json.loads(response.read())["version"] == 1, "the finished run is still on show"
        assert aggregator.wait(30) == 0
    finally:
        _stop([aggregator, device])
