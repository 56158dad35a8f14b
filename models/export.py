"""Export per-tier ONNX Runtime training artifacts plus a content-addressed manifest.

One path for every model: a normalized full-width forward graph (a user's ONNX file through
models.onnx_import, or a zoo model built at rate 1), its width plan (models.widths), and per tier
the graphs cut from it (models.tier_graph).

Layout of `out_dir`: `index.json`, `model.onnx` (the rate-1 forward graph with the initial
global weights), and per tier `<tier>/` with `training_model.onnx`,
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
from onnx import helper

from models.export_check import check_tier
from models.manifest import (FORWARD_FILE, GLOBAL_MODEL_FILE, INDEX_NAME, MANIFEST_NAME, STATISTICS_FILE, STEP_FILE,
                             ExportIndex, FileEntry, ModelCard, ParamInfo, TierManifest, WidthGroup)
from models.onnx_import import normalize
from models.ort_lowering import for_ort_training
from models.ort_training import TrainingAPI, captured_native_stderr, load_training_api
from models.spec import GLOBAL_SUFFIX, INPUT_NAME, MU_NAME, OUTPUT_NAME, ModelSpec
from models.step_graph import build_step_graph
from models.tier_graph import cut_forward, forward_macs, statistics_graph
from models.tiers import TIER_RATES, tier_rate
from models.widths import WidthPlan, analyse
from models.zoo import build_forward, init_global_params
from protocol.atomic_file import atomic_write, sync_folder

log = logging.getLogger(__name__)

Optimizer = Literal["sgd", "adamw"]
ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "inference.onnx",
                  STEP_FILE, FORWARD_FILE)


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


def _proximal_cross_entropy(training: TrainingAPI, shapes: dict[str, tuple[int, ...]]) -> object:
    """An onnxblock loss: cross-entropy + mu/2 * sum ||w - w_global||^2 (FedProx), `mu` and `<param>.global` as inputs."""
    class ProximalCrossEntropy(training.onnxblock.Block):
        def __init__(self) -> None:
            super().__init__()
            self._cross_entropy = training.onnxblock.loss.CrossEntropyLoss()

        def build(self, logits: str) -> str:
            graph = self.base.graph
            loss = self._cross_entropy(logits)
            graph.input.append(helper.make_tensor_value_info(MU_NAME, onnx.TensorProto.FLOAT, [1]))
            constants = {"proximal.flat": np.array([-1], np.int64), "proximal.half": np.array([0.5], np.float32),
                         "proximal.one": np.array([1], np.int64), "proximal.scalar": np.zeros(0, np.int64)}
            graph.initializer.extend(onnx.numpy_helper.from_array(value, name) for name, value in constants.items())
            squares = []
            # Every term is shaped [1] and only the total becomes a scalar: ORT's gradient builder fails on
            # rank-0 broadcasts, and has no gradient for Sum or ReduceSumSquare.
            for name, shape in shapes.items():
                graph.input.append(helper.make_tensor_value_info(name + GLOBAL_SUFFIX, onnx.TensorProto.FLOAT, list(shape)))
                flat = f"proximal.{name}.flat"
                graph.node.extend([
                    helper.make_node("Sub", [name, name + GLOBAL_SUFFIX], [f"proximal.{name}.diff"]),
                    helper.make_node("Reshape", [f"proximal.{name}.diff", "proximal.flat"], [flat]),
                    helper.make_node("Mul", [flat, flat], [f"proximal.{name}.sq_each"]),
                    helper.make_node("ReduceSum", [f"proximal.{name}.sq_each"], [f"proximal.{name}.sq"], keepdims=1),
                ])
                squares.append(f"proximal.{name}.sq")
            total = squares[0]
            for i, square in enumerate(squares[1:]):  # a chain of Adds: ORT training has no gradient for Sum
                graph.node.append(helper.make_node("Add", [total, square], [f"proximal.partial{i}"]))
                total = f"proximal.partial{i}"
            graph.node.extend([
                helper.make_node("Mul", [MU_NAME, "proximal.half"], ["proximal.half_mu"]),
                helper.make_node("Mul", ["proximal.half_mu", total], ["proximal.term"]),
                helper.make_node("Reshape", [loss, "proximal.one"], ["proximal.cross_entropy"]),
                helper.make_node("Add", ["proximal.cross_entropy", "proximal.term"], ["proximal.loss1"]),
                helper.make_node("Reshape", ["proximal.loss1", "proximal.scalar"], ["proximal.loss"]),
            ])
            return "proximal.loss"

    return ProximalCrossEntropy()


def _generate(
    training: TrainingAPI, forward: onnx.ModelProto, trainable: list[str], frozen: list[str],
    shapes: dict[str, tuple[int, ...]], optimizer: Optimizer, where: Path, proximal: bool,
) -> None:
    """Run generate_artifacts into `where`, its native INFO flood captured."""
    artifacts = training.artifacts
    optim = {"sgd": artifacts.OptimType.SGD, "adamw": artifacts.OptimType.AdamW}[optimizer]
    loss = (_proximal_cross_entropy(training, {n: shapes[n] for n in trainable}) if proximal
            else artifacts.LossType.CrossEntropyLoss)
    with captured_native_stderr(log), _fresh_graph_names(training):
        artifacts.generate_artifacts(
            forward,
            requires_grad=trainable,
            frozen_params=frozen or None,
            loss=loss,
            optimizer=optim,
            artifact_directory=where,
            additional_output_names=[OUTPUT_NAME],
        )


def _libraries(training: TrainingAPI) -> dict[str, str]:
    """Versions of the libraries that shaped the artifacts."""
    return {"onnx": onnx.__version__, "onnxruntime": training.version, "numpy": np.__version__}


def _write_tier(
    forward: onnx.ModelProto, plan: WidthPlan, card: ModelCard, tier: str, out: Path, optimizer: Optimizer,
    scaler: bool, proximal: bool, training: TrainingAPI,
) -> TierManifest:
    """Write one tier's training artifacts, inference and portable graphs, and manifest into `out/<tier>/`."""
    rate = tier_rate(tier)
    started = time.perf_counter()
    trainable, frozen = list(plan.trainable), list(plan.frozen)
    shapes = plan.param_shapes(rate)
    inference = cut_forward(forward, plan, rate)
    tier_dir = out / tier
    tier_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tier_dir, prefix=".staging-") as staging:
        stage = Path(staging)
        training_forward = for_ort_training(cut_forward(forward, plan, rate, class_mask=True, scaler=scaler))
        _generate(training, training_forward, trainable, frozen, shapes, optimizer, stage, proximal)
        onnx.save(inference, stage / "inference.onnx")
        step_forward = cut_forward(forward, plan, rate, class_mask=True, scaler=scaler, params_as_inputs=True)
        step = build_step_graph(step_forward, trainable, frozen, optimizer, proximal=proximal, momentum=False)
        onnx.save(step, stage / STEP_FILE)
        evaluation = cut_forward(forward, plan, rate, params_as_inputs=True)
        onnx.save(evaluation, stage / FORWARD_FILE)
        names = [*ARTIFACT_FILES, *([STATISTICS_FILE] if card.batch_norm else [])]
        if card.batch_norm:
            onnx.save(statistics_graph(evaluation), stage / STATISTICS_FILE)
        check = check_tier(stage, training, trainable, card.input_shape, card.num_classes, rate, optimizer)
        files = {name: _sha256(stage / name) for name in names}
        for name in names:
            os.replace(stage / name, tier_dir / name)
        sync_folder(tier_dir)  # the renames survive a power cut before the manifest names the files
    manifest = TierManifest(
        model=card,
        tier=tier,
        rate=rate,
        macs=forward_macs(inference),
        optimizer=optimizer,
        input_name=INPUT_NAME,
        input_shape=["N", *card.input_shape],
        scaler=scaler,
        class_mask=True,
        proximal=proximal,
        output_name=OUTPUT_NAME,
        params=[ParamInfo(name=n, shape=list(s), trainable=n not in plan.frozen, cuts=list(plan.cuts[n]))
                for n, s in shapes.items()],
        files=files,
        libraries=_libraries(training),
    )
    manifest.save(tier_dir / MANIFEST_NAME)  # last: a manifest only ever describes files in place
    log.info(
        "exported %s tier %s (rate %g): %d params, %d artifact bytes in %.2fs; one step on both backends differs by "
        "%.2g (largest update %.2g), gradient vs finite differences %s",
        card.name, tier, rate, manifest.param_count, manifest.artifact_bytes, time.perf_counter() - started,
        check.backend_difference, check.largest_update,
        "not compared (AdamW)" if optimizer == "adamw" else f"{check.finite_difference_error:.2g}",
    )
    return manifest


