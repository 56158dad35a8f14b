"""The downlink: how the weights of a task are put on the wire.

    float32     the exact weights, 4 bytes a parameter (only when asked: `--downlink float32`)
    float16     half precision; devices train from, and take deltas against, what they decoded
    int8-delta  int8 of (new weights - a reference of the version the device holds), 1 byte a parameter,
                from any of the tier's last K versions (`--downlink-versions`); a full copy for a device
                that holds none of them (`--downlink-full`): float16 (2 bytes a parameter, relative error
                at most 2^-11 per element) or int8-row (1 byte, error below max|row| / 127 per element)

int8-delta keeps, per tier, the references R_v of its last K versions: R_v is what a device that
follows the tier version by version holds, starting from the full copy of the tier's first version
the process sends (R_first = F_first, the full copy as decoded), then R_v = R_u + D(u, v) with u the
tier's previous version and D(b, v) = decode(int8(W_v - R_b)) encoded with a generator seeded by
(tier, v, b): every frame of that step carries the same bytes, so the aggregator decodes R_v bit for
bit as devices compute it, and the rounding of one step is part of the next step's delta (a device
on the chain never drifts from R_v; |R_v - W_v| is below one int8 quantum of the step,
max|W_v - R_u| / 127, per tensor, or the full copy's rounding for the first).
Memory: K x the tier's weights in float32 per tier (K = 8 by default: 13.5 MB for a 421,642-parameter
tier), plus the frames of the current round.

A device that missed versions holds R_b + e for an older b in the window; it gets D(b, v) and ends
at R_b + D(b, v) + e, off the chain by j(b, v) = max|R_b + D(b, v) - R_v| (below two quanta, computed
once per (b, v)) more than before. A full copy F_v (W_v in the full copy's codec, its rounding seeded
by (tier, v) like the deltas) leaves it off by max|F_v - R_v|.
So, per device and tier, the aggregator keeps O(tensors) numbers: for each kept version it sent the
device, a bound E[t] of max|H_t - R_v,t| per tensor t, H being what the device holds (a device left
with no kept version is forgotten at the next round):

    invariant   for every device, tier and version v this process sent it:
                max|H_t - R_v,t| <= E[t] <= max(tolerance x max|R_v|, max|F_v,t - R_v,t|)

(max|R_v| is the tier's largest weight over all its tensors: a small tensor such as a bias moves by
as much as the others and gets the same absolute bound).

Chain steps add nothing, a jump adds j(b, v) (plus one float32 ulp of the tensor's magnitude
when E > 0: the device adds in another order); when the sum would pass the limit, the device gets
a full copy instead, which resets E to the copy's own error. Against the exact float32 weights a
device therefore holds |H - W_v| <= E + |R_v - W_v|: at most tolerance x the tier's largest weight
(or the full copy's own error when that is larger) plus one int8 quantum of the chain's step. It
never grows with the rounds. The default tolerance, 1/127, is one int8 quantum of the whole tier: the
error a full int8 copy with a single scale would have, and above what an int8-row full copy has.

A device gets a delta only against a version it says it holds (hello, last update) AND that this
process sent it, so a copy from before an aggregator restart is never patched by a new chain: after a
restart every device gets a full copy first. A FedMut task (`weights.variant` > 0) carries the
device's own mutated weights: they go out whole (float32 only with `--downlink float32`), and the
device's next task is a full copy again, since what it holds is no tier reference.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from aggregator.engines.tasks import with_delta
from protocol.frame import decode_frame, encode_frame
from protocol.messages import FrameHeader, Task

DOWNLINK_MODES = ("float32", "float16", "int8-delta")
DEFAULT_VERSIONS = 8  # references kept per tier by int8-delta
DEFAULT_TOLERANCE = 1 / 127  # a device's drift from the references, as a fraction of the tier's largest weight
FULL_COPIES = ("float16", "int8-row")  # int8-delta's full copy
Bounds = dict[str, float]  # tensor -> an element-wise bound


@dataclass
class _Reference:
    """R_version: what a device of the tier that followed the chain holds after `version`."""

    version: int
    weights: dict[str, np.ndarray]
    chain_error: Bounds  # max|R_v - W_v| per tensor
    limit: Bounds = field(default_factory=dict)  # the largest E a device may hold of this version, per tensor
    full_error: Bounds = field(default_factory=dict)  # max|F_v - R_v| of the full copy

    @functools.cached_property
    def magnitude(self) -> float:
        """max|R_v| over the tier's tensors (computed once: every jump to this version needs it)."""
        return max((float(np.abs(a).max()) for a in self.weights.values() if a.size), default=0.0)


@dataclass
class _Tier:
    """One tier's references, oldest first, and the jumps between them measured so far."""

    references: dict[int, _Reference] = field(default_factory=dict)
    jumps: dict[tuple[int, int], Bounds] = field(default_factory=dict)  # (b, v) -> j(b, v)


