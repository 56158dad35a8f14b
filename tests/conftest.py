"""Shared fixtures: the Mosquitto broker of the development and CI machines, and process helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

MOSQUITTO = ("127.0.0.1", 1883)


@pytest.fixture(scope="session")
def mosquitto_url() -> str:
    """mqtt:// URL of Mosquitto on 127.0.0.1:1883; the test fails (never skips) when it is not there."""
    try:
        socket.create_connection(MOSQUITTO, timeout=2).close()
    except OSError as exc:
        pytest.fail(f"Mosquitto is not answering on {MOSQUITTO[0]}:{MOSQUITTO[1]} ({exc}); "
                    "start it with `mosquitto -d` (.ci/run does this)")
    return f"mqtt://{MOSQUITTO[0]}:{MOSQUITTO[1]}"


@pytest.fixture
def fleet() -> str:
    """A fleet name no other test (or earlier run) uses, so retained messages never leak between tests."""
    return f"t{uuid.uuid4().hex[:10]}"


def tierfl(*args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `tierfl ARGS` as a separate OS process (output to `log`, or captured)."""
    out = open(log, "wb") if log else subprocess.PIPE
    env = {"TIERFL_LOG_FORMAT": "text", **os.environ, "PYTHONUNBUFFERED": "1"}  # tests read the logs as text
    return subprocess.Popen([sys.executable, "-m", "tierfl.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env)


def peak_traced_bytes(action: Callable[[], object]) -> int:
    """The peak of Python-traced memory (numpy buffers included) while `action` runs."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
