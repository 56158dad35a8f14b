"""Whole federations of real processes over a real MQTT broker, with real ONNX Runtime training."""

from __future__ import annotations

import getpass
import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from aggregator.store.artifacts import ArtifactStore
from edge_client.bench import BenchReport, BenchSettings, TierResult
from models.export import zoo_card
from models.spec import ModelSpec
from models.tiers import TIER_RATES
from protocol.frame import decode_frame, encode_frame
from protocol.messages import Hello, Reject, RejectReason, RoundSummary, Task, Update, new_id
from protocol.mqtt.url import BrokerUnreachable, parse, wait_for_broker
from protocol.signing import DeviceKey
from protocol.topics import Topics
from tests.conftest import tierfl

pytestmark = pytest.mark.integration


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _run_demo(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "tierfl.cli", "demo", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "accuracy.png").stat().st_size > 10_000
    return json.loads((out / "summary.json").read_text())


# Bytes of one update of the 85,002-parameter MLP: the codec's tensor bytes plus a small JSON header
# (top-k is deflated, so its size depends on the update).
@pytest.mark.parametrize("codec,low,high", [("float32", 340_008, 344_008), ("int8", 85_002, 89_002),
                                            ("topk:0.1+int8", 6_000, 20_000)])
def test_demo_federation_on_embedded_broker(tmp_path, codec, low, high):
    summary = _run_demo(tmp_path, "--clients", "4", "--rounds", "6", "--tiers", "a", "--arch", "mlp",
                         "--no-batch-norm", "--codec", codec)
    assert summary["broker"].startswith("mqtt://127.0.0.1:")
    assert [r["round"] for r in summary["rounds"]] == list(range(1, 7))
    assert all(r["clients_answered"] == 4 for r in summary["rounds"])
    assert summary["final_accuracy"] > 0.8
    assert summary["rounds"][-1]["accuracy"] > summary["rounds"][0]["accuracy"]
    for r in summary["rounds"]:
        assert 4 * low < r["bytes_up"] < 4 * high


@pytest.mark.parametrize("downlink,task_bytes", [("float16", 170_004), ("int8-delta", 85_002)])
def test_compact_downlink_cuts_bytes_down_and_still_trains(tmp_path, downlink, task_bytes):
    summary = _run_demo(tmp_path, "--clients", "4", "--rounds", "6", "--tiers", "a", "--arch", "mlp",
                         "--no-batch-norm", "--downlink", downlink)
    assert summary["final_accuracy"] > 0.8
    # From round 2 on only tasks go down (int8-delta: every device holds the previous version):
    # 4 x 85,002 weights in the downlink's encoding plus small headers.
    for r in summary["rounds"][1:]:
        assert 4 * task_bytes < r["bytes_down"] < 4 * (task_bytes + 6_000)


def test_batch_norm_federation_measures_statistics_on_devices(tmp_path):
    summary = _run_demo(tmp_path, "--clients", "3", "--rounds", "4")  # the default: a CNN with batch norm
    assert summary["rejected"] == {}
    assert summary["final_accuracy"] > 0.6 and set(summary["final_accuracy_by_tier"]) == {"a", "b", "c"}
    log = (tmp_path / "demo" / "logs" / "aggregator.log").read_text()
    assert log.count("batch-norm statistics from 3 devices") == 4


def test_demo_federation_on_mosquitto(tmp_path, mosquitto_url, fleet):
    summary = _run_demo(tmp_path, "--broker", mosquitto_url, "--fleet", fleet, "--clients", "8", "--rounds", "20")
    assert summary["broker"] == mosquitto_url
    assert summary["final_accuracy"] >= 0.90
    assert summary["rejected"] == {}


