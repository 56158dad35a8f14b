"""SCAFFOLD (option II): the variates against the paper's rules on hand-made numbers (the server's delta c_i derived
from the update), the per-step correction on both training backends, the device's c_i on disk, the server's c across a
restart, an update carrying scaffold/ tensors refused, and an uplink of the update alone."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from aggregator.cli import configure_parser
from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.options import resolve_options
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.scaffold import Scaffold, VariateMean, derived_change
from edge_client.backends import open_trainer
from edge_client.declines import SENT_KEPT, SentUpdates
from edge_client.scaffold import ControlVariate, Variate, variate_shapes
from edge_client.stages import TaskRefused, task_weights
from models.data import Dataset
from models.export import export_all
from models.manifest import TierManifest
from models.zoo import ModelSpec
from protocol.control import CONTROL_PREFIX, split_control, with_control
from protocol.messages import AttachedWeights, Reject, RejectReason, TrainTask, Update, new_id

SPEC = ModelSpec(arch="mlp", image_size=8, hidden=(8,))


# -- the server's rule, element by element ----------------------------------------------------------------------

def test_server_variate_follows_the_rule_element_by_element_across_tiers() -> None:
    """c <- c + (|S|/N) mean over the answering devices holding each element; an element nobody holds keeps c."""
    c = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    wide = np.full((4, 3), 1.0, np.float32)  # a full-width device
    narrow = np.array([[3.0, -1.0], [0.5, 2.0]], np.float32)  # a tier holding the leading 2 x 2 block
    bias_wide, bias_narrow = np.array([2.0, 4.0, 6.0], np.float32), np.array([-2.0, 0.0], np.float32)
    mean = VariateMean({"w": (4, 3), "b": (3,), "untouched": (2,)})
    mean.add({"w": wide, "b": bias_wide})
    mean.add({"w": narrow, "b": bias_narrow})
    control = {"w": c, "b": np.zeros(3, np.float32), "untouched": np.array([7.0, 8.0], np.float32)}
    new = mean.step(control, population=5)  # N = 5, |S| = 2
    expected_w = c.astype(np.float64).copy()
    for i in range(4):
        for j in range(3):
            holders = [wide[i, j]] + ([narrow[i, j]] if i < 2 and j < 2 else [])
            expected_w[i, j] += 2 / 5 * sum(holders) / len(holders)
    np.testing.assert_allclose(new["w"], expected_w, rtol=1e-6)
    np.testing.assert_allclose(new["b"], [2 / 5 * 0.0, 2 / 5 * 2.0, 2 / 5 * 6.0], rtol=1e-6)
    np.testing.assert_array_equal(new["untouched"], [7.0, 8.0])  # held by no device: unchanged
    np.testing.assert_array_equal(control["w"], c)  # the input is not changed
    assert Scaffold().population(available=1, answered=2) == 2 and Scaffold(10).population(3, 2) == 10


def test_the_derived_change_is_the_papers_rule_on_the_tiers_slice_of_c() -> None:
    """delta c_i = -c + (x - y_i)/(K lr) with c sliced to the tier (HeteroFL), any K (partial work); none for K = 0."""
    c = {"w": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], np.float32),
         "b": np.array([0.5, -0.5, 1.5], np.float32)}
    x = {"w": np.array([[0.0, 1.0], [2.0, 3.0]], np.float32), "b": np.array([1.0, 1.0], np.float32)}  # a 2-wide tier
    y = {"w": np.array([[0.5, 0.0], [2.0, 4.0]], np.float32), "b": np.array([0.0, 2.0], np.float32)}
    update = {n: y[n] - x[n] for n in x}
    shapes = {"w": (2, 2), "b": (2,)}
    for steps, lr in [(4, 0.25), (3, 0.1)]:  # K = 3: a device stopped early at its deadline
        derived = derived_change(update, c, shapes, steps, lr)
        assert derived is not None
        expected_w = [[-1 + (0 - 0.5) / (steps * lr), -2 + (1 - 0) / (steps * lr)],
                      [-4 + 0.0, -5 + (3 - 4) / (steps * lr)]]
        np.testing.assert_allclose(derived["w"], expected_w, rtol=1e-6)
        np.testing.assert_allclose(derived["b"], [-0.5 + 1 / (steps * lr), 0.5 - 1 / (steps * lr)], rtol=1e-6)
    assert derived_change(update, c, shapes, 0, 0.1) is None  # no steps: no change
    np.testing.assert_array_equal(c["w"][0], [1.0, 2.0, 3.0])  # the inputs are not changed


# -- the device's rule and its file -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def art_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art")
    export_all(SPEC, ["a", "c"], out)
    return out


def _manifest(art: Path, tier: str = "a") -> TierManifest:
    return TierManifest.load(art / tier / "manifest.json")


def test_device_variate_follows_the_rule_and_survives_a_restart(art_dir: Path, tmp_path: Path) -> None:
    """c_i+ = c_i - c + (x - y) / (K lr); the aggregator derives the same delta c_i from the update; c_i is on disk
    for the next start; no steps, no change."""
    manifest = _manifest(art_dir)
    shapes = variate_shapes(manifest)
    assert set(shapes) == {p.name for p in manifest.params if p.trainable}
    rng = np.random.default_rng(0)
    own = ControlVariate(tmp_path, manifest)
    assert all(not v.any() for v in own.value.values())  # c_i starts at zero
    own.commit({n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()})  # some earlier round
    c_i = {n: v.copy() for n, v in own.value.items()}
    c = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    x = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    y = {n: (x[n] + 0.1 * rng.normal(size=s)).astype(np.float32) for n, s in shapes.items()}
    steps, lr = 7, 0.05
    change = own.change(c, {n: y[n] - x[n] for n in x}, steps, lr)
    for name in shapes:
        c_plus = c_i[name].astype(np.float64) - c[name] + (x[name].astype(np.float64) - y[name]) / (steps * lr)
        np.testing.assert_allclose(change[name], c_plus - c_i[name], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(own.correction(c)[name], c[name] - c_i[name], rtol=1e-6)
    derived = derived_change({n: y[n] - x[n] for n in x}, c, shapes, steps, lr)  # what the server folds, same formula
    for name in shapes:
        np.testing.assert_allclose(derived[name], change[name], rtol=1e-6, atol=1e-6)
    assert all(not v.any() for v in own.change(c, {n: y[n] - x[n] for n in x}, 0, lr).values())
    own.commit(change)
    again = ControlVariate(tmp_path, manifest)  # a restarted device
    for name in shapes:
        np.testing.assert_array_equal(again.value[name], c_i[name] + change[name])


def test_a_refused_update_rolls_its_variate_change_back_and_is_declined(art_dir: Path, tmp_path: Path) -> None:
    """The aggregator moves c only by accepted updates: the change committed with an update it refused is undone (and
    saved), once; another update's change stays. A refusal of what the update carried is answered with a decline of
    its task; one of a stale round is not; only the last SENT_KEPT updates sent are kept."""
    manifest = _manifest(art_dir)
    shapes = variate_shapes(manifest)
    rng = np.random.default_rng(1)
    own, sent = ControlVariate(tmp_path, manifest), SentUpdates()
    c = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}

    def train_and_send(msg_id: str, round_number: int = 1) -> Update:
        variate = Variate(own, c)
        variate.change({n: rng.normal(0, 0.01, size=s).astype(np.float32) for n, s in shapes.items()}, 5, 0.05)
        variate.commit()
        update = Update(update_id=new_id(), round=round_number, base_version=round_number - 1, tier="a", num_samples=10,
                        steps=5, train_loss=1.0, train_accuracy=0.5, train_seconds=0.1, eval_loss=1.0,
                        eval_accuracy=0.5, eval_samples=3)
        sent.sent(msg_id, update, variate)
        return update

    def refusal(msg_id: str | None, reason: RejectReason) -> Reject:
        return Reject(reason=reason, detail="", ref_msg_id=msg_id, round=1)

    train_and_send("accepted")
    after_accepted = {n: v.copy() for n, v in own.value.items()}
    refused = train_and_send("refused")
    assert not all(np.array_equal(own.value[n], after_accepted[n]) for n in shapes)
    decline = sent.refused(refusal("refused", RejectReason.OUTLIER))
    assert decline is not None and decline.declined and decline.update_id != refused.update_id
    assert (decline.round, decline.base_version, decline.tier, decline.steps, decline.eval_loss) == (1, 0, "a", 0, None)
    assert sent.refused(refusal("refused", RejectReason.OUTLIER)) is None and sent.refused(refusal(None, RejectReason.OUTLIER)) is None
    for name in shapes:
        np.testing.assert_allclose(own.value[name], after_accepted[name], atol=1e-5)
        np.testing.assert_allclose(ControlVariate(tmp_path, manifest).value[name], after_accepted[name], atol=1e-5)
    train_and_send("late", 2)
    after_late = {n: v.copy() for n, v in own.value.items()}
    assert sent.refused(refusal("late", RejectReason.STALE_ROUND)) is None  # rolled back, but nothing to decline
    assert not all(np.array_equal(own.value[n], after_late[n]) for n in shapes)
    for i in range(SENT_KEPT):
        train_and_send(f"later-{i}")
    assert sent.refused(refusal("accepted", RejectReason.OUTLIER)) is None  # forgotten: SENT_KEPT updates were sent since


def test_a_corrupt_or_foreign_variate_file_is_named_and_reset_to_zero(art_dir: Path, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    own = ControlVariate(tmp_path, _manifest(art_dir))
    own.commit({n: np.ones(s, np.float32) for n, s in own.shapes.items()})
    own.path.write_bytes(b"PK\x03\x04 not really a zip")
    with caplog.at_level(logging.WARNING):
        reset = ControlVariate(tmp_path, _manifest(art_dir))
    assert str(own.path) in caplog.text and "starts again from c_i = 0" in caplog.text
    assert all(not v.any() for v in reset.value.values())
    reset.commit({n: np.ones(s, np.float32) for n, s in reset.shapes.items()})
    caplog.clear()
    other = ControlVariate(tmp_path, _manifest(art_dir).model_copy(update={"model": _manifest(art_dir).model.model_copy(
        update={"name": "another"})}))  # the same tier of another export
    assert "another model" in caplog.text and all(not v.any() for v in other.value.values())


def test_a_variate_file_larger_than_the_tier_or_not_decompressing_is_named_and_reset(
        art_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    own = ControlVariate(tmp_path, _manifest(art_dir))
    own.commit({n: np.ones(s, np.float32) for n, s in own.shapes.items()})
    saved = dict(np.load(own.path, allow_pickle=False))
    np.savez(own.path, **saved, extra=np.zeros(1 << 20, np.float32))  # refused before any array is read
    with caplog.at_level(logging.WARNING):
        reset = ControlVariate(tmp_path, _manifest(art_dir))
    assert str(own.path) in caplog.text and "more than the tier's variate takes" in caplog.text
    assert all(not v.any() for v in reset.value.values())
    np.savez_compressed(own.path, **saved)
    data = bytearray(own.path.read_bytes())
    data[60:200] = bytes(b ^ 0x55 for b in data[60:200])  # deflate data that does not decompress (zlib.error)
    own.path.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        reset = ControlVariate(tmp_path, _manifest(art_dir))
    assert str(own.path) in caplog.text and "starts again from c_i = 0" in caplog.text
    assert all(not v.any() for v in reset.value.values())


def test_a_device_takes_c_beside_the_weights_only_whole_finite_and_of_the_tier(art_dir: Path) -> None:
    """stages.task_weights: a SCAFFOLD task's c must be every trainable parameter's, finite; a delta applies to it."""
    manifest = _manifest(art_dir, "c")
    weights = {p.name: np.zeros(p.shape, np.float32) for p in manifest.params}
    control = {n: np.full(s, 0.5, np.float32) for n, s in variate_shapes(manifest).items()}
    task = TrainTask(round=1, model_version=3, tier="c", manifest_sha256="0" * 64, artifacts={}, deadline=1e10, epochs=1,
                     batch_size=8, learning_rate=0.1, weights=AttachedWeights(control=True))
    held = task_weights(task, with_control(weights, control), manifest, None)
    assert split_control(held)[1].keys() == control.keys()
    name = next(iter(control))
    for bad, reason in [({k: v for k, v in control.items() if k != name}, RejectReason.BAD_TENSOR),
                        ({**control, name: np.full(control[name].shape, np.inf, np.float32)}, RejectReason.NON_FINITE),
                        ({**control, name: np.zeros((1, *control[name].shape), np.float32)}, RejectReason.BAD_TENSOR)]:
        with pytest.raises(TaskRefused) as refused:
            task_weights(task, with_control(weights, bad), manifest, None)
        assert refused.value.reason is reason
    plain = task.model_copy(update={"weights": AttachedWeights()})
    with pytest.raises(TaskRefused, match="not a float32 parameter"):  # c where the task says none rides along
        task_weights(plain, with_control(weights, control), manifest, None)
    delta_task = task.model_copy(update={"model_version": 4, "weights": AttachedWeights(control=True, delta_from=3)})
    moved = task_weights(delta_task, with_control({}, {name: np.ones_like(control[name])}), manifest, (3, held))
    np.testing.assert_array_equal(split_control(moved)[1][name], control[name] + 1)


# -- the per-step correction on both backends -------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["ort-training", "portable"])
def test_one_corrected_step_is_the_plain_step_minus_lr_times_the_correction(art_dir: Path, backend: str) -> None:
    manifest = _manifest(art_dir)
    rng = np.random.default_rng(1)
    data = Dataset(rng.normal(size=(32, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 32))
    correction = {n: rng.normal(size=s).astype(np.float32) for n, s in variate_shapes(manifest).items()}
    trainer = open_trainer(backend, art_dir / "a", manifest)
    start = trainer.get_weights()
    trainer.train(data, 1, 32, 0.1, 0)
    plain = trainer.get_weights()
    trainer.set_weights(start)
    stats = trainer.train(data, 1, 32, 0.1, 0, correction=correction)
    corrected = trainer.get_weights()
    assert stats.steps == 1
    for name, value in plain.items():
        expected = value - 0.1 * correction[name] if name in correction else value
        np.testing.assert_allclose(corrected[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
    trainer.set_weights(start)  # several steps: the backends agree with each other
    trainer.train(Dataset(np.tile(data.x, (3, 1, 1, 1)), np.tile(data.y, 3)), 1, 32, 0.1, 0, correction=correction)
    other = open_trainer("portable" if backend == "ort-training" else "ort-training", art_dir / "a", manifest)
    other.set_weights(start)
    other.train(Dataset(np.tile(data.x, (3, 1, 1, 1)), np.tile(data.y, 3)), 1, 32, 0.1, 0, correction=correction)
    for name, value in trainer.get_weights().items():
        np.testing.assert_allclose(other.get_weights()[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


# -- the server's c in rounds: restart, hostile input -----------------------------------------------------------

def _engine(art: Path, state: Path, fleet_size: int | None = 4) -> RoundEngine:
    registry = DeviceRegistry()
    registry.hello("wide", 10, 0, "a", "ort-training", now=0.0)
    registry.hello("narrow", 30, 0, "c", "ort-training", now=0.0)
    config = EngineConfig(rounds=4, round_timeout_s=60.0, scaffold=Scaffold(fleet_size))
    return RoundEngine(EngineParts(config, FedAvg(min_clients=2), ArtifactStore(art), StateStore(state), registry))


def _answer(engine: RoundEngine, out, seed: int, now: float, **change: object) -> list:
    """An update of a seeded random delta of the task's weights (`change` adds or replaces tensors), after `steps`."""
    steps = change.pop("steps", 1)
    rng = np.random.default_rng([seed, 0 if out.device_id == "wide" else 1])
    weights = split_control(out.tensors)[0]
    tensors = {n: (0.05 * rng.normal(size=v.shape)).astype(np.float32) for n, v in sorted(weights.items())}
    tensors.update(change)
    body = Update(update_id=new_id(), round=out.body.round, base_version=out.body.model_version, tier=out.body.tier,
                  num_samples=10 if out.device_id == "wide" else 30, steps=steps, train_loss=1.0, train_accuracy=0.5,
                  train_seconds=0.1)
    return engine.on_update(out.device_id, new_id(), body, {n: v for n, v in tensors.items() if v is not None}, 100, now)


