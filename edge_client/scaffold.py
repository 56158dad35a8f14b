"""SCAFFOLD on the device: its control variate c_i per tier, kept durably in the cache folder.

A task with `weights.control` carries the server's variate c (sliced to the tier) beside the
weights. Each local SGD step then uses g - c_i + c: the trainers apply it after every optimizer
step as w <- w - lr (c - c_i), exact for plain SGD. After K steps at learning rate lr from x to y

    c_i+ = c_i - c + (x - y) / (K lr)          delta c_i = c_i+ - c_i = -c + (x - y) / (K lr)

(none after K = 0 steps). delta c_i is not sent: it does not depend on c_i, so the aggregator
derives it from the update y - x it receives (aggregator.strategies.scaffold), and the uplink is
the update alone. The device keeps the exact value; the server's derived one differs from it by
the codec's quantisation error / (K lr), which error feedback carries into later updates (and so
into later derived changes). c_i starts at zero. It is saved (atomically) when the
update is sent, in `scaffold-<tier>.npz` beside the tier's model identity, so it survives a
restart of the device. An update the aggregator refuses moved no c there (c is the mean of the
accepted c_i), so its refusal rolls c_i back (edge_client.declines; a refusal that arrives after the
device restarted finds nothing to roll back, and c_i keeps that change). A file that cannot be read, is larger than the tier's variate, holds NaN/Inf
or does not fit the tier's trainable parameters is named in a warning and the tier starts again
from c_i = 0 (the way out is automatic: the file is replaced with the next update; delete it to
reset by hand).
"""

from __future__ import annotations

import logging
import math
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from models.manifest import TierManifest
from protocol.atomic_file import atomic_write
from protocol.control import control_shapes

log = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]
MODEL_KEY = "__model__"  # the tier's model name and shapes, so a variate of another export is not applied
NPY_HEADER_BYTES = 4096  # room for each .npy entry's header beside its array's bytes
UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError)


def variate_shapes(manifest: TierManifest) -> dict[str, tuple[int, ...]]:
    """The tier's variate tensors: its trainable parameters' shapes."""
    return control_shapes((p.name, tuple(p.shape), p.trainable) for p in manifest.params)


def _identity(manifest: TierManifest, shapes: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    text = manifest.model.name + "|" + ";".join(f"{n}:{list(s)}" for n, s in sorted(shapes.items()))
    return np.frombuffer(text.encode(), np.uint8)


class ControlVariate:
    """c_i of one tier, persisted under `folder`."""

    def __init__(self, folder: Path, manifest: TierManifest, durable: bool = True) -> None:
        """`durable` False: written atomically for readers but without fsync (a virtual device of `tierfl fleet`)."""
        self.path = folder / f"scaffold-{manifest.tier}.npz"
        self.durable = durable
        self.shapes = variate_shapes(manifest)
        self._identity = _identity(manifest, self.shapes)
        self.value: Tensors = {name: np.zeros(shape, np.float32) for name, shape in self.shapes.items()}
        if self.path.exists():
            try:
                self.value = self._load()
            except UNREADABLE as exc:
                log.warning("SCAFFOLD control variate %s cannot be used (%s: %s): tier %s starts again from c_i = 0; "
                            "the file is replaced with the next update", self.path, type(exc).__name__, exc, manifest.tier)

    def _load(self) -> Tensors:
        """The saved c_i: float32 arrays of the tier's trainable shapes, all finite; ValueError otherwise."""
        saved = np.load(self.path, allow_pickle=False)
        if not isinstance(saved, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with saved:
            # bounded before reading anything: float32 arrays of the tier's shapes and the identity, each with a header
            limit = (sum(4 * math.prod(shape) for shape in self.shapes.values()) + self._identity.nbytes
                     + NPY_HEADER_BYTES * (len(self.shapes) + 1))
            if (declared := sum(info.file_size for info in saved.zip.infolist())) > limit:
                raise ValueError(f"it holds {declared} bytes, more than the tier's variate takes ({limit})")
            if MODEL_KEY not in saved.files or not np.array_equal(saved[MODEL_KEY], self._identity):
                raise ValueError("it belongs to another model or export of this tier")
            value = {name: np.asarray(saved[name], np.float32) for name in saved.files if name != MODEL_KEY}
        if set(value) != set(self.shapes) or any(value[n].shape != self.shapes[n] for n in value):
            raise ValueError("its tensors are not the tier's trainable parameters")
        if bad := [name for name, array in value.items() if not np.isfinite(array).all()]:
            raise ValueError(f"{bad[:4]} hold NaN or Inf")
        return value

    def correction(self, control: Mapping[str, np.ndarray]) -> Tensors:
        """c - c_i, what every local step subtracts (times lr) beside the gradient."""
        return {name: np.asarray(control[name], np.float32) - c_i for name, c_i in self.value.items()}

    def change(self, control: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], steps: int,
               learning_rate: float) -> Tensors:
        """delta c_i = c_i+ - c_i = -c + (x - y) / (K lr) for `delta` = y - x after K = `steps` steps; zero when K = 0
        (the aggregator derives none then either)."""
        if steps <= 0:
            return {name: np.zeros_like(c_i) for name, c_i in self.value.items()}
        scale = np.float32(1.0 / (steps * learning_rate))
        return {name: -np.asarray(control[name], np.float32) - np.asarray(delta[name], np.float32) * scale
                for name in self.value}

    def commit(self, change: Mapping[str, np.ndarray]) -> None:
        """c_i <- c_i + delta c_i, saved atomically (call it with the update's publication)."""
        self.value = {name: (c_i + change[name]).astype(np.float32) for name, c_i in self.value.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda out: np.savez(out, **self.value, **{MODEL_KEY: self._identity}),
                     durable=self.durable)


class Variate:
    """One task's SCAFFOLD: the tier's c_i and the server's c sent with the task."""

    def __init__(self, own: ControlVariate, control: Mapping[str, np.ndarray]) -> None:
        self.own, self.control = own, control
        self._change: Tensors | None = None  # delta c_i of the training, until it is committed

    def correction(self) -> Tensors:
        """c - c_i (what the trainers apply at every step)."""
        return self.own.correction(self.control)

    def change(self, delta: Mapping[str, np.ndarray], steps: int, learning_rate: float) -> Tensors:
        """delta c_i after `steps` steps that moved the weights by `delta` (kept for `commit`)."""
        self._change = self.own.change(self.control, delta, steps, learning_rate)
        return self._change

    def commit(self) -> None:
        """c_i <- c_i + the last `change`, saved (call it with the update's publication); nothing before a change."""
        if self._change is not None:
            self.own.commit(self._change)

    def roll_back(self) -> None:
        """c_i <- c_i - the committed change, saved: the update that carried it was refused (once; later changes of
        this tier stay, each is added on its own)."""
        if self._change is not None:
            self.own.commit({name: -change for name, change in self._change.items()})
            self._change = None

