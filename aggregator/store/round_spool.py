"""The open round on disk: its plan and every update accepted so far, so a crash loses none of them.

Layout of STATE_DIR/open_round/:
    plan.json            round number, base version, start, deadline, assignments, pool size, phase
    update-000001.npz    the first accepted update: its validated tensors plus `__meta__` (device,
    update-000002.npz    Update header, wire bytes and how quantised tensors are stored, as JSON);
                         numbered in order of acceptance

A float32 tensor is one entry under its name. A quantised one (protocol.quantized, from an int8,
int8-row or int4 frame) stays quantised, about its wire size: entries `<name>.codes` and
`<name>.scales`, and in `__meta__` its kind and shape:

    int8       codes int8, one per element; scales float32, one
    int8-row   codes int8, one per element; scales float32, one per row (protocol.quantized.row_grid)
    int4       codes uint8, two per byte, low nibble first, an odd count padded with a zero nibble;
               scales float32, one (any one-scale tensor whose codes lie in [-7, 7] is stored so)

Reading one back gives the same codes and scales, hence bit for bit the same sum. Files are plain
np.savez archives read with allow_pickle=False, checked entry by entry (kinds, dtypes, counts, code
and scale ranges): a spool that does not check out stops the start with a SpoolError naming the file.

Every file is written atomically (temp, fsync, rename, fsync of the folder), and an update is
spooled before the ledger records it as accepted, so "accepted" always means "durably spooled".
With group commit (`group_commit`, turned on by Ledger.group_commit for the running service) an
accepted update is first written as a hidden `.update-NNNNNN.npz.pending` file without fsync;
`sync` then makes every pending file durable at once (their fsyncs in parallel, which the file
system's journal commits together, then the renames and one fsync of the folder) before the
ledger writes their rows. A crash before `sync` leaves only pending files, which are never read
and are deleted: those updates were never recorded as accepted, and count nowhere. After a crash the
engine re-adds the spooled updates in their order to a fresh accumulator, which gives exactly the
sum it had. The spool is cleared once state.json records the round as finished; a spool whose
round state.json already records is a leftover of a crash in between and is discarded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import threading
import zipfile
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.atomic_file import atomic_write, sync_folder
from protocol.messages import Update
from protocol.quantized import QuantizedTensor, Tensor, pack_nibbles, row_grid, unpack_nibbles

log = logging.getLogger(__name__)
META = "__meta__"
PLAN = "plan.json"
PENDING = ".pending"  # suffix of an update written but not yet made durable (group commit)
CLEARED = ".cleared-"  # a spool folder set aside by `clear`, being deleted
SYNC_THREADS = 16  # parallel fsyncs of one group commit
# what reading a damaged .npz raises (MemoryError: an entry's header claiming a shape larger than memory;
# zlib.error: a deflated entry whose data does not decompress)
ARCHIVE_ERRORS = (OSError, ValueError, EOFError, KeyError, MemoryError, zipfile.BadZipFile, zlib.error)
_MAX_F32 = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Assignment:
    """One device's task for a round."""

    device_id: str
    tier: str
    epochs: int
    batch_size: int
    learning_rate: float
    mask_classes: bool = False
    logit_adjust: float = 0.0  # devices add this times log(their label shares) to the logits in their loss
    proximal_mu: float = 0.0
    weighted: bool = True  # updates weighted by samples (False: one vote per device), for relays
    weigh_work: bool = False  # partial work (fewer steps than asked, at the deadline) weighs by the share done
    variant: int = 0  # FedMut: which mutation of the global model the device starts from (0: the global model)
    announced_samples: int | None = None  # what the device's hello announced when it was given the task



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


class SpooledQuantized(BaseModel):
    """How one quantised tensor is stored: its kind (see the module docstring) and the shape it stands for."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["int8", "int8-row", "int4"]
    shape: list[Annotated[int, Field(ge=0)]]


class SpooledUpdate(BaseModel):
    """The metadata stored with one accepted update's tensors."""

    model_config = ConfigDict(extra="forbid")

    device_id: str
    update: Update
    nbytes: int
    quantized: dict[str, SpooledQuantized] = Field(default_factory=dict)  # tensor name -> how it is stored


@dataclass(frozen=True)
class SpooledRound:
    """An open round read back from disk: its plan and its accepted updates in order of acceptance."""

    plan: RoundPlan
    updates: list[tuple[SpooledUpdate, dict[str, Tensor]]]