def _round(engine: RoundEngine, seed: int, now: float, stop_after: int | None = None) -> list:
    tasks = engine.tick(now)
    for out in tasks[:stop_after]:
        assert out.body.weights.control and any(n.startswith(CONTROL_PREFIX) for n in out.tensors)
        assert _answer(engine, out, seed, now + 1) == [] or engine.current_round is None
    return tasks


def _expected_control(c: dict, answers: dict, lr: float, population: int) -> dict:
    """The paper's server rule by hand: c + (|S|/N) x per-element mean over the devices with K > 0 of
    -c + (x - y_i)/(K lr), each over its tier's leading block of c."""
    sums = {n: np.zeros(v.shape) for n, v in c.items()}
    counts = {n: np.zeros(v.shape) for n, v in c.items()}
    devices = 0
    for update, steps in answers.values():
        if not steps:
            continue
        devices += 1
        for name in c:
            block = tuple(slice(0, s) for s in update[name].shape)
            sums[name][block] += -c[name][block].astype(np.float64) - update[name].astype(np.float64) / (steps * lr)
            counts[name][block] += 1
    return {n: c[n] + devices / population * np.divide(sums[n], counts[n], out=np.zeros_like(sums[n]),
                                                     where=counts[n] > 0) for n in c}


def test_tasks_carry_c_sliced_to_the_tier_and_c_moves_by_the_rule_from_the_updates(art_dir: Path, tmp_path: Path) -> None:
    """Two rounds, the second from a non-zero c, devices of two tiers with different K; tasks carry c sliced."""
    engine = _engine(art_dir, tmp_path)
    for number, steps in [(1, {"wide": 3, "narrow": 5}), (2, {"wide": 2, "narrow": 0})]:
        before = {n: v.copy() for n, v in engine.control.items()}
        answers = {}
        for out in engine.tick(10.0 * number):
            weights, control = split_control(out.tensors)
            assert {n: v.shape for n, v in control.items()} == variate_shapes(engine.artifacts.tiers[out.body.tier].manifest)
            for name, value in control.items():  # c = 0 at first, then the committed c, sliced to the tier
                np.testing.assert_array_equal(value, before[name][tuple(slice(0, s) for s in value.shape)])
            answer = _answer(engine, out, number, 10.0 * number + 1, steps=steps[out.device_id])
            assert all(o.body.kind != "reject" for o in answer)
            rng = np.random.default_rng([number, 0 if out.device_id == "wide" else 1])  # _answer's delta, again
            sent = {n: (0.05 * rng.normal(size=v.shape)).astype(np.float32) for n, v in sorted(weights.items())}
            answers[out.device_id] = ({n: sent[n] for n in control}, steps[out.device_id])
            lr = out.body.learning_rate
        assert engine.record.version == number
        expected = _expected_control(before, answers, lr, 4)
        for name, value in engine.control.items():
            np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
            assert value.any()


