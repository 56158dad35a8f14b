"""int8-delta over a real broker with half the fleet per round: deltas from older versions, never float32."""

from __future__ import annotations

import json
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from protocol.frame import decode_frame
from protocol.messages import Hello, Task
from protocol.topics import Topics
from tests.conftest import tierfl

pytestmark = pytest.mark.integration
DEVICES = 4


def test_half_the_fleet_per_round_gets_int8_deltas_from_the_version_each_device_holds(tmp_path, mosquitto_url, fleet):
    topics, tasks, hellos = Topics(fleet), [], set()
    ready = threading.Event()

    def on_message(client, userdata, message) -> None:
        body = decode_frame(message.payload).body
        if isinstance(body, Task):
            tasks.append((message.topic.rsplit("/", 1)[1], decode_frame(message.payload)))
        elif isinstance(body, Hello):
            hellos.add(message.topic)
            if len(hellos) == DEVICES:
                ready.set()

    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
    watcher.on_message = on_message
    host, port = mosquitto_url.removeprefix("mqtt://").split(":")
    watcher.connect(host, int(port))
    watcher.subscribe([(f"{topics.base}/down/+", 0), (topics.all_status, 0)])
    watcher.loop_start()
    common = ["--broker", mosquitto_url, "--fleet", fleet]
    clients = [tierfl("client", *common, "--device-id", f"d{i}", "--data", "digits", "--cache-dir",
                      str(tmp_path / f"d{i}"), "--codec", "int8", log=tmp_path / f"d{i}.log") for i in range(DEVICES)]
    try:
        assert ready.wait(60), "the devices did not say hello"  # all four available: the seeded draw is fixed
        aggregator = tierfl("aggregator", *common, "--state-dir", str(tmp_path / "state"), "--eval-data", "digits",
                            "--rounds", "6", "--min-clients", "2", "--fraction", "0.5", "--round-timeout", "30",
                            "--downlink", "int8-delta", "--downlink-versions", "3", "--downlink-tolerance", "1",
                            log=tmp_path / "aggregator.log")
        assert aggregator.wait(180) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
    finally:
        for client in clients:
            client.terminate()
        for client in clients:
            client.wait(30)
        watcher.loop_stop()
        watcher.disconnect()
    history = json.loads((tmp_path / "state" / "state.json").read_text())["history"]
    assert [h["round"] for h in history] == list(range(1, 7))
    assert all(h["answered"] == h["selected"] == 2 for h in history)  # no device skipped a task it could not apply
    assert history[-1]["accuracy"] > 0.7
    # Which devices a round draws depends on when their hellos arrived; what each gets follows from that draw.
    # With the tolerance at 1 no drift forces a copy: a delta from what the device holds while it is among the
    # 3 kept versions, else a float16 full copy.
    held: dict[str, int] = {}
    kinds = {"chain": 0, "older": 0, "full": 0}
    for device, frame in tasks:
        task, before = frame.body, held.get(device)
        assert {entry.codec for entry in frame.header.tensors} <= {"int8", "float16"}  # never float32
        expected = before if before is not None and task.model_version - before < 3 else None
        assert task.weights.delta_from == expected, (device, before, task.model_version)
        kinds["full" if expected is None else "chain" if expected == task.model_version - 1 else "older"] += 1
        held[device] = task.model_version
    assert len(tasks) == 12 and kinds["full"] >= 2 and kinds["chain"] + kinds["older"] >= 1
