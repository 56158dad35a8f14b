"""`tierfl bench`: per-tier measurements in child processes, bench.json/.md/.png, clear user errors."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_client.bench import configure_parser
from models.export import export_all, zoo_card
from models.manifest import ExportIndex, TierManifest
from models.spec import ModelSpec
from tierfl.cli import main

MLP = ModelSpec(arch="mlp", image_size=8)
TORCH = importlib.util.find_spec("torch")
FAST = ["--steps", "5", "--threads", "1"]


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run on mlp 8x8 digits, tiers a and d, exporting into a temp folder."""
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--tiers", "a,d", *FAST, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiers exported here (export is deterministic: identical files to the bench's)."""
    out = tmp_path_factory.mktemp("artifacts")
    export_all(MLP, ["a", "d"], out)
    return out


def _report(out: Path) -> dict:
    return json.loads((out / "bench.json").read_text())


def _manifest(artifacts: Path, tier: str) -> TierManifest:
    return TierManifest.load(artifacts / ExportIndex.load(artifacts / "index.json").tiers[tier])


def test_report_fields_per_tier(bench_out: Path) -> None:
    report = _report(bench_out)
    assert report["model"]["name"] == "mlp8" and report["model"]["input_shape"] == [1, 8, 8]
    assert report["model"]["recipe"]["arch"] == "mlp" and report["settings"]["data"] == "digits"
    assert [t["tier"] for t in report["tiers"]] == ["a", "d"]
    for tier in report["tiers"]:
        assert 0 < tier["step_p50_ms"] <= tier["step_p95_ms"]
        assert tier["samples_per_second"] > 0
        assert tier["peak_rss_kib"] > 0 and tier["peak_rss_kib"] >= tier["baseline_rss_kib"]
        assert tier["epochs_seconds"] > 0
        assert set(tier["update_bytes"]) == set(report["settings"]["codecs"])
        assert tier["update_bytes"]["int8"] < tier["update_bytes"]["float32"]
        assert (tier["torch_step_p50_ms"] is None) == (TORCH is None)  # a zoo model: timed in PyTorch when it is here


def test_artifact_bytes_are_the_manifest_sizes(bench_out: Path, exported: Path) -> None:
    tiers = {t["tier"]: t for t in _report(bench_out)["tiers"]}
    for name, tier in tiers.items():
        manifest = _manifest(exported, name)
        assert tier["artifact_bytes"] == sum(f.bytes for f in manifest.files.values())
        assert tier["params"] == manifest.param_count
    assert tiers["a"]["artifact_bytes"] > tiers["d"]["artifact_bytes"]
    assert tiers["a"]["update_bytes"]["float32"] > tiers["d"]["update_bytes"]["float32"]


def test_markdown_and_chart(bench_out: Path) -> None:
    lines = (bench_out / "bench.md").read_text().splitlines()
    assert any(line.startswith("| tier | rate | params") for line in lines)
    for tier in ("a", "d"):
        assert sum(line.startswith(f"| {tier} |") for line in lines) == 2  # main table and codec table
    assert (bench_out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_parent_process_never_imports_a_runtime(exported: Path, tmp_path: Path) -> None:
    """The bench's own process stays light (its peak would be every child's): onnx, onnxruntime and torch load in the
    children only. A fresh interpreter: this one imported onnxruntime to export (which imports torch where it is)."""
    argv = ["bench", "--artifacts", str(exported), "--tiers", "d", "--steps", "1", "--epochs", "0", "--out", str(tmp_path)]
    code = (f"import sys\nfrom tierfl.cli import main\nassert main({argv!r}) == 0\n"
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_existing_artifacts_and_no_epochs(exported: Path, tmp_path: Path) -> None:
    assert main(["bench", "--artifacts", str(exported), "--tiers", "d", "--steps", "2", "--epochs", "0",
                 "--out", str(tmp_path)]) == 0
    (tier,) = _report(tmp_path)["tiers"]
    assert tier["tier"] == "d" and tier["epochs_seconds"] is None
    assert tier["artifact_bytes"] == _manifest(exported, "d").artifact_bytes


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tiers", "a,x"], "unknown tier 'x'; known tiers: a=1"),
        (["--data", "/nonexistent/local.npz"], "dataset file not found: /nonexistent/local.npz"),
        (["--image-size", "28", "--data", "digits"],
         "digits: x holds samples of shape [1, 8, 8] but the model takes [1, 28, 28]"),
    ],
)
def test_user_errors(options: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *options, *FAST, "--out", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_artifacts_missing_a_tier(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--artifacts", str(exported), "--tiers", "b"]) == 1
    assert "tier(s) b not in" in capsys.readouterr().err


def test_help_has_an_example_and_the_columns() -> None:
    parser = argparse.ArgumentParser(prog="tierfl bench")
    configure_parser(parser)
    text = parser.format_help()
    assert "tierfl bench --arch cnn --image-size 28" in text
    for column in ("step p50 ms", "samples/s", "peak RSS MiB", "artifacts KiB", "ORT/torch"):
        assert column in text


def test_the_portable_backend_trains_from_real_initial_weights(exported: Path, tmp_path: Path) -> None:
    """The portable step graph holds no initial weights (a task sends them): bench gives it the zoo's scheme, so its
    delta, and the sparse codecs' bytes, are those of real training, as with onnxruntime-training."""
    sizes = {}
    for backend in ("ort-training", "portable"):
        assert main(["bench", "--artifacts", str(exported), "--tiers", "a", "--backend", backend, "--steps", "5",
                     "--epochs", "0", "--out", str(tmp_path / backend)]) == 0
        (tier,) = _report(tmp_path / backend)["tiers"]
        assert tier["backend"] == backend
        sizes[backend] = tier["update_bytes"]
    for backend, size in sizes.items():
        assert size["topk:0.1"] > 0.05 * size["float32"], (backend, size)  # not the deflated zeros of no training
    assert 0.5 < sizes["portable"]["topk:0.1"] / sizes["ort-training"]["topk:0.1"] < 2


def test_initial_weights_follow_the_zoos_bounds() -> None:
    from edge_client.bench import initial_weights
    from models.zoo import init_global_params

    spec = ModelSpec(arch="cnn", image_size=8, batch_norm=True)
    manifest = TierManifest(model=zoo_card(spec), tier="a", rate=1.0, optimizer="sgd", input_name="x", input_shape=["N", 1, 8, 8],
                            output_name="y", params=[{"name": n, "shape": list(v.shape), "trainable": True}
                                                     for n, v in init_global_params(spec).items()],
                            files={}, libraries={})
    drawn, zoo = initial_weights(manifest), init_global_params(spec)
    assert drawn.keys() == zoo.keys()
    for name, value in zoo.items():
        assert drawn[name].shape == value.shape and drawn[name].dtype == np.float32
        if value.min() == value.max():  # batch norm's constants
            assert (drawn[name] == value).all(), name
        else:
            assert np.abs(drawn[name]).max() <= np.abs(value).max() * 1.01 + 1e-6 and drawn[name].std() > 0, name
