"""How each virtual device of `tierfl fleet` behaves: from a trace file, or drawn from distributions.

A trace is JSON (`{"devices": [DEVICE, ...]}`) or JSON lines (one DEVICE per line, `#` comments
and blank lines skipped). Every field of a DEVICE may be left out; what is left out is drawn from
the command line's distributions (seeded by --seed and the device's index, so a run can be repeated):

    {"id": "pi-0001",                 device id (default: PREFIX-00001, PREFIX from --id-prefix)
     "tier": "b",                     a fixed tier the device asks for (default: the aggregator decides)
     "speed_factor": 2.5,             x the seconds per sample of --bench / --seconds-per-sample (1 = as measured)
     "seconds_per_sample": {"a": 0.004, "b": 0.002},   the device's own training speed per tier (overrides both)
     "uplink_kbps": 2000,             upload bandwidth in kilobits per second (0 or absent: unlimited)
     "latency_ms": 80,                one-way latency added to every update's send time
     "online": [[0, 600], [900, 1e9]],   availability windows in seconds since the fleet started (absent: always)
     "dropouts": [{"round": 2, "after": 0.5, "away_s": 30}],   drops out during the task of round 2, half way
                                      through its training time, and comes back 30 s later
     "dropout_probability": 0.05}     chance of dropping out during any other task

Training time is simulated around the real training: a task's update is trained on the device's
shard at once (on the shared ONNX Runtime session), and sent when a device of that speed would
have finished: samples x epochs x seconds per sample, plus latency and bytes / bandwidth.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol.topics import check_id

MAX_TRACE_DEVICES = 1_000_000
MAX_WINDOWS = 10_000
MAX_TRACE_BYTES = 1 << 30  # a trace file read whole: ~1 kB for each of MAX_TRACE_DEVICES devices
Seconds = Annotated[float, Field(ge=0, le=1e12)]


class Dropout(BaseModel):
    """A device that drops out (loses its connection, the broker publishing its will) during one round's task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=1, le=10**9)
    after: float = Field(0.5, ge=0, le=1)  # share of the task's simulated training time done when it drops out
    away_s: Seconds = 30.0  # how long it stays away before connecting again


class DeviceTrace(BaseModel):
    """One device's behaviour; every field optional (drawn from the distributions when absent)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = None
    tier: Annotated[str, Field(pattern=r"^[a-z]$")] | None = None
    speed_factor: Annotated[float, Field(gt=0, le=1e6)] | None = None
    seconds_per_sample: Annotated[dict[str, Annotated[float, Field(gt=0, le=3600)]], Field(max_length=26)] | None = None
    uplink_kbps: Annotated[float, Field(ge=0, le=1e9)] | None = None
    latency_ms: Annotated[float, Field(ge=0, le=1e7)] | None = None
    online: Annotated[list[tuple[Seconds, Seconds]], Field(max_length=MAX_WINDOWS)] | None = None
    dropouts: Annotated[list[Dropout], Field(max_length=MAX_WINDOWS)] = []
    dropout_probability: Annotated[float, Field(ge=0, le=1)] | None = None

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        return None if value is None else check_id(value, "device id")

    @field_validator("online")
    @classmethod
    def _ordered(cls, value: list[tuple[float, float]] | None) -> list[tuple[float, float]] | None:
        if value is not None and any(start >= end for start, end in value):
            raise ValueError("each online window is [start, end] with start < end (seconds since the fleet started)")
        if value is not None and any(a[1] > b[0] for a, b in zip(value, value[1:])):
            raise ValueError("online windows must be in order and not overlap")
        return value


class Trace(BaseModel):
    """A trace file: the devices of a fleet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: Annotated[list[DeviceTrace], Field(min_length=1, max_length=MAX_TRACE_DEVICES)]


