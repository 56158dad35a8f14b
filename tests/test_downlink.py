"""The downlink encodings, with devices simulated exactly as the agent applies task frames."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.downlink import Downlink
from protocol.frame import decode_frame
from protocol.messages import Task, TrainTask

SHA = "0" * 64


def _task(round_number: int, version: int, tier: str = "a") -> Task:
    return TrainTask(round=round_number, model_version=version, tier=tier, manifest_sha256=SHA, artifacts={"manifest.json": SHA},
                     epochs=1, batch_size=8, learning_rate=0.1, deadline=1e12)


class Device:
    """Holds what it received, like edge_client.agent: sent weights, or held + delta."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.version: int | None = None
        self.weights: dict[str, np.ndarray] = {}

    def receive(self, frame: bytes) -> int:
        decoded = decode_frame(frame)
        task: Task = decoded.body  # type: ignore[assignment]
        if task.weights.delta_from is None:
            self.weights = decoded.tensors
        else:
            assert task.weights.delta_from == self.version, "a delta against a version the device does not hold"
            self.weights = {n: w + decoded.tensors[n] if n in decoded.tensors else w for n, w in self.weights.items()}
        self.version = task.model_version
        return len(frame)


def _versions(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """A training-like walk of global weights: each version moves a little."""
    rng = np.random.default_rng(seed)
    weights = {"w": rng.normal(0, 0.1, (64, 32)).astype(np.float32), "b": np.zeros(32, np.float32)}
    walk = []
    for _ in range(count):
        walk.append(weights)
        weights = {n: (w + rng.normal(0, 0.01, w.shape)).astype(np.float32) for n, w in weights.items()}
    return walk


def test_int8_delta_tracks_the_weights_without_accumulating_error():
    downlink, device, walk = Downlink("f", "agg", "int8-delta"), Device("d1"), _versions(30)
    sizes, error = [], {"w": 0.0, "b": 0.0}
    for version, weights in enumerate(walk):
        sizes.append(device.receive(downlink.task_frame("d1", _task(version + 1, version), weights, device.version)))
        for name, value in weights.items():
            # The delta sent is this step plus the last error; its int8 rounding is below one scale unit.
            step = float(np.abs(value - walk[max(0, version - 1)][name]).max())
            new_error = float(np.abs(device.weights[name] - value).max())
            assert new_error <= (step + error[name]) / 127 * 1.0001
            assert new_error <= 2 * step / 127 + 1e-9  # bounded by one step: errors never pile up
            error[name] = new_error
    assert device.weights["w"].dtype == np.float32
    assert sizes[0] > 4 * 2080 and all(s < sizes[0] / 3 for s in sizes[1:])  # float32 once, then int8


def test_late_joiner_gets_an_exact_copy_of_what_the_others_hold():
    downlink, walk = Downlink("f", "agg", "int8-delta"), _versions(6)
    steady, late = Device("steady"), Device("late")
    for version, weights in enumerate(walk):
        for device in (steady, late) if version in (0, 5) else (steady,):
            device.receive(downlink.task_frame(device.name, _task(version + 1, version), weights, device.version))
    assert late.version == steady.version == 5
    for name in steady.weights:
        np.testing.assert_array_equal(late.weights[name], steady.weights[name])  # bit for bit


def test_same_version_sends_no_tensors_and_a_claim_not_backed_by_this_process_gets_a_full_copy():
    downlink, weights = Downlink("f", "agg", "int8-delta"), _versions(1)[0]
    device = Device("d1")
    device.receive(downlink.task_frame("d1", _task(1, 0), weights, None))
    again = decode_frame(downlink.task_frame("d1", _task(2, 0), weights, 0))  # round 1 failed: same version
    assert again.tensors == {} and again.body.weights.delta_from == 0
    stranger = decode_frame(downlink.task_frame("d2", _task(2, 0), weights, 0))  # says it holds 0, never sent by us
    assert stranger.body.weights.delta_from is None
    np.testing.assert_array_equal(stranger.tensors["w"], weights["w"])


def test_frames_are_encoded_once_per_task_and_float_modes_send_full_weights():
    weights = _versions(1)[0]
    for mode, nbytes in (("float32", 4), ("float16", 2)):
        downlink = Downlink("f", "agg", mode)
        first = downlink.task_frame("d1", _task(1, 0), weights, None)
        assert downlink.task_frame("d2", _task(1, 0), weights, 0) is first
        decoded = decode_frame(first)
        assert decoded.body.weights.delta_from is None
        assert sum(e.nbytes for e in decoded.header.tensors) == nbytes * 2080
    with pytest.raises(ValueError, match="unknown downlink"):
        Downlink("f", "agg", "int4")
