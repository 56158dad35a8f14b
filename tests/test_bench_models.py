"""scripts/bench_models.py and the preresnet data of scripts/bench_heterofl.py, without a long run.

One zoo model, one tier, 3 timed steps on each ONNX backend (PyTorch lives in its own virtualenv
and is left out here), and the writer that keeps models.md's two sections apart.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from models.data import Dataset

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str) -> ModuleType:
    """Import scripts/<name>.py (its sibling scripts importable, as when it runs)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_one_tier_on_both_onnx_backends(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_models.py"), "--models", "mlp8", "--tiers", "a",
                           "--warmup", "0", "--rounds", "1", "--block", "3", "--memory-steps", "3", "--batches", "3",
                           "--no-torch", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    section = json.loads((tmp_path / "models.json").read_text())["step_time"]
    (row,) = section["rows"]
    assert (row["model"], row["tier"], row["params"], row["macs"]) == ("mlp8", "a", 85_002, 84_480)
    assert set(row["series"]) == {"ort-training", "portable"} and row["series"]["portable"]["steps"] == 3
    assert row["series"]["portable"]["ratio"] > 0 and row["artifact_bytes"] > 0
    assert all(0 < m["baseline_kib"] <= m["peak_kib"] for m in row["memory"].values())
    losses = row["losses"]
    assert len(losses["portable"]) == 3 and max(abs(a - b) for a, b in zip(*losses.values())) < 1e-4  # same steps
    assert "--no-torch" in section["command"]
    text = (tmp_path / "models.md").read_text()
    assert "| mlp8 | a (1) | 85,002 | 84,480 |" in text and "PyTorch" not in text.split("| model |")[1]


def test_sections_are_kept_apart(tmp_path: Path) -> None:
    bench = _script("bench_models")
    bench.write_section(tmp_path, "heterofl", {"markdown": ["## HeteroFL", "mixes"], "value": 1})
    bench.write_section(tmp_path, "step_time", {"markdown": ["## Step time", "first run"]})
    bench.write_section(tmp_path, "step_time", {"markdown": ["## Step time", "second run"]})
    report = json.loads((tmp_path / "models.json").read_text())
    assert list(report) == ["step_time", "heterofl"] and report["heterofl"]["value"] == 1
    text = (tmp_path / "models.md").read_text()
    assert text.index("second run") < text.index("## HeteroFL") and "first run" not in text


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="preresnet32"):
        _script("bench_models").model_specs(["resnet50"])


def test_fashion_mnist_fits_a_3x32x32_model() -> None:
    heterofl = _script("bench_heterofl")
    images = np.arange(2 * 28 * 28, dtype=np.float32).reshape(2, 1, 28, 28)
    fitted = heterofl.fit_images(Dataset(images, np.array([3, 7])), (3, 32, 32))
    assert fitted.x.shape == (2, 3, 32, 32) and list(fitted.y) == [3, 7]
    assert np.array_equal(fitted.x[:, 2, 2:30, 2:30], images[:, 0]) and fitted.x[:, :, :2].sum() == 0
    assert heterofl.model_spec(heterofl.parse_args(["--arch", "preresnet"])).input_shape == (3, 32, 32)
    with pytest.raises(SystemExit):
        heterofl.parse_args(["--arch", "preresnet", "--batch-norm"])