def export_model(
    forward: onnx.ModelProto,
    card: ModelCard,
    tiers: Iterable[str],
    out_dir: str | os.PathLike[str],
    optimizer: Optimizer = "sgd",
    scaler: bool = False,
    proximal: bool = False,
) -> ExportIndex:
    """Export a normalized full-width forward graph (models.onnx_import) as tiers, and write `out_dir/index.json`.

    `proximal` makes the loss FedProx's cross-entropy + mu/2 ||w - w_global||^2, with `mu` and
    `<param>.global` as inputs of the training graph (set each round, no re-export).
    `scaler` adds HeteroFL's scaler input to the training graph. Off by default: a BatchNorm
    training with batch statistics cancels it exactly (forward and gradients), while the running
    averages it leaves behind come out 1/rate too large; without batch norm it inflates the
    narrow tiers' activations and destabilises training at usual learning rates.
    A model whose widths cannot be cut is exported as tier a only (plain FedAvg), with a warning
    naming what blocks it.
    """
    tiers = list(dict.fromkeys(tiers))
    for tier in tiers:
        tier_rate(tier)  # fail on an unknown tier before writing anything
    plan = analyse(forward)
    if not plan.cuttable and tiers != ["a"]:
        log.warning("%s: no width can be cut, so it is exported as one tier (a): %s", card.name,
                    "; ".join(plan.blockers()) or "every channel group is fixed")
        tiers = ["a"]
    training = load_training_api()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_NAME).unlink(missing_ok=True)  # an export that fails half-way leaves no index to serve
    manifests = {tier: _write_tier(forward, plan, card, tier, out, optimizer, scaler, proximal, training)
                 for tier in tiers}
    atomic_write(out / GLOBAL_MODEL_FILE, lambda file: file.write(cut_forward(forward, plan, 1.0).SerializeToString()))
    global_model = _sha256(out / GLOBAL_MODEL_FILE)
    ordered = sorted(manifests, key=list(TIER_RATES).index)
    groups = {name: WidthGroup(size=size, pinned=why) for name, (size, why) in plan.groups.items()}
    index = ExportIndex(model=card, tiers={t: f"{t}/{MANIFEST_NAME}" for t in ordered}, global_model=global_model,
                        groups=groups)
    index.save(out / INDEX_NAME)
    return index


def zoo_card(spec: ModelSpec) -> ModelCard:
    """The card of a zoo model."""
    return ModelCard(name=spec.name, input_shape=list(spec.input_shape), num_classes=spec.num_classes,
                     batch_norm=spec.batch_norm, recipe=spec)


def export_all(
    spec: ModelSpec,
    tiers: Iterable[str],
    out_dir: str | os.PathLike[str],
    optimizer: Optimizer = "sgd",
    scaler: bool = False,
    proximal: bool = False,
) -> ExportIndex:
    """Export a zoo model's tiers through the same path as a user's model (its full-width graph, then `export_model`)."""
    forward, _ = normalize(build_forward(spec, init_global_params(spec)))
    return export_model(forward, zoo_card(spec), tiers, out_dir, optimizer, scaler, proximal)
