"""Robust aggregation: norm clipping, coordinate-wise median and trimmed mean, over tiers; the CLI; the benchmark."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aggregator.cli import configure_parser
from aggregator.options import accumulator_from_args
from aggregator.strategies.fedavg import Accumulator, ClientUpdate, ElementwiseMean, FedAvg
from aggregator.strategies.robust import (AdaptiveClipping, CoordinateMedian, NormClipping, TrimmedMean, clip_update,
                                          robust_accumulator, update_norm)
from models.data import FASHION_MNIST_ROOT

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_robust.py"


def _update(i: int, delta: Mapping[str, np.ndarray], samples: int = 10) -> ClientUpdate:
    return ClientUpdate(f"d{i}", "a", samples, {n: np.asarray(d, np.float32) for n, d in delta.items()})


def _aggregate(accumulator: Accumulator, deltas: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    for i, delta in enumerate(deltas):
        accumulator.add(_update(i, delta))
    return accumulator.result()


def _reference(global_w: np.ndarray, blocks: list[np.ndarray], reduce) -> np.ndarray:
    """Element by element: `reduce` over the blocks that hold the element, global value where none does."""
    out = global_w.astype(np.float64).copy()
    for index in np.ndindex(global_w.shape):
        held = [b[index] for b in blocks if all(i < s for i, s in zip(index, b.shape))]
        if held:
            out[index] += reduce(np.array(held))
    return out


def _trim(values: np.ndarray, beta: float) -> float:
    k = int(beta * len(values))
    return float(np.sort(values)[k : len(values) - k].mean())


# -- hand-made rounds ------------------------------------------------------------------------


def test_median_and_trimmed_mean_of_one_tier() -> None:
    g = {"w": np.array([1.0, 2.0], np.float32)}
    deltas = [{"w": [v, -v]} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    np.testing.assert_allclose(_aggregate(CoordinateMedian(g), deltas)["w"], [4.0, -1.0])
    # beta 0.2 of 5: one value dropped from each side -> mean of 2, 3, 4
    np.testing.assert_allclose(_aggregate(TrimmedMean(g, 0.2), deltas)["w"], [4.0, -1.0])
    np.testing.assert_allclose(_aggregate(TrimmedMean(g, 0.0), deltas)["w"], [1 + 22.0, 2 - 22.0])


def test_a_trimmed_mean_of_too_few_updates_says_it_trimmed_nothing(caplog: pytest.LogCaptureFixture) -> None:
    g = {"w": np.array([1.0, 2.0], np.float32)}
    deltas = [{"w": [v, -v]} for v in (1.0, 2.0, 100.0)]
    with caplog.at_level("WARNING", logger="aggregator.strategies.robust"):
        np.testing.assert_allclose(_aggregate(TrimmedMean(g, 0.2), deltas)["w"], [1 + 103 / 3, 2 - 103 / 3], rtol=1e-6)
    assert "trims nothing (floor(0.2 x 3) = 0): this round is a plain mean; it trims from 5 updates on" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="aggregator.strategies.robust"):
        _aggregate(TrimmedMean(g, 0.2), [{"w": [v, -v]} for v in range(5)])
    assert caplog.text == ""


def test_two_tiers_combine_each_element_over_the_updates_that_hold_it() -> None:
    g = {"w": np.zeros((3, 4), np.float32), "b": np.full(5, 7.0, np.float32)}
    wide = [{"w": np.full((3, 4), v), "b": np.full(4, v)} for v in (1.0, 2.0, 9.0)]
    narrow = [{"w": np.full((2, 2), v), "b": np.full(2, v)} for v in (3.0, 4.0)]
    median = _aggregate(CoordinateMedian(g), wide + narrow)
    # the 2x2 block is held by all 5 (median of 1, 2, 9, 3, 4), the rest of w by the 3 wide ones
    np.testing.assert_allclose(median["w"], [[3, 3, 2, 2], [3, 3, 2, 2], [2, 2, 2, 2]])
    np.testing.assert_allclose(median["b"], [10, 10, 9, 9, 7])  # b[4]: held by nobody, keeps 7
    trimmed = _aggregate(TrimmedMean(g, 0.2), wide + narrow)
    # 5 values: drop 1 and 9 -> mean(2, 3, 4) = 3; 3 values: int(0.6) = 0 dropped -> mean(1, 2, 9) = 4
    np.testing.assert_allclose(trimmed["w"], [[3, 3, 4, 4], [3, 3, 4, 4], [4, 4, 4, 4]])
    np.testing.assert_allclose(trimmed["b"], [10, 10, 11, 11, 7])


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_blocks_of_any_shapes_match_the_per_element_definition(data: st.DataObject) -> None:
    shape = data.draw(st.tuples(st.integers(1, 4), st.integers(1, 4)), label="global shape")
    blocks = data.draw(st.lists(st.tuples(st.integers(1, shape[0]), st.integers(1, shape[1])), min_size=1, max_size=7))
    values = st.floats(-100, 100, width=32)
    deltas = [data.draw(hnp.arrays(np.float32, b, elements=values)) for b in blocks]
    g = {"w": data.draw(hnp.arrays(np.float32, shape, elements=values))}
    median = _aggregate(CoordinateMedian(g), [{"w": d} for d in deltas])["w"]
    np.testing.assert_allclose(median, _reference(g["w"], deltas, np.median), rtol=1e-5, atol=1e-3)
    trimmed = _aggregate(TrimmedMean(g, 0.25), [{"w": d} for d in deltas])["w"]
    np.testing.assert_allclose(trimmed, _reference(g["w"], deltas, lambda v: _trim(v, 0.25)), rtol=1e-5, atol=1e-3)


def test_updates_are_copied_when_kept() -> None:
    g = {"w": np.zeros(2, np.float32)}
    accumulator = CoordinateMedian(g)
    delta = np.ones(2, np.float32)
    accumulator.add(_update(0, {"w": delta}))
    delta[:] = 50
    np.testing.assert_array_equal(accumulator.result()["w"], [1, 1])


# -- clipping --------------------------------------------------------------------------------


def test_clipping_bounds_the_norm_and_leaves_small_updates_unchanged() -> None:
    big = _update(0, {"w": np.full((2, 2), 3.0), "b": [4.0]})  # norm sqrt(4 * 9 + 16) ~ 7.2
    small = _update(1, {"w": np.full((2, 2), 0.1), "b": [0.2]})
    clipped = clip_update(big, 2.0)
    assert update_norm(clipped.delta) == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(clipped.delta["w"] / big.delta["w"], clipped.delta["b"][0] / 4.0)  # direction kept
    assert clip_update(small, 2.0) is small
    g = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(1, np.float32)}
    accumulator = NormClipping(g, 2.0)
    accumulator.add(small)
    np.testing.assert_allclose(accumulator.result()["w"], small.delta["w"], rtol=1e-6)
    accumulator.add(big)
    assert accumulator.clipped == 1 and accumulator.count == 2
    np.testing.assert_allclose(accumulator.result()["b"], (0.2 + clipped.delta["b"]) / 2, rtol=1e-6)


def test_adaptive_clipping_bounds_every_update_by_the_median_norm() -> None:
    g = {"w": np.zeros(2, np.float32)}
    deltas = [{"w": [1.0, 0.0]}, {"w": [0.0, 2.0]}, {"w": [300.0, 400.0]}]  # norms 1, 2, 500
    accumulator = AdaptiveClipping(g, weighted=False)
    result = _aggregate(accumulator, deltas)["w"]
    assert accumulator.bound == pytest.approx(2.0)
    np.testing.assert_allclose(result, [(1 + 1.2) / 3, (2 + 1.6) / 3], rtol=1e-6)


# -- an attacker -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(5, 12), st.integers(1, 6)), elements=st.floats(-1, 1, width=32)),
       st.integers(0, 4))
def test_an_attacker_scaling_by_100_barely_moves_median_and_trimmed_mean(honest: np.ndarray, who: int) -> None:
    g = {"w": np.zeros(honest.shape[1], np.float32)}
    attacked = honest.copy()
    attacked[who] *= 100
    deltas = [{"w": row} for row in attacked]
    low, high = honest.min(axis=0) - 1e-6, honest.max(axis=0) + 1e-6
    for robust in (CoordinateMedian(g), TrimmedMean(g, 0.2)):  # int(0.2 * n) >= 1 value dropped per side
        result = _aggregate(robust, deltas)["w"]
        assert np.all((low <= result) & (result <= high)), "an outlier moved the result out of the honest range"
    mean_shift = _aggregate(ElementwiseMean(g), deltas)["w"] - honest.mean(axis=0)
    np.testing.assert_allclose(mean_shift, 99 * honest[who] / len(honest), rtol=1e-3, atol=1e-4)


def test_scaled_attacker_moves_the_mean_by_a_lot_and_the_median_by_little() -> None:
    rng = np.random.default_rng(0)
    honest = rng.normal(1.0, 0.1, (9, 1000)).astype(np.float32)
    deltas = [{"w": row} for row in honest] + [{"w": honest[0] * -100}]
    g = {"w": np.zeros(1000, np.float32)}
    shifts = {name: np.abs(_aggregate(acc, deltas)["w"] - 1.0).mean()
              for name, acc in [("mean", ElementwiseMean(g)), ("median", CoordinateMedian(g)),
                                ("trimmed", TrimmedMean(g, 0.1)), ("clip", AdaptiveClipping(g))]}
    assert shifts["mean"] > 9
    assert shifts["median"] < 0.1 and shifts["trimmed"] < 0.1 and shifts["clip"] < 0.3


@pytest.mark.parametrize("make", [
    ElementwiseMean, CoordinateMedian, lambda g: TrimmedMean(g, 0.2), AdaptiveClipping, lambda g: NormClipping(g, 1.0),
])
def test_an_empty_round_returns_the_global_weights(make) -> None:
    g = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    accumulator = make(g)
    result = accumulator.result()
    assert accumulator.count == 0
    assert set(result) == set(g)
    for name in g:
        np.testing.assert_array_equal(result[name], g[name])
        assert result[name].dtype == np.float32


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "kwargs", "kind"), [
    ("none", {}, ElementwiseMean),
    ("clip", {}, AdaptiveClipping),
    ("clip", {"clip_norm": 3.0}, NormClipping),
    ("median", {}, CoordinateMedian),
    ("trimmed-mean", {}, TrimmedMean),
    ("trimmed-mean", {"trim_fraction": 0.1}, TrimmedMean),
])
def test_robust_accumulator_builds_each_mode(mode: str, kwargs: dict, kind: type) -> None:
    accumulator = robust_accumulator(mode, **kwargs)({"w": np.zeros(1, np.float32)})
    assert isinstance(accumulator, kind)
    if kind is TrimmedMean:
        assert accumulator.beta == kwargs.get("trim_fraction", 0.2)


@pytest.mark.parametrize(("mode", "kwargs", "message"), [
    ("mean", {}, "unknown robust"),
    ("median", {"clip_norm": 1.0}, "--clip-norm"),
    ("clip", {"trim_fraction": 0.1}, "--trim-fraction"),
    ("clip", {"clip_norm": 0.0}, "> 0"),
    ("trimmed-mean", {"trim_fraction": 0.5}, r"\[0, 0.5\)"),
    ("trimmed-mean", {"trim_fraction": -0.1}, r"\[0, 0.5\)"),
])
def test_robust_accumulator_rejects_bad_options(mode: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        robust_accumulator(mode, **kwargs)


def test_fedavg_uses_the_given_accumulator_and_defaults_to_the_mean() -> None:
    g = {"w": np.zeros(1, np.float32)}
    assert isinstance(FedAvg().start_aggregation(g), ElementwiseMean)
    assert isinstance(FedAvg(accumulator=CoordinateMedian).start_aggregation(g), CoordinateMedian)


def test_aggregator_cli_options_choose_the_accumulator() -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    defaults = parser.parse_args([])
    assert defaults.robust == "none"
    assert isinstance(accumulator_from_args(defaults)({}), ElementwiseMean)
    clip = parser.parse_args(["--robust", "clip", "--clip-norm", "5"])
    assert accumulator_from_args(clip)({}).clip_norm == 5.0
    trimmed = parser.parse_args(["--robust", "trimmed-mean", "--trim-fraction", "0.1"])
    assert accumulator_from_args(trimmed)({}).beta == 0.1
    with pytest.raises(SystemExit):
        parser.parse_args(["--robust", "krum"])


# -- the benchmark ---------------------------------------------------------------------------


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="Fashion-MNIST is not installed")
def test_tiny_benchmark_run_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--devices", "5", "--train-samples", "250",
                           "--test-samples", "300", "--defences", "fedavg,median", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "robust.json").read_text())
    assert [(r["attack"], r["defence"]) for r in report["results"]] == [
        (a, d) for a in ("clean", "sign-flip", "scale") for d in ("fedavg", "median")]
    assert len(report["attackers"]) == 1
    assert [(c["attack"], c["defence"]) for c in report["claims"]] == [("sign-flip", "median"), ("scale", "median")]
    assert "| median |" in (tmp_path / "robust.md").read_text()
    assert (tmp_path / "robust.png").stat().st_size > 0
