"""`tierfl fleet`: traces, drawn behaviour, and a virtual fleet of 200 devices against an aggregator over Mosquitto."""

from __future__ import annotations

import argparse
import json
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_client.fleet import Fleet, configure_parser, settings_from
from edge_client.fleet_trace import DeviceTrace, Distributions, behaviours, next_edge, online_at, read_trace
from models.data import load_dataset
from models.export import export_all
from models.zoo import ModelSpec
from protocol.frame import decode_frame
from protocol.messages import Update
from protocol.topics import Topics
from tests.conftest import tierfl

DEVICES = 200
DROPS = {1: ["d-003", "d-050", "d-120"], 2: ["d-007"]}  # round -> devices of the trace that drop out in its task


def test_trace_reads_json_and_json_lines_and_names_the_bad_line(tmp_path, monkeypatch):
    as_json = tmp_path / "trace.json"
    as_json.write_text(json.dumps({"devices": [{"id": "x-1", "tier": "b", "online": [[0, 10], [20, 30]]}, {}]}))
    trace = read_trace(as_json)
    assert [d.id for d in trace.devices] == ["x-1", None] and trace.devices[0].online == [(0, 10), (20, 30)]
    lines = tmp_path / "trace.jsonl"
    lines.write_text('# a comment\n{"id": "x-1"}\n\n{"dropouts": [{"round": 2}]}\n')
    assert read_trace(lines).devices[1].dropouts[0].after == 0.5
    lines.write_text('{"id": "x-1"}\n{"latency_ms": -1}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:2: latency_ms"):
        read_trace(lines)
    lines.write_text('{"online": [[5, 1]]}\n')
    with pytest.raises(ValueError, match="start < end"):
        read_trace(lines)
    lines.write_text("[" * 100_000)  # json's own parser raises RecursionError on it
    with pytest.raises(ValueError, match=r"trace.jsonl:1: .*recursion limit"):
        read_trace(lines)
    lines.write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl is not a fleet trace: not UTF-8 text"):
        read_trace(lines)
    monkeypatch.setattr("edge_client.fleet_trace.MAX_TRACE_BYTES", 4)
    with pytest.raises(ValueError, match=r"trace.jsonl is not a fleet trace: 12 bytes, more than a trace may take"):
        read_trace(lines)  # refused before it is read


def test_behaviour_is_drawn_per_device_and_repeatable():
    spread = Distributions(tiers=["a", "b"], seconds_per_sample={"a": 0.01, "b": 0.005}, speed_spread=0.5,
                           uplink_kbps=800, latency_ms=50, seed=3)
    first, again = behaviours(100, None, spread), behaviours(100, None, spread)
    assert first == again and first[0].id == "v-00000"
    assert {b.tier for b in first} == {"a", "b"}
    assert len({b.seconds_per_sample["a"] for b in first}) == 100  # each device its own speed factor
    given = behaviours(1, _trace([DeviceTrace(id="pi", speed_factor=2.0, uplink_kbps=8, latency_ms=100)]), spread)[0]
    assert given.id == "pi" and given.training_s("a", 100) == pytest.approx(100 * 0.01 * 2.0)
    assert given.upload_s(1000) == pytest.approx(0.1 + 1000 * 8 / 8000)
    with pytest.raises(ValueError, match="describes only 1"):
        behaviours(2, _trace([DeviceTrace()]), spread)


def test_online_windows_are_looked_up_by_bisection_as_by_a_scan():
    windows = [(0.0, 10.0), (10.0, 12.0), (20.0, 30.0), (45.5, 50.0)]  # adjacent windows too
    for t in [-1.0, 0.0, 5.0, 10.0, 11.9, 12.0, 15.0, 20.0, 30.0, 40.0, 45.5, 49.0, 50.0, 60.0]:
        assert online_at(windows, t) == any(start <= t < end for start, end in windows), t
        later = [edge for window in windows for edge in window if edge > t]
        assert next_edge(windows, t) == (min(later) if later else None), t
    assert online_at(None, 5.0) and not online_at([], 5.0) and next_edge([], 5.0) is None


def _trace(devices: list[DeviceTrace]):
    from edge_client.fleet_trace import Trace

    return Trace(devices=devices)


class _UplinkCapture:
    """Every update frame devices publish on the fleet's uplink, decoded, by update id."""

    def __init__(self, url_port: int, fleet: str) -> None:
        self.updates: dict[str, tuple[Update, dict[str, np.ndarray]]] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self._client.on_connect = lambda c, u, f, r, p: c.subscribe(Topics(fleet).all_up(), qos=1)
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", url_port)
        self._client.loop_start()
        assert self._subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        try:
            frame = decode_frame(message.payload)
        except Exception:
            return
        if isinstance(frame.body, Update):
            with self._lock:
                self.updates[frame.body.update_id] = (frame.body, {k: np.asarray(v) for k, v in frame.tensors.items()})

    def stop(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


@pytest.mark.integration
def test_virtual_fleet_completes_rounds_with_its_dropouts_and_commits_the_mean_of_its_updates(tmp_path, mosquitto_url,
                                                                                              fleet):
    trace = tmp_path / "trace.jsonl"
    rows = []
    for i in range(DEVICES):
        device = {"id": f"d-{i:03d}"}
        drops = [{"round": r, "after": 0.5, "away_s": 3.0 if r == 1 else 120.0} for r, ids in DROPS.items() if device["id"] in ids]
        if drops:
            device["dropouts"] = drops
        rows.append(json.dumps(device))
    trace.write_text("\n".join(rows) + "\n")
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--broker", mosquitto_url, "--fleet", fleet, "--trace", str(trace), "--cache-root",
                              str(tmp_path / "fleet"), "--samples-per-device", "16", "--seconds-per-sample", "a=0.01"])
    settings, devices = settings_from(args)
    art = tmp_path / "art"
    export_all(ModelSpec(arch="mlp", hidden=(16,)), ["a"], art)  # digits' 8x8 MLP, small: 1,210 parameters
    capture = _UplinkCapture(1883, fleet)
    virtual = Fleet(settings, devices, load_dataset("digits"), per_device=16)
    virtual.start()
    state = tmp_path / "state"
    aggregator = None
    try:
        deadline = time.monotonic() + 30
        while virtual.connected() < DEVICES and time.monotonic() < deadline:
            time.sleep(0.05)
        assert virtual.connected() == DEVICES
        aggregator = tierfl("aggregator", "--broker", mosquitto_url, "--fleet", fleet, "--state-dir", str(state),
                            "--artifacts", str(art), "--rounds", "2", "--min-clients",
                            str(DEVICES), "--round-timeout", "30", log=tmp_path / "aggregator.log")
        assert aggregator.wait(timeout=120) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
    finally:
        if aggregator is not None and aggregator.poll() is None:
            aggregator.kill()
        virtual.stop()
        capture.stop()
    history = json.loads((state / "state.json").read_text())["history"]
    assert [(r["round"], r["selected"], r["answered"]) for r in history] == [
        (1, DEVICES, DEVICES - len(DROPS[1])), (2, DEVICES, DEVICES - len(DROPS[2]))]
    assert virtual.runtime.counts()["dropouts"] == len(DROPS[1]) + len(DROPS[2])
    with sqlite3.connect(state / "ledger.sqlite") as ledger:
        accepted = ledger.execute("SELECT round, device, update_id FROM received WHERE accepted = 1 AND kind = 'update'"
                                  ).fetchall()
    for round_number, dropped in DROPS.items():
        answered = {device for r, device, _ in accepted if r == round_number}
        assert answered == {d.id for d in devices} - set(dropped)
    # version 2 = version 1 + the sample-weighted mean of round 2's accepted updates, as captured on the wire
    before, after = (dict(np.load(state / "weights" / f"v{v:06d}.npz")) for v in (1, 2))
    updates = [capture.updates[update_id] for r, _, update_id in accepted if r == 2]
    total = sum(body.num_samples for body, _ in updates)
    for name, value in after.items():
        mean = sum(body.num_samples * tensors[name].astype(np.float64) for body, tensors in updates) / total
        np.testing.assert_allclose(value, before[name] + mean, rtol=1e-5, atol=1e-6, err_msg=name)