class Watcher:
    """A plain paho client that records every frame on the given topics."""

    def __init__(self, url: str, topics: list[str]) -> None:
        self.frames: list[tuple[str, object]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
        self.client.on_message = lambda c, u, m: self.frames.append((m.topic, m.payload))
        host, port = url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def bodies(self, topic_suffix: str) -> list:
        return [decode_frame(p).body for t, p in list(self.frames) if t.endswith(topic_suffix) and p]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _stop(processes: list[subprocess.Popen[bytes]] | tuple[subprocess.Popen[bytes], ...]) -> None:
    """Terminate the processes still running and reap them."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


def _aggregator(tmp_path: Path, url: str, fleet: str, *extra: str) -> subprocess.Popen[bytes]:
    return tierfl(
        "aggregator", "--broker", url, "--fleet", fleet, "--state-dir", str(tmp_path / "state"),
        "--eval-data", "digits", *extra, log=tmp_path / "aggregator.log",
    )


class Mosquitto:
    """A Mosquitto of the test's own on a free port, persistent like a production broker: started, stopped, restarted."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.log = folder / "mosquitto.log"
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {folder}/\nuser {getpass.getuser()}\n")  # root would drop to `mosquitto`
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        """Run the broker and return once it accepts MQTT connections."""
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen([binary, "-c", str(self.conf), "-v"], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_broker(parse(self.url), 10)
        except BrokerUnreachable:
            self.stop()
            raise AssertionError(self.log.read_text()[-3000:]) from None
        return self

    def freeze(self, frozen: bool) -> None:
        """Suspend the broker (SIGSTOP: connections stay open, nothing is read or acknowledged) or resume it."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    def stop(self) -> None:
        """Stop the broker (SIGTERM: it saves its sessions and retained messages first)."""
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto this test starts and stops itself (fault tests restart it, or need it to themselves)."""
    broker = Mosquitto(tmp_path / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.stop()


def test_hostile_and_misdirected_messages_are_refused_with_reasons(tmp_path, mosquitto_url, fleet):
    topics = Topics(fleet)
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--min-clients", "5", "--rounds", "1")
    watcher = Watcher(mosquitto_url, [f"{topics.base}/down/+"])
    try:
        _wait_for(lambda: "waiting for devices" in (tmp_path / "aggregator.log").read_text(), 30, "aggregator start")
        # A device announces itself, then sends garbage, a frame for a round that does not exist,
        # a frame whose tensors do not fit the tier, a frame claiming another sender, and a frame of a foreign fleet.
        watcher.publish(topics.status("mallory"), encode_frame(fleet, "mallory", Hello(num_samples=10)), retain=True)
        watcher.publish(topics.up("mallory"), b"\x00garbage that is no frame")
        update = Update(update_id=new_id(), round=99, base_version=0, tier="a", num_samples=10, steps=1,
                        train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
        shapes = ArtifactStore(tmp_path / "state" / "artifacts").tiers["a"].shapes
        tensors = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        watcher.publish(topics.up("mallory"), encode_frame(fleet, "mallory", update, tensors))
        watcher.publish(topics.up("mallory"), encode_frame(fleet, "mallory", update, {"fc1.weight": np.zeros((2, 2), np.float32)}))
        watcher.publish(topics.up("mallory"), encode_frame(fleet, "alice", update))
        watcher.publish(topics.up("mallory"), encode_frame("otherfleet", "mallory", update))
        # Mallory's downlink also gets the aggregator's key announcement (a Blob), answering its hello.
        _wait_for(lambda: sum(isinstance(b, Reject) for b in watcher.bodies("/down/mallory")) >= 5, 15, "five rejections")
        reasons = [b.reason for b in watcher.bodies("/down/mallory") if isinstance(b, Reject)]
        assert reasons == [RejectReason.MALFORMED, RejectReason.STALE_ROUND, RejectReason.BAD_TENSOR,
                           RejectReason.SENDER_MISMATCH, RejectReason.WRONG_FLEET], watcher.bodies("/down/mallory")
        assert aggregator.poll() is None, "the aggregator must survive hostile input"
        log = (tmp_path / "aggregator.log").read_text()
        assert "Traceback" not in log and "rejected a message from mallory: malformed" in log
        aggregator.terminate()
        aggregator.wait(10)
        ledger = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
        recorded = [row[0] for row in ledger.execute("SELECT reason FROM received WHERE device = 'mallory' ORDER BY id")]
        assert recorded == ["malformed", "stale_round", "bad_tensor", "sender_mismatch", "wrong_fleet"]
    finally:
        watcher.publish(topics.status("mallory"), b"", retain=True)
        watcher.close()
        aggregator.terminate()
        aggregator.wait(10)


def _bench_report(path: Path, ms_per_sample: dict[str, float]) -> Path:
    tiers = [TierResult(tier=t, rate=TIER_RATES[t], params=1, artifact_bytes=1, step_p50_ms=1.0, step_p95_ms=1.0,
                        samples_per_second=1e3 / ms, peak_rss_kib=None, baseline_rss_kib=None, epochs_seconds=None,
                        update_bytes={}) for t, ms in ms_per_sample.items()]
    settings = BenchSettings(data="digits", tiers=list(ms_per_sample), batch_size=32, warmup_steps=3, steps=10,
                             epochs=0, threads=1, codecs=[])
    report = BenchReport(model=zoo_card(ModelSpec(arch="mlp")), settings=settings, samples=100, host={}, parent_peak_rss_kib=None,
                         tiers=tiers)
    path.write_text(report.model_dump_json())
    return path


def test_auto_tiers_follow_announced_and_measured_speed(tmp_path, mosquitto_url, fleet):
    """A device announcing a slow benchmark gets tier e; one without a benchmark starts on e and, once
    its first update shows its speed, moves to the widest tier that fits; a fast one gets a at once."""
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--tiers", "a,e", "--tier-policy", "auto",
                             "--min-clients", "3", "--rounds", "3", "--round-timeout", "20")
    speeds = {"slow": {"a": 500.0, "e": 5.0}, "fast": {"a": 0.01}}
    devices = [
        tierfl("client", "--broker", mosquitto_url, "--fleet", fleet, "--device-id", name, "--data", "digits",
               "--cache-dir", str(tmp_path / name),
               *(["--bench", str(_bench_report(tmp_path / f"{name}.json", speeds[name]))] if name in speeds else []),
               log=tmp_path / f"{name}.log")
        for name in ("slow", "fast", "unknown")
    ]
    try:
        agg_log = tmp_path / "aggregator.log"
        assert aggregator.wait(120) == 0, agg_log.read_text()[-3000:]
        selected = re.findall(r"round (\d): 3 devices selected: (.*)", agg_log.read_text())
        assert selected[0][1] == "fast (tier a), slow (tier e), unknown (tier e)"
        assert selected[1][1] == "fast (tier a), slow (tier e), unknown (tier a)"
    finally:
        _stop([aggregator, *devices])


def test_fedprox_with_partial_work_at_the_deadline(tmp_path, mosquitto_url, fleet):
    """500 local epochs cannot finish in a 6 s round: devices stop before the deadline and send what they did
    (with logit adjustment on both backends)."""
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--mu", "0.1", "--logit-adjust", "1", "--min-clients", "2",
                             "--rounds", "2", "--epochs", "500", "--batch-size", "16", "--lr", "0.05", "--round-timeout", "6")
    devices = [tierfl("client", "--broker", mosquitto_url, "--fleet", fleet, "--device-id", f"p{i}", "--data", "digits",
                      "--cache-dir", str(tmp_path / f"p{i}"), *(["--backend", "portable"] if i else []),
                      log=tmp_path / f"p{i}.log") for i in range(2)]
    watcher = Watcher(mosquitto_url, [Topics(fleet).rounds])
    try:
        assert aggregator.wait(90) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        summaries = watcher.bodies("/rounds")
        assert [(s.selected, s.answered) for s in summaries] == [(2, 2), (2, 2)]
        assert summaries[-1].accuracy > 0.5
        steps = [int(m) for i in range(2) for m in re.findall(r"round \d+: (\d+) steps", (tmp_path / f"p{i}.log").read_text())]
        assert steps and all(0 < s < 500 * 90 for s in steps)  # partial: far fewer than 500 epochs of ~90 batches
        left = sorted(p.name for p in (tmp_path / "state").iterdir())
        assert not {"ledger.sqlite-wal", "ledger.sqlite-shm", "open_round"} & set(left), left  # a clean exit tidies up
        options = json.loads((tmp_path / "state" / "options.json").read_text())["options"]
        assert options["mu"] == 0.1 and options["logit_adjust"] == 1.0
    finally:
        watcher.close()
        _stop([aggregator, *devices])


def test_devices_whose_training_diverges_decline_and_the_round_closes_without_waiting(tmp_path, mosquitto_url, fleet):
    """FedProx with mu 100 at lr 10 multiplies w - w_received by -999 a step: training goes to Inf on both
    backends, each device declines the round (`Update.declined`) and the round closes at once, failed for too
    few updates, not at its 120 s deadline."""
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--min-clients", "2", "--rounds", "1",
                             "--round-timeout", "120", "--mu", "100", "--lr", "10")
    devices = [tierfl("client", "--broker", mosquitto_url, "--fleet", fleet, "--device-id", f"o{i}", "--data", "digits",
                      "--cache-dir", str(tmp_path / f"o{i}"), *(["--backend", "portable"] if i else []),
                      log=tmp_path / f"o{i}.log") for i in range(2)]
    watcher = Watcher(mosquitto_url, [Topics(fleet).rounds])
    try:
        assert aggregator.wait(100) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        summaries = watcher.bodies("/rounds")
        assert [(s.version, s.answered, s.selected) for s in summaries] == [(0, 0, 2)]
        assert summaries[0].seconds < 60 and not summaries[0].rejected
        for i in range(2):
            assert "round 1: declined (its training diverged)" in (tmp_path / f"o{i}.log").read_text()
        text = (tmp_path / "aggregator.log").read_text()
        assert "declined o0, o1" in text, text[-3000:]
        with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM received WHERE kind = 'decline' AND accepted = 1").fetchone() == (2,)
    finally:
        watcher.close()
        _stop([aggregator, *devices])


def test_enrolled_fleet_refuses_spoofed_and_unenrolled_devices(tmp_path, mosquitto_url, fleet):
    """The broker lets anyone publish anywhere here; signatures still keep Mallory out."""
    alice, mallory, bob = (DeviceKey(tmp_path / name) for name in ("alice", "mallory", "bob"))
    enrolled = tmp_path / "enrolled.json"
    enrolled.write_text(json.dumps({"alice": alice.public_hex}))
    topics = Topics(fleet)
    watcher = Watcher(mosquitto_url, [f"{topics.base}/down/+", topics.rounds])
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--enrolled", str(enrolled), "--min-clients", "1",
                             "--rounds", "2")
    device = tierfl("client", "--broker", mosquitto_url, "--fleet", fleet, "--device-id", "alice", "--data", "digits",
                    "--cache-dir", str(tmp_path / "alice"), log=tmp_path / "alice.log")
    try:
        _wait_for(lambda: "joined" in (tmp_path / "aggregator.log").read_text(), 60, "alice to join")
        update = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=10_000, steps=1,
                        train_loss=0.1, train_accuracy=1.0, train_seconds=0.1)
        watcher.publish(topics.up("alice"), encode_frame(fleet, "alice", update, None, signer=mallory.sign))
        watcher.publish(topics.status("bob"), encode_frame(fleet, "bob", Hello(num_samples=10), signer=bob.sign))
        assert aggregator.wait(120) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        reasons = {t.rsplit("/", 1)[1]: b.reason for t, b in
                   ((t, decode_frame(p).body) for t, p in list(watcher.frames) if "/down/" in t and p)
                   if isinstance(b, Reject)}
        assert reasons == {"alice": RejectReason.BAD_SIGNATURE, "bob": RejectReason.NOT_ENROLLED}
        summaries = watcher.bodies("/rounds")
        assert [s.answered for s in summaries] == [1, 1] and summaries[-1].accuracy > 0.5  # alice's real updates
    finally:
        watcher.publish(topics.status("bob"), b"", retain=True)
        watcher.close()
        _stop((aggregator, device))