def test_a_restart_gives_the_same_next_version_and_c_as_no_restart(art_dir: Path, tmp_path: Path) -> None:
    straight = _engine(art_dir, tmp_path / "straight")
    for r in range(3):
        _round(straight, r, 10.0 * r)
    first = _engine(art_dir, tmp_path / "restarted")
    _round(first, 0, 0.0)
    _round(first, 1, 10.0, stop_after=1)  # one of two answers spooled, then the process dies
    second = _engine(art_dir, tmp_path / "restarted")  # a new process on the same state folder
    assert second.record.version == 1 and second.current_round == 2
    for name, value in first.control.items():
        np.testing.assert_array_equal(second.control[name], value)  # c of version 1, as committed
    owed = second.tick(11.0)
    assert len(owed) == 1  # the device that had not answered
    _answer(second, owed[0], 1, 12.0)
    assert second.record.version == 2
    third = _engine(art_dir, tmp_path / "restarted")  # and once more between rounds
    _round(third, 2, 20.0)
    assert third.record.version == straight.record.version == 3
    for name, value in straight.weights.items():
        np.testing.assert_array_equal(third.weights[name], value, err_msg=name)
    for name, value in straight.control.items():
        np.testing.assert_array_equal(third.control[name], value, err_msg=name)


@pytest.mark.parametrize("scaffold", [True, False])
def test_an_update_carrying_scaffold_tensors_is_refused_and_changes_nothing(art_dir: Path, tmp_path: Path,
                                                                           scaffold: bool) -> None:
    """delta c_i is derived, never taken: a device that sends it (SCAFFOLD fleet or not) is refused bad_tensor."""
    registry = DeviceRegistry()
    registry.hello("wide", 10, 0, "a", "ort-training", now=0.0)
    registry.hello("narrow", 30, 0, "c", "ort-training", now=0.0)
    config = EngineConfig(rounds=4, round_timeout_s=60.0, scaffold=Scaffold(4) if scaffold else None)
    engine = RoundEngine(EngineParts(config, FedAvg(min_clients=2), ArtifactStore(art_dir), StateStore(tmp_path), registry))
    tasks = engine.tick(0.0)
    out = next(o for o in tasks if o.device_id == "narrow")
    assert bool(out.body.weights.control) is scaffold is any(n.startswith(CONTROL_PREFIX) for n in out.tensors)
    name = next(iter(variate_shapes(engine.artifacts.tiers["c"].manifest)))
    refused = _answer(engine, out, 0, 1.0, **{CONTROL_PREFIX + name: np.zeros(out.tensors[name].shape, np.float32)})
    assert [o.body.reason for o in refused] == [RejectReason.BAD_TENSOR] and CONTROL_PREFIX + name in refused[0].body.detail
    current = engine.open_round
    assert current is not None and not current.answered and engine.rejected["bad_tensor"] == 1
    assert current.variates is None if not scaffold else current.variates.devices == 0
    if scaffold:  # the honest answers still make the version, c from them alone
        for o in tasks:
            assert all(a.body.kind != "reject" for a in _answer(engine, o, 0, 2.0))
        assert engine.record.version == 1 and all(v.any() for v in engine.control.values())