class RoundSpool:
    """Writes and reads STATE_DIR/open_round."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._plan: RoundPlan | None = None
        self._next = 1
        self.group_commit = False  # accept writes pending files; `sync` makes them durable together
        self._pending: list[tuple[Path, Path]] = []  # (pending file, final name), in order of acceptance
        self._syncer: ThreadPoolExecutor | None = None
        self._remove_cleared()

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

    def accept(self, device_id: str, update: Update, nbytes: int, tensors: Mapping[str, Tensor]) -> None:
        """Durably store one accepted update of the open round (returns once it is on disk)."""
        if self._plan is None or update.round != self._plan.round:
            raise SpoolError(f"update of round {update.round} but the spooled round is "
                             f"{self._plan.round if self._plan else 'none'}")
        arrays, quantized = _entries(tensors)
        meta = SpooledUpdate(device_id=device_id, update=update, nbytes=nbytes, quantized=quantized)
        arrays[META] = np.frombuffer(meta.model_dump_json().encode(), np.uint8)
        path = self.folder / f"update-{self._next:06d}.npz"
        if self.group_commit:
            pending = self.folder / f".{path.name}{PENDING}"
            with open(pending, "wb") as out:
                np.savez(out, **arrays)
            self._pending.append((pending, path))
        else:
            atomic_write(path, lambda out: np.savez(out, **arrays))
        self._next += 1

    def sync(self) -> None:
        """Make every pending update durable, in order of acceptance: one group commit (see the module docstring)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="tierfl-spool-sync")
        list(self._syncer.map(_fsync, [file for file, _ in pending]))
        for file, path in pending:
            os.replace(file, path)
        sync_folder(self.folder)

    def load(self, committed_round: int, version: int) -> SpooledRound | None:
        """The round that was open when the process stopped, or None (a stale spool is discarded)."""
        path = self.folder / PLAN
        if not path.exists():
            self.clear()
            return None
        try:
            plan = RoundPlan.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise SpoolError(f"{path} is unreadable ({first_problem(exc)}); {self._advice()}") from None
        except OSError as exc:  # a folder, or not readable
            raise SpoolError(f"{path} is unreadable ({exc}); {self._advice()}") from None
        if plan.round <= committed_round:  # committed, then stopped before the spool was cleared
            log.info("discarding the spool of round %d: state.json already records it", plan.round)
            self.clear()
            return None
        if plan.round != committed_round + 1 or plan.base_version != version:
            raise SpoolError(f"{self.folder} holds round {plan.round} on version {plan.base_version}, but the "
                             f"state is at round {committed_round}, version {version}; {self._advice()}")
        for leftover in self.folder.glob(f".update-*{PENDING}"):  # written, never made durable: never accepted
            leftover.unlink(missing_ok=True)
        updates = [self._read_update(file, plan) for file in sorted(self.folder.glob("update-*.npz"))]
        self._plan, self._next = plan, len(updates) + 1
        return SpooledRound(plan, updates)

    def clear(self) -> None:
        """Delete the spool (the round it held is finished, or about to be replaced).

        The folder is renamed aside at once (atomic: from then on no spool is open) and its files are
        deleted on a helper thread, off the round's critical path; a leftover of a crash in between
        is deleted at the next start."""
        self._plan, self._next, self._pending = None, 1, []
        if not self.folder.exists():
            return
        aside = self.folder.with_name(f".{self.folder.name}{CLEARED}{secrets.token_hex(4)}")
        try:
            os.rename(self.folder, aside)
        except OSError:
            return
        threading.Thread(target=_remove_spool, args=(aside,), name="tierfl-spool-clear", daemon=True).start()

    def _remove_cleared(self) -> None:
        """Delete spools set aside by an earlier `clear` whose deletion a crash cut short (a deletion still running
        in this process does no harm: both skip what the other removed)."""
        for leftover in self.folder.parent.glob(f".{self.folder.name}{CLEARED}*"):
            _remove_spool(leftover)

    def _write_plan(self, plan: RoundPlan) -> None:
        atomic_write(self.folder / PLAN, lambda out: out.write(plan.model_dump_json(indent=1).encode()))
        self._plan = plan

    def _read_update(self, file: Path, plan: RoundPlan) -> tuple[SpooledUpdate, dict[str, Tensor]]:
        try:
            with np.load(file, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            if META not in arrays:
                raise ValueError(f"no {META} entry")
            meta = SpooledUpdate.model_validate_json(arrays.pop(META).tobytes())
            tensors = _tensors(arrays, meta.quantized)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise SpoolError(f"{file} is unreadable ({META}: {problems}); {self._advice()}") from None
        except ARCHIVE_ERRORS as exc:
            raise SpoolError(f"{file} is unreadable ({exc}); {self._advice()}") from None
        assigned = {a.device_id for a in plan.assignments}
        if meta.update.round != plan.round or meta.device_id not in assigned:
            raise SpoolError(f"{file} holds an update of {meta.device_id} for round {meta.update.round}, which "
                             f"round {plan.round}'s plan does not expect; {self._advice()}")
        return meta, tensors

    def _advice(self) -> str:
        return (f"run `tierfl aggregator --recover` (same options) to set {self.folder} aside and run the round "
                "again without its accepted updates")


def _remove_spool(folder: Path) -> None:
    """Delete a spool folder set aside by `clear`: its known files, then the folder (left if not empty)."""
    try:
        files = [*folder.glob("update-*.npz"), *folder.glob(".*.tmp"), *folder.glob(f".*{PENDING}"), folder / PLAN]
    except FileNotFoundError:  # the other deletion (a clear's thread, or a start's) removed it meanwhile
        return
    for file in files:
        file.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty (a file of someone else's): leave it
        folder.rmdir()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def first_problem(exc: ValidationError) -> str:
    """The first of a validation error's problems, on one line."""
    first = exc.errors()[0]
    where = ".".join(map(str, first["loc"])) or "the file"
    return f"{exc.error_count()} problems, first: {where}: {first['msg']}"


# -- tensors <-> archive entries ----------------------------------------------------------------


def _entries(tensors: Mapping[str, Tensor]) -> tuple[dict[str, np.ndarray], dict[str, SpooledQuantized]]:
    """The archive entries of an update's tensors, and how its quantised ones are stored."""
    arrays: dict[str, np.ndarray] = {}
    quantized: dict[str, SpooledQuantized] = {}

    def put(name: str, array: np.ndarray) -> None:
        if name in arrays or name == META:
            raise ValueError(f"tensor entry {name!r} clashes with another entry of the spool")
        arrays[name] = array

    for name, tensor in tensors.items():
        if not isinstance(tensor, QuantizedTensor):
            put(name, np.asarray(tensor))
            continue
        codes, scales = tensor.codes, tensor.scales
        if scales.size != 1:
            kind = "int8-row"
        elif codes.size and int(codes.min()) >= -7 and int(codes.max()) <= 7:
            kind, codes = "int4", pack_nibbles(codes)
        else:
            kind = "int8"
        put(f"{name}.codes", codes)
        put(f"{name}.scales", scales)
        quantized[name] = SpooledQuantized(kind=kind, shape=list(tensor.shape))
    return arrays, quantized


def _tensors(arrays: Mapping[str, np.ndarray], quantized: Mapping[str, SpooledQuantized]) -> dict[str, Tensor]:
    """An update's tensors, in their order, from its archive entries; ValueError says what does not check out."""
    tensors: dict[str, Tensor] = {}
    for entry, array in arrays.items():
        name, _, part = entry.rpartition(".")
        if name in quantized and part in ("codes", "scales"):
            if name not in tensors:
                tensors[name] = _quantized(name, quantized[name], arrays.get(f"{name}.codes"), arrays.get(f"{name}.scales"))
        elif entry in quantized:
            raise ValueError(f"tensor {entry!r} is stored both quantized and as an array")
        elif array.dtype != np.float32:
            raise ValueError(f"tensor {entry!r} is {array.dtype}, not float32")
        else:
            tensors[entry] = array
    missing = sorted(set(quantized) - set(tensors))
    if missing:
        raise ValueError(f"quantized tensors {missing} have no entries")
    return tensors


def _quantized(name: str, how: SpooledQuantized, codes: np.ndarray | None, scales: np.ndarray | None) -> QuantizedTensor:
    """One quantised tensor from its entries, after checking them against `how`."""
    where = f"tensor {name!r} ({how.kind})"
    if codes is None or scales is None:
        raise ValueError(f"{where}: entry {name}.codes or {name}.scales is missing")
    rows, columns = row_grid(how.shape)
    count = math.prod(how.shape)
    packed, limit = (True, 7) if how.kind == "int4" else (False, 127)
    expected = (np.dtype(np.uint8), (count + 1) // 2) if packed else (np.dtype(np.int8), count)
    if (codes.dtype, codes.shape) != (expected[0], (expected[1],)):
        raise ValueError(f"{where}: codes are {codes.dtype}{list(codes.shape)}, expected {expected[0]}[{expected[1]}] "
                         f"for shape {how.shape}")
    scale_count = rows if how.kind == "int8-row" else 1
    if (scales.dtype, scales.shape) != (np.dtype(np.float32), (scale_count,)):
        raise ValueError(f"{where}: scales are {scales.dtype}{list(scales.shape)}, expected float32[{scale_count}]")
    if not (np.isfinite(scales) & (scales >= 0) & (scales <= _MAX_F32 / (limit + 1))).all():
        raise ValueError(f"{where}: a scale is NaN, Inf, negative or too large")
    values = unpack_nibbles(codes, count, where) if packed else codes
    if values.size and int(values.min()) < -limit:  # -128 (int8) or -8 (a nibble): nothing can lie above the limit
        raise ValueError(f"{where}: a code lies outside [-{limit}, {limit}]")
    return QuantizedTensor(values, scales, tuple(how.shape))
