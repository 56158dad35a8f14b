"""Update compression on the device: error feedback and selective upload around any codec.

Each round the device sends u = delta + residual, where residual is what the codec dropped from
earlier rounds (what was sent is read back from the encoded frame itself, so it is exactly what
the aggregator decodes). An update whose relative norm is below `skip_below` is not sent at all:
it joins the residual and a small "unchanged" message goes instead. The residual of each tier is
kept on disk, so it survives a restart of the client; a residual file that cannot be read (a full
disk, a bad block) is lost state: the tier starts again from a zero residual, with one warning
naming the file, and the file is replaced at once.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from protocol.atomic_file import atomic_write

log = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]


class ErrorFeedback:
    """The residual of one tier, persisted under `folder`."""

    def __init__(self, folder: Path, tier: str, skip_below: float = 0.0) -> None:
        self.path = folder / f"residual-{tier}.npz"
        self.skip_below = skip_below
        self.residual: Tensors = {}
        if self.path.exists():
            try:
                self.residual = self._load()
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                log.warning("error-feedback state %s cannot be read (%s: %s): starting tier %s from a zero residual "
                            "and replacing the file", self.path, type(exc).__name__, exc, tier)
                self._save()

    def _load(self) -> Tensors:
        """The residual saved in `path`: float32 arrays, all finite; ValueError (or OSError) otherwise."""
        saved = np.load(self.path, allow_pickle=False)
        if not isinstance(saved, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with saved:
            residual = {name: np.asarray(saved[name], np.float32) for name in saved.files}
        bad = [name for name, value in residual.items() if not np.isfinite(value).all()]
        if bad:
            raise ValueError(f"{bad[:4]} hold NaN or Inf")
        return residual

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda out: np.savez(out, **self.residual))

    def compensate(self, delta: Mapping[str, np.ndarray]) -> Tensors:
        """delta + residual (a residual whose shapes no longer match is dropped)."""
        out = {}
        for name, value in delta.items():
            carried = self.residual.get(name)
            out[name] = value + carried if carried is not None and carried.shape == value.shape else value.copy()
        return out

    def insignificant(self, update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> bool:
        """True when ||update|| / ||reference|| is below the selective-upload threshold."""
        if self.skip_below <= 0:
            return False
        update_norm = np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in update.values()))
        reference_norm = np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in reference.values()))
        return update_norm < self.skip_below * max(reference_norm, 1e-12)

    def remember(self, intended: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray] | None) -> Tensors:
        """Keep intended - sent (all of `intended` when nothing was sent) and save it; the residual's change (`undo`
        takes it back)."""
        before = self.residual
        self.residual = {
            name: (value - sent[name] if sent is not None else value).astype(np.float32)
            for name, value in intended.items()
        }
        self._save()
        return {name: value - before[name] if name in before and before[name].shape == value.shape else value
                for name, value in self.residual.items()}

    def undo(self, change: Mapping[str, np.ndarray]) -> None:
        """Take back a residual's change (`remember`'s): its update was refused, so nothing of it reached the model.
        Changes add up, so an earlier update's change may be taken back after a later one's; saved."""
        self.residual = {name: (value - change[name]).astype(np.float32)
                         if name in change and change[name].shape == value.shape else value
                         for name, value in self.residual.items()}
        self._save()
