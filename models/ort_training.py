"""The one place that imports the onnxruntime training API (onnxruntime-training-cpu 1.19.2).

Why the import is unusual: `onnxruntime/training/__init__.py` imports `amp` and `optim`, which
import torch (upstream issue microsoft/onnxruntime#22070), and torch is neither installed nor
wanted on a device. The submodules TierFL needs -- `api` (Module, Optimizer, CheckpointState),
`artifacts` (generate_artifacts) and `onnxblock` -- do not need torch. So when
`onnxruntime.training` has not been imported yet, we register a bare package object for it in
`sys.modules` whose `__path__` points at the installed `onnxruntime/training` folder, and then
import the three submodules through it; the torch-importing `__init__` never runs.

The plain `onnxruntime` wheel and the training wheel write the same `onnxruntime/` folder, so
installing one over the other silently leaves a native library without the training symbols
(`pip check` says nothing). `load_training_api` checks those symbols first and names the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

TRAINING_DIST = "onnxruntime-training-cpu"
# Native symbols the api/artifacts/onnxblock modules call; the plain inference build has none.
REQUIRED_SYMBOLS = (
    "GradientGraphBuilder",
    "CheckpointState",
    "Module",
    "Optimizer",
    "save_checkpoint",
    "load_checkpoint",
    "get_model_after_loading_checkpoint",
)
_FIX = (
    "Fix: `pip uninstall -y onnxruntime onnxruntime-training onnxruntime-training-cpu && "
    f"pip install {TRAINING_DIST}==1.19.2` (x86_64 Linux/macOS/Windows, Python 3.8-3.12; "
    "there is no aarch64 wheel -- use the portable backend there)."
)


class TrainingBackendUnavailable(RuntimeError):
    """The onnxruntime training API cannot be used in this environment."""


@dataclasses.dataclass(frozen=True)
class TrainingAPI:
    """The three onnxruntime.training submodules TierFL uses."""

    api: types.ModuleType
    artifacts: types.ModuleType
    onnxblock: types.ModuleType
    version: str


def _installed_dists() -> list[str]:
    """Names of the installed distributions that own an `onnxruntime/` folder."""
    names = ("onnxruntime", "onnxruntime-training", TRAINING_DIST, "onnxruntime-gpu")
    found = []
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{name}=={importlib.metadata.version(name)}")
    return found


def _check_native(ort: types.ModuleType) -> None:
    """Raise TrainingBackendUnavailable unless the native library carries the training symbols."""
    try:
        state = importlib.import_module("onnxruntime.capi._pybind_state")
    except ImportError as exc:
        raise TrainingBackendUnavailable(f"onnxruntime's native library failed to load: {exc}. {_FIX}") from exc
    missing = [s for s in REQUIRED_SYMBOLS if not hasattr(state, s)]
    training_dir = Path(ort.__file__).parent / "training"
    if missing or not (training_dir / "api").is_dir():
        raise TrainingBackendUnavailable(
            f"onnxruntime {ort.__version__} at {Path(ort.__file__).parent} is an inference-only build "
            f"(missing training symbols {missing or 'none'}; training/api folder present: "
            f"{(training_dir / 'api').is_dir()}). Installed onnxruntime distributions: "
            f"{_installed_dists() or 'none'} -- plain `onnxruntime` installed over the training "
            f"package replaces its native library without a warning. {_FIX}"
        )


def _register_bare_package(training_dir: Path) -> None:
    """Put an empty `onnxruntime.training` package in sys.modules so its __init__ never runs."""
    spec = importlib.machinery.ModuleSpec("onnxruntime.training", None, is_package=True)
    spec.submodule_search_locations = [str(training_dir)]
    module = importlib.util.module_from_spec(spec)
    module.__path__ = [str(training_dir)]
    sys.modules["onnxruntime.training"] = module


def load_training_api() -> TrainingAPI:
    """Import onnxruntime.training's api, artifacts and onnxblock without importing torch."""
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise TrainingBackendUnavailable(f"onnxruntime is not installed ({exc}). {_FIX}") from exc
    _check_native(ort)
    if "onnxruntime.training" not in sys.modules:
        _register_bare_package(Path(ort.__file__).parent / "training")
    try:
        modules = [importlib.import_module(f"onnxruntime.training.{m}") for m in ("api", "artifacts", "onnxblock")]
    except ImportError as exc:
        raise TrainingBackendUnavailable(f"onnxruntime.training submodules failed to import: {exc}. {_FIX}") from exc
    return TrainingAPI(*modules, version=ort.__version__)


@contextlib.contextmanager
def captured_native_stderr(logger: logging.Logger = log) -> Iterator[None]:
    """Send fd 2 (native INFO floods) to a temp file; replay it to `logger` only if the body fails.

    generate_artifacts prints dozens of C++ INFO lines straight to fd 2, which Python's logging
    cannot filter. The redirect is process-wide: other threads' stderr is captured meanwhile.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace").strip()
            if text:
                logger.error("native stderr during failed call:\n%s", text)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
