"""`tierfl bench --broker`: the tiers fetched from a real aggregator process over Mosquitto, as the client fetches
them (hello, the tier's signed catalogue, fetch, signed blobs into the device's cache, the same checks), then
measured, while the aggregator waits for more devices than there are: no round is ever run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.store.state import STATE_FILE, StateRecord
from edge_client.bench import BenchReport
from models.manifest import ExportIndex
from tests.conftest import tierfl

pytestmark = pytest.mark.integration


def _bench(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TIERFL_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "tierfl.cli", "--log-format", "text", "bench", *args],
                          capture_output=True, text=True, timeout=timeout, env=environ)


@pytest.fixture(scope="module")
def aggregator(mosquitto_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An aggregator exporting tiers a and c that waits for 3 devices before a round, more than the tests bring:
    (fleet, state dir, its log)."""
    fleet, state = f"t{uuid.uuid4().hex[:10]}", tmp_path_factory.mktemp("aggregator") / "state"
    log = state.parent / "aggregator.log"
    process = tierfl("aggregator", "--broker", mosquitto_url, "--fleet", fleet, "--state-dir", str(state),
                     "--tiers", "a,c", "--min-clients", "3", "--rounds", "1000", "--round-timeout", "30", log=log)
    deadline = time.time() + 60
    while "waiting for devices" not in log.read_text():
        assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    try:
        yield fleet, state, log
    finally:
        process.terminate()
        process.wait(10)


def test_bench_fetches_the_fleets_tiers_like_the_client_and_measures_them(tmp_path, mosquitto_url, aggregator):
    fleet, state, log = aggregator
    cache, out = tmp_path / "cache", tmp_path / "bench"
    result = _bench("--fleet", fleet, "--device-id", "bench-pi", "--cache-dir", str(cache), "--data", "digits",
                    "--backend", "portable", "--steps", "5", "--epochs", "1", "--out", str(out),
                    env={"TIERFL_BROKER": mosquitto_url})  # the client's variable: no password on a command line
    assert result.returncode == 0, result.stderr[-3000:]
    report = BenchReport.model_validate_json((out / "bench.json").read_text())
    assert [t.tier for t in report.tiers] == ["a", "c"], "every tier the fleet exports; b, d, e refused and skipped"
    assert report.settings.tiers == ["a", "c"] and {t.backend for t in report.tiers} == {"portable"}
    assert all(t.samples_per_second > 0 and t.epochs_seconds for t in report.tiers)
    assert report.model == ExportIndex.load(state / "artifacts" / "index.json").model
    assert "does not export tier(s) b, d, e: not measured" in result.stderr

    # the files came into the device's own cache, by sha256, exactly the aggregator's export ...
    exported = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (state / "artifacts").rglob("*") if p.is_file()
                and p.name != "index.json"}
    assert {p.name for p in (cache / "blobs").iterdir()} == exported
    # ... under the aggregator's key, pinned on first contact as the client pins it
    shown = subprocess.run([sys.executable, "-m", "tierfl.cli", "aggregator", "--state-dir", str(state), "--show-key"],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads((cache / "aggregator.pub").read_text()) == json.loads(shown)

    # the client reads what bench wrote
    from edge_client.cli import read_benchmark

    assert set(read_benchmark(out / "bench.json")) == {"a", "c"}

    # fetched without a round: the aggregator (waiting for 3 devices) never started one
    _assert_no_round(state, log.read_text())


def _assert_no_round(state: Path, log: str) -> None:
    rounds = [line for line in log.splitlines() if re.search(r"\bround \d+", line)]
    assert "bench-pi joined" in log and all("waiting for devices" in line for line in rounds), log[-3000:]
    if (state / STATE_FILE).exists():
        record = StateRecord.model_validate_json((state / STATE_FILE).read_text())
        assert record.round == 0 and record.history == []
    assert not [p for p in (state / "open_round").rglob("*") if p.is_file()]


def test_bench_checks_the_aggregators_signature_like_the_client(tmp_path, mosquitto_url, aggregator):
    """With another aggregator key, the catalogue is refused as the client refuses a task: nothing is fetched."""
    fleet, _, _ = aggregator
    result = _bench("--broker", mosquitto_url, "--fleet", fleet, "--device-id", "bench-wrong-key", "--cache-dir",
                    str(tmp_path / "cache"), "--data", "digits", "--tiers", "a", "--aggregator-key", "ab" * 32,
                    "--fetch-timeout", "6", "--out", str(tmp_path / "bench"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "refused a message: bad_signature" in result.stderr
    last = result.stderr.splitlines()[-1]
    assert "the files of tier a did not come from the aggregator of fleet" in last
    refused = re.search(r"refused here: bad_signature \((\d+)\)", last)
    assert refused and int(refused[1]) >= 2, last  # the key announcement, then the catalogue
    assert not (tmp_path / "bench").exists() and not list((tmp_path / "cache" / "blobs").iterdir())


def test_bench_names_a_tier_the_fleet_does_not_export(tmp_path, mosquitto_url, aggregator):
    fleet, _, _ = aggregator
    result = _bench("--broker", mosquitto_url, "--fleet", fleet, "--device-id", "bench-e", "--cache-dir",
                    str(tmp_path / "cache"), "--data", "digits", "--tiers", "a,e", "--out", str(tmp_path / "bench"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].endswith(f"the aggregator of fleet {fleet!r} does not export tier e (its "
                                                   "refusal above names the tiers it has)")
    assert "unknown_tier: tier 'e' is not exported (have: a, c)" in result.stderr


@pytest.mark.parametrize("options,message", [
    ([], "--broker (or $TIERFL_BROKER) needs --data"),
    (["--data", "digits", "--artifacts", "x"], "--artifacts and --broker both name where the tiers come from"),
])
def test_fetch_usage_errors_exit_2(tmp_path, options, message):
    result = _bench("--broker", "mqtt://127.0.0.1:1", *options, "--out", str(tmp_path / "bench"), timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