def test_device_killed_mid_round_is_dropped_and_training_continues(tmp_path, own_mosquitto, fleet):
    url = own_mosquitto.url
    rounds = 5
    aggregator = _aggregator(tmp_path, url, fleet, "--min-clients", "2", "--rounds", str(rounds),
                             "--epochs", "40", "--batch-size", "8", "--round-timeout", "60")
    devices = [
        tierfl("client", "--broker", url, "--fleet", fleet, "--device-id", f"d{i}", "--data", "digits",
               "--cache-dir", str(tmp_path / f"d{i}"), log=tmp_path / f"d{i}.log")
        for i in range(3)
    ]
    watcher = Watcher(url, [Topics(fleet).rounds])
    try:
        agg_log = tmp_path / "aggregator.log"
        full = re.compile(r"round (\d+): 3 devices selected")
        _wait_for(lambda: full.search(agg_log.read_text()), 90, "a round with all three devices")
        time.sleep(0.3)  # the task has arrived; 40 local epochs take about a second
        devices[2].send_signal(signal.SIGKILL)
        killed_round = int(full.search(agg_log.read_text()).group(1))
        assert aggregator.wait(120) == 0, agg_log.read_text()[-3000:]
        summaries = watcher.bodies("/rounds")
        assert [s.round for s in summaries] == list(range(1, rounds + 1))
        assert summaries[-1].version == rounds
        hit = summaries[killed_round - 1]
        assert hit.selected == 3 and hit.answered in (2, 3)
        assert hit.seconds < 30, "the dead device must be dropped via its last will, not waited for until the deadline"
        assert all(s.selected == s.answered == 2 for s in summaries[killed_round:])
    finally:
        watcher.close()
        _stop([aggregator, *devices])


