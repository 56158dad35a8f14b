"""FedMut and FedBuff federations of real processes over Mosquitto, with real ONNX Runtime training."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from protocol.frame import encode_frame
from protocol.messages import RoundSummary, TrainTask
from protocol.topics import Topics
from tests.conftest import tierfl
from tests.test_integration import Watcher, _aggregator, _stop

pytestmark = pytest.mark.integration


def _devices(tmp_path: Path, url: str, fleet: str, count: int, *extra: str) -> list:
    return [tierfl("client", "--broker", url, "--fleet", fleet, "--device-id", f"d{i}", "--data", "digits",
                   "--cache-dir", str(tmp_path / f"d{i}"), *extra, log=tmp_path / f"d{i}.log") for i in range(count)]


def _summaries(watcher: Watcher) -> list[RoundSummary]:
    return [b for b in watcher.bodies("/rounds") if isinstance(b, RoundSummary)]


def test_fedmut_federation_trains_mutated_models(tmp_path, mosquitto_url, fleet):
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--strategy", "fedmut", "--min-clients", "4",
                             "--rounds", "4", "--lr", "0.1", "--downlink", "int8-delta")
    devices = _devices(tmp_path, mosquitto_url, fleet, 4)
    watcher = Watcher(mosquitto_url, [Topics(fleet).rounds])
    try:
        assert aggregator.wait(120) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        summaries = _summaries(watcher)
        assert all(not s.rejected for s in summaries)
        assert summaries[-1].version == 4 and summaries[-1].accuracy > 0.8
        assert summaries[0].metrics["fedmut_step_norm"] == 0.0  # nothing to mutate along before the second round
        assert all(s.metrics["fedmut_step_norm"] > 0 for s in summaries[1:])
    finally:
        watcher.close()
        _stop([aggregator, *devices])


def test_fedadam_federation_over_tiers_commits_its_moments_with_each_version(tmp_path, mosquitto_url, fleet):
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--server-optimizer", "adam", "--server-lr", "0.1",
                             "--tiers", "a,c", "--tier-mix", "a-c", "--min-clients", "3", "--rounds", "4", "--lr", "0.1")
    devices = _devices(tmp_path, mosquitto_url, fleet, 3)
    watcher = Watcher(mosquitto_url, [Topics(fleet).rounds])
    try:
        assert aggregator.wait(120) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        summaries = _summaries(watcher)
        assert [s.version for s in summaries] == [1, 2, 3, 4] and all(not s.rejected for s in summaries)
        assert summaries[-1].accuracy > 0.8
        with np.load(tmp_path / "state" / "weights" / "v000004.npz") as stored:
            moments = [name for name in stored.files if name.startswith("server_optimizer/")]
        assert moments and {n.split("/")[1] for n in moments} == {"m", "v"}
    finally:
        watcher.close()
        _stop([aggregator, *devices])


def test_fedbuff_federation_applies_buffers_without_rounds(tmp_path, mosquitto_url, fleet):
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--strategy", "fedbuff", "--buffer-size", "2",
                             "--max-staleness", "4", "--rounds", "6", "--lr", "0.1")
    devices = _devices(tmp_path, mosquitto_url, fleet, 3)
    watcher = Watcher(mosquitto_url, [Topics(fleet).rounds])
    try:
        assert aggregator.wait(120) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        summaries = _summaries(watcher)
        assert [s.version for s in summaries] == list(range(1, 7))
        assert all(s.answered == 2 for s in summaries)
        assert summaries[-1].accuracy > 0.8
        assert max(s.metrics["staleness_max"] for s in summaries) >= 1, "three devices, buffers of two: some updates are stale"
        assert all(not s.rejected for s in summaries)
    finally:
        watcher.close()
        _stop([aggregator, *devices])


def test_relay_forwards_its_group_as_one_update(tmp_path, mosquitto_url, fleet):
    """Root with one direct device and one relay serving two devices of tiers a and c on its own fleet."""
    site = f"{fleet}-site"
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--tiers", "a,c", "--tier-policy", "fixed", "--tier-mix", "a",
                             "--min-clients", "2", "--rounds", "3", "--lr", "0.1", "--bn-statistics", "averaged")
    artifacts = tmp_path / "state" / "artifacts"
    deadline = time.time() + 60
    while not (artifacts / "index.json").exists() and time.time() < deadline:  # the root exports on first start
        time.sleep(0.2)
    relay = tierfl("relay", "--parent", mosquitto_url, "--parent-fleet", fleet, "--id", "site1",
                   "--fleet", site, "--artifacts", str(artifacts), "--state-dir", str(tmp_path / "relay"),
                   "--tier-mix", "a-c", log=tmp_path / "relay.log")
    direct = _devices(tmp_path, mosquitto_url, fleet, 1)
    group = [tierfl("client", "--broker", mosquitto_url, "--fleet", site, "--aggregator-id", "site1", "--device-id", f"g{i}",
                    "--data", "digits", "--cache-dir", str(tmp_path / f"g{i}"), log=tmp_path / f"g{i}.log") for i in range(2)]
    watcher = Watcher(mosquitto_url, [Topics(fleet).rounds])
    try:
        assert aggregator.wait(150) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        summaries = _summaries(watcher)
        assert [s.version for s in summaries] == [1, 2, 3]
        assert all(s.answered == 2 and not s.rejected for s in summaries)  # the direct device and the relay
        assert summaries[-1].accuracy > 0.8
        relay_log = (tmp_path / "relay.log").read_text()
        assert relay_log.count("forwarding one update") == 3 and "tier a: 1 devices, tier c: 1 devices" in relay_log
        assert "TRUST ON FIRST USE: pinned aggregator key" in relay_log, "the relay pins its parent's key"
        # A task forged in the parent's name, unsigned, on the relay's parent downlink: ignored, no local round.
        forged = TrainTask(round=4, model_version=3, tier="a", manifest_sha256="0" * 64, artifacts={}, epochs=1,
                           batch_size=8, learning_rate=0.1, deadline=time.time() + 60)
        watcher.publish(Topics(fleet).down("site1"), encode_frame(fleet, "aggregator", forged))
        deadline = time.time() + 15
        while "ignored a frame from the parent: bad_signature" not in (tmp_path / "relay.log").read_text():
            assert time.time() < deadline, (tmp_path / "relay.log").read_text()[-2000:]
            time.sleep(0.2)
        assert "round 4" not in (tmp_path / "relay.log").read_text()
        relay.terminate()
        assert relay.wait(20) == 0
        assert "SIGTERM: stopping" in (tmp_path / "relay.log").read_text()
        assert "stopped after forwarding 3 combined updates to aggregator" in (tmp_path / "relay.log").read_text()
    finally:
        watcher.close()
        _stop([aggregator, relay, *direct, *group])


@pytest.mark.parametrize("mode", ["central", "local"])
def test_dp_federation_reports_epsilon_every_round(tmp_path, mosquitto_url, fleet, mode):
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--dp", mode, "--dp-clip", "2.0", "--dp-noise", "0.05",
                             "--min-clients", "3", "--rounds", "3", "--lr", "0.1")
    devices = _devices(tmp_path, mosquitto_url, fleet, 3)
    watcher = Watcher(mosquitto_url, [Topics(fleet).rounds])
    try:
        assert aggregator.wait(120) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        summaries = _summaries(watcher)
        epsilons = [s.metrics["dp_epsilon"] for s in summaries]
        assert len(epsilons) == 3 and 0 < epsilons[0] < epsilons[1] < epsilons[2]
        assert all(s.metrics["dp_delta"] == 1e-5 for s in summaries)
        assert summaries[-1].accuracy > 0.5 and all(not s.rejected for s in summaries)
    finally:
        watcher.close()
        _stop([aggregator, *devices])
