"""A site broker bridged to a central one (issue 16): two private Mosquitto processes configured by `tierfl
broker-config` (TLS, passwords, ACLs; the site's `connection` section from --bridge-to), devices on the site broker,
the aggregator on the central one, a federation end to end."""

from __future__ import annotations

import contextlib
import getpass
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.mqtt.broker_config import FleetCredentials, generate
from protocol.mqtt.url import BrokerUnreachable, parse, wait_for_broker
from tests.conftest import tierfl
from tests.test_broker_config import _free_port

FLEET = "site"
DEVICES = ["d1", "d2"]  # both have users on both brokers; d1 runs (one device process keeps the test short)


@contextlib.contextmanager
def _broker(folder: Path) -> Iterator[None]:
    """Run Mosquitto on `folder`'s configuration until the block ends."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with open(folder / "mosquitto.log", "wb") as log:
        process = subprocess.Popen([binary, "-c", str(folder / "mosquitto.conf"), "-v"], stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start(credentials: FleetCredentials, folder: Path, user: str) -> None:
    try:
        wait_for_broker(parse(credentials.user(user).url), 10)
    except BrokerUnreachable:
        raise AssertionError((folder / "mosquitto.log").read_text()[-3000:]) from None


def _wait_for_bridge(central_log: Path) -> None:
    """Until the central broker has accepted the site broker's bridge connection."""
    deadline = time.monotonic() + 30
    while "New bridge connected" not in central_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, central_log.read_text(errors="replace")[-3000:]
        time.sleep(0.05)


def _federation(site: FleetCredentials, central: FleetCredentials, tmp_path: Path) -> None:
    """The aggregator on the central broker, one device on the site broker, two rounds; every process stopped."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        aggregator = tierfl("aggregator", "--broker", central.aggregator.url, "--fleet", FLEET,  # exports the MLP
                            "--state-dir", str(tmp_path / "state"), "--min-clients", "1", "--rounds", "2",
                            "--round-timeout", "30", log=tmp_path / "aggregator.log")
        processes.append(aggregator)
        processes += [tierfl("client", "--broker", site.devices[d].url, "--fleet", FLEET, "--device-id", d,
                             "--data", "digits", "--cache-dir", str(tmp_path / d), log=tmp_path / f"{d}.log")
                      for d in DEVICES[:1]]
        assert aggregator.wait(90) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait(10)


@pytest.mark.integration
def test_a_site_broker_bridged_to_the_central_one_carries_a_federation(tmp_path):
    me = getpass.getuser()  # Mosquitto started as root drops to --broker-user: run it as ourselves
    central_dir, site_dir = tmp_path / "central", tmp_path / "site"
    central = generate(central_dir, FLEET, DEVICES, hosts=["127.0.0.1"], port=_free_port(), bind="127.0.0.1",
                       broker_user=me, bridges=["site-1"])
    site = generate(site_dir, FLEET, DEVICES, hosts=["127.0.0.1"], port=_free_port(), bind="127.0.0.1", broker_user=me,
                    bridge_to=(central.bridges["site-1"], central.ca_file))
    conf = (site_dir / "mosquitto.conf").read_text()
    assert "connection site-1" in conf and f"topic tierfl/v1/{FLEET}/up/# out 1" in conf
    assert (site_dir / "mosquitto.conf").stat().st_mode & 0o077 == 0, "the bridge's password is in it"
    with _broker(central_dir):
        _start(central, central_dir, "aggregator")
        with _broker(site_dir):  # after the central one: the bridge connects at once, not after a retry's back-off
            _start(site, site_dir, "d1")
            _wait_for_bridge(central_dir / "mosquitto.log")  # the device's hello then crosses it as it is sent
            _federation(site, central, tmp_path)
    history = json.loads((tmp_path / "state" / "state.json").read_text())["history"]
    assert [(s["round"], s["selected"], s["answered"]) for s in history] == [(1, 1, 1), (2, 1, 1)]
    assert "Connecting bridge (step 2) site-1" in (site_dir / "mosquitto.log").read_text()
    for device in DEVICES[:1]:  # the device pinned the aggregator's key, which came over the bridge, and trained
        assert "round 2:" in (tmp_path / f"{device}.log").read_text()
