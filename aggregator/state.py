"""Durable aggregator state: global weights per committed version and the round history.

Layout of the state directory:
    weights/v000012.npz   global weights of version 12 (numpy .npz, loaded without pickle)
    state.json            current version and round, model identity, round history
    open_round/           the round in progress: its plan and accepted updates (aggregator.round_spool)

Weights are written first, then state.json by atomic rename, so a crash at any instant leaves
the last committed version intact and resumes exactly there; the open round's spool is cleared
only after state.json records that round, so its accepted updates are never lost nor counted twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from aggregator.round_spool import RoundSpool
from protocol.atomic_file import atomic_write
from protocol.messages import RoundSummary

log = logging.getLogger(__name__)
KEEP_VERSIONS = 3


class StateRecord(BaseModel):
    """What state.json holds."""

    model_config = ConfigDict(extra="forbid")

    fleet: str
    model: str  # model identity: name + sha256 of the full-width manifest
    version: int
    round: int  # last round that finished (committed or failed)
    history: list[RoundSummary] = []


class StateMismatch(RuntimeError):
    """The state directory belongs to another fleet or model."""


class StateStore:
    """Reads and commits the aggregator's state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._weights_dir = root / "weights"
        self._weights_dir.mkdir(parents=True, exist_ok=True)
        self.open_round = RoundSpool(root / "open_round")

    def weights_path(self, version: int) -> Path:
        return self._weights_dir / f"v{version:06d}.npz"

    def load(self, fleet: str, model: str) -> tuple[StateRecord, dict[str, np.ndarray]] | None:
        """The last committed state, or None for a fresh directory; StateMismatch if it is another run's."""
        path = self.root / "state.json"
        if not path.exists():
            return None
        record = StateRecord.model_validate_json(path.read_bytes())
        if (record.fleet, record.model) != (fleet, model):
            raise StateMismatch(
                f"{self.root} holds fleet {record.fleet!r} / model {record.model!r}, not {fleet!r} / {model!r}; "
                "use another --state-dir (or delete it to start over)"
            )
        with np.load(self.weights_path(record.version), allow_pickle=False) as archive:
            weights = {name: archive[name].astype(np.float32) for name in archive.files}
        return record, weights

    def commit(self, record: StateRecord, weights: dict[str, np.ndarray] | None) -> None:
        """Durably record `record` (no round open); `weights` (if given) become version `record.version`.

        The open-round spool is cleared afterwards: the round it held is now in state.json.
        """
        if weights is not None:
            atomic_write(self.weights_path(record.version), lambda out: np.savez(out, **weights))
        atomic_write(self.root / "state.json", lambda out: out.write(record.model_dump_json(indent=1).encode()))
        self.open_round.clear()
        for old in sorted(self._weights_dir.glob("v*.npz"))[:-KEEP_VERSIONS]:
            old.unlink(missing_ok=True)
