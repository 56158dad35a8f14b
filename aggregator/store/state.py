"""Durable aggregator state: global weights per committed version and the round history.

Layout of the state directory:
    weights/v000012.npz   global weights of version 12 (numpy .npz, loaded without pickle); the last
                          KEEP_VERSIONS versions are kept
    state.json            current version and round, model identity, round history, and the sha256
                          of every kept weights file
    state.prev.json       the state.json before the last commit
    open_round/           the round in progress: its plan and accepted updates (aggregator.store.round_spool)
    options.json          the options of the latest start (broker password masked), for `tierfl report`

Weights are written first, then state.json by atomic rename (each followed by an fsync of the
folder), so a crash at any instant leaves the last committed version intact and resumes exactly
there; the open round's spool is cleared only after state.json records that round, so its accepted
updates are never lost nor counted twice.

A state file that does not check out (empty, truncated, not JSON, not the schema, weights whose
sha256 is not the one recorded) stops the start with StateCorrupt naming the file; `recover` rolls
back to the newest kept version that verifies.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from aggregator.store.round_spool import ARCHIVE_ERRORS, RoundSpool, SpoolError
from protocol.atomic_file import atomic_write, sync_folder
from protocol.messages import RoundSummary

log = logging.getLogger(__name__)
KEEP_VERSIONS = 3
STATE_FILE = "state.json"
PREVIOUS_STATE_FILE = "state.prev.json"
OPTIONS_FILE = "options.json"
EXIT_NEEDS_OPERATOR = 2  # exit status of `tierfl aggregator` when the state directory needs an operator


class StateRecord(BaseModel):
    """What state.json holds."""

    model_config = ConfigDict(extra="forbid")

    fleet: str
    model: str  # model identity: name + sha256 of the full-width manifest
    version: int
    round: int  # last round that finished (committed or failed)
    history: list[RoundSummary] = []
    weights_sha256: dict[int, str] = {}  # kept version -> sha256 of its weights file (empty in older state dirs)


OptionValue = str | int | float | bool | list[str] | None


class RunOptions(BaseModel):
    """What options.json holds: the command line of the latest start, as its parser resolved it."""

    model_config = ConfigDict(extra="forbid")

    started: float  # unix time
    options: dict[str, OptionValue]  # option dest -> value; secrets masked


def write_run_options(root: Path, options: dict[str, OptionValue]) -> None:
    """Record the options of this start in ROOT/options.json."""
    record = RunOptions(started=time.time(), options=options)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / OPTIONS_FILE, lambda out: out.write(record.model_dump_json(indent=1).encode()))


def read_run_options(root: Path) -> RunOptions | None:
    """The options of the latest start, or None if none were recorded (or the file does not read)."""
    try:
        return RunOptions.model_validate_json((root / OPTIONS_FILE).read_bytes())
    except (OSError, ValidationError):
        return None


class StateMismatch(RuntimeError):
    """The state directory belongs to another fleet or model."""


class StateCorrupt(RuntimeError):
    """A file of the state directory cannot be read or does not verify; the message names it and what to do."""


def recover_hint(root: Path) -> str:
    """What an operator does about a corrupt state directory."""
    return (f"run `tierfl aggregator --recover --state-dir {root}` (with the service's other options) to roll back "
            f"to the newest kept version that verifies, or move {root} aside to start over")


def set_aside(path: Path) -> Path:
    """Rename a bad file or folder to PATH.bad-<time> beside it (kept for inspection); returns the new name."""
    aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}")
    path.rename(aside)
    sync_folder(path.parent)
    return aside


class StateStore:
    """Reads and commits the aggregator's state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._weights_dir = root / "weights"
        self._weights_dir.mkdir(parents=True, exist_ok=True)
        self.open_round = RoundSpool(root / "open_round")
        self._shas: dict[int, str] = {}  # what state.json records: kept version -> sha256 of its weights file

    def weights_path(self, version: int) -> Path:
        return self._weights_dir / f"v{version:06d}.npz"

    def load(self, fleet: str, model: str) -> tuple[StateRecord, dict[str, np.ndarray]] | None:
        """The last committed state, or None for a fresh directory; StateMismatch if it is another run's,
        StateCorrupt (naming the file) if state.json or its weights do not check out."""
        path = self.root / STATE_FILE
        if not path.exists():
            if (self.root / PREVIOUS_STATE_FILE).exists():
                raise StateCorrupt(f"{path} is missing but {PREVIOUS_STATE_FILE} is there; {recover_hint(self.root)}")
            return None
        record = self._read_record(path)
        self._check_identity(record, fleet, model)
        weights = self._read_weights(record.version, record.weights_sha256.get(record.version))
        self._shas = dict(record.weights_sha256)
        return record, weights

    def commit(self, record: StateRecord, weights: dict[str, np.ndarray] | None) -> None:
        """Durably record `record` (no round open); `weights` (if given) become version `record.version`.

        The previous state.json is kept as state.prev.json; the open-round spool is cleared afterwards:
        the round it held is now in state.json.
        """
        shas = {**self._shas, **record.weights_sha256}
        if weights is not None:
            buffer = io.BytesIO()
            np.savez(buffer, **weights)
            data = buffer.getvalue()
            atomic_write(self.weights_path(record.version), lambda out: out.write(data))
            shas[record.version] = hashlib.sha256(data).hexdigest()
        kept = sorted(shas)[-KEEP_VERSIONS:]
        self._shas = {v: shas[v] for v in kept}
        record = record.model_copy(update={"weights_sha256": self._shas})
        current = self.root / STATE_FILE
        if current.exists():
            previous = current.read_bytes()
            atomic_write(self.root / PREVIOUS_STATE_FILE, lambda out: out.write(previous))
        atomic_write(current, lambda out: out.write(record.model_dump_json(indent=1).encode()))
        self.open_round.clear()
        keep = {self.weights_path(v).name for v in kept} | {self.weights_path(record.version).name}
        for old in sorted(self._weights_dir.glob("v*.npz"))[:-KEEP_VERSIONS]:
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def recover(self, fleet: str, model: str) -> StateRecord | None:
        """Roll back to the newest kept version that verifies (state.json, else state.prev.json, at their own
        version or an older kept one); set aside what does not check out and an open round that no longer
        fits. Returns the record now in state.json, None if the directory holds no state; StateCorrupt if
        nothing verifies."""
        path = self.root / STATE_FILE
        if not path.exists() and not (self.root / PREVIOUS_STATE_FILE).exists():
            log.info("recover: %s holds no state yet; nothing to do", self.root)
            return None
        records: dict[str, StateRecord] = {}
        for name in (STATE_FILE, PREVIOUS_STATE_FILE):
            try:
                records[name] = self._read_record(self.root / name)
            except FileNotFoundError:
                log.warning("recover: %s is missing", self.root / name)
            except StateCorrupt as exc:
                log.warning("recover: %s", exc)
        for record in records.values():
            self._check_identity(record, fleet, model)
        good = self._newest_verified(list(records.values()))
        if good is None:
            raise StateCorrupt(f"no kept version in {self.root} verifies ({STATE_FILE}, {PREVIOUS_STATE_FILE}, "
                               f"{self._weights_dir}); move {self.root} aside to start over")
        unchanged = good == records.get(STATE_FILE)
        if unchanged:
            log.info("recover: %s verifies (version %d after round %d); it stays", path, good.version, good.round)
        else:
            if path.exists():
                log.warning("recover: %s set aside as %s", path, set_aside(path))
            atomic_write(path, lambda out: out.write(good.model_dump_json(indent=1).encode()))
            log.warning("recover: rolled back to version %d after round %d (%s now says so)", good.version,
                        good.round, path)
        self._shas = dict(good.weights_sha256)
        self._recover_open_round(good, moved=not unchanged)
        return good

    def _recover_open_round(self, record: StateRecord, moved: bool) -> None:
        """Keep the open round if it still fits the recovered state and reads back; set it aside otherwise."""
        folder = self.open_round.folder
        if not folder.exists() or not any(folder.iterdir()):
            return
        try:
            self.open_round.load(record.round, record.version)
            self.open_round = RoundSpool(folder)  # forget what load remembered: the engine loads it again
            if moved:
                raise SpoolError(f"{folder} was spooled on a version that is no longer the state's")
        except SpoolError as exc:
            aside = set_aside(folder)
            log.warning("recover: the open round is set aside as %s and will run again without its accepted "
                        "updates (%s); the ledger keeps their rows", aside, exc)

    def _newest_verified(self, candidates: list[StateRecord]) -> StateRecord | None:
        """The newest (version, round) of the candidates, each at its version or rolled back to an older kept one,
        whose weights verify."""
        best: StateRecord | None = None
        for record in candidates:
            for version in sorted({record.version, *(v for v in record.weights_sha256 if v < record.version)}, reverse=True):
                try:
                    self._read_weights(version, record.weights_sha256.get(version))
                except StateCorrupt as exc:
                    log.warning("recover: %s", exc)
                    continue
                rolled = _rolled_back(record, version)
                if best is None or (rolled.version, rolled.round) > (best.version, best.round):
                    best = rolled
                break
        return best

    def _read_record(self, path: Path) -> StateRecord:
        try:
            data = path.read_bytes()
        except IsADirectoryError:
            raise StateCorrupt(f"{path} is a folder, not a state file; {recover_hint(self.root)}") from None
        if not data.strip():
            raise StateCorrupt(f"{path} is empty (a crash or a full disk?); {recover_hint(self.root)}")
        try:
            return StateRecord.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "the file"
            raise StateCorrupt(f"{path} is not a valid state file ({where}: {first['msg']}); "
                               f"{recover_hint(self.root)}") from None

    def _check_identity(self, record: StateRecord, fleet: str, model: str) -> None:
        if (record.fleet, record.model) != (fleet, model):
            raise StateMismatch(
                f"{self.root} holds fleet {record.fleet!r} / model {record.model!r}, not {fleet!r} / {model!r}; "
                "use another --state-dir (or delete it to start over)"
            )

    def _read_weights(self, version: int, sha256: str | None) -> dict[str, np.ndarray]:
        """Version `version`'s weights, checked against `sha256` when state.json recorded it."""
        path = self.weights_path(version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StateCorrupt(f"{path} (the weights of version {version}) is missing; "
                               f"{recover_hint(self.root)}") from None
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise StateCorrupt(f"{path} does not match the sha256 state.json records for version {version} "
                               f"({len(data)} bytes: truncated or changed); {recover_hint(self.root)}")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                weights = {name: archive[name] for name in archive.files}
        except ARCHIVE_ERRORS as exc:
            raise StateCorrupt(f"{path} is not a readable weights archive ({exc}); {recover_hint(self.root)}") from None
        bad = [name for name, array in weights.items() if array.dtype.kind != "f" or not np.isfinite(array).all()]
        if not weights or bad:
            raise StateCorrupt(f"{path} holds {'no tensors' if not weights else f'non-finite or non-float tensors {bad[:3]}'}; "
                               f"{recover_hint(self.root)}")
        return {name: array.astype(np.float32) for name, array in weights.items()}


def _rolled_back(record: StateRecord, version: int) -> StateRecord:
    """`record` as it was when `version` was current: the rounds after the last one at `version` undone."""
    if version == record.version:
        return record
    history = [summary for summary in record.history if summary.version <= version]
    return record.model_copy(update={
        "version": version, "round": history[-1].round if history else 0, "history": history,
        "weights_sha256": {v: sha for v, sha in record.weights_sha256.items() if v <= version},
    })
