"""Held-out evaluation of the global model on the aggregator (plain onnxruntime inference)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnxruntime

from models.data import Dataset
from models.scoring import score_logits
from models.slicing import slice_params
from models.zoo import INPUT_NAME, ModelSpec, build_forward, init_global_params, param_shapes


class HeldOutEvaluator:
    """Runs a forward graph with weights fed as inputs over a fixed test set, one session per width."""

    def __init__(self, test: Dataset, batch_size: int = 1024) -> None:
        self._test = test
        self._batch_size = batch_size
        self._sessions: dict[tuple[str, float], onnxruntime.InferenceSession] = {}

    def _session(self, spec: ModelSpec, rate: float) -> onnxruntime.InferenceSession:
        key = (spec.model_dump_json(), rate)
        if key not in self._sessions:
            shapes = param_shapes(spec, rate)
            params = slice_params(init_global_params(spec), shapes)
            graph = build_forward(spec, rate, params, params_as_inputs=True)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1
            self._sessions[key] = onnxruntime.InferenceSession(
                graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        return self._sessions[key]

    def evaluate(self, weights: Mapping[str, np.ndarray], spec: ModelSpec, rate: float = 1.0) -> tuple[float, float]:
        """(mean cross-entropy loss, accuracy) on the test set of `weights` at width `rate`."""
        session = self._session(spec, rate)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(self._test), self._batch_size):
            x, y = self._test.x[i : i + self._batch_size], self._test.y[i : i + self._batch_size]
            (logits,) = session.run(None, {INPUT_NAME: x, **weights})
            batch_loss, batch_correct = score_logits(logits, y)
            loss_sum += batch_loss
            correct += batch_correct
        n = max(len(self._test), 1)
        return loss_sum / n, correct / n
