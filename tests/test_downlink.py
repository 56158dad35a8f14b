"""The downlink encodings, with devices simulated exactly as the agent applies task frames (and the agent itself)."""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytest

from aggregator.cli import configure_parser
from aggregator.downlink import Downlink
from aggregator.options import resolve_options
from aggregator.store.artifacts import ArtifactStore
from edge_client.agent import ClientConfig, DeviceAgent
from models.data import load_dataset, train_test_split
from models.export import export_all
from models.zoo import ModelSpec
from protocol.frame import decode_frame
from protocol.messages import Task, TrainTask
from protocol.mqtt.url import parse as parse_broker

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
        self.bases: list[int | None] = []  # delta_from of every task with tensors
        self.codecs: set[str] = set()

    def receive(self, frame: bytes) -> int:
        """Apply a task frame; the bytes of its tensors."""
        decoded = decode_frame(frame)
        task: Task = decoded.body  # type: ignore[assignment]
        self.codecs |= {entry.codec for entry in decoded.header.tensors}
        if task.weights.delta_from is None:
            self.weights = {n: np.asarray(t, np.float32) for n, t in decoded.tensors.items()}
        else:
            assert task.weights.delta_from == self.version, "a delta against a version the device does not hold"
            self.weights = {n: w + np.asarray(decoded.tensors[n], np.float32) if n in decoded.tensors else w
                            for n, w in self.weights.items()}
        if decoded.tensors:
            self.bases.append(task.weights.delta_from)
        self.version = task.model_version
        return sum(entry.nbytes for entry in decoded.header.tensors)


def _versions(count: int, seed: int = 0, step: float = 0.01) -> list[dict[str, np.ndarray]]:
    """A training-like walk of global weights: each version moves a little."""
    rng = np.random.default_rng(seed)
    weights = {"w": rng.normal(0, 0.1, (64, 32)).astype(np.float32), "b": np.zeros(32, np.float32)}
    walk = []
    for _ in range(count):
        walk.append(weights)
        weights = {n: (w + rng.normal(0, step, w.shape)).astype(np.float32) for n, w in weights.items()}
    return walk


def test_int8_delta_follows_the_chain_without_accumulating_error():
    downlink, device, walk = Downlink("f", "agg", "int8-delta"), Device("d1"), _versions(30)
    sizes = []
    for version, weights in enumerate(walk):
        sizes.append(device.receive(downlink.task_frame("d1", _task(version + 1, version), weights, device.version)))
        np.testing.assert_array_equal(device.weights["w"], downlink.reference("a", version)["w"])  # on the chain
        assert downlink.bound("d1", "a", version) == {"w": 0.0, "b": 0.0}
        for name, value in weights.items():
            # One int8 quantum of this step (its delta holds the last step's rounding), never a growing sum.
            step = float(np.abs(value - walk[max(0, version - 1)][name]).max())
            assert float(np.abs(device.weights[name] - value).max()) <= max(2 * step / 127, 2 ** -11 * 0.5)
    assert device.weights["w"].dtype == np.float32 and device.codecs == {"float16", "int8"}
    assert device.bases == [None, *range(29)]
    assert sizes[0] == 2 * 2080 and set(sizes[1:]) == {2080}  # float16 once, then int8 (the scales ride in the header)


def test_the_base_is_whichever_kept_version_the_device_holds():
    downlink, walk = Downlink("f", "agg", "int8-delta", versions=3), _versions(12)
    devices = {name: Device(name) for name in ("every", "skips1", "skips3", "late")}
    plan = {"every": range(12), "skips1": (0, 2, 4), "skips3": (0, 4), "late": (7,)}
    for version, weights in enumerate(walk):
        for name, device in devices.items():
            if version in plan[name]:
                device.receive(downlink.task_frame(name, _task(version + 1, version), weights, device.version))
    assert devices["every"].bases == [None, *range(11)]
    assert devices["skips1"].bases == [None, 0, 2]  # two versions back: a delta from what it holds
    assert devices["skips3"].bases == [None, None]  # 0 left the 3 kept versions: a float16 full copy
    assert devices["late"].bases == [None] and devices["late"].codecs == {"float16"}


