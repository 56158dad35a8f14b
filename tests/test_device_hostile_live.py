"""A real device agent and a real aggregator over Mosquitto, with a raw publisher attacking the device's downlink.

Issue 13, case 6: the honest rounds still commit, no hostile task is trained, and the device's log
shows the hostile frames refused with their reasons (an unsigned task, a task signed by another key,
a task listing 100 missing artifacts, weights of the wrong shape, garbage bytes). The device logs
one line per sender and reason per 10 s: the wrongly signed task comes 0.3 s after the unsigned one
and the garbage after the 100 artifacts, so those two are counted under the earlier line, not logged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.signing import AGGREGATOR_KEY_FILE, DeviceKey
from tests.test_unattended import _aggregator, _client, _messages, _stop, _wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
CASES = ["unsigned task", "wrongly signed task", "100 missing artifacts", "wrong-shape weights", "garbage"]
REFUSALS = {  # case -> words of the device's log line refusing it (the throttled cases have none of their own)
    "unsigned task": ("bad_signature: train: a frame from aggregator carries no signature",),
    "100 missing artifacts": ("refused a message: malformed", "artifacts"),  # by the schema's bound, or the agent's
    "wrong-shape weights": ("bad_tensor: round 904 (tier a) abandoned: tensor 'fc1.weight' (float32 [3, 3])",),
}



def test_hostile_downlink_frames_are_refused_while_the_honest_rounds_commit(tmp_path, mosquitto_url, fleet):
    state = tmp_path / "state"
    key = DeviceKey(state, file_name=AGGREGATOR_KEY_FILE)  # the aggregator's key, made before it starts
    key_file = tmp_path / "aggregator-key.json"
    key_file.write_text(json.dumps({"aggregator": key.public_hex}))
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--rounds", "4", "--epochs", "1", "--round-timeout", "20")
    device = _client(tmp_path, mosquitto_url, fleet, "victim", "--aggregator-key", str(key_file))
    device_log, aggregator_log = tmp_path / "victim.log", tmp_path / "aggregator.log"
    try:
        _wait_for(lambda: any("sent" in m and "round 1:" in m for m in _messages(device_log)), 90, "round 1 trained")
        attack = subprocess.run([sys.executable, "-m", "tests.downlink_attacker", mosquitto_url.rsplit(":", 1)[1], fleet,
                                 "victim", str(state)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert attack.returncode == 0, attack.stderr
        assert attack.stdout.split("\n")[:5] == CASES
        assert aggregator.wait(120) == 0, aggregator_log.read_text()[-3000:]
        messages = _messages(device_log)
        for case, words in REFUSALS.items():
            assert any(all(w in m for w in words) for m in messages), f"{case}: no refusal {words} in the device's log"
        assert device.poll() is None, "the device keeps running"
        record = json.loads((state / "state.json").read_text())
        assert (record["round"], record["version"]) == (4, 4), "every honest round commits"
        trained = [m for m in messages if m.startswith("round ") and "steps in" in m and "sent" in m]
        assert len(trained) == 4, trained
        assert not any("Traceback" in m or "internal_error" in m for m in messages)
    finally:
        _stop(device, aggregator)
