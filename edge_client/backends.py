"""Which training backend a device uses: onnxruntime-training where it works, the portable step graph elsewhere."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from models.ort_training import TrainingBackendUnavailable, load_training_api

if TYPE_CHECKING:  # onnxruntime is imported when a trainer is opened, not to name the backends
    from edge_client.trainer import Trainer
    from models.manifest import TierManifest

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ort-training", "portable")


def resolve_backend(requested: str) -> str:
    """`ort-training` or `portable` for a requested backend; `auto` takes ort-training when its wheel works."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r} (expected one of {', '.join(BACKENDS)})")
    if requested == "portable":
        return "portable"
    try:
        load_training_api()
    except TrainingBackendUnavailable as exc:
        if requested == "ort-training":
            raise
        log.info("onnxruntime-training is not usable here (%s); training with the portable backend", exc)
        return "portable"
    return "ort-training"


def open_trainer(backend: str, tier_dir: Path, manifest: TierManifest, threads: int = 1) -> Trainer:
    """A trainer of `backend` ("ort-training" or "portable") on one tier's artifacts."""
    if backend == "ort-training":
        from edge_client.trainer import OrtTrainer

        return OrtTrainer(tier_dir, manifest, threads)
    from edge_client.portable import PortableTrainer

    return PortableTrainer(tier_dir, manifest, threads)
