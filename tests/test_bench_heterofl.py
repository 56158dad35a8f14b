"""scripts/bench_heterofl.py: a tiny real run writes the report; a missing dataset is one line, exit 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.data import FASHION_MNIST_ROOT

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_heterofl.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="Fashion-MNIST is not installed")
def test_tiny_run_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    done = _run("--rounds", "1", "--devices", "2", "--train-samples", "200", "--test-samples", "300",
                "--mixes", "a,e,a-e", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "heterofl.json").read_text())
    assert [(r["partition"], r["mix"]) for r in report["results"]] == [
        (p, m) for p in ("iid", "dirichlet") for m in ("a", "e", "a-e")]
    mixed = report["results"][2]
    assert mixed["devices_per_tier"] == {"a": 1, "e": 1} and set(mixed["final_tiers"]) == {"a", "e"}
    assert report["results"][1]["model_tier"] == "e"
    assert [c["mix"] for c in report["claims"]] == ["a-e", "a-e"]
    assert "| iid | a-e | a:1 e:1 |" in (tmp_path / "heterofl.md").read_text()
    assert (tmp_path / "heterofl.png").stat().st_size > 0


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="Fashion-MNIST is not installed")
def test_batch_norm_run_measures_static_statistics(tmp_path: Path) -> None:
    done = _run("--batch-norm", "--rounds", "1", "--devices", "2", "--train-samples", "200", "--test-samples", "300",
                "--mixes", "a-e", "--partitions", "iid", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "heterofl.json").read_text())
    assert report["model"]["batch_norm"] and "--batch-norm" in report["command"]
    assert set(report["results"][0]["final_tiers"]) == {"a", "e"}


def test_missing_dataset_is_one_line(tmp_path: Path) -> None:
    done = _run("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "apt-get install dataset-fashion-mnist" in done.stderr
