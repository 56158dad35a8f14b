"""Strategies beyond FedAvg on hand-made updates with known results: client sampling, FedMut,
FedBuff's staleness weights and bound, and hierarchical aggregation (through a relay) equal to flat."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from aggregator.engines.base import EngineConfig
from aggregator.engines.buffered import BufferConfig, BufferedEngine, staleness_factor
from aggregator.engines.parts import EngineParts
from aggregator.registry import DeviceInfo, DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import ClientUpdate, Contribution, ElementwiseMean, FedAvg
from aggregator.strategies.fedmut import FedMut
from aggregator.strategies.sampling import AvailabilitySampler, PowerOfChoiceSampler, UniformSampler
from aggregator.strategies.tiering import FixedTiers
from models.export import export_all
from models.zoo import ModelSpec
from protocol.messages import BnStatistics, Reject, RejectReason, RoundSummary, Task, Update, new_id

SPEC = ModelSpec(arch="mlp", image_size=8, hidden=(16,))
SHAPES = {"fc1.weight": (16, 64), "fc1.bias": (16,), "fc2.weight": (10, 16), "fc2.bias": (10,)}


def _devices(k: int) -> list[DeviceInfo]:
    return [DeviceInfo(f"dev{i:02d}", num_samples=10 + i, num_test_samples=0, requested_tier=None,
                       backend="ort-training", online=True, last_seen=0.0) for i in range(k)]


def _random(shapes: Mapping[str, tuple[int, ...]], seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (scale * rng.normal(size=s)).astype(np.float32) for n, s in shapes.items()}


# -- client sampling ---------------------------------------------------------------------------


def test_uniform_sampler_is_reproducible_and_sized() -> None:
    devices = _devices(20)
    picks = [tuple(d.device_id for d in UniformSampler(0.25, 1, seed=3).sample(r, devices)) for r in range(1, 6)]
    again = [tuple(d.device_id for d in UniformSampler(0.25, 1, seed=3).sample(r, devices)) for r in range(1, 6)]
    assert picks == again and all(len(p) == 5 for p in picks) and len(set(picks)) > 1


def test_availability_sampler_benches_devices_that_keep_missing_and_favours_reliable_ones() -> None:
    registry = DeviceRegistry()
    for d in _devices(10):
        registry.hello(d.device_id, d.num_samples, 0, None, "ort-training", 0.0)
    for _ in range(2):  # dev00 missed its last two tasks in round 3
        registry.asked("dev00", 3)
        registry.missed("dev00")
    for dev in ("dev01", "dev02"):  # dev01 answers everything, dev02 nothing (but not in a row lately)
        for _ in range(20):
            registry.asked(dev, 1)
            registry.answered(dev, 1.0) if dev == "dev01" else None
    sampler = AvailabilitySampler(fraction=0.3, min_clients=1, seed=0, bench_after=2, bench_rounds=5)
    available = registry.available()
    for r in range(4, 9):  # benched for 5 rounds after round 3
        assert "dev00" not in {d.device_id for d in sampler.sample(r, available)}
    counts = {"dev01": 0, "dev02": 0}
    for r in range(9, 400):
        for d in sampler.sample(r, available):
            counts[d.device_id] = counts.get(d.device_id, 0) + 1
    assert counts["dev00"] > 0, "a benched device never came back"
    assert counts["dev01"] > 3 * counts["dev02"], counts


def test_availability_sampler_never_stalls_the_fleet() -> None:
    registry = DeviceRegistry()
    for d in _devices(2):
        registry.hello(d.device_id, d.num_samples, 0, None, "ort-training", 0.0)
        for _ in range(3):
            registry.asked(d.device_id, 1)
            registry.missed(d.device_id)
    assert len(AvailabilitySampler(1.0, 2).sample(2, registry.available())) == 2


def test_power_of_choice_picks_the_highest_losses_among_candidates_unknown_first() -> None:
    devices = _devices(10)
    for i, d in enumerate(devices):
        d.last_loss = float(i) if i != 7 else None
    sampler = PowerOfChoiceSampler(fraction=0.2, min_clients=1, seed=1, candidates=10)  # candidates = everyone
    picked = [d.device_id for d in sampler.sample(1, devices)]
    assert picked == ["dev07", "dev09"]  # unknown loss first, then the highest
    narrow = PowerOfChoiceSampler(fraction=0.2, min_clients=1, seed=1, candidates=1)  # d = m: just the data-size draw
    assert len(narrow.sample(1, devices)) == 2


# -- FedMut -----------------------------------------------------------------------------------


def _fedmut_after_one_step(global_0: dict[str, np.ndarray], global_1: dict[str, np.ndarray], k: int, **kwargs: float):  # noqa: ANN202
    """A FedMut strategy in round 2 (its step is global_1 - global_0), its assignments and its accumulator."""
    strategy = FedMut(min_clients=1, seed=5, **kwargs)  # type: ignore[arg-type]
    strategy.configure_round(1, _devices(k))
    strategy.start_aggregation(global_0)
    assignments = strategy.configure_round(2, _devices(k))
    accumulator = strategy.start_aggregation(global_1)
    return strategy, assignments, accumulator


def test_fedmut_signs_are_balanced_in_pairs_and_the_bias_decays() -> None:
    g0, g1 = _random(SHAPES, 0), _random(SHAPES, 1)
    strategy, assignments, _ = _fedmut_after_one_step(g0, g1, k=7, alpha=2.0, bias=0.0)
    variants = sorted(a.variant for a in assignments)
    assert variants == [0, 1, 2, 3, 4, 5, 6], "six paired devices and one unmutated"
    names = sorted(SHAPES)
    for pair in range(3):
        first, second = strategy.signs(2, 2 * pair + 1, names), strategy.signs(2, 2 * pair + 2, names)
        assert all(first[n] == -second[n] and abs(first[n]) == 1.0 for n in names)
    step = {n: g1[n] - g0[n] for n in SHAPES}
    total = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    for a in assignments:
        mutated = strategy.task_weights(a, g1)
        for n in SHAPES:
            total[n] += mutated[n] - g1[n]
            if a.variant:
                np.testing.assert_allclose(np.abs(mutated[n] - g1[n]), 2.0 * np.abs(step[n]), rtol=1e-5, atol=1e-6)
    for n in SHAPES:
        np.testing.assert_allclose(total[n], 0.0, atol=1e-5)  # the mutations cancel over the devices
    biased = FedMut(min_clients=1, bias=0.5, bias_rounds=10)
    assert biased.bias_at(0) == 0.5 and biased.bias_at(5) == pytest.approx(0.25) and biased.bias_at(10) == biased.bias_at(50) == 0.0
    against = biased.signs(1, 1, names) | biased.signs(1, 2, names)
    assert set(against.values()) <= {1.0, -1.0 + biased.bias_at(1)}


def test_fedmut_aggregates_local_models_mutation_plus_delta_with_tiers() -> None:
    g0, g1 = _random(SHAPES, 0), _random(SHAPES, 1)
    strategy, assignments, accumulator = _fedmut_after_one_step(g0, g1, k=2, alpha=1.5, bias=0.3)
    half = {"fc1.weight": (8, 64), "fc1.bias": (8,), "fc2.weight": (10, 8), "fc2.bias": (10,)}
    blocks = {assignments[0].device_id: SHAPES, assignments[1].device_id: half}
    samples = {assignments[0].device_id: 30, assignments[1].device_id: 10}
    expected_sum = {n: np.zeros(s, np.float64) for n, s in SHAPES.items()}
    mass = {n: np.zeros(s, np.float64) for n, s in SHAPES.items()}
    for i, a in enumerate(assignments):
        delta = _random(blocks[a.device_id], 10 + i)
        local = strategy.task_weights(a, g1)  # what the device starts from
        for n, shape in blocks[a.device_id].items():
            block = tuple(slice(0, d) for d in shape)
            expected_sum[n][block] += samples[a.device_id] * (local[n][block] + delta[n] - g1[n][block])
            mass[n][block] += samples[a.device_id]
        accumulator.add(ClientUpdate(a.device_id, "a", samples[a.device_id], delta))
    result = accumulator.result()
    for n in SHAPES:  # the new global model is the mean of the local models (per element, HeteroFL)
        expected = g1[n] + np.divide(expected_sum[n], mass[n], out=np.zeros_like(mass[n]), where=mass[n] > 0)
        np.testing.assert_allclose(result[n], expected, rtol=1e-5, atol=1e-6)
    assert strategy.metrics()["fedmut_step_norm"] > 0


def test_fedmut_sends_the_global_model_before_the_first_step() -> None:
    g = _random(SHAPES, 0)
    strategy = FedMut(min_clients=1)
    assignments = strategy.configure_round(1, _devices(4))
    strategy.start_aggregation(g)
    assert all(strategy.task_weights(a, g) is g for a in assignments)


# -- FedBuff ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art")
    export_all(SPEC, ["a"], out)
    return out


def _buffered(art: Path, state: Path, devices: int, buffer: BufferConfig, rounds: int = 5) -> BufferedEngine:
    registry = DeviceRegistry()
    for i in range(devices):
        registry.hello(f"d{i}", 10 * (i + 1), 0, None, "ort-training", now=0.0)
    return BufferedEngine(EngineParts(EngineConfig(rounds=rounds, round_timeout_s=10.0), FedAvg(min_clients=1),
                                      ArtifactStore(art), StateStore(state), registry), buffer)


def test_fedbuff_waits_for_min_clients_before_the_first_tasks(art_dir: Path, tmp_path: Path, caplog) -> None:
    engine = _buffered(art_dir, tmp_path / "state", devices=2, buffer=BufferConfig(buffer_size=2, min_clients=3))
    with caplog.at_level("INFO", logger="aggregator.engines.buffered"):
        assert engine.tick(0.0) == [] and engine.tick(1.0) == []
    assert caplog.text.count("buffer 1: waiting for devices (2 of --min-clients 3 available)") == 1
    engine.registry.hello("d2", 30, 0, None, "ort-training", now=2.0)
    assert sorted(o.device_id for o in engine.tick(2.0)) == ["d0", "d1", "d2"]


class _Fleet:
    """The latest task of each device, from everything the engine sent."""

    def __init__(self, engine: BufferedEngine) -> None:
        self.engine, self.tasks = engine, {}
        self.take(engine.tick(0.0))

    def take(self, out: list) -> list:
        self.tasks.update({o.device_id: o.body for o in out if isinstance(o.body, Task)})
        return out

    def answer(self, device: str, delta: dict[str, np.ndarray], now: float, samples: int) -> list:
        task = self.tasks[device]
        body = Update(update_id=new_id(), round=task.round, base_version=task.model_version, tier=task.tier,
                      num_samples=samples, steps=1, train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
        return self.take(self.engine.on_update(device, new_id(), body, delta, 1000, now))


def test_fedbuff_takes_a_decline_as_the_end_of_its_task_and_folds_nothing(art_dir: Path, tmp_path: Path) -> None:
    engine = _buffered(art_dir, tmp_path / "state", devices=2, buffer=BufferConfig(buffer_size=2))
    fleet = _Fleet(engine)
    task = fleet.tasks["d0"]
    body = Update(update_id=new_id(), round=task.round, base_version=task.model_version, tier=task.tier, num_samples=10,
                  steps=0, train_loss=0.0, train_accuracy=0.0, train_seconds=0.0, declined=True)
    assert [o.body.reason for o in engine.on_update("d0", new_id(), body.model_copy(update={"base_version": 5}), {}, 100,
                                                    1.0)] == [RejectReason.NOT_SELECTED]
    out = fleet.take(engine.on_update("d0", new_id(), body, {}, 100, 1.0))
    assert [o.device_id for o in out if isinstance(o.body, Task)] == ["d0"]  # its task is over: a fresh one
    assert [o.body.reason for o in engine.on_update("d0", new_id(), body, {}, 100, 1.5)] == [RejectReason.DUPLICATE]
    assert engine.slot.current.accumulator.count == 0 and engine.record.version == 0


def test_staleness_factor() -> None:
    assert staleness_factor(0, 0.5) == 1.0
    assert staleness_factor(3, 0.5) == pytest.approx(0.5)
    assert staleness_factor(8, 0.0) == 1.0


def test_fedbuff_applies_every_k_updates_weighted_by_staleness_and_refuses_too_stale(art_dir: Path, tmp_path: Path) -> None:
    engine = _buffered(art_dir, tmp_path / "state", devices=3, buffer=BufferConfig(buffer_size=2, max_staleness=1))
    fleet = _Fleet(engine)
    assert set(fleet.tasks) == {"d0", "d1", "d2"} and all(t.model_version == 0 for t in fleet.tasks.values())
    g0 = {n: w.copy() for n, w in engine.weights.items()}
    deltas = [_random(SHAPES, i) for i in range(3)]
    # d0 answers and, idle again, trains on the newest version there is (still 0); d1's answer fills
    # the buffer of 2: version 1, and d1's next task is on it
    assert not any(isinstance(o.body, RoundSummary) for o in fleet.answer("d0", deltas[0], 1.0, 10))
    assert fleet.tasks["d0"].model_version == 0
    out = fleet.answer("d1", deltas[1], 2.0, 20)
    assert engine.record.version == 1 and any(isinstance(o.body, RoundSummary) for o in out)
    for n in SHAPES:
        np.testing.assert_allclose(engine.weights[n], g0[n] + (10 * deltas[0][n] + 20 * deltas[1][n]) / 30, rtol=1e-5, atol=1e-7)
    assert fleet.tasks["d1"].model_version == 1
    # d2 and d0 trained on version 0: staleness 1, deltas scaled by 1/sqrt(2), weights in the mean unchanged
    g1 = {n: w.copy() for n, w in engine.weights.items()}
    fleet.answer("d2", deltas[2], 3.0, 30)
    again = _random(SHAPES, 7)
    fleet.answer("d0", again, 4.0, 10)
    assert engine.record.version == 2
    for n in SHAPES:
        expected = g1[n] + (30 * deltas[2][n] + 10 * again[n]) / np.sqrt(2) / 40
        np.testing.assert_allclose(engine.weights[n], expected, rtol=1e-5, atol=1e-7)
    metrics = engine.record.history[-1].metrics
    assert metrics["staleness_mean"] == 1.0 and metrics["staleness_max"] == 1.0
    # d1 still holds its version-1 task; d0 and d2 move the model on to version 3
    fleet.answer("d2", _random(SHAPES, 8), 5.0, 30)
    fleet.answer("d0", _random(SHAPES, 9), 6.0, 10)
    assert engine.record.version == 3 and fleet.tasks["d1"].model_version == 1
    before = {n: w.copy() for n, w in engine.weights.items()}
    out = fleet.answer("d1", deltas[1], 7.0, 20)  # staleness 2 > bound 1
    refusal = [o.body for o in out if isinstance(o.body, Reject)]
    assert refusal and refusal[0].reason is RejectReason.TOO_STALE and "bound 1" in refusal[0].detail
    assert engine.rejected["too_stale"] == 1
    assert fleet.tasks["d1"].model_version == 3, "a device refused as too stale gets a fresh task"
    for n in SHAPES:
        np.testing.assert_array_equal(engine.weights[n], before[n])
    # versions are durable: a new engine on the same state directory resumes at version 3
    resumed = _buffered(art_dir, tmp_path / "state", devices=3, buffer=BufferConfig(buffer_size=2))
    assert resumed.record.version == 3
    for n in SHAPES:
        np.testing.assert_array_equal(resumed.weights[n], engine.weights[n])


def test_fedbuff_refuses_unasked_and_duplicate_updates(art_dir: Path, tmp_path: Path) -> None:
    engine = _buffered(art_dir, tmp_path / "state", devices=2, buffer=BufferConfig(buffer_size=5))
    fleet = _Fleet(engine)
    task = fleet.tasks["d0"]
    body = Update(update_id=new_id(), round=task.round, base_version=0, tier="a", num_samples=10, steps=1,
                  train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
    assert not [o for o in engine.on_update("d0", new_id(), body, _random(SHAPES, 0), 10, 1.0) if isinstance(o.body, Reject)]
    again = engine.on_update("d0", new_id(), body, _random(SHAPES, 0), 10, 1.5)
    assert [o.body.reason for o in again if isinstance(o.body, Reject)] == [RejectReason.DUPLICATE]
    stranger = engine.on_update("nobody", new_id(), body.model_copy(update={"update_id": new_id()}), _random(SHAPES, 0), 10, 2.0)
    assert [o.body.reason for o in stranger if isinstance(o.body, Reject)] == [RejectReason.UNKNOWN_DEVICE]
    statistics = BnStatistics(round=task.round, base_version=0, tier="a", num_samples=10)
    assert engine.on_bn_statistics("d1", new_id(), statistics, {}, 2.0)[0].body.reason is RejectReason.UNEXPECTED


# -- hierarchical aggregation -----------------------------------------------------------------

HALF = {"fc1.weight": (8, 64), "fc1.bias": (8,), "fc2.weight": (10, 8), "fc2.bias": (10,)}
QUARTER = {"fc1.weight": (4, 64), "fc1.bias": (4,), "fc2.weight": (10, 4), "fc2.bias": (10,)}


@pytest.mark.parametrize("weighted", [True, False])
def test_relay_then_root_equals_flat_aggregation_with_tiers(weighted: bool) -> None:
    g = _random(SHAPES, 0)
    devices = [("a", SHAPES, 30), ("c", HALF, 10), ("e", QUARTER, 25), ("a", SHAPES, 5), ("e", QUARTER, 40)]
    updates = [ClientUpdate(f"dev{i}", tier, n, _random(shapes, 100 + i)) for i, (tier, shapes, n) in enumerate(devices)]
    flat = ElementwiseMean(g, weighted=weighted)
    for u in updates:
        flat.add(u)
    # a relay serves devices 1, 2 and 4 (tiers c, e, e) and forwards one combined update
    relay = ElementwiseMean(g, weighted=weighted)
    for u in (updates[1], updates[2], updates[4]):
        relay.add(u)
    combined = ClientUpdate("relay", "a", 75, relay.mean_delta(), contributions=(
        Contribution("c", 10, 1, HALF), Contribution("e", 65, 2, QUARTER)))
    root = ElementwiseMean(g, weighted=weighted)
    for u in (updates[0], combined, updates[3]):
        root.add(u)
    flat_result, root_result = flat.result(), root.result()
    for n in SHAPES:
        np.testing.assert_allclose(root_result[n], flat_result[n], rtol=1e-6, atol=1e-7)


def test_partial_work_weighs_by_the_share_of_steps_done_when_asked() -> None:
    from aggregator.engines.intake import work_done
    from aggregator.store.round_spool import Assignment
    update = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=100, steps=4, train_loss=1.0,
                    train_accuracy=0.5, train_seconds=1.0)
    asked = Assignment("d", "a", epochs=2, batch_size=32, learning_rate=0.1, weigh_work=True)  # 2 x ceil(100/32) = 8 steps
    assert work_done(update, asked) == 0.5
    assert work_done(update.model_copy(update={"steps": 20}), asked) == 1.0
    assert work_done(update, Assignment("d", "a", epochs=2, batch_size=32, learning_rate=0.1)) == 1.0  # off by default
    g = {"w": np.zeros(4, np.float32)}
    mean = ElementwiseMean(g)
    mean.add(ClientUpdate("full", "a", 100, {"w": np.ones(4, np.float32)}))
    mean.add(ClientUpdate("half", "a", 100, {"w": np.full(4, 4.0, np.float32)}, work=0.5))
    np.testing.assert_allclose(mean.result()["w"], (100 * 1 + 50 * 4) / 150)


# -- differential privacy books ---------------------------------------------------------------


def test_privacy_books_charge_committed_rounds_and_survive_a_restart(art_dir: Path, tmp_path: Path) -> None:
    from aggregator.engines.rounds import RoundEngine
    from aggregator.strategies.privacy import CentralDp, PrivacyBudget

    def engine() -> RoundEngine:
        registry = DeviceRegistry()
        for i in range(4):
            registry.hello(f"d{i}", 10, 0, None, "ort-training", now=0.0)
        strategy = FedAvg(fraction=0.5, min_clients=1, accumulator=CentralDp(1.0, 1.0, seed=3))
        return RoundEngine(EngineParts(EngineConfig(rounds=5, round_timeout_s=10.0), strategy, ArtifactStore(art_dir),
                                       StateStore(tmp_path / "state"), registry, privacy=PrivacyBudget("central", 1.0)))

    first = engine()
    for round_number in (1, 2):
        tasks = [o for o in first.tick(float(round_number)) if isinstance(o.body, Task)]
        assert len(tasks) == 2  # C = 0.5 of 4: sampling rate 0.5
        for o in tasks:
            body = Update(update_id=new_id(), round=o.body.round, base_version=o.body.model_version, tier="a",
                          num_samples=10, steps=1, train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
            first.on_update(o.device_id, new_id(), body, _random(SHAPES, round_number), 10, float(round_number))
    epsilons = [s.metrics["dp_epsilon"] for s in first.record.history]
    assert 0 < epsilons[0] < epsilons[1]
    expected = PrivacyBudget("central", 1.0)
    expected.record_round(2, 4)
    assert epsilons[1] == pytest.approx(expected.record_round(2, 4).epsilon)
    resumed = engine()  # a restart rebuilds the books from the committed history
    assert resumed.privacy is not None and resumed.privacy.spent().epsilon == pytest.approx(epsilons[1])


# -- FedProx against numpy --------------------------------------------------------------------


def test_fedprox_loss_and_gradient_match_numpy(tmp_path: Path) -> None:
    """Full-batch SGD: step 2 with mu differs from step 2 without by -lr * mu * (w1 - w0), its loss by mu/2 ||w1 - w0||^2."""
    from edge_client.trainer import OrtTrainer
    from models.data import load_digits

    export_all(ModelSpec(arch="mlp", image_size=8, hidden=(16,)), ["a"], tmp_path, proximal=True)
    artifacts = ArtifactStore(tmp_path)
    trainer = OrtTrainer(tmp_path / "a", artifacts.tiers["a"].manifest)
    data = load_digits()
    data = data.subset(np.arange(64))
    w0, lr, mu = artifacts.global_weights(), 0.1, 0.5

    def train(epochs: int, proximal_mu: float) -> tuple[dict[str, np.ndarray], float]:
        trainer.set_weights(w0)  # w_global of the proximal term = w0
        stats = trainer.train(data, epochs, batch_size=64, learning_rate=lr, seed=0, proximal_mu=proximal_mu)
        return trainer.get_weights(), stats.loss

    w1, _ = train(1, 0.0)
    w2, loss2 = train(2, 0.0)
    w2_prox, loss2_prox = train(2, mu)
    distance = sum(float(np.sum((w1[n] - w0[n]) ** 2)) for n in w0)
    for n in w0:
        np.testing.assert_allclose(w2_prox[n] - w2[n], -lr * mu * (w1[n] - w0[n]), rtol=1e-3, atol=1e-6)
    assert loss2_prox - loss2 == pytest.approx(mu / 2 * distance / 2, rel=1e-3)  # the mean over two equal steps


def test_fedbuff_buffer_survives_a_restart(art_dir: Path, tmp_path: Path) -> None:
    deltas = [_random(SHAPES, 40 + i) for i in range(2)]

    def run(crash: bool, state: Path) -> dict[str, np.ndarray]:
        engine = _buffered(art_dir, state, devices=2, buffer=BufferConfig(buffer_size=2))
        fleet = _Fleet(engine)
        fleet.answer("d0", deltas[0], 1.0, 10)
        if crash:  # the process dies with one update in the buffer; a new one resumes from the state directory
            tasks = fleet.tasks
            engine = _buffered(art_dir, state, devices=2, buffer=BufferConfig(buffer_size=2))
            fleet = _Fleet(engine)
            fleet.tasks["d1"] = tasks["d1"]
            assert (view := engine.view()) is not None and view.updates == 1
        fleet.answer("d1", deltas[1], 2.0, 20)
        assert engine.record.version == 1
        return engine.weights

    uninterrupted, resumed = run(False, tmp_path / "a"), run(True, tmp_path / "b")
    for n in SHAPES:
        np.testing.assert_array_equal(resumed[n], uninterrupted[n])


def test_root_checks_a_relays_contributors(tmp_path: Path) -> None:
    from aggregator.engines.rounds import RoundEngine
    from protocol.messages import TierShare

    export_all(SPEC, ["a", "c"], tmp_path / "art")
    registry = DeviceRegistry()
    registry.hello("relay", 30, 0, "a", "relay", now=0.0)
    artifacts = ArtifactStore(tmp_path / "art")
    engine = RoundEngine(EngineParts(EngineConfig(rounds=2, round_timeout_s=10.0),
                                     FedAvg(min_clients=1, tiers=FixedTiers({"a": 1.0})), artifacts,
                                     StateStore(tmp_path / "state"), registry))
    task = next(o.body for o in engine.tick(0.0) if isinstance(o.body, Task))
    tensors = _random(artifacts.tiers["a"].shapes, 0)

    def send(contributors: dict, samples: int = 30) -> list:
        body = Update(update_id=new_id(), round=task.round, base_version=0, tier="a", num_samples=samples, steps=2,
                      train_loss=1.0, train_accuracy=0.0, train_seconds=1.0, contributors=contributors)
        return [o.body.reason for o in engine.on_update("relay", new_id(), body, tensors, 100, 1.0) if isinstance(o.body, Reject)]

    assert send({"z": TierShare(samples=30, devices=1)}) == [RejectReason.UNKNOWN_TIER]
    assert send({"c": TierShare(samples=10, devices=1)}) == [RejectReason.BAD_TENSOR]  # 10 samples, the update says 30
    assert send({"a": TierShare(samples=10, devices=1), "c": TierShare(samples=20, devices=2)}) == []
    assert engine.record.version == 1


def test_fedbuff_counts_a_device_that_answers_twice_in_one_buffer(art_dir: Path, tmp_path: Path) -> None:
    engine = _buffered(art_dir, tmp_path / "state", devices=2, buffer=BufferConfig(buffer_size=2))
    fleet = _Fleet(engine)
    fleet.answer("d0", _random(SHAPES, 1), 1.0, 10)
    fleet.answer("d0", _random(SHAPES, 2), 2.0, 10)  # d0 is fast: its second update fills the buffer before d1's
    summary = engine.record.history[-1]
    assert engine.record.version == 1 and (summary.selected, summary.answered) == (2, 2)
