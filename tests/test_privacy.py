"""Differential privacy: the accountant (dp-accounting's), DP-FedAvg at the aggregator, local noise on the device, the options."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

from aggregator.options import add_privacy_arguments, add_robust_arguments, privacy_from_args
from aggregator.strategies.fedavg import ClientUpdate, Contribution, ElementwiseMean
from aggregator.strategies.privacy import (MIN_ORDER, CentralDp, DpEventAccountant, DpFedAvg, DpSettings, PrivacyBudget,
                                           round_rng)
from edge_client.privacy import privatize
from protocol.clipping import clip_delta, delta_norm

# Computed once with dp-accounting 0.6.0 at integer orders 2..256 (RdpAccountant composed `steps` times,
# get_epsilon_and_optimal_order(1e-5)), when the accountant was still our own code checked against it.
# (q, z, steps, epsilon)
DP_ACCOUNTING_EPSILON = [
    (0.01, 1.1, 10000, 5.6543080001495145),
    (0.1, 1.0, 100, 7.972921510380539),
    (0.05, 4.0, 1000, 1.728781762963511),
    (0.5, 0.8, 20, 23.408034292281812),
    (0.2, 2.0, 500, 13.692324050982332),
    (256 / 60000, 1.1, 14062, 2.5969811785948815),  # Abadi et al.'s MNIST setting: 60 epochs of lots of 256
]


def _epsilon(q: float, z: float, steps: int, delta: float = 1e-5) -> float:
    accountant = DpEventAccountant()
    accountant.step(z, q, steps)
    return accountant.epsilon(delta)[0]


# -- the accountant: dp-accounting's, through DpEventAccountant --------------------------------


@pytest.mark.parametrize(("q", "z", "steps", "epsilon"), DP_ACCOUNTING_EPSILON)
def test_books_are_dp_accountings(q: float, z: float, steps: int, epsilon: float) -> None:
    """The books compose the package's own events; its fractional orders (2 and up) can only tighten the
    epsilon found at integer orders."""
    reference = dp_accounting.rdp.RdpAccountant([o for o in DEFAULT_RDP_ORDERS if o >= MIN_ORDER])
    reference.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    got = _epsilon(q, z, steps)
    assert got == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    assert 0.95 * epsilon <= got <= epsilon * (1 + 1e-9)


def test_full_batch_is_the_gaussian_mechanism() -> None:
    once = DpEventAccountant()
    once.step(2.0, 1.0, 50)
    reference = dp_accounting.rdp.RdpAccountant([o for o in DEFAULT_RDP_ORDERS if o >= MIN_ORDER])
    reference.compose(dp_accounting.GaussianDpEvent(2.0), 50)
    assert once.epsilon(1e-6)[0] == pytest.approx(reference.get_epsilon(1e-6), rel=1e-12)


def test_epsilon_grows_with_rounds_and_sampling_rate_and_shrinks_with_noise() -> None:
    by_rounds = [_epsilon(0.05, 1.0, steps) for steps in (1, 10, 100, 1000)]
    by_noise = [_epsilon(0.05, z, 100) for z in (0.7, 1.0, 2.0, 5.0)]
    by_rate = [_epsilon(q, 1.0, 100) for q in (0.001, 0.01, 0.1, 1.0)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    assert by_rate == sorted(by_rate) and len(set(by_rate)) == 4


def test_steps_compose_and_the_books_restore_from_their_events() -> None:
    once = DpEventAccountant()
    once.step(1.2, 0.03, count=7)
    by_one = DpEventAccountant()
    for _ in range(7):
        by_one.step(1.2, 0.03)
    by_one.step(3.0)
    once.step(3.0)
    assert once.epsilon(1e-5)[0] == pytest.approx(by_one.epsilon(1e-5)[0], rel=1e-12)
    assert DpEventAccountant(json.loads(json.dumps(by_one.events))).epsilon(1e-5) == by_one.epsilon(1e-5)
    assert DpEventAccountant().epsilon(1e-5)[0] == 0.0  # nothing composed, nothing spent


@pytest.mark.parametrize(("call", "message"), [
    (lambda: DpEventAccountant().step(0.0, 0.1), "noise multiplier"),
    (lambda: DpEventAccountant().step(1.0, 1.5), "sampling rate"),
    (lambda: DpEventAccountant().step(1.0, 0.1, count=0), "count"),
])
def test_bad_accountant_input_is_refused(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# -- the books ---------------------------------------------------------------------------------


def test_budget_charges_the_sampling_rate_of_each_round() -> None:
    budget = PrivacyBudget("central", noise_multiplier=1.1, delta=1e-5)
    spent = [budget.record_round(selected, 100) for selected in (10, 10, 5)]
    reference = DpEventAccountant()
    reference.step(1.1, 0.1, count=2)
    reference.step(1.1, 0.05)
    assert spent[-1].epsilon == pytest.approx(reference.epsilon(1e-5)[0], rel=1e-12)
    assert [s.rounds for s in spent] == [1, 2, 3]
    assert spent[0].epsilon < spent[1].epsilon < spent[2].epsilon
    assert spent[-1].metrics() == {"dp_epsilon": spent[-1].epsilon, "dp_delta": 1e-5, "dp_rdp_order": spent[-1].order,
                                   "dp_rounds": 3.0}


def test_local_budget_gains_nothing_from_sampling() -> None:
    local = PrivacyBudget("local", noise_multiplier=2.0)
    spent = local.record_round(1, 1000)
    assert spent.epsilon == pytest.approx(_epsilon(1.0, 2.0, 1), rel=1e-12)
    assert spent.epsilon > PrivacyBudget("central", noise_multiplier=2.0).record_round(1, 1000).epsilon


def test_budget_survives_a_restart_through_its_state() -> None:
    budget = PrivacyBudget("central", noise_multiplier=0.9, delta=1e-6)
    for _ in range(3):
        budget.record_round(4, 50)
    restored = PrivacyBudget.restore(json.loads(json.dumps(budget.state())))
    assert restored.spent() == budget.spent()
    assert restored.record_round(4, 50) == budget.record_round(4, 50)


@pytest.mark.parametrize(("selected", "available"), [(0, 10), (11, 10), (3, 0)])
def test_budget_refuses_impossible_samples(selected: int, available: int) -> None:
    with pytest.raises(ValueError, match="cannot sample"):
        PrivacyBudget("central", 1.0).record_round(selected, available)


# -- clipping and local noise on the device ----------------------------------------------------


def test_clipping_bounds_the_norm_and_keeps_the_direction() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        delta = {"w": rng.normal(size=(7, 5)) * rng.uniform(0.01, 10), "b": rng.normal(size=5)}
        clipped, was_clipped = clip_delta(delta, 1.5)
        norm = delta_norm(delta)
        assert delta_norm(clipped) <= 1.5 * (1 + 1e-6)
        assert was_clipped == (norm > 1.5)
        factor = min(1.0, 1.5 / norm)
        for name in delta:
            np.testing.assert_allclose(clipped[name], delta[name] * factor, rtol=1e-5, atol=1e-7)
            assert clipped[name].dtype == np.float32


def test_clipping_refuses_non_finite_updates_and_bad_bounds() -> None:
    with pytest.raises(ValueError, match="NaN"):
        clip_delta({"w": np.array([1.0, np.nan])}, 1.0)
    with pytest.raises(ValueError, match="> 0"):
        clip_delta({"w": np.ones(3)}, 0.0)


def test_local_noise_has_std_z_times_c_around_the_clipped_update() -> None:
    delta = {"w": np.full((400, 500), 0.01, np.float32), "b": np.zeros(10, np.float32)}  # norm 4.47, clipped to 2
    clip, z = 2.0, 0.75
    noisy = privatize(delta, clip, z, np.random.default_rng(7))
    clipped, _ = clip_delta(delta, clip)
    noise = noisy["w"] - clipped["w"]
    assert noise.std() == pytest.approx(z * clip, rel=0.01)
    assert abs(noise.mean()) < 4 * z * clip / math.sqrt(noise.size)
    same = privatize(delta, clip, z, np.random.default_rng(7))
    assert all(np.array_equal(same[n], noisy[n]) for n in delta)
    assert delta_norm(privatize(delta, clip, 0.0, np.random.default_rng(7))) == pytest.approx(clip, rel=1e-6)


# -- DP-FedAvg at the aggregator ---------------------------------------------------------------


def _update(i: int, delta: Mapping[str, np.ndarray], samples: int = 10, scale: float = 1.0) -> ClientUpdate:
    return ClientUpdate(f"d{i}", "a", samples, {n: np.asarray(d, np.float32) for n, d in delta.items()}, scale=scale)


def _dp(global_weights: Mapping[str, np.ndarray], clip: float, z: float, seed: int = 0) -> DpFedAvg:
    return DpFedAvg(global_weights, clip, z, np.random.default_rng(seed))


def test_without_noise_and_clipping_it_is_the_unweighted_heterofl_mean() -> None:
    rng = np.random.default_rng(3)
    global_weights = {"w": rng.normal(size=(6, 4)).astype(np.float32), "b": rng.normal(size=6).astype(np.float32)}
    blocks = [(3, 2), (6, 4), (4, 3), (6, 4), (3, 2)]
    updates = [_update(i, {"w": rng.normal(size=shape), "b": rng.normal(size=shape[0])}, samples=10 * (i + 1),
                       scale=0.5 if i == 2 else 1.0)
               for i, shape in enumerate(blocks)]
    private, plain = _dp(global_weights, 1e9, 0.0), ElementwiseMean(global_weights, weighted=False)
    for update in updates:
        private.add(update)
        plain.add(update)
    expected = plain.result()
    got = private.result()
    for name in global_weights:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-6)
    assert private.count == 5 and private.clipped == 0


def test_each_element_is_divided_by_the_updates_holding_it() -> None:
    global_weights = {"w": np.full((4, 4), 10.0, np.float32)}
    accumulator = _dp(global_weights, clip=1.0, z=0.0)
    accumulator.add(_update(0, {"w": np.full((2, 2), 3.0)}))  # norm 6: clipped to 1, each element 0.5
    accumulator.add(_update(1, {"w": np.full((3, 3), 0.1)}))  # norm 0.3: as it is
    accumulator.add(_update(2, {"w": np.full((3, 3), -0.2)}, samples=1000))  # norm 0.6, weight still 1
    got = accumulator.result()["w"] - 10.0
    expected = np.zeros((4, 4))
    expected[:3, :3] = (0.1 - 0.2) / 2
    expected[:2, :2] = (0.5 + 0.1 - 0.2) / 3
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_array_equal(accumulator.holders("w"), [[3, 3, 2, 0], [3, 3, 2, 0], [2, 2, 2, 0], [0, 0, 0, 0]])
    assert accumulator.clipped == 1


def test_noise_has_std_z_c_over_the_holders_and_spares_unheld_elements() -> None:
    shape = (400, 400)
    global_weights = {"w": np.zeros(shape, np.float32), "v": np.ones(3, np.float32)}
    clip, z = 0.5, 1.3
    accumulator = _dp(global_weights, clip, z, seed=11)
    for i in range(4):  # zero deltas: what comes out is the noise alone
        accumulator.add(_update(i, {"w": np.zeros((300, 300) if i else (200, 200))}))
    noise = accumulator.result()["w"]
    inner, ring = noise[:200, :200], noise[:300, :300].copy()
    ring[:200, :200] = np.nan
    ring = ring[~np.isnan(ring)]
    assert inner.std() == pytest.approx(z * clip / 4, rel=0.02)
    assert ring.std() == pytest.approx(z * clip / 3, rel=0.02)
    assert abs(inner.mean()) < 4 * z * clip / 4 / math.sqrt(inner.size)
    assert not noise[300:, :].any() and not noise[:, 300:].any()  # held by no update: unchanged, no noise
    np.testing.assert_array_equal(accumulator.result()["v"], global_weights["v"])


def test_noise_leaves_no_negative_batch_norm_variance() -> None:
    global_weights = {"bn.running_var": np.full(1000, 0.01, np.float32), "bn.weight": np.ones(1000, np.float32)}
    accumulator = _dp(global_weights, clip=1.0, z=1.0)
    accumulator.add(_update(0, {name: np.zeros(1000) for name in global_weights}))
    result = accumulator.result()
    assert result["bn.running_var"].min() == 0.0 and (result["bn.running_var"] > 0.01).any()
    assert result["bn.weight"].min() < 0  # trained parameters keep their noise


def test_the_noisy_result_is_released_once() -> None:
    accumulator = _dp({"w": np.zeros(5, np.float32)}, 1.0, 1.0)
    accumulator.add(_update(0, {"w": np.ones(5)}))
    first = accumulator.result()
    assert accumulator.result() is first  # a second read must not release a second noisy copy
    with pytest.raises(RuntimeError, match="released"):
        accumulator.add(_update(1, {"w": np.ones(5)}))


def test_noise_is_reproducible_per_seed_and_round() -> None:
    start = {"w": np.zeros((20, 20), np.float32)}
    after = {"w": np.full((20, 20), 0.5, np.float32)}

    def run(seed: int, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        accumulator = CentralDp(clip_norm=1.0, noise_multiplier=1.0, seed=seed)(weights)
        accumulator.add(_update(0, {"w": np.ones((10, 10))}))
        return accumulator.result()["w"] - weights["w"]

    assert np.array_equal(run(5, start), run(5, start))
    assert not np.array_equal(run(5, start), run(6, start))
    assert not np.array_equal(run(5, start), run(5, after))  # the next round, from new weights: fresh noise
    assert round_rng(5, start).integers(1 << 62) == round_rng(5, {"w": start["w"].copy()}).integers(1 << 62)


def test_central_dp_refuses_combined_updates_and_unknown_tensors() -> None:
    accumulator = _dp({"w": np.zeros(4, np.float32)}, 1.0, 1.0)
    combined = ClientUpdate("relay", "a", 20, {"w": np.ones(4, np.float32)},
                            contributions=(Contribution("a", 20, 2, {"w": (4,)}),))
    with pytest.raises(ValueError, match="relay's combined update"):
        accumulator.add(combined)
    with pytest.raises(ValueError, match="not in the global model"):
        accumulator.add(_update(0, {"x": np.ones(4)}))
    assert accumulator.count == 0


# -- options -----------------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_robust_arguments(parser)
    add_privacy_arguments(parser)
    return parser.parse_args(list(argv))


def test_dp_is_off_by_default() -> None:
    settings = privacy_from_args(_args())
    assert settings.mode == "off"
    assert settings.accumulator_factory() is None and settings.budget() is None


def test_central_options_build_the_accumulator_and_the_books() -> None:
    settings = privacy_from_args(_args("--dp", "central", "--dp-clip", "0.8", "--dp-noise", "1.1", "--dp-seed", "3"))
    assert settings == DpSettings("central", 0.8, 1.1, 1e-5, 3)
    factory = settings.accumulator_factory()
    assert isinstance(factory, CentralDp)
    accumulator = factory({"w": np.zeros(2, np.float32)})
    assert (accumulator.clip_norm, accumulator.noise_multiplier) == (0.8, 1.1)
    budget = settings.budget()
    assert budget is not None and budget.mode == "central" and budget.delta == 1e-5


def test_local_options_leave_aggregation_alone() -> None:
    settings = privacy_from_args(_args("--dp", "local", "--dp-clip", "1", "--dp-noise", "2", "--dp-delta", "1e-6"))
    assert settings.accumulator_factory() is None
    budget = settings.budget()
    assert budget is not None and budget.mode == "local" and budget.delta == 1e-6


def test_the_default_seed_is_fresh() -> None:
    seeds = {privacy_from_args(_args("--dp", "central", "--dp-clip", "1", "--dp-noise", "1")).seed for _ in range(3)}
    assert len(seeds) == 3


@pytest.mark.parametrize(("argv", "message"), [
    (["--dp", "central", "--dp-noise", "1"], "--dp-clip"),
    (["--dp", "local", "--dp-clip", "1"], "--dp-noise"),
    (["--dp", "central", "--dp-clip", "1", "--dp-noise", "0"], "epsilon is infinite"),
    (["--dp", "central", "--dp-clip", "-1", "--dp-noise", "1"], "--dp-clip"),
    (["--dp", "central", "--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "1"], "--dp-delta"),
    (["--dp-clip", "1"], "need --dp central or --dp local"),
    (["--dp", "central", "--dp-clip", "1", "--dp-noise", "1", "--robust", "median"], "--robust median"),
    (["--dp", "local", "--dp-clip", "1", "--dp-noise", "1", "--dp-seed", "4"], "--dp central only"),
    (["--dp", "central", "--dp-clip", "1", "--dp-noise", "1", "--dp-seed", "-4"], "--dp-seed"),
])
def test_bad_option_combinations_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        privacy_from_args(_args(*argv))


def test_help_explains_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _args("--help")
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--dp {off,central,local}", "noise multiplier", "--dp-delta DELTA", "must stay secret", "epsilon"):
        assert phrase in text
