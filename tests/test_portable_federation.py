"""A federation where half the devices train with onnxruntime-training and half with the portable
backend, each in its own virtualenv (the two onnxruntime packages never share one environment)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from edge_client.bench import BenchReport
from models.data import load_digits, save_npz
from models.export import export_all
from models.zoo import ModelSpec
from tests.conftest import tierfl
from tierfl.cli import ALIASES

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
EDGE_VENV = ROOT / ".venv-edge"


@pytest.fixture(scope="session")
def edge_python() -> Path:
    """Python of a virtualenv holding `tierfl[edge]`: plain onnxruntime, no training package, no onnx."""
    python = EDGE_VENV / "bin" / "python"
    stamp = EDGE_VENV / ".installed"
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not (python.exists() and stamp.exists() and stamp.read_text() == key):
        venv.create(EDGE_VENV, with_pip=True, clear=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[edge]"], check=True, timeout=600)
        stamp.write_text(key)
    return python


def test_edge_environment_has_only_plain_onnxruntime(edge_python):
    probe = ("import importlib.util, json, edge_client.agent, edge_client.portable, sys; "
             "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
             "('onnx', 'onnxruntime', 'amqtt', 'sklearn')} | {'imported_onnx': 'onnx' in sys.modules}))")
    found = json.loads(subprocess.run([edge_python, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    assert found == {"onnx": False, "onnxruntime": True, "amqtt": False, "sklearn": False, "imported_onnx": False}


COMMANDS = ("export", "aggregator", "relay", "edge-aggregator", "client", "broker", "broker-config", "bench", "demo", "report",
            "config")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_on_the_device_install_works_or_names_the_extra(edge_python, command):
    """`tierfl COMMAND --help` with only tierfl[edge]: its help, or one line saying which extra to install (exit 2).
    An old name (`edge-aggregator`) runs, and is named as, its command (`relay`)."""
    name = ALIASES.get(command, command)
    result = subprocess.run([edge_python, "-m", "tierfl.cli", command, "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    if result.returncode == 0:
        assert f"tierfl {name}" in result.stdout
    else:
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert re.fullmatch(rf"tierfl {name}: error: this command needs the \w+ package, which is not installed "
                            r"here: pip install 'tierfl\[(full|demo|signing|edge)\]'", lines[0]), lines[0]


@pytest.fixture(scope="module")
def device_bench(edge_python: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """`tierfl bench --artifacts` run on the device install: (artifacts, data, output folder)."""
    root = tmp_path_factory.mktemp("device-bench")
    artifacts, data, out = root / "artifacts", root / "digits.npz", root / "bench"
    export_all(ModelSpec(arch="mlp", hidden=(16,)), ["a", "c"], artifacts)
    save_npz(data, load_digits())
    result = subprocess.run([edge_python, "-m", "tierfl.cli", "bench", "--artifacts", str(artifacts), "--data", str(data),
                             "--steps", "5", "--epochs", "1", "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return artifacts, data, out


def test_bench_on_the_device_install_measures_given_artifacts_with_the_portable_backend(device_bench):
    """`tierfl bench --artifacts` with only tierfl[edge]: every tier of the export, bench.json and bench.md."""
    _, _, out = device_bench
    report = BenchReport.model_validate_json((out / "bench.json").read_text())
    assert [t.tier for t in report.tiers] == ["a", "c"] and {t.backend for t in report.tiers} == {"portable"}
    assert all(t.samples_per_second > 0 and t.epochs_seconds for t in report.tiers)
    assert "portable backend" in (out / "bench.md").read_text() and not (out / "bench.png").exists()


def test_bench_without_artifacts_or_broker_on_the_device_install_says_what_to_give(edge_python, tmp_path):
    """Without onnx bench cannot export: one line naming --artifacts, --broker and the extra, exit 2 like argparse."""
    result = subprocess.run([edge_python, "-m", "tierfl.cli", "bench", "--data", "digits", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("tierfl bench: error: without --artifacts or --broker, bench exports the tiers itself")
    assert "pass --artifacts DIR" in lines[0] and "--broker URL --fleet NAME" in lines[0]
    assert "pip install 'tierfl[full]'" in lines[0] and not any(tmp_path.iterdir())


def test_the_client_on_the_device_install_announces_the_bench_and_gets_its_tier(edge_python, device_bench, tmp_path,
                                                                                 mosquitto_url, fleet):
    """The README's device path: bench.json from `tierfl bench` on the device, read by `tierfl client --bench`; an
    aggregator with --tier-policy auto gives it the widest tier from round 1 (without a speed: the narrowest, c)."""
    artifacts, data, out = device_bench
    aggregator = tierfl("aggregator", "--broker", mosquitto_url, "--fleet", fleet, "--artifacts", str(artifacts),
                        "--state-dir", str(tmp_path / "state"), "--tier-policy", "auto", "--min-clients", "1",
                        "--rounds", "1", "--round-timeout", "30", log=tmp_path / "aggregator.log")
    device = subprocess.Popen([edge_python, "-m", "tierfl.cli", "--log-format", "text", "client", "--broker",
                               mosquitto_url, "--fleet", fleet, "--device-id", "pi-bench", "--data", str(data),
                               "--cache-dir", str(tmp_path / "pi"), "--bench", str(out / "bench.json")],
                              stdout=open(tmp_path / "pi.log", "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        assert aggregator.wait(120) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
    finally:
        for process in (device, aggregator):
            if process.poll() is None:
                process.terminate()
                process.wait(10)
    log = (tmp_path / "aggregator.log").read_text()
    assert "round 1: 1 devices selected: pi-bench (tier a)" in log and "round 1 committed" in log, log[-3000:]
    device_log = (tmp_path / "pi.log").read_text()
    assert re.search(r"announcing the speed measured by \S+bench.json on mlp8-h16: tier a [\d.]+ ms/sample, "
                     r"tier c [\d.]+ ms/sample", device_log), device_log[-3000:]
    assert "training backend: portable" in device_log


def test_show_key_without_cryptography_names_the_extra(edge_python, tmp_path):
    result = subprocess.run([edge_python, "-m", "tierfl.cli", "client", "--device-id", "pi-1", "--cache-dir",
                             str(tmp_path), "--fleet", "lab", "--broker", "mqtt://127.0.0.1:1883", "--show-key"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "needs the cryptography package" in result.stderr and "pip install 'tierfl[signing]'" in result.stderr


def _client(python: Path, url: str, fleet: str, name: str, data: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    command = [str(python), "-m", "tierfl.cli", "client", "--broker", url, "--fleet", fleet, "--device-id", name,
               "--data", str(data), "--cache-dir", str(tmp_path / name)]
    return subprocess.Popen(command, stdout=open(tmp_path / f"{name}.log", "wb"), stderr=subprocess.STDOUT, cwd=ROOT)


def _federation(tmp_path: Path, url: str, fleet: str, pythons: list[Path]) -> tuple[float, dict[str, str]]:
    """Run 8 rounds over 4 devices (one Dirichlet share each); return the final accuracy and each device's backend."""
    from models.data import dirichlet_partition, load_digits, save_npz

    tmp_path.mkdir()
    digits = load_digits()
    for i, part in enumerate(dirichlet_partition(digits.y, len(pythons), 1.0, seed=0)):
        save_npz(tmp_path / f"part{i}.npz", digits.subset(part))
    aggregator = tierfl("aggregator", "--broker", url, "--fleet", fleet, "--state-dir", str(tmp_path / "state"),
                        "--eval-data", "digits", "--min-clients", str(len(pythons)), "--rounds", "8", "--epochs", "2",
                        "--lr", "0.1", "--batch-size", "16", log=tmp_path / "aggregator.log")
    devices = [_client(python, url, fleet, f"dev{i}", tmp_path / f"part{i}.npz", tmp_path) for i, python in enumerate(pythons)]
    try:
        assert aggregator.wait(240) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
    finally:
        for process in [aggregator, *devices]:
            if process.poll() is None:
                process.terminate()
                process.wait(10)
    log = (tmp_path / "aggregator.log").read_text()
    accuracy = float(log.rsplit("accuracy ", 1)[1].split()[0])
    return accuracy, dict(re.findall(r"(dev\d) joined: .*, backend ([\w-]+)", log))


def test_mixed_backend_federation_trains_like_one_backend(tmp_path, mosquitto_url, fleet, edge_python):
    main = Path(sys.executable)
    alone, backends = _federation(tmp_path / "alone", mosquitto_url, fleet + "a", [main] * 4)
    assert set(backends.values()) == {"ort-training"}
    mixed, backends = _federation(tmp_path / "mixed", mosquitto_url, fleet + "m", [main, main, edge_python, edge_python])
    assert backends == {"dev0": "ort-training", "dev1": "ort-training", "dev2": "portable", "dev3": "portable"}
    assert alone > 0.85 and abs(mixed - alone) < 0.02, (alone, mixed)
