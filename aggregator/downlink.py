"""The downlink: how the weights of a task are put on the wire.

    float32     the exact weights
    float16     half precision; devices train from, and take deltas against, what they decoded
    int8-delta  int8 of (new weights - the weights the device already holds), a quarter of float32;
                an exact float32 copy for a device that holds nothing usable

int8-delta keeps one reference per tier: R_v, the weights every device of that tier holds after
receiving version v. R_v = R_u + decode(int8(W_v - R_u)) where u is the tier's previous version; the
rounding error of one step is part of the next step's delta, so it never accumulates. The step is
encoded with a generator seeded by (tier, version): every frame of that step carries the same
bytes, and decoding its own frame gives the aggregator R_v bit for bit as the devices compute it.
A device gets a delta only against a version it says it holds (hello, last update) AND that this
process sent it, so a copy from before an aggregator restart is never patched by a new chain.
A FedMut task (`weights.variant` > 0) carries the device's own mutated weights: they go out whole, and
the device's next task is a full copy again, since what it holds is no tier reference.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.engines.tasks import with_delta
from protocol.frame import decode_frame, encode_frame
from protocol.messages import FrameHeader, Task

DOWNLINK_MODES = ("float32", "float16", "int8-delta")


@dataclass
class _Reference:
    """What devices of one tier hold after version `version`."""

    version: int
    weights: dict[str, np.ndarray]  # R_version
    previous: int | None = None  # the version the delta starts from; None for a first, exact copy
    delta: dict[str, np.ndarray] | None = None  # W_version - R_previous, before quantisation


class Downlink:
    """Encodes task frames for the configured downlink mode, one encoding per tier and task."""

    def __init__(self, fleet: str, sender: str, mode: str = "float32", seed: int = 0,
                 signer: Callable[[FrameHeader], str] | None = None) -> None:
        if mode not in DOWNLINK_MODES:
            raise ValueError(f"unknown downlink {mode!r} (expected one of {', '.join(DOWNLINK_MODES)})")
        self.fleet, self.sender, self.mode, self.seed, self.signer = fleet, sender, mode, seed, signer
        self._references: dict[str, _Reference] = {}
        self._frames: dict[tuple[str, str], bytes] = {}  # (kind, task JSON) -> frame, for the latest round
        self._round = -1
        self._sent: dict[tuple[str, str], set[int]] = {}  # (device, tier) -> versions sent to it, int8-delta only

    def task_frame(self, device_id: str, task: Task, weights: Mapping[str, np.ndarray], held: int | None) -> bytes:
        """The frame of `task` with the tier's `weights`, for a device that says it holds version `held` of the tier."""
        if task.round != self._round:
            self._frames.clear()
            self._round = task.round
        if task.weights.variant:  # a FedMut mutation is this device's alone: encode it once, chain nothing onto it
            self._sent.pop((device_id, task.tier), None)
            return self._encode(task, weights, "float16" if self.mode == "float16" else "float32")
        if self.mode != "int8-delta":
            return self._cached("full", task, lambda: self._encode(task, weights, self.mode))
        reference = self._reference(task, weights)
        sent = self._sent.setdefault((device_id, task.tier), set())
        if held not in sent:
            held = None
        sent.intersection_update({reference.previous})
        sent.add(reference.version)
        if held == reference.version:  # nothing changed since: train on what you hold
            return self._cached("same", task, lambda: self._encode(with_delta(task, held), None))
        if held is not None and held == reference.previous:
            return self._cached("delta", task, lambda: self._delta_frame(task, reference))
        return self._cached("full", task, lambda: self._encode(task, reference.weights, "float32"))

    def _reference(self, task: Task, weights: Mapping[str, np.ndarray]) -> _Reference:
        """The tier's reference at the task's version, advancing it one step when the version moved on."""
        last = self._references.get(task.tier)
        if last is not None and last.version == task.model_version:
            return last
        if last is None or last.version > task.model_version:
            reference = _Reference(task.model_version, {n: np.array(w, np.float32) for n, w in weights.items()})
        else:
            reference = _Reference(task.model_version, {}, last.version, {n: weights[n] - last.weights[n] for n in weights})
            step = decode_frame(self._cached("delta", task, lambda: self._delta_frame(task, reference))).tensors
            reference.weights = {n: last.weights[n] + step[n] for n in weights}
        self._references[task.tier] = reference
        return reference

    def _delta_frame(self, task: Task, reference: _Reference) -> bytes:
        rng = np.random.default_rng([self.seed, reference.version, zlib.crc32(task.tier.encode())])
        body = with_delta(task, reference.previous)
        return encode_frame(self.fleet, self.sender, body, reference.delta, "int8", rng=rng, signer=self.signer)

    def _encode(self, task: Task, tensors: Mapping[str, np.ndarray] | None, codec: str = "float32") -> bytes:
        return encode_frame(self.fleet, self.sender, task, tensors, codec, signer=self.signer)

    def _cached(self, kind: str, task: Task, make: Callable[[], bytes]) -> bytes:
        key = (kind, task.model_dump_json())
        if key not in self._frames:
            self._frames[key] = make()
        return self._frames[key]
