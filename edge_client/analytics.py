"""The device's side of federated analytics: answer one Query on local data (models.analytics holds the menu).

Data computations run on the split the query names, shaped for the model's input. `model_metrics`
scores the query's attached weights (the global model's slice for the query's tier, checked
against the tier's manifest like a task's) with the tier's `forward.onnx` on plain onnxruntime,
so it touches neither the trainer nor the weights the device holds for its tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime

from edge_client.trainer import check_weights
from models.analytics import QuerySpec, compute, score
from models.data import Dataset, fit_to_model
from models.manifest import FORWARD_FILE, TierManifest
from models.spec import INPUT_NAME
from protocol.messages import Query

BATCH = 512  # samples per forward run when scoring a model


def spec_of(query: Query) -> QuerySpec:
    """The computation and parameters a Query asks for."""
    return QuerySpec(query.computation, tuple(query.input_shape), query.classes, query.low, query.high, query.bins,
                     query.loss_clip)


def data_answer(query: Query, data: Dataset, source: str) -> dict[str, np.ndarray]:
    """A data computation's answer on `data`; ValueError when the data does not fit the query's model."""
    return compute(spec_of(query), data, source)


def checked_weights(tensors: Mapping[str, np.ndarray], manifest: TierManifest) -> dict[str, np.ndarray]:
    """The query's attached weights as float32, once they are exactly the tier's parameters and finite; else ValueError."""
    check_weights(tensors, manifest)
    weights = {name: np.asarray(value) for name, value in tensors.items()}
    if any(value.dtype != np.float32 for value in weights.values()):
        raise ValueError("the attached weights are not all float32")
    if not all(np.isfinite(value).all() for value in weights.values()):
        raise ValueError("the attached weights hold NaN or Inf")
    return weights


def model_answer(query: Query, folder: Path, weights: Mapping[str, np.ndarray], data: Dataset, source: str,
                 threads: int = 1) -> dict[str, np.ndarray]:
    """The model_metrics answer: `weights` scored by the tier's forward graph in `folder` on `data`."""
    spec = spec_of(query)
    fitted = fit_to_model(data, spec.input_shape, spec.classes, source)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(folder / FORWARD_FILE), options, providers=["CPUExecutionProvider"])
    logits = [session.run(None, {INPUT_NAME: fitted.x[i:i + BATCH], **weights})[0] for i in range(0, len(fitted), BATCH)]
    stacked = np.concatenate(logits) if logits else np.zeros((0, spec.classes), np.float32)
    return score(spec, stacked.astype(np.float64), fitted.y)