def read_trace(path: Path) -> Trace:
    """The trace in `path` (JSON, or JSON lines of devices); ValueError naming the file (and line) and the problem."""
    if (size := path.stat().st_size) > MAX_TRACE_BYTES:
        raise ValueError(f"{path} is not a fleet trace: {size} bytes, more than a trace may take ({MAX_TRACE_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a fleet trace: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):  # nested too deep: each line's parser says so below
            whole = None  # JSON lines
        if isinstance(whole, dict) and "devices" in whole:
            return Trace.model_validate(whole)
        devices = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    devices.append(DeviceTrace.model_validate_json(line))
                except ValidationError as exc:
                    raise ValueError(f"{path}:{number}: {_first(exc)}") from None
        return Trace(devices=devices)
    except ValidationError as exc:
        raise ValueError(f"{path} is not a fleet trace: {_first(exc)}") from None


def _first(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


class Distributions(BaseModel):
    """What the command line says about devices the trace leaves open."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id_prefix: str = "v"
    tiers: list[str] = []  # fixed tiers drawn with equal shares; empty: the aggregator decides
    seconds_per_sample: dict[str, float] = {}  # tier -> seconds per sample at speed factor 1
    speed_spread: float = Field(0.0, ge=0, le=5)  # sigma of the log-normal speed factor (median 1)
    uplink_kbps: float = Field(0.0, ge=0)  # median upload bandwidth (0: unlimited)
    latency_ms: float = Field(0.0, ge=0)  # median one-way latency
    network_spread: float = Field(0.0, ge=0, le=5)  # sigma of the log-normal bandwidth and latency factors
    dropout_probability: float = Field(0.0, ge=0, le=1)  # per task
    away_s: float = Field(30.0, ge=0)  # how long a drawn dropout stays away
    mean_online_s: float = Field(0.0, ge=0)  # churn: mean online period (0: always online)
    mean_offline_s: float = Field(0.0, ge=0)  # churn: mean offline period
    seed: int = 0


class Behaviour(BaseModel):
    """One virtual device, every field settled."""

    model_config = ConfigDict(frozen=True)

    id: str
    tier: str | None
    seconds_per_sample: dict[str, float]  # tier -> simulated seconds per training sample (empty: as fast as trained)
    uplink_kbps: float  # 0: unlimited
    latency_ms: float
    online: list[tuple[float, float]] | None  # None: always online
    dropouts: dict[int, Dropout]  # round -> dropout
    dropout_probability: float
    away_s: float

    def training_s(self, tier: str, samples: int) -> float:
        """Simulated seconds to train `samples` samples (epochs included) on `tier`; 0 when no speed is known."""
        per_sample = self.seconds_per_sample.get(tier)
        return per_sample * samples if per_sample else 0.0

    def upload_s(self, nbytes: int) -> float:
        """Simulated seconds for `nbytes` to reach the broker: latency plus bytes over bandwidth."""
        transfer = nbytes * 8 / (self.uplink_kbps * 1000) if self.uplink_kbps > 0 else 0.0
        return self.latency_ms / 1000 + transfer


def behaviours(count: int, trace: Trace | None, spread: Distributions) -> list[Behaviour]:
    """`count` devices: the trace's (in order), the open fields drawn from `spread`; ValueError on a bad count or ids."""
    if trace is not None and count > len(trace.devices):
        raise ValueError(f"--devices {count} but the trace describes only {len(trace.devices)} devices")
    digits = max(5, len(str(count)))
    settled = []
    for index in range(count):
        given = trace.devices[index] if trace is not None else DeviceTrace()
        rng = np.random.default_rng([spread.seed, index])
        factor = given.speed_factor or float(math.exp(rng.normal(0, spread.speed_spread)))
        network = float(math.exp(rng.normal(0, spread.network_spread)))
        tier = given.tier or (spread.tiers[int(rng.integers(len(spread.tiers)))] if spread.tiers else None)
        settled.append(Behaviour(
            id=given.id or f"{spread.id_prefix}-{index:0{digits}d}",
            tier=tier,
            seconds_per_sample=given.seconds_per_sample or {t: s * factor for t, s in spread.seconds_per_sample.items()},
            uplink_kbps=given.uplink_kbps if given.uplink_kbps is not None else spread.uplink_kbps * network,
            latency_ms=given.latency_ms if given.latency_ms is not None else spread.latency_ms * network,
            online=given.online if given.online is not None else _churn(rng, spread),
            dropouts={d.round: d for d in given.dropouts},
            dropout_probability=(given.dropout_probability if given.dropout_probability is not None
                                 else spread.dropout_probability),
            away_s=spread.away_s,
        ))
    ids = [b.id for b in settled]
    if len(set(ids)) != len(ids):
        raise ValueError("device ids repeat: give each device of the trace its own id")
    for behaviour in settled:
        check_id(behaviour.id, "device id")
    return settled


def _churn(rng: np.random.Generator, spread: Distributions, horizon_s: float = 30 * 86400) -> list[tuple[float, float]] | None:
    """Alternating exponential online and offline periods (starting online at a random phase), or None (always)."""
    if spread.mean_online_s <= 0 or spread.mean_offline_s <= 0:
        return None
    windows: list[tuple[float, float]] = []
    t = 0.0
    online = rng.random() < spread.mean_online_s / (spread.mean_online_s + spread.mean_offline_s)
    while t < horizon_s and len(windows) < MAX_WINDOWS:
        length = float(rng.exponential(spread.mean_online_s if online else spread.mean_offline_s))
        if online:
            windows.append((t, t + max(length, 1.0)))
        t += max(length, 1.0)
        online = not online
    return windows or None


def parse_tier_seconds(text: str) -> dict[str, float]:
    """`a=0.002,b=0.001` -> {tier: seconds per sample}; ValueError naming the bad part."""
    speeds = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        tier, _, value = part.partition("=")
        try:
            speeds[tier.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--seconds-per-sample: {part!r} is not TIER=SECONDS") from None
        if not (len(tier.strip()) == 1 and tier.strip().isalpha() and 0 < speeds[tier.strip()] <= 3600):
            raise ValueError(f"--seconds-per-sample: {part!r} is not TIER=SECONDS (a tier letter, 0 < seconds <= 3600)")
    return speeds


def online_at(windows: Sequence[tuple[float, float]] | None, t: float) -> bool:
    """Whether a device with these windows (in order, not overlapping) is online `t` seconds after the fleet started."""
    if windows is None:
        return True
    began = bisect.bisect_right(windows, (t, math.inf))  # windows[:began] start at or before t
    return began > 0 and t < windows[began - 1][1]


def next_edge(windows: Sequence[tuple[float, float]], t: float) -> float | None:
    """The first start or end of an online window later than `t` (windows in order, not overlapping); None after all."""
    began = bisect.bisect_right(windows, (t, math.inf))
    if began > 0 and windows[began - 1][1] > t:
        return windows[began - 1][1]
    return windows[began][0] if began < len(windows) else None
