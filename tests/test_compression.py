"""Error feedback and selective upload on the device."""

import numpy as np

from edge_client.compression import ErrorFeedback


def _tensors(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((3, 4), value, np.float32), "b": np.full(3, value, np.float32)}


def test_dropped_mass_is_carried_into_the_next_round_and_survives_restart(tmp_path):
    feedback = ErrorFeedback(tmp_path, "a")
    intended = feedback.compensate(_tensors(1.0))
    sent = {name: np.round(v * 0.6, 1) for name, v in intended.items()}  # a lossy "codec" that drops 40%
    feedback.remember(intended, sent)
    restarted = ErrorFeedback(tmp_path, "a")  # a new process reads the residual from disk
    np.testing.assert_allclose(restarted.residual["w"], 0.4, rtol=1e-6)
    np.testing.assert_allclose(restarted.compensate(_tensors(1.0))["w"], 1.4, rtol=1e-6)


def test_error_feedback_restores_the_dropped_mass_over_rounds(tmp_path):
    feedback = ErrorFeedback(tmp_path, "a")
    total_sent, rounds = np.zeros(12), 50
    for _ in range(rounds):
        intended = feedback.compensate({"w": np.full(12, 0.1, np.float32)})
        top3 = np.abs(intended["w"]) >= np.sort(np.abs(intended["w"]))[-3]  # a top-k "codec" keeping 3 of 12
        sent = {"w": np.where(top3, intended["w"], 0).astype(np.float32)}
        feedback.remember(intended, sent)
        total_sent += sent["w"]
    # Over many rounds every element gets through: sent + residual equals everything intended.
    np.testing.assert_allclose(total_sent + feedback.residual["w"], np.full(12, 0.1 * rounds), rtol=1e-5)
    assert np.abs(feedback.residual["w"]).max() < 0.5


def test_selective_upload_threshold_and_skipped_update_joins_residual(tmp_path):
    feedback = ErrorFeedback(tmp_path, "a", skip_below=0.01)
    weights = _tensors(1.0)
    assert feedback.insignificant(_tensors(0.001), weights)
    assert not feedback.insignificant(_tensors(0.1), weights)
    feedback.remember(_tensors(0.001), None)
    np.testing.assert_allclose(feedback.compensate(_tensors(0.0))["w"], 0.001)
    assert not ErrorFeedback(tmp_path, "b").insignificant(_tensors(0.0), weights)  # threshold 0 never skips
