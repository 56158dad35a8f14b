"""Which training backend a device uses: onnxruntime-training where it works, the portable step graph elsewhere."""

from __future__ import annotations

import logging
from pathlib import Path

from edge_client.portable import PortableTrainer
from edge_client.trainer import OrtTrainer, Trainer
from models.manifest import TierManifest
from models.ort_training import TrainingBackendUnavailable, load_training_api

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
        return OrtTrainer(tier_dir, manifest, threads)
    return PortableTrainer(tier_dir, manifest, threads)
