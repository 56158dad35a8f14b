"""Tier mixes and the three tier policies."""

from __future__ import annotations

import collections

import pytest

from aggregator.registry import DeviceInfo
from aggregator.strategies.tiering import AutoTiers, DynamicTiers, FixedTiers, make_tier_policy, parse_tier_mix


def _device(name: str, tier: str | None = None, samples: int = 100, speed: dict[str, float] | None = None) -> DeviceInfo:
    return DeviceInfo(name, samples, 0, tier, "ort-training", True, 0.0, seconds_per_sample=speed or {})


@pytest.mark.parametrize("text,expected", [
    ("a2-e8", {"a": 0.2, "e": 0.8}),
    ("a-b-c-d-e", {t: 0.2 for t in "abcde"}),
    ("c", {"c": 1.0}),
    ("e1-a3", {"a": 0.75, "e": 0.25}),
])
def test_parse_tier_mix(text, expected):
    assert parse_tier_mix(text) == pytest.approx(expected)


@pytest.mark.parametrize("text,message", [("a-a", "twice"), ("f", "unknown tier"), ("a0-b", "share of 0"), ("a,b", "tier letter")])
def test_parse_tier_mix_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_tier_mix(text)


def test_fixed_tiers_are_stable_follow_the_mix_and_honour_requests():
    devices = [_device(f"dev{i:03d}") for i in range(1000)] + [_device("asks-for-d", "d")]
    policy = FixedTiers(parse_tier_mix("a2-e8"), seed=1)
    first = policy.assign(1, devices)
    assert policy.assign(7, devices[::-1]) == first  # same tier every round, whatever the order
    counts = collections.Counter(first[d.device_id] for d in devices[:-1])
    assert 150 < counts["a"] < 250 and counts["a"] + counts["e"] == 1000
    assert first["asks-for-d"] == "d"


def test_dynamic_tiers_are_redrawn_each_round_reproducibly():
    devices = [_device(f"dev{i:02d}") for i in range(50)]
    policy = DynamicTiers(parse_tier_mix("a-b-c-d-e"), seed=3)
    rounds = [policy.assign(r, devices) for r in range(1, 6)]
    assert rounds[0] != rounds[1]
    assert rounds == [DynamicTiers(parse_tier_mix("a-b-c-d-e"), seed=3).assign(r, devices) for r in range(1, 6)]
    assert {t for r in rounds for t in r.values()} == set("abcde")


CNN28_MACS = {"a": 4_241_152, "c": 307_648, "e": 29_872}  # forward MACs per sample of the zoo's cnn28 tiers


def test_auto_tiers_give_the_widest_tier_that_fits_the_deadline():
    policy = AutoTiers(CNN28_MACS, ["a", "c", "e"], epochs=2, deadline_s=10.0, budget=1.0)
    # 1,000 samples x 2 epochs in 10 s: at most 5 ms per sample.
    assert policy.fitting_tier(_device("fast", samples=1000, speed={"a": 0.004})) == "a"
    assert policy.fitting_tier(_device("slow", samples=1000, speed={"a": 0.04})) == "c"  # c costs ~14x less than a
    assert policy.fitting_tier(_device("snail", samples=1000, speed={"e": 1.0})) == "e"  # nothing fits: narrowest
    assert policy.fitting_tier(_device("new", samples=1000)) == "e"  # unmeasured: narrowest, which measures it
    measured = _device("measured", samples=1000, speed={"e": 0.0001})  # extrapolated from e by MACs
    assert policy.fitting_tier(measured) == "c"
    assert policy.assign(1, [_device("asks", "a", speed={"a": 10.0})]) == {"asks": "a"}


def test_auto_tiers_need_every_tier_s_forward_cost():
    with pytest.raises(ValueError, match="tier\\(s\\) c does not give: re-run tierfl export"):
        AutoTiers({"a": 1000, "c": 0}, ["a", "c"], epochs=1, deadline_s=10.0)
    with pytest.raises(ValueError, match="tier\\(s\\) e does not"):
        AutoTiers({"a": 1000}, ["a", "e"], epochs=1, deadline_s=10.0)


def test_make_tier_policy_names():
    macs, mix = {"a": 1000}, {"a": 1.0}
    assert [make_tier_policy(n, mix, macs, 1, 10.0).name for n in ("fixed", "dynamic", "auto")] == ["fixed", "dynamic", "auto"]
    with pytest.raises(ValueError, match="unknown tier policy"):
        make_tier_policy("random", mix, macs, 1, 10.0)