# -- which options compose --------------------------------------------------------------------------------------

def _resolve(tmp_path: Path, *argv: str) -> object:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return resolve_options(parser.parse_args(["--state-dir", str(tmp_path), "--strategy", "scaffold", *argv]))


@pytest.mark.parametrize("argv, says", [
    (["--secure-aggregation", "--min-clients", "3"], "--secure-aggregation"),
    (["--dp", "local", "--dp-clip", "1", "--dp-noise", "1"], "--dp local"),
    (["--robust", "median"], "--robust median"),
    (["--tier-policy", "dynamic"], "--tier-policy dynamic"),
])
def test_combinations_that_do_not_compose_are_refused_saying_why(tmp_path: Path, argv: list[str], says: str) -> None:
    with pytest.raises(ValueError, match="--strategy scaffold cannot be combined with") as refused:
        _resolve(tmp_path, *argv)
    assert says in str(refused.value)
    settings = _resolve(tmp_path, "--server-optimizer", "momentum", "--fraction", "0.5", "--scaffold-fleet-size", "20")
    assert settings.scaffold == Scaffold(20) and settings.server_optimizer is not None


def test_artifacts_exported_with_another_optimizer_than_sgd_are_refused(art_dir: Path, tmp_path: Path) -> None:
    assert _resolve(tmp_path, "--artifacts", str(art_dir)).scaffold == Scaffold()  # exported with plain SGD
    adamw = tmp_path / "adamw"
    shutil.copytree(art_dir, adamw)
    manifest = adamw / "c" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "optimizer": "adamw"}))
    with pytest.raises(ValueError, match=f"needs artifacts trained with plain SGD .*; {adamw} was exported with adamw"):
        _resolve(tmp_path, "--artifacts", str(adamw))


