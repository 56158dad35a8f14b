"""What a device with no usable result sends: a loss past what an update may carry is divergence (declined, not an
internal error), and a measurement of a global model gone bad is left out of an update instead of failing it."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.declines import declined_task
from edge_client.stages import TrainingDiverged, encode_update, trained_delta
from edge_client.trainer import EvalStats, TrainStats
from protocol.frame import decode_frame
from protocol.messages import MAX_LOSS, TrainTask, Update

WEIGHTS = {"w": np.ones((3, 2), np.float32)}


def _task() -> TrainTask:
    return TrainTask(round=4, model_version=3, tier="a", manifest_sha256="0" * 64, artifacts={}, deadline=1e10,
                     epochs=1, batch_size=8, learning_rate=0.1)


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), 6.5e18, -2 * MAX_LOSS])
def test_a_loss_past_what_an_update_carries_is_divergence_and_its_task_is_declined(loss: float) -> None:
    with pytest.raises(TrainingDiverged, match="training diverged"):
        trained_delta({"w": WEIGHTS["w"] * 2}, WEIGHTS, loss)
    assert trained_delta({"w": WEIGHTS["w"] * 2}, WEIGHTS, MAX_LOSS)["w"].sum() == 6.0
    decline = declined_task(_task(), 120)
    assert (decline.round, decline.base_version, decline.tier, decline.num_samples, decline.declined) == (4, 3, "a", 120,
                                                                                                          True)


def test_a_measurement_past_what_an_update_carries_is_left_out() -> None:
    stats = TrainStats(steps=5, samples_seen=40, loss=0.5, accuracy=0.8, seconds=1.0)
    bad, good = EvalStats(loss=1e13, accuracy=0.1, samples=20), EvalStats(loss=0.7, accuracy=0.6, samples=20)
    encoded = encode_update("f", "d", _task(), {"w": WEIGHTS["w"] * 0.1}, WEIGHTS, stats, bad, 40, "float32", None, None,
                            after=good)
    body = decode_frame(encoded.frame).body
    assert isinstance(body, Update) and body.train_loss == 0.5
    assert (body.eval_loss, body.eval_accuracy, body.eval_samples) == (None, None, 0)
    assert (body.personal_loss, body.personal_accuracy) == (0.7, 0.6)