def check_int8_delta(versions: int, tolerance: float, full: str) -> None:
    """ValueError naming the option when an int8-delta setting is out of range."""
    if not 1 <= versions <= 1000:
        raise ValueError(f"--downlink-versions must be in 1..1000, got {versions}")
    if not 0 <= tolerance <= 1:
        raise ValueError(f"--downlink-tolerance must be in [0, 1], got {tolerance}")
    if full not in FULL_COPIES:
        raise ValueError(f"unknown --downlink-full {full!r} (expected one of {', '.join(FULL_COPIES)})")


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) if a.size else 0.0


class Downlink:
    """Encodes task frames for the configured downlink mode, one encoding per tier and task."""

    def __init__(self, fleet: str, sender: str, mode: str = "float32", seed: int = 0,
                 signer: Callable[[FrameHeader], str] | None = None, versions: int = DEFAULT_VERSIONS,
                 tolerance: float = DEFAULT_TOLERANCE, full: str = "float16") -> None:
        if mode not in DOWNLINK_MODES:
            raise ValueError(f"unknown downlink {mode!r} (expected one of {', '.join(DOWNLINK_MODES)})")
        check_int8_delta(versions, tolerance, full)
        self.fleet, self.sender, self.mode, self.seed, self.signer = fleet, sender, mode, seed, signer
        self.versions, self.tolerance, self.full = versions, tolerance, full
        self._tiers: dict[str, _Tier] = {}
        self._frames: dict[tuple, bytes] = {}  # (kind, base, task JSON) -> frame, for the latest round
        self._round = -1
        # (device, tier) -> {version this process sent it: E, the device's bound if it holds that version}
        self._sent: dict[tuple[str, str], dict[int, Bounds]] = {}

    def task_frame(self, device_id: str, task: Task, weights: Mapping[str, np.ndarray], held: int | None) -> bytes:
        """The frame of `task` with the tier's `weights`, for a device that says it holds version `held` of the tier."""
        if task.round != self._round:
            self._frames.clear()
            self._round = task.round
            self._forget_dropped_versions()
        if task.weights.variant:  # a FedMut mutation is this device's alone: encode it once, chain nothing onto it
            self._sent.pop((device_id, task.tier), None)
            return self._encode(task, weights, "float32" if self.mode == "float32" else "float16")
        if self.mode != "int8-delta":
            return self._cached(("full", None), task, lambda: self._encode(task, weights, self.mode))
        tier = self._tiers.setdefault(task.tier, _Tier())
        reference = self._reference(tier, task, weights)
        sent = self._sent.setdefault((device_id, task.tier), {})
        for version in [v for v in sent if v not in tier.references]:
            del sent[version]
        bound = sent.get(held) if held is not None else None
        if bound is not None and held == reference.version:  # nothing changed since: train on what you hold
            return self._cached(("same", held), task, lambda: self._encode(with_delta(task, held), None))
        if bound is not None and held is not None and held < reference.version:
            jump, frame = self._jump(tier, task, weights, held)
            ulp = float(np.spacing(np.float32(2 * reference.magnitude)))  # the device adds in another order
            moved = {n: bound[n] + jump[n] + (ulp if bound[n] > 0 else 0.0) for n in bound}
            limit = self._limit(reference, task, weights)
            if all(moved[n] <= limit[n] for n in moved):
                self._note(sent, reference.version, moved)
                return frame
        self._limit(reference, task, weights)
        self._note(sent, reference.version, dict(reference.full_error))
        return self._full_frame(task, weights)

    def _forget_dropped_versions(self) -> None:
        """Drop what devices were sent of versions that left their tier's window, and the devices left with none:
        the bookkeeping stays bounded by the devices sent a kept version, not every device ever seen (once a round)."""
        for key, sent in list(self._sent.items()):
            kept = self._tiers.get(key[1], _Tier()).references
            for version in [v for v in sent if v not in kept]:
                del sent[version]
            if not sent:
                del self._sent[key]

    def bound(self, device_id: str, tier: str, version: int) -> Bounds | None:
        """E: per tensor, how far the weights of `version` this process sent the device may be from R_version."""
        bounds = self._sent.get((device_id, tier), {}).get(version)
        return dict(bounds) if bounds is not None else None

    def limit(self, tier: str, version: int) -> Bounds | None:
        """The largest E per tensor a device may hold of `version`, once a device was sent it."""
        found = self._tiers.get(tier, _Tier()).references.get(version)
        return dict(found.limit) if found is not None and found.limit else None

    def reference(self, tier: str, version: int) -> dict[str, np.ndarray] | None:
        """R_version of `tier`, while it is among the kept versions."""
        found = self._tiers.get(tier, _Tier()).references.get(version)
        return found.weights if found is not None else None

    @staticmethod
    def _note(sent: dict[int, Bounds], version: int, bounds: Bounds) -> None:
        """Remember `bounds` for `version`; two sends of one version (a round run again) keep the larger bound."""
        old = sent.get(version)
        sent[version] = bounds if old is None else {n: max(old[n], bounds[n]) for n in bounds}

    def _limit(self, reference: _Reference, task: Task, weights: Mapping[str, np.ndarray]) -> Bounds:
        """The version's limit on E per tensor (and its full copy's error), computed once."""
        if not reference.limit:
            copy = self._full_copy(task, weights)
            reference.full_error = {n: _max_abs(copy[n], r) for n, r in reference.weights.items()}
            allowed = self.tolerance * reference.magnitude
            reference.limit = {n: max(allowed, reference.full_error[n]) for n in reference.weights}
        return reference.limit

    def _reference(self, tier: _Tier, task: Task, weights: Mapping[str, np.ndarray]) -> _Reference:
        """The tier's reference at the task's version, advancing the chain one step when the version moved on."""
        version = task.model_version
        if version in tier.references:
            return tier.references[version]
        newest = max(tier.references, default=None)
        if newest is None or newest > version:  # a first version, or one older than the window: start afresh
            tier.references.clear()
            tier.jumps.clear()
            start = self._full_copy(task, weights)  # what its first devices get: they start on the chain
            reference = _Reference(version, start, {n: _max_abs(start[n], np.asarray(weights[n])) for n in weights})
        else:
            last = tier.references[newest]
            step = self._decoded_delta(task, weights, last)
            moved = {n: last.weights[n] + step[n] for n in weights}
            reference = _Reference(version, moved, {n: _max_abs(moved[n], np.asarray(weights[n])) for n in weights})
        tier.references[version] = reference
        while len(tier.references) > self.versions:
            oldest = next(iter(tier.references))
            del tier.references[oldest]
        tier.jumps = {key: jump for key, jump in tier.jumps.items() if key[0] in tier.references and key[1] == version}
        return reference

    def _decoded_delta(self, task: Task, weights: Mapping[str, np.ndarray], base: _Reference) -> dict[str, np.ndarray]:
        """D(base, task's version), decoded from the frame as a device decodes and applies it."""
        frame = self._cached(("delta", base.version), task, lambda: self._delta_frame(task, weights, base))
        return {n: np.asarray(t, np.float32) for n, t in decode_frame(frame).tensors.items()}

    def _jump(self, tier: _Tier, task: Task, weights: Mapping[str, np.ndarray], base: int) -> tuple[Bounds, bytes]:
        """j(base, v) per tensor and the delta frame from `base` to the task's version."""
        reference, start = tier.references[task.model_version], tier.references[base]
        frame = self._cached(("delta", base), task, lambda: self._delta_frame(task, weights, start))
        key = (base, reference.version)
        if key not in tier.jumps:
            step = self._decoded_delta(task, weights, start)
            tier.jumps[key] = {n: _max_abs(start.weights[n] + step[n], reference.weights[n]) for n in reference.weights}
        return tier.jumps[key], frame

    def _full_frame(self, task: Task, weights: Mapping[str, np.ndarray]) -> bytes:
        """The task with the whole weights in the full copy's codec (rounding seeded by tier and version)."""
        def make() -> bytes:
            rng = np.random.default_rng([self.seed, task.model_version, zlib.crc32(task.tier.encode()), 1 << 31])
            return encode_frame(self.fleet, self.sender, task, weights, self.full, rng=rng, signer=self.signer)
        return self._cached(("full", None), task, make)

    def _full_copy(self, task: Task, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """F_v: the full copy's weights as a device decodes them."""
        return {n: np.asarray(t, np.float32) for n, t in decode_frame(self._full_frame(task, weights)).tensors.items()}

    def _delta_frame(self, task: Task, weights: Mapping[str, np.ndarray], base: _Reference) -> bytes:
        rng = np.random.default_rng([self.seed, task.model_version, zlib.crc32(task.tier.encode()), base.version])
        delta = {n: np.asarray(weights[n], np.float32) - base.weights[n] for n in weights}
        return encode_frame(self.fleet, self.sender, with_delta(task, base.version), delta, "int8", rng=rng,
                            signer=self.signer)

    def _encode(self, task: Task, tensors: Mapping[str, np.ndarray] | None, codec: str = "float32") -> bytes:
        return encode_frame(self.fleet, self.sender, task, tensors, codec, signer=self.signer)

    def _cached(self, kind: tuple, task: Task, make: Callable[[], bytes]) -> bytes:
        key = (*kind, task.model_dump_json())
        if key not in self._frames:
            self._frames[key] = make()
        return self._frames[key]
