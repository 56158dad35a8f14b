"""Held-out evaluation of the global model on the aggregator (plain onnxruntime inference).

The graphs are the export's own: a tier's `forward.onnx` for its width, and the full-width
`model.onnx` with its parameters turned into inputs for rate 1, so any exported model is
evaluated as exported, never rebuilt.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnxruntime

from aggregator.store.artifacts import ArtifactStore
from models.data import Dataset, fit_to_model
from models.manifest import FORWARD_FILE
from models.scoring import score_logits
from models.spec import INPUT_NAME
from models.tier_graph import params_as_inputs


class HeldOutEvaluator:
    """Runs the export's forward graphs with weights fed as inputs over a fixed test set, one session per width."""

    def __init__(self, test: Dataset, artifacts: ArtifactStore, batch_size: int = 1024,
                 source: str = "the held-out data") -> None:
        card = artifacts.card
        self._test = fit_to_model(test, card.input_shape, card.num_classes, source)
        self._artifacts = artifacts
        self._batch_size = batch_size
        self._sessions: dict[float, onnxruntime.InferenceSession] = {}

    def _graph(self, rate: float) -> bytes:
        """The forward graph at width `rate` with its parameters as inputs (serialized)."""
        artifacts = self._artifacts
        if rate == 1.0:
            return params_as_inputs(artifacts.global_forward(), artifacts.param_names).SerializeToString()
        tier = next((t for t in artifacts.tiers.values() if t.manifest.rate == rate), None)
        if tier is None:
            rates = sorted(t.manifest.rate for t in artifacts.tiers.values())
            raise ValueError(f"no exported tier has width rate {rate:g} (the export has {rates})")
        found = artifacts.read(tier.files[FORWARD_FILE])
        assert found is not None  # every file a manifest names is in the store
        return found[1]

    def _session(self, rate: float) -> onnxruntime.InferenceSession:
        if rate not in self._sessions:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1
            self._sessions[rate] = onnxruntime.InferenceSession(self._graph(rate), options,
                                                                providers=["CPUExecutionProvider"])
        return self._sessions[rate]

    def evaluate(self, weights: Mapping[str, np.ndarray], rate: float = 1.0) -> tuple[float, float]:
        """(mean cross-entropy loss, accuracy) on the test set of `weights` (every parameter at width `rate`)."""
        session = self._session(rate)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(self._test), self._batch_size):
            x, y = self._test.x[i : i + self._batch_size], self._test.y[i : i + self._batch_size]
            (logits,) = session.run(None, {INPUT_NAME: x, **weights})
            batch_loss, batch_correct = score_logits(logits, y)
            loss_sum += batch_loss
            correct += batch_correct
        n = max(len(self._test), 1)
        return loss_sum / n, correct / n
