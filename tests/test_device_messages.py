"""What a person meets in the device's log and the relay's help: plain, true words (issue 19)."""

from __future__ import annotations

import argparse
import importlib
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import tierfl
from tierfl.cli import COMMANDS
from tierfl.config import Schema, resolve


def _wait_for_text(path: Path, text: str, timeout: float, process: subprocess.Popen[bytes]) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        assert process.poll() is None, content[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {timeout:.0f} s in {path}:\n" + path.read_text()[-3000:])


@pytest.mark.integration
def test_a_refusal_without_a_round_is_logged_without_one(tmp_path, mosquitto_url, fleet):
    """The aggregator refuses a hello asking for a tier it does not export: a refusal of no round."""
    aggregator = tierfl("aggregator", "--broker", mosquitto_url, "--fleet", fleet, "--state-dir", str(tmp_path / "state"),
                        "--min-clients", "5", "--rounds", "1", log=tmp_path / "aggregator.log")
    device = None
    try:
        _wait_for_text(tmp_path / "aggregator.log", "waiting for devices", 60, aggregator)
        device = tierfl("client", "--broker", mosquitto_url, "--fleet", fleet, "--device-id", "pi-e", "--tier", "e",
                        "--data", "digits", "--cache-dir", str(tmp_path / "pi-e"), log=tmp_path / "pi-e.log")
        log = _wait_for_text(tmp_path / "pi-e.log", "aggregator refused our message", 60, device)
        assert "aggregator refused our message: unknown_tier: tier 'e' is not exported (have: a)" in log
        assert "round None" not in log and "of round" not in log
    finally:
        for process in (p for p in (device, aggregator) if p is not None):
            process.terminate()
            process.wait(10)


def test_a_connect_timeout_is_called_a_timeout_not_a_refusal(tmp_path):
    """A port that accepts TCP and never answers MQTT (a TLS port, another service): the device says it timed out."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        held: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:  # keep every connection open and silent
            server.settimeout(0.2)
            while not stop.is_set():
                try:
                    held.append(server.accept()[0])
                except OSError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        port = server.getsockname()[1]
        try:
            result = subprocess.run([sys.executable, "-m", "tierfl.cli", "client", "--broker", f"mqtt://127.0.0.1:{port}",
                                     "--device-id", "pi-silent", "--data", "digits", "--cache-dir", str(tmp_path),
                                     "--connect-timeout", "2"], capture_output=True, text=True, timeout=60)
        finally:
            stop.set()
            thread.join(5)
            for connection in held:
                connection.close()
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"MQTT broker at 127.0.0.1:{port} accepted TCP but gave no CONNACK within 2 s" in last, last
    assert "refused" not in last


def _parser(role: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"tierfl {role}")
    importlib.import_module(COMMANDS[role][0]).configure_parser(parser)
    return parser


# `--flag`s the relay's help may name without having them: another command's, in an example of it
OTHER_COMMANDS = re.compile(r"`tierfl (client|aggregator)[^`]*`|the parent's --enrolled")


def test_relay_help_names_only_options_it_has():
    parser = _parser("relay")
    resolve(parser, "relay", [], {})  # adds --config, as a start does
    text = OTHER_COMMANDS.sub("", " ".join(parser.format_help().split()))
    options = {s for action in parser._actions for s in action.option_strings}
    dests = {action.dest.upper() for action in parser._actions}
    named = set(re.findall(r"(--[a-z][a-z-]*)", text))
    assert named - options == set(), "flags the relay does not have"
    variables = set(re.findall(r"TIERFL_([A-Z_]+)", text)) - {"CONFIG"}
    assert variables <= dests, f"variables of options it does not have: {sorted(variables - dests)}"
    keys = set(re.findall(r"\b([a-z][a-z-]+) = ", text))
    assert keys <= {o.lstrip("-") for o in options}, f"file keys it does not have: {sorted(keys)}"


def test_relay_variables_follow_the_other_roles():
    """TIERFL_ + the option's dest in capitals, as for `tierfl aggregator` and `tierfl client`: an option both
    aggregators have is the same variable for both; the relay's own --id is TIERFL_RELAY_ID."""
    shared = {"--broker": "mqtt://b:1883", "--fleet": "site1", "--state-dir": "runs/e", "--seed": "3",
              "--fraction": "0.5", "--tier-policy": "dynamic", "--tier-mix": "c-e", "--max-message-bytes": "65536",
              "--outlier-multiple": "4", "--max-share": "0.5"}
    required = {"TIERFL_PARENT": "mqtt://p:1883", "TIERFL_RELAY_ID": "site1", "TIERFL_ARTIFACTS": "art"}
    env = {"TIERFL_" + flag.lstrip("-").replace("-", "_").upper(): value for flag, value in shared.items()}
    relay = resolve(_parser("relay"), "relay", [], env | required).namespace
    root = resolve(_parser("aggregator"), "aggregator", [], env).namespace
    for flag in shared:
        dest = flag.lstrip("-").replace("-", "_")
        assert getattr(relay, dest) == getattr(root, dest) != _parser("aggregator").get_default(dest), flag
    assert (relay.parent, relay.relay_id, relay.artifacts) == ("mqtt://p:1883", "site1", Path("art"))
    variables = {o.key: o.env for o in Schema(_parser("relay"), "relay").options}
    assert variables["id"] == "TIERFL_RELAY_ID" and variables["parent-key"] == "TIERFL_PARENT_KEY"
    assert all(re.fullmatch(r"TIERFL_[A-Z_]+", env) for env in variables.values()), variables
