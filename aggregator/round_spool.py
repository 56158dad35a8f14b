"""The open round on disk: its plan and every update accepted so far, so a crash loses none of them.

Layout of STATE_DIR/open_round/:
    plan.json            round number, base version, start, deadline, assignments, pool size, phase
    update-000001.npz    the first accepted update: its validated tensors plus `__meta__` (device,
    update-000002.npz    Update header and wire bytes as JSON); numbered in order of acceptance

Every file is written atomically (temp, fsync, rename, fsync of the folder), and an update is
spooled before the ledger records it as accepted, so "accepted" always means "durably spooled". After a crash the
engine re-adds the spooled updates in their order to a fresh accumulator, which gives exactly the
sum it had. The spool is cleared once state.json records the round as finished; a spool whose
round state.json already records is a leftover of a crash in between and is discarded.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from aggregator.strategy import Assignment
from protocol.atomic_file import atomic_write
from protocol.messages import Update

log = logging.getLogger(__name__)
META = "__meta__"
PLAN = "plan.json"


class SpoolError(RuntimeError):
    """The open-round spool contradicts the committed state or cannot be read."""


class RoundPlan(BaseModel):
    """What plan.json holds: the open round as it was started."""

    model_config = ConfigDict(extra="forbid")

    round: int
    base_version: int
    started: float
    deadline: float
    assignments: list[Assignment]
    available: int = 0  # devices the round was drawn from
    measuring_statistics: bool = False  # the training phase closed; the batch-norm statistics phase ran


class SpooledUpdate(BaseModel):
    """The metadata stored with one accepted update's tensors."""

    model_config = ConfigDict(extra="forbid")

    device_id: str
    update: Update
    nbytes: int


@dataclass(frozen=True)
class SpooledRound:
    """An open round read back from disk: its plan and its accepted updates in order of acceptance."""

    plan: RoundPlan
    updates: list[tuple[SpooledUpdate, dict[str, np.ndarray]]]


class RoundSpool:
    """Writes and reads STATE_DIR/open_round."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._plan: RoundPlan | None = None
        self._next = 1

    def begin(self, plan: RoundPlan) -> None:
        """Start spooling a new open round (whatever was spooled before is dropped)."""
        self.clear()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_plan(plan)

    def mark_measuring_statistics(self) -> None:
        """Record that the open round's training phase closed and its statistics phase started."""
        if self._plan is None:
            raise SpoolError("no open round is being spooled")
        self._write_plan(self._plan.model_copy(update={"measuring_statistics": True}))

    def assign(self, assignment: Assignment) -> None:
        """Add an assignment to the open round's plan (FedBuff: the buffer learns its devices as they answer)."""
        if self._plan is None:
            raise SpoolError("no open round is being spooled")
        self._write_plan(self._plan.model_copy(update={"assignments": [*self._plan.assignments, assignment]}))

    def accept(self, device_id: str, update: Update, nbytes: int, tensors: Mapping[str, np.ndarray]) -> None:
        """Durably store one accepted update of the open round (returns once it is on disk)."""
        if self._plan is None or update.round != self._plan.round:
            raise SpoolError(f"update of round {update.round} but the spooled round is "
                             f"{self._plan.round if self._plan else 'none'}")
        if META in tensors:
            raise ValueError(f"a tensor named {META!r} clashes with the spool's metadata entry")
        meta = SpooledUpdate(device_id=device_id, update=update, nbytes=nbytes).model_dump_json().encode()
        arrays = {**tensors, META: np.frombuffer(meta, np.uint8)}
        atomic_write(self.folder / f"update-{self._next:06d}.npz", lambda out: np.savez(out, **arrays))
        self._sync_folder()
        self._next += 1

    def load(self, committed_round: int, version: int) -> SpooledRound | None:
        """The round that was open when the process stopped, or None (a stale spool is discarded)."""
        path = self.folder / PLAN
        if not path.exists():
            self.clear()
            return None
        try:
            plan = RoundPlan.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise SpoolError(f"{path} is unreadable ({exc.error_count()} errors); {self._advice()}") from None
        if plan.round <= committed_round:  # committed, then stopped before the spool was cleared
            log.info("discarding the spool of round %d: state.json already records it", plan.round)
            self.clear()
            return None
        if plan.round != committed_round + 1 or plan.base_version != version:
            raise SpoolError(f"{self.folder} holds round {plan.round} on version {plan.base_version}, but the "
                             f"state is at round {committed_round}, version {version}; {self._advice()}")
        updates = [self._read_update(file, plan) for file in sorted(self.folder.glob("update-*.npz"))]
        self._plan, self._next = plan, len(updates) + 1
        return SpooledRound(plan, updates)

    def clear(self) -> None:
        """Delete the spool (the round it held is finished, or about to be replaced)."""
        self._plan, self._next = None, 1
        if not self.folder.exists():
            return
        for file in [*self.folder.glob("update-*.npz"), *self.folder.glob(".*.tmp")]:
            file.unlink(missing_ok=True)
        (self.folder / PLAN).unlink(missing_ok=True)

    def _write_plan(self, plan: RoundPlan) -> None:
        atomic_write(self.folder / PLAN, lambda out: out.write(plan.model_dump_json(indent=1).encode()))
        self._sync_folder()
        self._plan = plan

    def _sync_folder(self) -> None:
        """Make the last rename durable too (a power cut must not undo an accepted update)."""
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read_update(self, file: Path, plan: RoundPlan) -> tuple[SpooledUpdate, dict[str, np.ndarray]]:
        try:
            with np.load(file, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            meta = SpooledUpdate.model_validate_json(arrays.pop(META).tobytes())
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # pydantic's ValidationError is a ValueError
            raise SpoolError(f"{file} is unreadable ({exc}); {self._advice()}") from None
        assigned = {a.device_id for a in plan.assignments}
        if meta.update.round != plan.round or meta.device_id not in assigned:
            raise SpoolError(f"{file} holds an update of {meta.device_id} for round {meta.update.round}, which "
                             f"round {plan.round}'s plan does not expect; {self._advice()}")
        return meta, arrays

    def _advice(self) -> str:
        return f"delete {self.folder} to run the round again without its accepted updates"
