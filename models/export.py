"""Export per-tier ONNX Runtime training artifacts plus a content-addressed manifest.

Layout of `out_dir`: `index.json`, and per tier `<tier>/` with `training_model.onnx`,
`eval_model.onnx` (returns loss, logits), `optimizer_model.onnx`, `checkpoint` (the tier's
starting weights), `inference.onnx` (forward graph with those weights), `step_model.onnx` and
`forward.onnx` (the portable backend's training step and evaluation, standard operators only,
see models/step_graph.py), for batch-norm models
`statistics.onnx` (measures static BN statistics on device data) and `manifest.json`.
The training and eval graphs also take a `class_mask` input, and `scale` with the scaler on (see zoo).
Every tier starts from the leading block of the same rate-1 global model.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from models.manifest import FORWARD_FILE, STATISTICS_FILE, STEP_FILE, ExportIndex, FileEntry, ParamInfo, TierManifest
from models.step_graph import build_step_graph
from models.ort_training import TrainingAPI, captured_native_stderr, load_training_api
from models.slicing import slice_params
from models.tiers import TIER_RATES, tier_rate
from models.zoo import (
    INPUT_NAME,
    OUTPUT_NAME,
    ModelSpec,
    build_forward,
    build_statistics_graph,
    frozen_names,
    init_global_params,
    param_shapes,
    trainable_names,
)

log = logging.getLogger(__name__)

Optimizer = Literal["sgd", "adamw"]
ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "inference.onnx",
                  STEP_FILE, FORWARD_FILE)
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.json"


def _sha256(path: Path) -> FileEntry:
    """Content address of a file."""
    data = path.read_bytes()
    return FileEntry(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


@contextlib.contextmanager
def _fresh_graph_names(training: TrainingAPI) -> Iterator[None]:
    """Restart onnxblock's process-global name counter so generated names never depend on history.

    onnxblock names nodes `onnx::<op>::<n>` from a module-level counter (`_graph_utils._GRAPH_TOKEN`)
    that keeps counting across calls: the second export in a process would otherwise differ
    byte-wise from the first. Resetting it for the call (and restoring it after) makes every
    export identical to one from a fresh process.
    """
    utils = training.onnxblock._graph_utils
    saved = utils._GRAPH_TOKEN
    utils._GRAPH_TOKEN = 0
    try:
        yield
    finally:
        utils._GRAPH_TOKEN = saved


def _generate(training: TrainingAPI, spec: ModelSpec, forward: onnx.ModelProto, optimizer: Optimizer, where: Path) -> None:
    """Run generate_artifacts into `where`, its native INFO flood captured."""
    artifacts = training.artifacts
    optim = {"sgd": artifacts.OptimType.SGD, "adamw": artifacts.OptimType.AdamW}[optimizer]
    with captured_native_stderr(log), _fresh_graph_names(training):
        artifacts.generate_artifacts(
            forward,
            requires_grad=trainable_names(spec),
            frozen_params=frozen_names(spec) or None,
            loss=artifacts.LossType.CrossEntropyLoss,
            optimizer=optim,
            artifact_directory=where,
            additional_output_names=[OUTPUT_NAME],
        )


def _libraries(training: TrainingAPI) -> dict[str, str]:
    """Versions of the libraries that shaped the artifacts."""
    return {"onnx": onnx.__version__, "onnxruntime": training.version, "numpy": np.__version__}


def export_tier(
    spec: ModelSpec, tier: str, out_dir: str | os.PathLike[str], optimizer: Optimizer = "sgd", scaler: bool = False
) -> TierManifest:
    """Write one tier's training artifacts, inference model and manifest into `out_dir/<tier>/`.

    `scaler` adds HeteroFL's scaler input to the training graph. Off by default: a BatchNorm
    training with batch statistics cancels it exactly (forward and gradients), while the running
    averages it leaves behind come out 1/rate too large; without batch norm it inflates the
    narrow tiers' activations and destabilises training at usual learning rates.
    """
    rate = tier_rate(tier)
    training = load_training_api()
    started = time.perf_counter()
    shapes = param_shapes(spec, rate)
    params = slice_params(init_global_params(spec), shapes)
    forward = build_forward(spec, rate, params, scaler=scaler, class_mask=True)
    tier_dir = Path(out_dir) / tier
    tier_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tier_dir, prefix=".staging-") as staging:
        stage = Path(staging)
        _generate(training, spec, forward, optimizer, stage)
        onnx.save(build_forward(spec, rate, params), stage / "inference.onnx")
        onnx.save(build_step_graph(spec, rate, optimizer, scaler=scaler, class_mask=True), stage / STEP_FILE)
        onnx.save(build_forward(spec, rate, params, params_as_inputs=True), stage / FORWARD_FILE)
        names = [*ARTIFACT_FILES, *([STATISTICS_FILE] if spec.batch_norm else [])]
        if spec.batch_norm:
            onnx.save(build_statistics_graph(spec, rate), stage / STATISTICS_FILE)
        files = {name: _sha256(stage / name) for name in names}
        for name in names:
            os.replace(stage / name, tier_dir / name)
    frozen = set(frozen_names(spec))
    size = spec.image_size
    manifest = TierManifest(
        model=spec,
        tier=tier,
        rate=rate,
        optimizer=optimizer,
        input_name=INPUT_NAME,
        input_shape=["N", 1, size, size],
        scaler=scaler,
        class_mask=True,
        output_name=OUTPUT_NAME,
        params=[ParamInfo(name=n, shape=list(s), trainable=n not in frozen) for n, s in shapes.items()],
        files=files,
        libraries=_libraries(training),
    )
    manifest.save(tier_dir / MANIFEST_NAME)  # last: a manifest only ever describes files in place
    log.info(
        "exported %s tier %s (rate %g): %d params, %d artifact bytes in %.2fs",
        spec.name, tier, rate, manifest.param_count, manifest.artifact_bytes, time.perf_counter() - started,
    )
    return manifest


def export_all(
    spec: ModelSpec,
    tiers: Iterable[str],
    out_dir: str | os.PathLike[str],
    optimizer: Optimizer = "sgd",
    scaler: bool = False,
) -> ExportIndex:
    """Export every tier in `tiers` and write `out_dir/index.json`."""
    tiers = list(dict.fromkeys(tiers))
    for tier in tiers:
        tier_rate(tier)  # fail on an unknown tier before writing anything
    out = Path(out_dir)
    manifests = {tier: export_tier(spec, tier, out, optimizer, scaler) for tier in tiers}
    ordered = sorted(manifests, key=list(TIER_RATES).index)
    index = ExportIndex(model=spec, tiers={t: f"{t}/{MANIFEST_NAME}" for t in ordered})
    index.save(out / INDEX_NAME)
    return index