def test_aggregator_killed_and_restarted_resumes_from_its_state(tmp_path, own_mosquitto, fleet):
    url = own_mosquitto.url
    chunked = ["--max-message-bytes", "65536"]  # every weight frame (340 kB) travels in 6 chunks
    device = tierfl("client", "--broker", url, "--fleet", fleet, "--device-id", "solo", "--data", "digits",
                    "--cache-dir", str(tmp_path / "solo"), *chunked, log=tmp_path / "solo.log")
    try:
        first = _aggregator(tmp_path, url, fleet, "--min-clients", "1", "--rounds", "200", "--epochs", "3", *chunked)
        state = tmp_path / "state" / "state.json"
        _wait_for(lambda: state.exists() and json.loads(state.read_text())["version"] >= 3, 60, "3 committed rounds")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        before = json.loads(state.read_text())
        second = _aggregator(tmp_path, url, fleet, "--min-clients", "1", "--rounds", str(before["round"] + 2), *chunked)
        assert second.wait(60) == 0
        after = json.loads(state.read_text())
        assert after["round"] == before["round"] + 2 and after["version"] == before["version"] + 2
        assert [h["round"] for h in after["history"]] == list(range(1, after["round"] + 1))
        assert "resumed from" in (tmp_path / "aggregator.log").read_text()
        db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
        accepted = db.execute("SELECT COUNT(*) FROM received WHERE kind = 'update' AND accepted = 1 GROUP BY update_id").fetchall()
        db.close()
        assert len(accepted) == after["version"] and {n for (n,) in accepted} == {1}  # one update per version, once
    finally:
        device.terminate()
        device.wait(10)


