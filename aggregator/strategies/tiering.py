"""Which tier each device trains: fixed, dynamic (resampled each round) or automatic (fits the deadline).

Tier mixes are written as HeteroFL writes them: `a2-e8` is 20% tier a and 80% tier e,
`a-b-c-d-e` is an equal share of each. A tier a device asks for in its hello always wins.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from aggregator.registry import DeviceInfo
from models.tiers import tier_rate

TIER_POLICIES = ("fixed", "dynamic", "auto")
_PART = re.compile(r"^([a-z])(\d+(?:\.\d+)?)?$")


def parse_tier_mix(text: str) -> dict[str, float]:
    """`a2-e8` -> {"a": 0.2, "e": 0.8}; `a-b-c` -> equal thirds; shares are normalised to sum to 1."""
    shares: dict[str, float] = {}
    for part in text.strip().split("-"):
        match = _PART.match(part.strip())
        if not match:
            raise ValueError(f"tier mix {text!r}: {part!r} is not a tier letter with an optional share, e.g. a2-e8")
        tier, share = match.group(1), float(match.group(2) or 1)
        tier_rate(tier)
        if tier in shares:
            raise ValueError(f"tier mix {text!r}: tier {tier!r} appears twice")
        if share <= 0:
            raise ValueError(f"tier mix {text!r}: tier {tier!r} has a share of 0")
        shares[tier] = share
    total = sum(shares.values())
    return {tier: share / total for tier, share in sorted(shares.items())}


def _unit_draw(*key: int | str) -> float:
    """A uniform number in [0, 1) that depends only on `key` (reproducible across runs and machines)."""
    seed = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in key]
    return float(np.random.default_rng(seed).random())


def _pick(mix: Mapping[str, float], draw: float) -> str:
    """The tier whose cumulative share first exceeds `draw`."""
    total = 0.0
    for tier, share in mix.items():
        total += share
        if draw < total:
            return tier
    return next(reversed(mix))


class TierPolicy(Protocol):
    """Chooses the tier of each selected device for one round."""

    name: str

    def assign(self, round_number: int, devices: Sequence[DeviceInfo]) -> dict[str, str]: ...


class FixedTiers:
    """Each device keeps one tier for the whole run: its own request, else a seeded draw from the mix."""

    name = "fixed"

    def __init__(self, mix: Mapping[str, float], seed: int = 0) -> None:
        self.mix, self.seed = dict(mix), seed

    def assign(self, round_number: int, devices: Sequence[DeviceInfo]) -> dict[str, str]:
        """device id -> tier, the same every round."""
        return {d.device_id: d.requested_tier or _pick(self.mix, _unit_draw(self.seed, d.device_id)) for d in devices}


class DynamicTiers:
    """Each round each device draws its tier from the mix again (HeteroFL's dynamic setting), seeded."""

    name = "dynamic"

    def __init__(self, mix: Mapping[str, float], seed: int = 0) -> None:
        self.mix, self.seed = dict(mix), seed

    def assign(self, round_number: int, devices: Sequence[DeviceInfo]) -> dict[str, str]:
        """device id -> tier for this round."""
        return {
            d.device_id: d.requested_tier or _pick(self.mix, _unit_draw(self.seed, round_number, d.device_id))
            for d in devices
        }


class AutoTiers:
    """The widest tier whose E local epochs fit in `budget` of the round deadline, from the device's speed.

    A device's speed is its seconds per training sample on some tier: announced from a benchmark
    in its hello, or measured from its last update. Other tiers are estimated by their forward
    multiply-accumulates (each tier manifest's `macs`). A device with no speed yet gets the narrowest
    tier, which measures it.
    """

    name = "auto"

    def __init__(self, macs: Mapping[str, int], tiers: Sequence[str], epochs: int, deadline_s: float,
                 budget: float = 0.7) -> None:
        """`macs`: tier -> multiply-accumulates of one sample's forward pass, for every tier of `tiers`."""
        if not tiers:
            raise ValueError("automatic tier assignment needs at least one exported tier")
        if unknown := [t for t in tiers if macs.get(t, 0) <= 0]:
            raise ValueError(f"automatic tier assignment needs each tier's forward cost, which the manifest of tier(s) "
                             f"{', '.join(unknown)} does not give: re-run tierfl export")
        self.tiers = sorted(tiers, key=tier_rate, reverse=True)  # widest first
        self.macs = {t: macs[t] for t in self.tiers}
        self.epochs, self.seconds = epochs, deadline_s * budget

    def assign(self, round_number: int, devices: Sequence[DeviceInfo]) -> dict[str, str]:
        """device id -> tier for this round."""
        return {d.device_id: d.requested_tier or self.fitting_tier(d) for d in devices}

    def fitting_tier(self, device: DeviceInfo) -> str:
        """The widest tier the device can train for E epochs within the budget."""
        known = {t: s for t, s in device.seconds_per_sample.items() if t in self.macs and s > 0}
        if not known:
            return self.tiers[-1]
        for tier in self.tiers:
            per_sample = known.get(tier) or min(s * self.macs[tier] / self.macs[t] for t, s in known.items())
            if per_sample * device.num_samples * self.epochs <= self.seconds:
                return tier
        return self.tiers[-1]


def make_tier_policy(
    name: str, mix: Mapping[str, float], macs: Mapping[str, int], epochs: int, deadline_s: float, seed: int = 0
) -> TierPolicy:
    """The policy called `name` over `mix` (whose tiers must all be exported; `macs`: tier -> forward MACs per sample)."""
    if name == "fixed":
        return FixedTiers(mix, seed)
    if name == "dynamic":
        return DynamicTiers(mix, seed)
    if name == "auto":
        return AutoTiers(macs, list(mix), epochs, deadline_s)
    raise ValueError(f"unknown tier policy {name!r} (expected one of {', '.join(TIER_POLICIES)})")