def test_what_devices_were_sent_is_forgotten_once_their_versions_leave_the_window():
    downlink, walk = Downlink("f", "agg", "int8-delta", versions=2), _versions(5)
    gone = Device("gone")  # gets version 0, then never another task
    gone.receive(downlink.task_frame("gone", _task(1, 0), walk[0], None))
    stays = Device("stays")
    for version, weights in enumerate(walk):
        stays.receive(downlink.task_frame("stays", _task(version + 1, version), weights, stays.version))
    assert downlink.bound("gone", "a", 0) is None  # version 0 left the 2 kept versions
    assert set(downlink._sent) == {("stays", "a")}  # bounded by the devices holding a kept version
    assert downlink.bound("stays", "a", 4) == {"w": 0.0, "b": 0.0}


def test_same_version_sends_no_tensors_and_a_claim_not_backed_by_this_process_gets_a_full_copy():
    downlink, weights = Downlink("f", "agg", "int8-delta"), _versions(1)[0]
    device = Device("d1")
    device.receive(downlink.task_frame("d1", _task(1, 0), weights, None))
    again = decode_frame(downlink.task_frame("d1", _task(2, 0), weights, 0))  # round 1 failed: same version
    assert again.tensors == {} and again.body.weights.delta_from == 0
    stranger = decode_frame(downlink.task_frame("d2", _task(2, 0), weights, 0))  # says it holds 0, never sent by us
    assert stranger.body.weights.delta_from is None and {e.codec for e in stranger.header.tensors} == {"float16"}
    np.testing.assert_array_equal(stranger.tensors["w"], weights["w"].astype(np.float16).astype(np.float32))


def test_after_a_restart_every_device_gets_a_full_copy_first():
    walk = _versions(4)
    device, before = Device("d1"), Downlink("f", "agg", "int8-delta")
    for version in range(3):
        device.receive(before.task_frame("d1", _task(version + 1, version), walk[version], device.version))
    restarted = Downlink("f", "agg", "int8-delta")  # a new process: same seed, nothing sent yet
    frame = decode_frame(restarted.task_frame("d1", _task(4, 3), walk[3], device.version))
    assert frame.body.weights.delta_from is None and {e.codec for e in frame.header.tensors} == {"float16"}


@pytest.mark.parametrize("tolerance,versions,full", [(1 / 127, 4, "float16"), (1e-3, 2, "float16"),
                                                     (1 / 127, 4, "int8-row")])
def test_error_bound_holds_over_many_rounds_of_random_participation(tolerance, versions, full):
    """Every device, every round, against the exact float32 weights: |H - W_v| <= E + |R_v - W_v|, E <= the limit."""
    rng, walk = np.random.default_rng(1), _versions(80, seed=2)
    downlink = Downlink("f", "agg", "int8-delta", versions=versions, tolerance=tolerance, full=full)
    copy_error = (lambda w: 2 ** -11 * w) if full == "float16" else (lambda w: w / 127)  # per element, of max|W_t|
    devices = [Device(f"d{i}") for i in range(20)]
    for version, weights in enumerate(walk):
        reference = downlink.reference  # R_v once the round's first task made it
        for i in rng.choice(20, 10, replace=False):  # C = 0.5
            device = devices[i]
            device.receive(downlink.task_frame(device.name, _task(version + 1, version), weights, device.version))
            bound, kept = downlink.bound(device.name, "a", version), reference("a", version)
            magnitude = max(float(np.abs(t).max()) for t in kept.values())
            for name, exact in weights.items():
                off_chain = float(np.abs(device.weights[name] - kept[name]).max())
                assert off_chain <= bound[name]  # the invariant
                chain_error = float(np.abs(kept[name] - exact).max())
                full_error = copy_error(float(np.abs(exact).max())) + chain_error
                assert bound[name] <= downlink.limit("a", version)[name] <= max(tolerance * magnitude, full_error)
                assert float(np.abs(device.weights[name] - exact).max()) <= bound[name] + chain_error
    bases = [(b, i) for d in devices for i, b in enumerate(d.bases)]
    jumps = sum(1 for d in devices for prev, b in zip(d.bases, d.bases[1:]) if b is not None)
    resyncs = sum(1 for d in devices for b in d.bases[1:] if b is None)
    assert jumps > 100 and resyncs > 10 and len(bases) == 800
    assert set().union(*(d.codecs for d in devices)) == {"int8", full}  # never float32


