"""OrtTrainer on real onnxruntime-training artifacts of the digits MLP, checked against numpy."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from edge_client.trainer import OrtTrainer
from models.data import Dataset, load_digits
from models.export import MANIFEST_NAME, export_all
from models.manifest import TierManifest
from models.zoo import ModelSpec
from tests.tiers import zoo_weights

SPEC = ModelSpec(arch="mlp", image_size=8)  # mlp8: 64 -> 256 -> 256 -> 10
TIERS = ("a", "c")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mlp8")
    export_all(SPEC, TIERS, out)
    return out


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    ds = load_digits()
    order = np.random.default_rng(0).permutation(len(ds))
    return ds.subset(order[:300]), ds.subset(order[1400:])


def _trainer(exported: Path, tier: str) -> OrtTrainer:
    return OrtTrainer(exported / tier, TierManifest.load(exported / tier / MANIFEST_NAME))


def _numpy_eval(weights: Mapping[str, np.ndarray], data: Dataset) -> tuple[float, float]:
    """Flatten -> (Gemm transB=1 -> Relu)* -> Gemm, then mean cross-entropy and argmax accuracy, in float64."""
    h = data.x.reshape(len(data), -1).astype(np.float64)
    layers = sorted({n.split(".")[0] for n in weights}, key=lambda n: int(n[2:]))
    for i, layer in enumerate(layers):
        h = h @ weights[f"{layer}.weight"].astype(np.float64).T + weights[f"{layer}.bias"]
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    shifted = h - h.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(data)), data.y].mean()), float((h.argmax(axis=1) == data.y).mean())


def _random_weights(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (0.2 * rng.normal(size=s)).astype(np.float32) for n, s in shapes.items()}


@pytest.mark.parametrize("tier", TIERS)
def test_checkpoint_holds_the_leading_block_of_the_global_init(exported: Path, tier: str) -> None:
    trainer = _trainer(exported, tier)
    rate = {"a": 1.0, "c": 0.25}[tier]
    expected = zoo_weights(SPEC, rate)
    got = trainer.get_weights()
    assert {n: v.shape for n, v in got.items()} == {n: v.shape for n, v in expected.items()}
    for n in expected:
        np.testing.assert_array_equal(got[n], expected[n], err_msg=n)


@pytest.mark.parametrize("tier", TIERS)
def test_set_then_get_weights_round_trips(exported: Path, tier: str) -> None:
    trainer = _trainer(exported, tier)
    shapes = {p.name: tuple(p.shape) for p in trainer.manifest.params}
    weights = _random_weights(shapes, 1)
    trainer.set_weights(weights)
    got = trainer.get_weights()
    assert set(got) == set(weights)
    for n in weights:
        assert got[n].dtype == np.float32
        np.testing.assert_array_equal(got[n], weights[n], err_msg=n)
    # get_weights returns copies: changing them does not change the trainer
    got["fc1.bias"][:] = 123.0
    np.testing.assert_array_equal(trainer.get_weights()["fc1.bias"], weights["fc1.bias"])
    # float64 input is accepted and stored as float32
    trainer.set_weights({n: v.astype(np.float64) * 2 for n, v in weights.items()})
    np.testing.assert_array_equal(trainer.get_weights()["fc2.weight"], weights["fc2.weight"] * 2)


def test_set_weights_rejects_wrong_shape_or_names(exported: Path) -> None:
    trainer = _trainer(exported, "a")
    good = trainer.get_weights()
    with pytest.raises(ValueError, match=r"fc2\.weight.*\(256, 128\)"):
        trainer.set_weights({**good, "fc2.weight": np.zeros((256, 128), np.float32)})
    with pytest.raises(ValueError, match=r"missing \['fc3\.bias'\]"):
        trainer.set_weights({n: v for n, v in good.items() if n != "fc3.bias"})
    with pytest.raises(ValueError, match=r"extra \['fc9\.weight'\]"):
        trainer.set_weights({**good, "fc9.weight": np.zeros((1,), np.float32)})
    # a refused call changed nothing
    for n, v in trainer.get_weights().items():
        np.testing.assert_array_equal(v, good[n])


@pytest.mark.parametrize("tier", TIERS)
def test_evaluate_matches_numpy_forward(exported: Path, digits: tuple[Dataset, Dataset], tier: str) -> None:
    trainer = _trainer(exported, tier)
    shapes = {p.name: tuple(p.shape) for p in trainer.manifest.params}
    _, test = digits
    for weights in (trainer.get_weights(), _random_weights(shapes, 7)):
        trainer.set_weights(weights)
        stats = trainer.evaluate(test, batch_size=128)  # several batches, the last one partial
        loss, accuracy = _numpy_eval(weights, test)
        assert stats.samples == len(test) == 397
        assert 0.0 <= stats.accuracy <= 1.0
        assert stats.accuracy == pytest.approx(accuracy, abs=1e-4)
        assert stats.loss == pytest.approx(loss, abs=1e-4)
        # evaluation does not touch the weights
        for n, v in trainer.get_weights().items():
            np.testing.assert_array_equal(v, weights[n])


@pytest.mark.parametrize(("epochs", "batch_size"), [(5, 32), (4, 64)])
def test_train_reduces_loss_and_counts_steps(exported: Path, digits: tuple[Dataset, Dataset], epochs: int, batch_size: int) -> None:
    trainer = _trainer(exported, "a")
    train, _ = digits
    start = trainer.get_weights()
    loss_before, acc_before = _numpy_eval(start, train)
    stats = trainer.train(train, epochs=epochs, batch_size=batch_size, learning_rate=0.3, seed=3)
    assert stats.steps == epochs * math.ceil(len(train) / batch_size)
    assert stats.samples_seen == epochs * len(train)
    assert 0.0 <= stats.accuracy <= 1.0 and stats.seconds >= 0.0
    trained = trainer.get_weights()
    loss_after, acc_after = _numpy_eval(trained, train)
    assert loss_after < loss_before - 0.1, (loss_before, loss_after)
    assert acc_after > acc_before + 0.3
    after = trainer.evaluate(train)
    assert after.loss == pytest.approx(loss_after, abs=1e-4)
    # the update a device would send: finite, non-zero in every tensor
    for n in start:
        delta = trained[n] - start[n]
        assert np.isfinite(delta).all(), n
        assert np.abs(delta).max() > 0, n


def test_train_is_deterministic_for_a_seed(exported: Path, digits: tuple[Dataset, Dataset]) -> None:
    train, _ = digits
    runs = []
    for seed in (5, 5, 6):
        trainer = _trainer(exported, "c")
        trainer.train(train, epochs=1, batch_size=32, learning_rate=0.1, seed=seed)
        runs.append(trainer.get_weights())
    for n in runs[0]:
        np.testing.assert_array_equal(runs[0][n], runs[1][n], err_msg=n)
    assert any(not np.array_equal(runs[0][n], runs[2][n]) for n in runs[0])


@pytest.mark.parametrize("logit_adjust", [0.0, 1.0, 2.5])
def test_one_sgd_step_matches_numpy_gradient(exported: Path, digits: tuple[Dataset, Dataset], logit_adjust: float) -> None:
    """A single full-batch step moves every weight by -lr * (numpy gradient of the mean cross-entropy); with logit
    adjustment tau the loss sees logits + tau * log(the batch's label shares), a class it lacks masked out."""
    trainer = _trainer(exported, "c")
    train, _ = digits
    batch = train.subset(np.flatnonzero(train.y != 7)[:40])  # class 7 absent: masked under logit adjustment
    w = {n: v.astype(np.float64) for n, v in trainer.get_weights().items()}
    lr = 0.05
    trainer.train(batch, epochs=1, batch_size=len(batch), learning_rate=lr, seed=0, logit_adjust=logit_adjust)
    got = trainer.get_weights()
    counts = np.bincount(batch.y, minlength=10)
    assert counts[7] == 0 and (counts > 0).sum() == 9
    offsets = np.zeros(10) if not logit_adjust else np.where(
        counts > 0, logit_adjust * np.log(np.maximum(counts, 1) / counts.sum()), -1e4)

    x = batch.x.reshape(len(batch), -1).astype(np.float64)
    acts, h = [x], x
    for layer in ("fc1", "fc2"):
        h = np.maximum(h @ w[f"{layer}.weight"].T + w[f"{layer}.bias"], 0.0)
        acts.append(h)
    logits = h @ w["fc3.weight"].T + w["fc3.bias"] + offsets
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = p
    g[np.arange(len(batch)), batch.y] -= 1.0
    g /= len(batch)
    grads = {}
    for i, layer in reversed(list(enumerate(("fc1", "fc2", "fc3")))):
        grads[f"{layer}.weight"] = g.T @ acts[i]
        grads[f"{layer}.bias"] = g.sum(axis=0)
        g = (g @ w[f"{layer}.weight"]) * (acts[i] > 0)
    for n in w:
        np.testing.assert_allclose(got[n], w[n] - lr * grads[n], rtol=0, atol=2e-6, err_msg=n)


@pytest.mark.parametrize("tier", TIERS)
def test_class_masking_leaves_absent_classes_untouched(exported: Path, digits: tuple[Dataset, Dataset], tier: str) -> None:
    train, _ = digits
    two_classes = train.subset(np.flatnonzero(train.y < 2))
    trainer = _trainer(exported, tier)
    start = zoo_weights(SPEC, trainer.manifest.rate)
    moved = {}
    for masked in (True, False):
        trainer.set_weights(start)
        trainer.train(two_classes, epochs=2, batch_size=16, learning_rate=0.1, seed=0, mask_classes=masked)
        moved[masked] = np.abs(trainer.get_weights()["fc3.weight"] - start["fc3.weight"]).max(axis=1)
    assert (moved[True][:2] > 0).all() and (moved[True][2:] == 0).all()  # only the rows of classes 0 and 1 learn
    assert (moved[False][2:] > 0).all()  # unmasked, the softmax pushes every other class down
