"""FedAvg device selection and the element-wise (HeteroFL-ready) weighted mean of updates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.registry import DeviceInfo
from aggregator.strategies.fedavg import ClientUpdate, ElementwiseMean, FedAvg
from aggregator.strategies.tiering import FixedTiers


def _devices(k: int, tiers: dict[int, str] | None = None) -> list[DeviceInfo]:
    tiers = tiers or {}
    return [
        DeviceInfo(f"dev{i:02d}", num_samples=10 + i, num_test_samples=0, requested_tier=tiers.get(i),
                   backend="ort-training", online=True, last_seen=0.0)
        for i in range(k)
    ]


# -- FedAvg.configure_round ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "fraction", "min_clients", "expected"),
    [
        (10, 1.0, 1, 10),
        (10, 0.3, 1, 3),
        (10, 0.25, 1, 3),  # ceil(2.5)
        (10, 0.01, 1, 1),  # ceil(0.1)
        (10, 0.1, 4, 4),  # min_clients wins over C*K
        (7, 0.5, 2, 4),  # ceil(3.5)
        (3, 0.1, 3, 3),  # exactly min_clients available
    ],
)
def test_fedavg_selects_ceil_fraction_at_least_min_clients(k: int, fraction: float, min_clients: int, expected: int) -> None:
    available = _devices(k)
    chosen = FedAvg(fraction=fraction, min_clients=min_clients).configure_round(1, available)
    assert len(chosen) == expected == max(min_clients, math.ceil(fraction * k))
    ids = [a.device_id for a in chosen]
    assert len(set(ids)) == len(ids), "a device was drawn twice"
    assert set(ids) <= {d.device_id for d in available}


@pytest.mark.parametrize("k", [0, 1, 2])
def test_fedavg_selects_none_when_fewer_than_min_clients(k: int) -> None:
    assert FedAvg(fraction=1.0, min_clients=3).configure_round(1, _devices(k)) == []


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.01])
def test_fedavg_rejects_fraction_outside_unit_interval(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        FedAvg(fraction=fraction)


def test_fedavg_selection_reproducible_per_seed_and_round_and_varies_across_rounds() -> None:
    available = _devices(20)

    def ids(strategy: FedAvg, round_number: int) -> tuple[str, ...]:
        return tuple(a.device_id for a in strategy.configure_round(round_number, available))

    first, again = FedAvg(fraction=0.25, seed=7), FedAvg(fraction=0.25, seed=7)
    for r in range(1, 6):
        assert ids(first, r) == ids(again, r) == ids(first, r)
        assert len(ids(first, r)) == 5
    per_round = {ids(first, r) for r in range(1, 11)}
    assert len(per_round) > 1, "every round selected the same devices"
    other_seed = FedAvg(fraction=0.25, seed=8)
    assert [ids(other_seed, r) for r in range(1, 11)] != [ids(first, r) for r in range(1, 11)]
    # Over many rounds every device gets a turn (C=0.25 of 20 for 40 rounds).
    seen = {d for r in range(1, 41) for d in ids(first, r)}
    assert seen == {d.device_id for d in available}


def test_fedavg_assignment_tier_and_task_settings() -> None:
    available = _devices(4, tiers={1: "b", 3: "e"})
    strategy = FedAvg(fraction=1.0, epochs=3, batch_size=16, learning_rate=0.2, tiers=FixedTiers({"c": 1.0}))
    chosen = {a.device_id: a for a in strategy.configure_round(1, available)}
    assert {d: a.tier for d, a in chosen.items()} == {"dev00": "c", "dev01": "b", "dev02": "c", "dev03": "e"}
    for a in chosen.values():
        assert (a.epochs, a.batch_size, a.learning_rate) == (3, 16, 0.2)


# -- ElementwiseMean ------------------------------------------------------------------------


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "fc1.weight": rng.normal(size=(4, 6)).astype(np.float32),
        "fc1.bias": rng.normal(size=(4,)).astype(np.float32),
    }


def _delta(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}


def test_weighted_mean_of_full_width_updates_matches_numpy() -> None:
    g = _global()
    frozen = {n: w.copy() for n, w in g.items()}
    shapes = {n: w.shape for n, w in g.items()}
    samples = [10, 30, 5]
    deltas = [_delta(shapes, s) for s in (1, 2, 3)]
    acc = FedAvg().start_aggregation(g)
    for i, (n, d) in enumerate(zip(samples, deltas)):
        acc.add(ClientUpdate(f"d{i}", "a", n, d))
    assert acc.count == 3
    out = acc.result()
    for name in g:
        expected = frozen[name].astype(np.float64) + np.average(
            np.stack([d[name] for d in deltas]), axis=0, weights=samples
        )
        assert out[name].dtype == np.float32
        assert out[name].shape == g[name].shape
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(g[name], frozen[name])  # the input global is not modified
    # and it is not the unweighted mean
    assert not np.allclose(out["fc1.weight"], frozen["fc1.weight"] + np.mean([d["fc1.weight"] for d in deltas], axis=0))


def test_narrow_update_changes_only_its_leading_block() -> None:
    g = _global()
    wide = _delta({"fc1.weight": (4, 6), "fc1.bias": (4,)}, 11)
    narrow = _delta({"fc1.weight": (2, 3), "fc1.bias": (2,)}, 12)
    acc = ElementwiseMean(g)
    acc.add(ClientUpdate("wide", "a", 10, wide))
    acc.add(ClientUpdate("narrow", "c", 30, narrow))
    out = acc.result()

    w = g["fc1.weight"].astype(np.float64) + wide["fc1.weight"]  # covered by the wide update only
    w[:2, :3] = g["fc1.weight"][:2, :3] + (10 * wide["fc1.weight"][:2, :3] + 30 * narrow["fc1.weight"].astype(np.float64)) / 40
    np.testing.assert_allclose(out["fc1.weight"], w, rtol=1e-6, atol=1e-6)
    b = g["fc1.bias"].astype(np.float64) + wide["fc1.bias"]
    b[:2] = g["fc1.bias"][:2] + (10 * wide["fc1.bias"][:2] + 30 * narrow["fc1.bias"].astype(np.float64)) / 40
    np.testing.assert_allclose(out["fc1.bias"], b, rtol=1e-6, atol=1e-6)


def test_elements_no_update_touched_keep_their_value() -> None:
    g = _global()
    narrow = _delta({"fc1.weight": (1, 2)}, 5)  # no fc1.bias at all
    acc = ElementwiseMean(g)
    acc.add(ClientUpdate("n1", "e", 7, narrow))
    acc.add(ClientUpdate("n2", "e", 3, {"fc1.weight": -narrow["fc1.weight"]}))
    out = acc.result()
    # The covered block averages (7*d - 3*d)/10 = 0.4*d; everything else is bit-identical.
    np.testing.assert_allclose(out["fc1.weight"][:1, :2], g["fc1.weight"][:1, :2] + 0.4 * narrow["fc1.weight"], rtol=1e-6)
    mask = np.ones((4, 6), dtype=bool)
    mask[:1, :2] = False
    np.testing.assert_array_equal(out["fc1.weight"][mask], g["fc1.weight"][mask])
    np.testing.assert_array_equal(out["fc1.bias"], g["fc1.bias"])


def test_no_updates_returns_global_weights() -> None:
    g = _global()
    out = ElementwiseMean(g).result()
    for name in g:
        np.testing.assert_array_equal(out[name], g[name])


def test_unweighted_mode_ignores_sample_counts() -> None:
    g = _global()
    shapes = {n: w.shape for n, w in g.items()}
    deltas = [_delta(shapes, s) for s in (21, 22)]
    acc = ElementwiseMean(g, weighted=False)
    acc.add(ClientUpdate("a", "a", 1, deltas[0]))
    acc.add(ClientUpdate("b", "a", 1000, deltas[1]))
    out = acc.result()
    for name in g:
        expected = g[name] + (deltas[0][name].astype(np.float64) + deltas[1][name]) / 2
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 5),
    updates=st.lists(
        st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 100), st.integers(0, 2**16)),
        min_size=1,
        max_size=5,
    ),
    weighted=st.booleans(),
)
def test_elementwise_mean_matches_per_element_reference(rows: int, cols: int, updates: list, weighted: bool) -> None:
    """Against a per-element loop: mean over the updates whose block covers that element."""
    g = {"w": np.random.default_rng(rows * 10 + cols).normal(size=(rows, cols)).astype(np.float32)}
    acc = ElementwiseMean(g, weighted=weighted)
    blocks = []
    for r, c, n, seed in updates:
        r, c = min(r, rows), min(c, cols)
        d = np.random.default_rng(seed).normal(size=(r, c)).astype(np.float32)
        blocks.append((d, n if weighted else 1))
        acc.add(ClientUpdate("x", "a", n, {"w": d}))
    out = acc.result()["w"]
    for i in range(rows):
        for j in range(cols):
            held = [(d[i, j], n) for d, n in blocks if i < d.shape[0] and j < d.shape[1]]
            if not held:
                assert out[i, j] == g["w"][i, j]
            else:
                mean = sum(float(v) * n for v, n in held) / sum(n for _, n in held)
                assert out[i, j] == pytest.approx(float(g["w"][i, j]) + mean, rel=1e-5, abs=1e-5)
