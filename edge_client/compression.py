"""Update compression on the device: error feedback and selective upload around any codec.

Each round the device sends u = delta + residual, where residual is what the codec dropped from
earlier rounds (what was sent is read back from the encoded frame itself, so it is exactly what
the aggregator decodes). An update whose relative norm is below `skip_below` is not sent at all:
it joins the residual and a small "unchanged" message goes instead. The residual of each tier is
kept on disk, so it survives a restart of the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from protocol.atomic_file import atomic_write

Tensors = dict[str, np.ndarray]


class ErrorFeedback:
    """The residual of one tier, persisted under `folder`."""

    def __init__(self, folder: Path, tier: str, skip_below: float = 0.0) -> None:
        self.path = folder / f"residual-{tier}.npz"
        self.skip_below = skip_below
        self.residual: Tensors = {}
        if self.path.exists():
            with np.load(self.path, allow_pickle=False) as saved:
                self.residual = {name: saved[name].astype(np.float32) for name in saved.files}

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

    def remember(self, intended: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray] | None) -> None:
        """Keep intended - sent (all of `intended` when nothing was sent) and save it."""
        self.residual = {
            name: (value - sent[name] if sent is not None else value).astype(np.float32)
            for name, value in intended.items()
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda out: np.savez(out, **self.residual))
