"""The round ledger: every update the aggregator received, accepted or refused, and why.

One SQLite file in the state directory (`ledger.sqlite`), appended to by the service's single
loop thread. It is the audit trail an operator queries (`sqlite3 STATE/ledger.sqlite`), and it
makes replays idempotent across restarts: an update id it records as accepted is a duplicate
forever. An update is spooled to STATE/open_round before its row is written (aggregator.store.round_spool),
so a round a crash cut short resumes with every update the ledger accepted; the engine writes the
rows of those spooled just before the crash when it resumes.

The running service turns on group commit (`group_commit`): accepted rows then wait for the next
`flush` like refusals, and each flush first makes the spooled updates durable (RoundSpool.sync)
and then writes all rows in one transaction: one parallel batch of fsyncs and one SQLite commit per
flush instead of three fsyncs per update. The service flushes within 0.2 s of an acceptance and
every commit of a version flushes first, so a committed version never counts an update the ledger
lacks; a crash loses at most the acceptances since the last flush, which were recorded nowhere
(neither spooled nor in the ledger) and so count nowhere: nothing is ever counted twice.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from aggregator.store.round_spool import RoundSpool
from aggregator.store.state import StateCorrupt

SCHEMA = """
CREATE TABLE IF NOT EXISTS received (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,            -- unix time of the decision
    round INTEGER,               -- the round the message named (NULL if it could not be read)
    device TEXT,                 -- sender, from its topic (NULL if unknown)
    kind TEXT NOT NULL,          -- update | decline | statistics | frame
    update_id TEXT,
    accepted INTEGER NOT NULL,   -- 1 accepted, 0 refused
    reason TEXT,                 -- RejectReason value when refused
    detail TEXT NOT NULL,
    num_samples INTEGER,
    bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS received_update_id ON received (update_id);
"""


_INSERT = ("INSERT INTO received (at, round, device, kind, update_id, accepted, reason, detail, num_samples, bytes) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
MAX_PENDING_REFUSALS = 1000  # refusal rows held before they are written in one transaction


class Ledger:
    """Append-only record of received updates in SQLite.

    An accepted row is written (and committed) at once: exactly-once counting rests on it. Refusals
    are buffered and written together, one transaction per `flush` (the service flushes every second
    and on stop) or per MAX_PENDING_REFUSALS rows, so a flood of hostile frames costs no fsync each;
    a crash loses at most the last second of refusals, never an acceptance. Rows keep their order.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: each row is durable at once
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
            problem = self._db.execute("PRAGMA quick_check(1)").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            problem = str(exc)
        if problem != "ok":
            self._db.close()
            raise StateCorrupt(f"{path} is not a readable ledger ({problem}); run `tierfl aggregator --recover` "
                               "(with the service's options) to set it aside and start a new one")
        self._pending: list[tuple[object, ...]] = []  # rows not yet written (refusals; acceptances in group commit)
        self._pending_accepted = 0
        self._spool: RoundSpool | None = None  # group commit: synced before the rows are written

    def group_commit(self, spool: RoundSpool) -> None:
        """From now on acceptances wait for `flush` too, and each flush syncs `spool` first (module docstring)."""
        spool.group_commit = True
        self._spool = spool

    @property
    def pending_acceptances(self) -> int:
        """Accepted rows waiting for the next flush (group commit)."""
        return self._pending_accepted

    def record(
        self, *, kind: str, accepted: bool, detail: str = "", round_number: int | None = None, device: str | None = None,
        update_id: str | None = None, reason: str | None = None, num_samples: int | None = None, nbytes: int = 0,
    ) -> None:
        """Append one decision (a refusal may wait for the next flush; an acceptance never does)."""
        row = (time.time(), round_number, device, kind, update_id, int(accepted), reason, detail, num_samples, nbytes)
        self._pending.append(row)
        self._pending_accepted += int(accepted)
        if (accepted and self._spool is None) or len(self._pending) >= MAX_PENDING_REFUSALS:
            self.flush()

    def flush(self) -> None:
        """Write every buffered row in one transaction."""
        if self._spool is not None:
            self._spool.sync()  # the updates on disk before their rows say accepted
        if not self._pending:
            return
        rows, self._pending, self._pending_accepted = self._pending, [], 0
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(_INSERT, rows)

    def accepted_update_ids(self, up_to_round: int) -> set[str]:
        """Ids of the updates accepted in rounds 1..up_to_round (those rounds are finished)."""
        self.flush()
        rows = self._db.execute(
            "SELECT update_id FROM received WHERE accepted = 1 AND kind = 'update' AND round <= ?", (up_to_round,)
        )
        return {row[0] for row in rows}

    def counts(self) -> dict[str, int]:
        """Decisions by outcome: "accepted", "declined" (a device's decline of a round) or the refusal reason."""
        self.flush()
        rows = self._db.execute("SELECT COALESCE(reason, CASE kind WHEN 'decline' THEN 'declined' ELSE 'accepted' END), "
                                "COUNT(*) FROM received GROUP BY 1")
        return dict(rows.fetchall())

    def close(self) -> None:
        """Write what is buffered and close the database."""
        self.flush()
        self._db.close()
