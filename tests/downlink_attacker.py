"""A raw paho publisher attacking one device's downlink (run as a process by tests/test_device_hostile_live.py).

    python -m tests.downlink_attacker BROKER_PORT FLEET DEVICE STATE_DIR

Publishes, on tierfl/v1/FLEET/down/DEVICE, claiming to be the aggregator: an unsigned task, a
task signed by another key, and, signed with the aggregator's own key (STATE_DIR/aggregator.key,
as an insider or a bug would), a task listing 100 missing artifacts and a task with weights of the
wrong shape; then garbage bytes. Each line it prints names one case.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from aggregator.store.artifacts import ArtifactStore
from protocol.frame import encode_frame
from protocol.messages import TrainTask
from protocol.signing import AGGREGATOR_KEY_FILE, DeviceKey
from protocol.topics import Topics


def main(port: int, fleet: str, device: str, state_dir: Path) -> None:
    """Publish the hostile frames, at QoS 1, and wait for the broker to take them."""
    aggregator = DeviceKey(state_dir, file_name=AGGREGATOR_KEY_FILE)
    mallory = DeviceKey(Path(tempfile.mkdtemp()), file_name="mallory.key")
    tier = ArtifactStore(state_dir / "artifacts").tiers["a"]

    def task(round_number: int, **changes: object) -> TrainTask:
        fields = dict(round=round_number, model_version=0, tier="a", manifest_sha256=tier.manifest_sha256,
                      artifacts=tier.files, epochs=1, batch_size=16, learning_rate=0.1, deadline=time.time() + 30)
        return TrainTask.model_construct(**(fields | changes))  # unchecked: may break the schema's bounds

    weights = {n: np.zeros(s, np.float32) for n, s in tier.shapes.items()}
    wrong = weights | {"fc1.weight": np.zeros((3, 3), np.float32)}
    many = {f"f{i}.onnx": hashlib.sha256(b"%d" % i).hexdigest() for i in range(100)}
    frames = {
        "unsigned task": encode_frame(fleet, "aggregator", task(901), weights),
        "wrongly signed task": encode_frame(fleet, "aggregator", task(902), weights, signer=mallory.sign),
        "100 missing artifacts": encode_frame(fleet, "aggregator", task(903, artifacts=tier.files | many), weights,
                                              signer=aggregator.sign),
        "wrong-shape weights": encode_frame(fleet, "aggregator", task(904), wrong, signer=aggregator.sign),
        "garbage": b"TFL1\xff\xff\xff\xff garbage",
    }
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"attacker-{fleet}", protocol=MQTTProtocolVersion.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    for name, frame in frames.items():
        client.publish(Topics(fleet).down(device), frame, qos=1).wait_for_publish(10)
        print(name, flush=True)
        time.sleep(0.3)
    client.loop_stop()
    client.disconnect()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
