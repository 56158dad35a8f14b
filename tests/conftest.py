"""Shared fixtures: the Mosquitto broker of the development and CI machines, and process helpers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import tracemalloc
import uuid
import venv
from collections.abc import Callable
from pathlib import Path

import pytest

MOSQUITTO = ("127.0.0.1", 1883)
ROOT = Path(__file__).resolve().parent.parent
TORCH_MODELS = ROOT / "tests" / "torch_models.py"  # run by run_torch in the torch venv
# PyTorch never enters the main venv (onnxruntime-training's import of onnxruntime would import it): the tests that
# need it run tests/torch_models.py in this venv. Changing the list rebuilds the venv.
TORCH_REQUIREMENTS = ("torch==2.13.0", "onnx==1.17.0", "numpy>=2,<3")


@pytest.fixture(scope="session")
def mosquitto_url() -> str:
    """mqtt:// URL of Mosquitto on 127.0.0.1:1883; the test fails (never skips) when it is not there."""
    try:
        socket.create_connection(MOSQUITTO, timeout=2).close()
    except OSError as exc:
        pytest.fail(f"Mosquitto is not answering on {MOSQUITTO[0]}:{MOSQUITTO[1]} ({exc}); "
                    "start it with `mosquitto -d` (.ci/run does this)")
    return f"mqtt://{MOSQUITTO[0]}:{MOSQUITTO[1]}"


def run_torch(python: Path, folder: Path, commands: list[list[str]]) -> None:
    """Run command lines of tests/torch_models.py in one process of the torch venv; fail with its stderr."""
    (folder / "commands.json").write_text(json.dumps(commands))
    result = subprocess.run([str(python), str(TORCH_MODELS), "batch", str(folder / "commands.json")], capture_output=True,
                            text=True, cwd=ROOT, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="session")
def torch_python() -> Path:
    """Python of a virtualenv with PyTorch, onnx and numpy, built once per machine in the user's cache.

    Outside the checkout, so a fresh clone (CI) reuses it; keyed by the requirements and this Python, built in a
    temporary folder and renamed into place, so two runs never see half a venv. The repository is not installed in
    it: `run_torch` puts the checkout on PYTHONPATH.
    """
    key = hashlib.sha256(repr((TORCH_REQUIREMENTS, sys.version)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tierfl-tests"
    final = cache / f"venv-torch-{key}"
    python = final / "bin" / "python"
    if (final / ".installed").exists():
        return python
    cache.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"venv-torch-{key}.", dir=cache))
    try:
        venv.create(building, with_pip=True, clear=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"could not create a torch venv in {building}: {exc}")
    command = [str(building / "bin" / "python"), "-m", "pip", "install", "--quiet", "--only-binary=:all:",
               *TORCH_REQUIREMENTS]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=280)  # the suite's timeout is 300 s
    except subprocess.TimeoutExpired:
        pytest.fail(f"could not build the torch venv: `{' '.join(command)}` took over 280 s", pytrace=False)
    if result.returncode != 0:
        pytest.fail(f"could not build the torch venv: `{' '.join(command)}` exited {result.returncode}:\n"
                    f"{(result.stdout + result.stderr)[-3000:]}", pytrace=False)
    (building / ".installed").write_text(repr(TORCH_REQUIREMENTS))
    try:
        building.rename(final)
    except OSError:  # another run finished first: use its venv
        shutil.rmtree(building, ignore_errors=True)
    return python


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