# -- a federation over Mosquitto --------------------------------------------------------------------------------

@pytest.mark.integration
def test_scaffold_federation_with_partial_participation_improves_and_keeps_its_variates(tmp_path, mosquitto_url, fleet):
    """...and its uplink is the update alone: no scaffold/ tensor, as many bytes as FedAvg's update with the codec."""
    from protocol.codecs import parse_codec
    from protocol.frame import decode_frame, encode_frame
    from protocol.messages import RoundSummary
    from protocol.topics import Topics
    from tests.conftest import tierfl
    from tests.test_integration import Watcher, _aggregator, _stop

    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--strategy", "scaffold", "--min-clients", "2",
                             "--fraction", "0.5", "--rounds", "3", "--lr", "0.1", "--tiers", "a,c", "--tier-mix", "a-c",
                             "--downlink", "int8-delta")
    devices = [tierfl("client", "--broker", mosquitto_url, "--fleet", fleet, "--device-id", f"d{i}", "--data", "digits",
                      "--cache-dir", str(tmp_path / f"d{i}"), "--tier", "c" if i == 2 else "a",
                      *(("--codec", "int8") if i == 0 else ()),
                      log=tmp_path / f"d{i}.log") for i in range(3)]
    watcher = Watcher(mosquitto_url, [Topics(fleet).rounds, Topics(fleet).all_up()])
    try:
        assert aggregator.wait(120) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        summaries = [b for b in watcher.bodies("/rounds") if isinstance(b, RoundSummary)]
        assert [s.version for s in summaries] == [1, 2, 3] and all(not s.rejected for s in summaries)
        assert all(s.selected == 2 for s in summaries)  # C = 0.5 of 3 devices, at least --min-clients 2
        assert summaries[-1].accuracy > 0.7 and summaries[-1].accuracy > summaries[0].accuracy
        with np.load(tmp_path / "state" / "weights" / "v000003.npz") as stored:
            control = {n: stored[n] for n in stored.files if n.startswith(CONTROL_PREFIX)}
        assert control and all(np.isfinite(v).all() for v in control.values()) and any(v.any() for v in control.values())
        kept = sorted(p.name for p in tmp_path.glob("d*/scaffold-*.npz"))
        trained = [d for d in range(3) if "; sent " in (tmp_path / f"d{d}.log").read_text()]
        assert len(kept) == len(trained) >= 2, kept  # every device that trained keeps its c_i
        updates = [decode_frame(p) for t, p in list(watcher.frames) if "/up/" in t and p]
        updates = [u for u in updates if isinstance(u.body, Update)]
        assert len(updates) == sum(s.answered for s in summaries)
        for update in updates:
            names = {entry.name for entry in update.header.tensors}
            assert names and not any(n.startswith(CONTROL_PREFIX) for n in names), names
            codec = "int8" if update.header.sender == "d0" else "float32"
            fedavg = decode_frame(encode_frame(fleet, "fedavg", update.body, {  # a FedAvg update of those shapes
                e.name: np.ones(e.shape, np.float32) for e in update.header.tensors}, parse_codec(codec)))
            assert {e.name for e in fedavg.header.tensors} == names
            sent = sum(e.nbytes for e in update.header.tensors)
            assert sent == sum(e.nbytes for e in fedavg.header.tensors) and update.header.tensors[0].codec == codec
            if codec == "float32":
                assert sent == 4 * sum(int(np.prod(e.shape)) for e in update.header.tensors)
    finally:
        watcher.close()
        _stop([aggregator, *devices])