def test_bytes_per_round_with_half_the_fleet_against_float32():
    walk, totals = _versions(30, seed=3, step=0.002), {}  # a step of SGD moves weights of 0.1 by a few percent
    for mode in ("float32", "int8-delta"):
        downlink, devices, total = Downlink("f", "agg", mode), [Device(f"d{i}") for i in range(20)], 0
        for version, weights in enumerate(walk):
            for i in np.random.default_rng(version).choice(20, 10, replace=False):
                device = devices[i]
                total += device.receive(downlink.task_frame(device.name, _task(version + 1, version), weights,
                                                            device.version))
        totals[mode] = total
    # 4x at best; each device's first copy is float16: 300 tasks, 20 of them first copies -> 3.75x
    assert totals["float32"] / totals["int8-delta"] > 3.7


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
    with pytest.raises(ValueError, match="--downlink-versions"):
        Downlink("f", "agg", "int8-delta", versions=0)
    with pytest.raises(ValueError, match="--downlink-full"):
        Downlink("f", "agg", "int8-delta", full="int4")


@pytest.mark.parametrize("option, value", [("--downlink-versions", "0"), ("--downlink-tolerance", "2")])
def test_int8_delta_settings_out_of_range_are_refused_with_the_other_options(tmp_path, option: str, value: str):
    """Refused by resolve_options, like any option that does not fit (exit 2, nothing written), not at the service's
    start after the export and the state were written."""
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--state-dir", str(tmp_path / "s"), "--downlink", "int8-delta", option, value])
    with pytest.raises(ValueError, match=option):
        resolve_options(args)
    assert not (tmp_path / "s").exists()


def test_the_device_agent_applies_deltas_from_any_kept_version_as_the_simulation_does(tmp_path):
    """The real edge_client.agent stage 3 (`_get_weights`) on the downlink's frames, against the simulated device."""
    export_all(ModelSpec(arch="mlp", hidden=(16,)), ["a"], tmp_path / "art")
    tier = ArtifactStore(tmp_path / "art").tiers["a"]
    data = train_test_split(load_dataset("digits").subset(list(range(50))), 0.2, seed=0)
    config = ClientConfig(broker=parse_broker("mqtt://127.0.0.1:1"), device_id="d1", fleet="f",
                          cache_dir=tmp_path / "c")
    agent, twin = DeviceAgent(config, *data), Device("d1")
    rng = np.random.default_rng(0)
    weights = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in tier.shapes.items()}
    downlink = Downlink("f", "agg", "int8-delta", versions=4)
    for version in range(10):
        weights = {n: (w + rng.normal(0, 0.01, w.shape)).astype(np.float32) for n, w in weights.items()}
        if version not in (0, 1, 3, 6, 9):  # gaps of 1, 2, 3: deltas from version 1, 3 and 6
            continue
        task = TrainTask(round=version + 1, model_version=version, tier="a", manifest_sha256=tier.manifest_sha256,
                         artifacts=tier.files, epochs=1, batch_size=8, learning_rate=0.1, deadline=time.time() + 60)
        frame = downlink.task_frame("d1", task, weights, twin.version)
        twin.receive(frame)
        decoded = decode_frame(frame)
        held = agent._get_weights(decoded.body, decoded.tensors, tier.manifest)
        agent._held["a"] = (version, held)  # what stage 4 (_load_tier) records
        for name in weights:
            np.testing.assert_array_equal(held[name], twin.weights[name])
    assert twin.bases == [None, 0, 1, 3, 6]