def _accepted_in_ledger(ledger: Path, round_number: int) -> int:
    """Updates of `round_number` the ledger records as accepted (0 while the file or its table is not there yet)."""
    try:
        db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
        try:
            return db.execute("SELECT COUNT(*) FROM received WHERE kind = 'update' AND accepted = 1 AND round = ?",
                              (round_number,)).fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0


def test_aggregator_killed_mid_round_resumes_it_and_counts_every_update_once(tmp_path, own_mosquitto, fleet):
    """Round 2 of 2: two real devices' updates are accepted, the third device (this test) holds back; SIGKILL.
    The restarted aggregator resumes round 2 with both updates, sends the owed task again, refuses a replay
    of an update accepted before the crash (and one of round 1), takes the third update, and commits version 2."""
    url, topics = own_mosquitto.url, Topics(fleet)
    watcher = Watcher(url, [topics.down("probe"), f"{topics.base}/up/+", topics.rounds])
    watcher.publish(topics.status("probe"), encode_frame(fleet, "probe", Hello(num_samples=50)), retain=True)
    options = ["--fleet", fleet, "--state-dir", str(tmp_path / "state"), "--min-clients", "3", "--rounds", "2",
               "--round-timeout", "40", "--eval-data", "digits"]
    first = tierfl("aggregator", "--broker", url, *options, log=tmp_path / "first.log")
    devices = [tierfl("client", "--broker", url, "--fleet", fleet, "--device-id", f"d{i}", "--data", "digits",
                      "--cache-dir", str(tmp_path / f"d{i}"), log=tmp_path / f"d{i}.log") for i in range(2)]
    second = None

    def tasks(round_number: int) -> list[tuple[Task, dict[str, np.ndarray]]]:
        frames = [decode_frame(p) for t, p in list(watcher.frames) if t == topics.down("probe")]
        return [(f.body, f.tensors) for f in frames if isinstance(f.body, Task) and f.body.round == round_number]

    def answer(task: Task, tensors: dict[str, np.ndarray]) -> tuple[str, bytes]:
        update = Update(update_id=new_id(), round=task.round, base_version=task.model_version, tier=task.tier,
                        num_samples=50, steps=1, train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
        return update.update_id, encode_frame(fleet, "probe", update, {n: np.zeros_like(v) for n, v in tensors.items()})

    try:
        _wait_for(lambda: tasks(1), 60, "the probe's task of round 1")
        round_one_id, round_one = answer(*tasks(1)[0])
        watcher.publish(topics.up("probe"), round_one)
        _wait_for(lambda: "round 2: update 2/3" in (tmp_path / "first.log").read_text(), 60, "round 2's first two updates")
        # Acceptances become durable together within 0.2 s (group commit): kill once the ledger holds both.
        _wait_for(lambda: _accepted_in_ledger(tmp_path / "state" / "ledger.sqlite", 2) == 2, 10, "both in the ledger")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        state = json.loads((tmp_path / "state" / "state.json").read_text())
        assert (state["round"], state["version"]) == (1, 1)
        accepted_before = [p for t, p in list(watcher.frames) if t in (topics.up("d0"), topics.up("d1"))
                           and isinstance(decode_frame(p).body, Update) and decode_frame(p).body.round == 2]
        assert len(accepted_before) == 2

        second = tierfl("aggregator", "--broker", url, *options, log=tmp_path / "second.log")
        _wait_for(lambda: len(tasks(2)) == 2, 60, "round 2's task sent again to the probe")
        replayed = decode_frame(accepted_before[0]).body
        watcher.publish(topics.up(decode_frame(accepted_before[0]).header.sender), accepted_before[0])  # a redelivery
        watcher.publish(topics.up("probe"), round_one)
        probe_id, frame = answer(*tasks(2)[1])
        watcher.publish(topics.up("probe"), frame)
        assert second.wait(60) == 0, (tmp_path / "second.log").read_text()[-3000:]

        log = (tmp_path / "second.log").read_text()
        assert "round 2 resumed from" in log and "2 of 3 updates were accepted before the restart" in log
        state = json.loads((tmp_path / "state" / "state.json").read_text())
        assert (state["round"], state["version"]) == (2, 2)  # what an uninterrupted run commits
        assert [(h["round"], h["version"], h["answered"]) for h in state["history"]] == [(1, 1, 3), (2, 2, 3)]
        assert not (tmp_path / "state" / "open_round").exists(), "the finished round took its spool along"
        summaries = [b for b in watcher.bodies("/rounds") if isinstance(b, RoundSummary)]
        assert summaries and summaries[-1].round == 2 and summaries[-1].answered == 3
        db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
        accepted = dict(db.execute("SELECT update_id, COUNT(*) FROM received WHERE kind = 'update' AND accepted = 1 "
                                   "GROUP BY update_id").fetchall())
        assert len(accepted) == 6 and set(accepted.values()) == {1}  # 3 devices x 2 rounds, each exactly once
        assert {probe_id, round_one_id, replayed.update_id} <= set(accepted)
        refusals = db.execute("SELECT update_id, round FROM received WHERE accepted = 0 ORDER BY id").fetchall()
        assert refusals == [(replayed.update_id, 2), (round_one_id, 1)]  # both duplicates, nothing else refused
        assert {r[0] for r in db.execute("SELECT reason FROM received WHERE accepted = 0")} == {"duplicate"}
        db.close()
    finally:
        watcher.publish(topics.status("probe"), b"", retain=True)
        watcher.close()
        _stop([first, *devices, *([second] if second else [])])


@pytest.mark.parametrize("command", [
    ["aggregator", "--broker", "mqtt://127.0.0.1:1", "--rounds", "1"],
    ["client", "--broker", "mqtt://127.0.0.1:1", "--data", "digits", "--device-id", "x"],
])
def test_unreachable_broker_is_a_clear_error(tmp_path, command):
    if command[0] == "aggregator":
        command += ["--state-dir", str(tmp_path / "state")]
    else:
        command += ["--cache-dir", str(tmp_path / "cache"), "--connect-timeout", "3"]  # devices retry forever by default
    result = subprocess.run([sys.executable, "-m", "tierfl.cli", *command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot reach MQTT broker at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_everyone_reconnects_after_the_broker_restarts(tmp_path, own_mosquitto, fleet):
    url = own_mosquitto.url
    rounds = 6
    aggregator = _aggregator(tmp_path, url, fleet, "--min-clients", "2", "--rounds", str(rounds), "--round-timeout", "8")
    devices = [
        tierfl("client", "--broker", url, "--fleet", fleet, "--device-id", f"r{i}", "--data", "digits",
               "--cache-dir", str(tmp_path / f"r{i}"), log=tmp_path / f"r{i}.log")
        for i in range(2)
    ]
    try:
        state = tmp_path / "state" / "state.json"
        _wait_for(lambda: state.exists() and json.loads(state.read_text())["version"] >= 2, 60, "2 committed rounds")
        own_mosquitto.stop()
        time.sleep(2)
        own_mosquitto.start()  # the same port, its sessions and retained messages restored from its persistence file
        assert aggregator.wait(90) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        record = json.loads(state.read_text())
        assert record["round"] == rounds and record["version"] >= rounds - 1  # at most the interrupted round fails
        for log in ("aggregator.log", "r0.log", "r1.log"):
            assert "disconnected from broker" in (tmp_path / log).read_text(), log
        assert len(re.findall(r"mosquitto version \S+ starting", own_mosquitto.log.read_text())) == 2  # really restarted
    finally:
        _stop(devices + [aggregator])
