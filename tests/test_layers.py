"""The import contracts (pyproject.toml, checked by import-linter in `make test`) hold, and catch a violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("tierfl", "aggregator", "edge_client", "models", "protocol")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_every_contract():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_a_model_importing_the_aggregator_breaks_the_layers(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    zoo = tmp_path / "models" / "zoo.py"
    zoo.write_text(zoo.read_text() + "\nfrom aggregator.registry import DeviceRegistry  # a violation\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "models.zoo -> aggregator.registry" in result.stdout, result.stdout[-3000:]
