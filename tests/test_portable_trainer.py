"""The portable backend (step graph on plain onnxruntime) trains like the onnxruntime-training backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_client.backends import open_trainer, resolve_backend
from models.data import Dataset, load_digits
from models.export import export_all
from models.manifest import TierManifest
from models.zoo import ModelSpec, init_global_params
from tests.tiers import zoo_weights

SPECS = [ModelSpec(arch="mlp"), ModelSpec(arch="mlp", batch_norm=True), ModelSpec(arch="cnn", batch_norm=True)]


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    ds = load_digits()
    order = np.random.default_rng(0).permutation(len(ds))
    return ds.subset(order[:200]), ds.subset(order[1500:])


@pytest.fixture(scope="module", params=SPECS, ids=lambda s: s.name)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, Path]:
    out = tmp_path_factory.mktemp(request.param.name)
    export_all(request.param, ["a", "c"], out)
    return request.param, out


@pytest.mark.parametrize(("tier", "logit_adjust"), [("a", 0.0), ("c", 0.0), ("a", 1.0)])
def test_portable_training_matches_ort_training(exported, digits, tier, logit_adjust):
    spec, out = exported
    train, test = digits
    manifest = TierManifest.load(out / tier / "manifest.json")
    start = zoo_weights(spec, manifest.rate)
    results = {}
    for backend in ("ort-training", "portable"):
        trainer = open_trainer(backend, out / tier, manifest)
        trainer.set_weights(start)
        stats = trainer.train(train, epochs=1, batch_size=32, learning_rate=0.1, seed=3,  # 7 steps, the last of 8
                              logit_adjust=logit_adjust)
        results[backend] = (stats, trainer.get_weights(), trainer.evaluate(test))
    (ort_stats, ort_weights, ort_eval), (stats, weights, evaluation) = results["ort-training"], results["portable"]
    assert stats.steps == ort_stats.steps == 7 and stats.samples_seen == 200
    assert stats.loss == pytest.approx(ort_stats.loss, rel=1e-4)
    for name, value in ort_weights.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-4, atol=2e-5, err_msg=name)
    assert evaluation.loss == pytest.approx(ort_eval.loss, rel=1e-4)
    assert evaluation.accuracy == pytest.approx(ort_eval.accuracy, abs=0.01)


def test_portable_masking_and_weights_round_trip(exported, digits):
    spec, out = exported
    manifest = TierManifest.load(out / "a" / "manifest.json")
    trainer = open_trainer("portable", out / "a", manifest)
    start = init_global_params(spec)
    trainer.set_weights(start)
    for name, value in trainer.get_weights().items():
        np.testing.assert_array_equal(value, start[name])
    two_classes = digits[0].subset(np.flatnonzero(digits[0].y < 2))
    trainer.train(two_classes, epochs=1, batch_size=16, learning_rate=0.1, seed=0, mask_classes=True)
    last = [n for n in start if n.endswith(".weight") and n.startswith("fc")][-1]
    moved = np.abs(trainer.get_weights()[last] - start[last]).max(axis=1)
    assert (moved[:2] > 0).all() and (moved[2:] == 0).all()
    with pytest.raises(ValueError, match="missing"):
        trainer.set_weights({})


def test_backend_resolution():
    assert resolve_backend("portable") == "portable"
    assert resolve_backend("auto") == "ort-training"  # this environment has the training wheel
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("cuda")


def test_fedprox_term_matches_across_backends_and_pulls_toward_the_global_weights(tmp_path, digits):
    spec = ModelSpec(arch="mlp", hidden=(32,))
    export_all(spec, ["a"], tmp_path, proximal=True)
    manifest = TierManifest.load(tmp_path / "a" / "manifest.json")
    assert manifest.proximal
    start = init_global_params(spec)
    drift = {}
    for mu in (0.0, 1.0):
        trained = {}
        for backend in ("ort-training", "portable"):
            trainer = open_trainer(backend, tmp_path / "a", manifest)
            trainer.set_weights(start)
            trainer.train(digits[0], epochs=2, batch_size=32, learning_rate=0.1, seed=1, proximal_mu=mu)
            trained[backend] = trainer.get_weights()
        for name in start:
            np.testing.assert_allclose(trained["portable"][name], trained["ort-training"][name], rtol=1e-4, atol=2e-5)
        drift[mu] = sum(float(np.sum((trained["portable"][n] - start[n]) ** 2)) for n in start)
    assert drift[1.0] < 0.9 * drift[0.0]


def test_training_stops_at_the_deadline_with_partial_work(exported, digits):
    import time

    spec, out = exported
    trainer = open_trainer("portable", out / "a", TierManifest.load(out / "a" / "manifest.json"))
    trainer.set_weights(init_global_params(spec))
    stats = trainer.train(digits[0], epochs=50, batch_size=8, learning_rate=0.01, seed=0, stop_at=time.time())
    assert stats.steps == 1  # the deadline had passed: one step, reported as such
    with pytest.raises(ValueError, match="FedProx"):
        trainer.train(digits[0], epochs=1, batch_size=8, learning_rate=0.01, seed=0, proximal_mu=0.1)
