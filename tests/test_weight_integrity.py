"""Issue 13, case 5 (and the engine side of case 2): no device owns the model, no round commits NaN or Inf.

Real engines on the exported 8x8 MLP (and its batch-norm variant), a fake clock, real state
directories. Every test fails on the code before weight integrity: claimed counts were the
FedAvg weight unchecked, norms were never compared, and whatever the sum gave was committed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from aggregator.engines.base import EngineConfig, Outgoing
from aggregator.engines.buffered import BufferConfig, BufferedEngine
from aggregator.engines.parts import EngineParts
from aggregator.engines.relay import FollowTask, RelayEngine
from aggregator.engines.rounds import RoundEngine
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.round_spool import Assignment
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg, share_caps
from aggregator.strategies.robust import NormClipping, _compiled_row_squares, update_norm
from aggregator.strategies.tiering import FixedTiers
from models.export import export_all
from models.zoo import ModelSpec
from protocol.messages import (MAX_SAMPLES, BnStatistics, Reject, RejectReason, RoundSummary, Task, TierShare, Update,
                               new_id)
from protocol.quantized import QuantizedTensor
from tests.test_engine import SHAPES, SPEC

HUGE = MAX_SAMPLES  # the most the schema lets a device claim
MLP_BN = ModelSpec(arch="mlp", hidden=(32, 16), batch_norm=True)


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art")
    export_all(SPEC, ["a", "c"], out)
    return out


def _random(seed: int, scale: float = 0.1, shapes: Mapping[str, tuple[int, ...]] = SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (scale * rng.normal(size=s)).astype(np.float32) for n, s in shapes.items()}


def _filled(value: float, shapes: Mapping[str, tuple[int, ...]] = SHAPES) -> dict[str, np.ndarray]:
    return {n: np.full(s, value, np.float32) for n, s in shapes.items()}


def _one_element(value: float) -> dict[str, np.ndarray]:
    delta = _filled(0.0)
    delta["fc1.weight"][0, 0] = value
    return delta


def _engine(art: Path, state: Path, devices: Mapping[str, int], **config: object) -> RoundEngine:
    registry = DeviceRegistry()
    for device, samples in devices.items():
        registry.hello(device, samples, 0, "a", "ort-training", now=0.0)
    return RoundEngine(EngineParts(EngineConfig(fleet="f", rounds=10, round_timeout_s=10.0, **config),
                                   FedAvg(min_clients=len(devices), tiers=FixedTiers({"a": 1.0})), ArtifactStore(art),
                                   StateStore(state), registry))


def _update(engine: RoundEngine, device: str, tensors: Mapping[str, np.ndarray], samples: int, now: float = 1.0,
            **fields: object) -> list[Outgoing]:
    body = Update(update_id=new_id(), round=engine.current_round, base_version=engine.record.version, tier="a",
                  num_samples=samples, steps=1, train_loss=1.0, train_accuracy=0.5, train_seconds=0.1, **fields)
    return engine.on_update(device, new_id(), body, tensors, 1000, now)


def _reasons(out: list[Outgoing]) -> list[RejectReason]:
    return [o.body.reason for o in out if isinstance(o.body, Reject)]


def _copy(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: np.array(w) for n, w in weights.items()}


# -- 1. claimed samples are bounded by the announced ones ------------------------------------


def test_an_update_claiming_more_samples_than_its_device_announced_is_refused(art_dir: Path, tmp_path: Path) -> None:
    engine = _engine(art_dir, tmp_path / "state", {"d1": 10, "d2": 30, "mallory": 10})
    before = _copy(engine.weights)
    engine.tick(0.0)
    refused = _update(engine, "mallory", _random(9, scale=5.0), HUGE)
    assert _reasons(refused) == [RejectReason.TOO_MANY_SAMPLES] and "announced 10" in refused[0].body.detail
    d1, d2 = _random(1), _random(2)
    _update(engine, "d1", d1, 10)
    _update(engine, "d2", d2, 30)
    assert _update(engine, "mallory", _filled(0.0), 10)[0].body.kind == "round"  # its honest answer still counts
    for n in SHAPES:
        np.testing.assert_allclose(engine.weights[n], before[n] + (10 * d1[n] + 30 * d2[n]) / 50, rtol=1e-5, atol=1e-6)


def test_a_resumed_round_bounds_counts_by_its_plan_before_any_hello(art_dir: Path, tmp_path: Path) -> None:
    first = _engine(art_dir, tmp_path / "state", {"d1": 10, "d2": 30})
    first.tick(0.0)
    plan = json.loads((tmp_path / "state" / "open_round" / "plan.json").read_text())
    assert {a["device_id"]: a["announced_samples"] for a in plan["assignments"]} == {"d1": 10, "d2": 30}
    resumed = RoundEngine(EngineParts(first.config, first.strategy, first.artifacts, StateStore(tmp_path / "state"),
                                      DeviceRegistry()))
    assert _reasons(_update(resumed, "d1", _random(1), 11)) == [RejectReason.TOO_MANY_SAMPLES]
    assert _update(resumed, "d1", _random(1), 10) == []
    # a plan written before announced counts were recorded still loads; its counts wait for the hello
    for a in plan["assignments"]:
        del a["announced_samples"]
    (tmp_path / "state" / "open_round" / "plan.json").write_text(json.dumps(plan))
    legacy = RoundEngine(EngineParts(first.config, first.strategy, first.artifacts, StateStore(tmp_path / "state"),
                                     DeviceRegistry()))
    assert _reasons(_update(legacy, "d2", _random(2), 30)) == [RejectReason.UNKNOWN_DEVICE]
    legacy.registry.hello("d2", 30, 0, "a", "ort-training", now=1.0)
    assert _update(legacy, "d2", _random(2), 30, now=1.5)[0].body.kind == "round"


# -- 2. an optional cap on one device's share ------------------------------------------------


def test_max_share_caps_one_devices_weight_in_the_mean(art_dir: Path, tmp_path: Path) -> None:
    engine = _engine(art_dir, tmp_path / "state", {"d1": 10, "d2": 10, "big": 1000}, max_share=0.5)
    before = _copy(engine.weights)
    engine.tick(0.0)
    d1, d2, big = _random(1), _random(2), _random(3)
    _update(engine, "d1", d1, 10)
    _update(engine, "d2", d2, 10)
    _update(engine, "big", big, 1000)  # weighs 20: half of the round's weight, not 98%
    for n in SHAPES:
        np.testing.assert_allclose(engine.weights[n], before[n] + (10 * d1[n] + 10 * d2[n] + 20 * big[n]) / 40,
                                   rtol=1e-5, atol=1e-6)


def test_share_caps_count_the_devices_holding_the_same_elements() -> None:
    rates = {"a": 1.0, "c": 0.5}

    def caps(*devices: tuple[str, str, int]) -> dict[str, int]:
        return share_caps([Assignment(d, t, 1, 32, 0.1, announced_samples=n) for d, t, n in devices], rates, 0.5)

    # the only tier-a device shares its elements with the two c devices at most: capped at their 20
    assert caps(("wide", "a", 100), ("c1", "c", 10), ("c2", "c", 10)) == {"wide": 20, "c1": 110, "c2": 110}
    # with another tier-a device, its outer elements are held by that one alone: capped at its 10
    assert caps(("wide", "a", 100), ("wide2", "a", 10), ("c1", "c", 10))["wide"] == 10
    assert share_caps([Assignment("alone", "a", 1, 32, 0.1, announced_samples=5)], rates, 0.5) == {}
    assert caps(("x", "a", 1)) == {} and share_caps([], rates, 1.0) == {}


# -- 3. norms: finite, and within a multiple of the tier's median -----------------------------


def test_an_outlier_norm_is_refused_once_three_norms_are_known(art_dir: Path, tmp_path: Path) -> None:
    engine = _engine(art_dir, tmp_path / "state", {"d1": 10, "d2": 10, "d3": 10})
    engine.tick(0.0)
    for i, device in enumerate(("d1", "d2", "d3")):
        _update(engine, device, _random(i), 10)
    assert engine.record.version == 1
    engine.tick(2.0)
    before = _copy(engine.weights)
    outlier = _update(engine, "d1", _random(7, scale=10.0), 10, now=3.0)  # 100x the honest norms
    assert _reasons(outlier) == [RejectReason.OUTLIER] and "median" in outlier[0].body.detail
    nan = _random(8)
    nan["fc2.bias"][3] = np.nan
    assert _reasons(_update(engine, "d1", nan, 10, now=3.0)) == [RejectReason.NON_FINITE]
    assert engine.rejected["outlier"] == 1 and engine.rejected["non_finite"] == 1
    assert _update(engine, "d1", _random(9, scale=0.3), 10, now=3.0) == []  # 3x the median: honest spread
    assert all(np.array_equal(engine.weights[n], before[n]) for n in SHAPES)


def test_the_outlier_bound_is_configurable(art_dir: Path, tmp_path: Path) -> None:
    engine = _engine(art_dir, tmp_path / "state", {"d1": 10, "d2": 10, "d3": 10}, outlier_multiple=0.0)
    engine.tick(0.0)
    for i, device in enumerate(("d1", "d2", "d3")):
        _update(engine, device, _random(i), 10)
    engine.tick(2.0)
    assert _update(engine, "d1", _random(7, scale=10.0), 10, now=3.0) == []


def test_norms_are_exact_for_quantized_tensors_and_finite_for_huge_finite_deltas() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, size=(6, 50), dtype=np.int8)
    long_row = rng.integers(-127, 128, size=(1 << 14) + 5, dtype=np.int8)  # the numpy kernel's pieces of one row
    for codes, scales in ((codes, np.float32(0.01)), (codes, rng.uniform(0.001, 0.1, 6).astype(np.float32)),
                          (long_row, np.float32(0.02))):
        quantized = QuantizedTensor(codes.reshape(-1), scales, codes.shape)
        dense = np.asarray(quantized).astype(np.float64)
        assert update_norm({"w": quantized}) == pytest.approx(float(np.sqrt((dense**2).sum())), rel=1e-6)
        _compiled_row_squares.cache_clear()  # the numpy kernel too, whether numba is installed or not
        try:
            import unittest.mock

            with unittest.mock.patch("aggregator.strategies.robust._compiled_row_squares", return_value=None):
                assert update_norm({"w": quantized}) == pytest.approx(float(np.sqrt((dense**2).sum())), rel=1e-6)
        finally:
            _compiled_row_squares.cache_clear()
    assert update_norm(_filled(3e38)) == pytest.approx(3e38 * np.sqrt(sum(np.prod(s) for s in SHAPES.values())), rel=1e-6)
    assert np.isnan(update_norm({"w": np.array([1.0, np.nan], np.float32)}))
    assert update_norm({"w": np.array([1.0, -np.inf], np.float32)}) == np.inf


# -- 4. the sum never overflows; a NaN/Inf global is never committed --------------------------


def test_a_3e38_delta_is_refused_before_any_norm_is_known(art_dir: Path, tmp_path: Path) -> None:
    engine = _engine(art_dir, tmp_path / "state", {"d1": 10, "mallory": 10})
    engine.tick(0.0)
    refused = _update(engine, "mallory", _filled(3e38), 10)
    assert _reasons(refused) == [RejectReason.NON_FINITE] and "overflow" in refused[0].body.detail
    _update(engine, "d1", _random(1), 10)
    _update(engine, "mallory", _filled(0.0), 10)
    assert engine.record.version == 1 and all(np.isfinite(w).all() for w in engine.weights.values())


def test_a_round_that_would_commit_inf_is_refused_whole_and_the_next_goes_on(art_dir: Path, tmp_path: Path) -> None:
    engine = _engine(art_dir, tmp_path / "state", {"d1": 1})
    for round_number in (1, 2):  # each update is finite and its weighted norm fits the float32 sum
        engine.tick(float(round_number))
        _update(engine, "d1", _one_element(1.5e38), 1, now=round_number + 0.5)
    assert engine.record.version == 2
    kept = _copy(engine.weights)
    engine.tick(3.0)
    out = _update(engine, "d1", _one_element(1.5e38), 1, now=3.5)  # 3e38 + 1.5e38 is Inf in float32
    summary = out[0].body
    assert isinstance(summary, RoundSummary) and summary.version == 2 and summary.metrics["non_finite"] == 1.0
    assert summary.rejected["non_finite"] == 1
    assert (engine.record.round, engine.record.version) == (3, 2)
    record, on_disk = engine.store.load("f", engine.artifacts.identity)
    assert record.version == 2 and all(np.array_equal(on_disk[n], kept[n]) for n in SHAPES)
    engine.tick(4.0)
    _update(engine, "d1", _filled(0.0), 1, now=4.5)
    assert (engine.record.round, engine.record.version) == (4, 3)


# -- 5. batch-norm statistics, FedBuff, relays, robust aggregation ------------------


def test_batch_norm_statistics_are_bounded_finite_and_their_pool_checked(tmp_path: Path) -> None:
    export_all(MLP_BN, ["a"], tmp_path / "art")
    artifacts, registry = ArtifactStore(tmp_path / "art"), DeviceRegistry()
    for device in ("d1", "d2"):
        registry.hello(device, 100, 0, "a", "ort-training", now=0.0)
    engine = RoundEngine(EngineParts(EngineConfig(rounds=3, round_timeout_s=10),
                                     FedAvg(min_clients=2, tiers=FixedTiers({"a": 1})), artifacts,
                                     StateStore(tmp_path / "state"), registry))
    shapes = artifacts.tiers["a"].shapes
    tasks = {o.device_id: o for o in engine.tick(1.0)}
    for device, task in tasks.items():
        update = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=100, steps=1,
                        train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
        engine.on_update(device, new_id(), update, {n: np.full_like(v, 0.01) for n, v in task.tensors.items()}, 100, 2.0)
    before = _copy(engine.weights)

    def send(device: str, mean: float, samples: int = 100, var: float = 1.0) -> list[Outgoing]:
        tensors = {n: np.full(s, mean if n.endswith("running_mean") else var, np.float32) for n, s in shapes.items() if "running" in n}
        body = BnStatistics(round=1, base_version=1, tier="a", num_samples=samples)
        return engine.on_bn_statistics(device, new_id(), body, tensors, 3.0)

    assert _reasons(send("d1", 1.0, samples=HUGE)) == [RejectReason.TOO_MANY_SAMPLES]
    assert _reasons(send("d1", np.nan)) == [RejectReason.NON_FINITE]
    assert _reasons(send("d1", 1.0, var=np.inf)) == [RejectReason.NON_FINITE]
    assert send("d1", 1e20) == []  # finite, but the pooled variance, 1e40, is not a float32
    summary = send("d2", -1e20)[0].body
    assert isinstance(summary, RoundSummary) and summary.metrics["non_finite"] == 1.0 and engine.record.version == 0
    assert all(np.array_equal(engine.weights[n], before[n]) for n in before)


def test_fedbuff_bounds_counts_norms_and_sums(art_dir: Path, tmp_path: Path) -> None:
    registry = DeviceRegistry()
    for device in ("d0", "d1", "d2", "d3"):
        registry.hello(device, 10, 0, None, "ort-training", now=0.0)
    engine = BufferedEngine(EngineParts(EngineConfig(rounds=5, round_timeout_s=10.0), FedAvg(min_clients=1),
                                        ArtifactStore(art_dir), StateStore(tmp_path / "state"), registry),
                            BufferConfig(buffer_size=4))
    tasks = {o.device_id: o.body for o in engine.tick(0.0) if isinstance(o.body, Task)}

    def answer(device: str, tensors: dict[str, np.ndarray], samples: int = 10) -> list[RejectReason]:
        task = tasks[device]
        body = Update(update_id=new_id(), round=task.round, base_version=task.model_version, tier=task.tier,
                      num_samples=samples, steps=1, train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
        return _reasons(engine.on_update(device, new_id(), body, tensors, 1000, 1.0))

    assert answer("d0", _random(0), samples=HUGE) == [RejectReason.TOO_MANY_SAMPLES]
    assert answer("d0", _filled(3e38)) == [RejectReason.NON_FINITE]
    for i, device in enumerate(("d1", "d2", "d3")):
        assert answer(device, _random(i)) == []
    assert answer("d0", _random(4, scale=10.0)) == [RejectReason.OUTLIER]
    assert engine.record.version == 0 and engine.view().updates == 3


def test_a_relay_checks_its_devices_and_the_root_checks_the_relay(art_dir: Path, tmp_path: Path) -> None:
    artifacts = ArtifactStore(art_dir)
    root_registry = DeviceRegistry()
    root_registry.hello("relay", 30, 0, "a", "relay", now=0.0)  # the relay announced its group's 30 samples
    root = RoundEngine(EngineParts(EngineConfig(rounds=3, round_timeout_s=60.0),
                                   FedAvg(min_clients=1, tiers=FixedTiers({"a": 1.0})), artifacts,
                                   StateStore(tmp_path / "root"), root_registry))
    parent_task = next(o for o in root.tick(0.0) if isinstance(o.body, Task))
    group = DeviceRegistry()
    for device, samples in (("c1", 10), ("c2", 20)):
        group.hello(device, samples, 0, "c", "ort-training", now=0.0)
    relay = RelayEngine(EngineParts(EngineConfig(fleet="site"), FollowTask(tiers=FixedTiers({"c": 1.0})), artifacts,
                                    StateStore(tmp_path / "relay"), group))
    child_tasks = {o.device_id: o.body for o in relay.start(parent_task.body, parent_task.tensors, 1.0)}
    half = artifacts.tiers["c"].shapes

    def child(device: str, samples: int, tensors: dict[str, np.ndarray]) -> list[RejectReason]:
        task = child_tasks[device]
        body = Update(update_id=new_id(), round=task.round, base_version=task.model_version, tier="c",
                      num_samples=samples, steps=1, train_loss=1.0, train_accuracy=0.5, train_seconds=0.1)
        return _reasons(relay.on_update(device, new_id(), body, tensors, 100, 2.0))

    assert child("c1", HUGE, _random(1, shapes=half)) == [RejectReason.TOO_MANY_SAMPLES]
    assert child("c1", 10, _random(1, shapes=half)) == []
    assert child("c2", 20, _random(2, shapes=half)) == []
    combined, tensors = relay.take_combined()
    assert combined.num_samples == 30

    def forward(**fields: object) -> list[RejectReason]:
        body = combined.model_copy(update={"update_id": new_id(), **fields})
        return _reasons(root.on_update("relay", new_id(), body, tensors, 100, 3.0))

    assert forward(num_samples=3000, contributors={"c": TierShare(samples=3000, devices=2)}) == [RejectReason.TOO_MANY_SAMPLES]
    assert forward(contributors={"c": TierShare(samples=30, devices=31)}) == [RejectReason.TOO_MANY_SAMPLES]
    assert forward() == [] and root.record.version == 1


def test_robust_clipping_weighs_no_more_samples_than_announced(art_dir: Path, tmp_path: Path) -> None:
    registry = DeviceRegistry()
    for device in ("d1", "d2", "mallory"):
        registry.hello(device, 10, 0, "a", "ort-training", now=0.0)
    clipping = FedAvg(min_clients=3, tiers=FixedTiers({"a": 1.0}), accumulator=lambda g: NormClipping(g, clip_norm=1.0))
    engine = RoundEngine(EngineParts(EngineConfig(rounds=2, round_timeout_s=10.0), clipping, ArtifactStore(art_dir),
                                     StateStore(tmp_path / "state"), registry))
    engine.tick(0.0)
    assert _reasons(_update(engine, "mallory", _random(5), HUGE)) == [RejectReason.TOO_MANY_SAMPLES]
    assert _reasons(_update(engine, "mallory", _filled(np.nan), 10)) == [RejectReason.NON_FINITE]
