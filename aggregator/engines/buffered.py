"""Asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022): no round barrier.

Every idle available device gets a task on the newest model version as soon as it is free. Each
update that comes back is folded into a buffer, its delta scaled by its staleness factor
s(tau) = (1 + tau) ** -exponent (tau = versions committed since the one it trained on; 0.5 gives
FedBuff's 1/sqrt(1 + tau)), its weight in the mean unchanged. Every `buffer_size` updates the
buffer is applied: a new version, committed durably like a synchronous round, and its summary
published. Updates staler than `max_staleness` are refused (too_stale). A task whose device
neither answers nor shows up by its deadline plus one more timeout is given up, and the device
may get a new one; a late answer to a task still awaited counts, with its staleness.

The engine is the synchronous one with the round barrier replaced: the open "round" is the
buffer, and `rounds` counts applied buffers (versions). Like a round, the buffer is spooled to the
state directory as it fills (aggregator.store.round_spool), so a restart resumes it with every accepted
update. Batch-norm models keep their averaged running statistics: there is no statistics phase
without a barrier.

Weight integrity as in the round engine: an update claims no more samples than its device
announced, its norm is finite and within the tier's outlier bound, the buffer's float32 sums stay
finite, and a buffer whose new global would hold NaN or Inf is refused whole (non_finite). There
is no `max_share` cap: without a round's selection there is no set of devices to cap a share of.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from aggregator.engines.base import EngineConfig, OpenRound, Outgoing
from aggregator.engines.rounds import RECORDED_ON_RESTART, RoundEngine, check_update_tensors
from aggregator.evaluate import HeldOutEvaluator
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.ledger import Ledger
from aggregator.store.round_spool import Assignment, RoundPlan
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import ClientUpdate, Strategy
from aggregator.strategies.privacy import PrivacyBudget
from aggregator.strategies.robust import update_norm
from protocol.messages import RejectReason, RoundSummary, Statistics, Update

log = logging.getLogger(__name__)


class BufferConfig(BaseModel):
    """FedBuff settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    buffer_size: int = Field(10, ge=1)  # K: updates per applied version
    max_staleness: int = Field(10, ge=0)  # updates trained on an older version than this are refused
    staleness_exponent: float = Field(0.5, ge=0)  # s(tau) = (1 + tau) ** -exponent
    concurrency: int | None = Field(None, ge=1)  # most devices training at once (None: every idle device)
    min_clients: int = Field(1, ge=1)  # devices available before the first tasks go out (after each start)


def staleness_factor(staleness: int, exponent: float) -> float:
    """s(tau) = (1 + tau) ** -exponent: how much an update trained `staleness` versions ago still counts."""
    return float((1.0 + staleness) ** -exponent)


@dataclass(frozen=True)
class _Flight:
    """A task out on a device."""

    assignment: Assignment
    round: int  # the buffer the task was sent in (the round field of its task)
    base_version: int
    deadline: float


class BufferedEngine(RoundEngine):
    """Runs FedBuff over the registry's devices; same interface to the service as the round engine."""

    UNIT = "buffer"  # what the logs call one applied version

    def __init__(
        self,
        config: EngineConfig,
        buffer: BufferConfig,
        strategy: Strategy,
        artifacts: ArtifactStore,
        store: StateStore,
        registry: DeviceRegistry,
        evaluator: HeldOutEvaluator | None = None,
        ledger: Ledger | None = None,
        privacy: PrivacyBudget | None = None,
    ) -> None:
        self.buffer = buffer
        self._flights: dict[str, _Flight] = {}
        self._dispatches = 0
        self._staleness: list[int] = []  # of the updates in the open buffer
        self._started = False  # min_clients devices were available once since this process started
        super().__init__(config.model_copy(update={"static_batch_norm": False}), strategy, artifacts, store, registry,
                         evaluator, ledger, privacy=privacy)  # DP: each applied buffer is charged as sampling rate 1

    def tick(self, now: float) -> list[Outgoing]:
        """Give up on overdue tasks, then send a task to every idle available device."""
        if self.finished:
            return []
        if self._open is None:
            self._open_buffer(now)
        for device_id, flight in list(self._flights.items()):
            info = self.registry.get(device_id)
            if now > flight.deadline + self.config.round_timeout_s or info is None or not info.online:
                del self._flights[device_id]
                self.registry.missed(device_id)
                log.info("gave up on %s's task of version %d", device_id, flight.base_version)
        return self._dispatch(now)

    def _open_buffer(self, now: float) -> None:
        self._open = self._empty_buffer(now)
        self.store.open_round.begin(RoundPlan(round=self._open.number, base_version=self.record.version, started=now,
                                              deadline=now, assignments=[]))

    def _empty_buffer(self, started: float) -> OpenRound:
        self._staleness = []
        return OpenRound(number=self.record.round + 1, started=started, deadline=float("inf"), assignments={},
                          accumulator=self.strategy.start_aggregation(self.weights))

    def _resume_open_round(self, now: float) -> None:
        """Rebuild the buffer a crash cut short from its spool, each update with its staleness as accepted."""
        spooled = self.store.open_round.load(self.record.round, self.record.version)
        if spooled is None:
            return
        self._open = self._empty_buffer(spooled.plan.started)  # the spool stays as it is and grows from here
        assignments = {a.device_id: a for a in spooled.plan.assignments}
        recorded = self.ledger.accepted_update_ids(self._open.number) if self.ledger else set()
        for meta, tensors in spooled.updates:
            self._fold_buffered(meta.device_id, assignments[meta.device_id], meta.update, tensors, update_norm(tensors),
                                meta.nbytes)
            if meta.update.update_id not in recorded:  # spooled, then stopped before the ledger row
                self._record_accepted(self._open.number, meta.device_id, meta.update, meta.nbytes, RECORDED_ON_RESTART)
        log.info("buffer %d resumed from %s with %d updates accepted before the restart", self._open.number,
                 self.store.open_round.folder, self._open.accumulator.count)

    def _dispatch(self, now: float) -> list[Outgoing]:
        available = self.registry.available(now)
        if not self._started:
            if len(available) < self.buffer.min_clients:
                if not self._waiting_logged:
                    log.info("buffer %d: waiting for devices (%d of --min-clients %d available)",
                             self.record.round + 1, len(available), self.buffer.min_clients)
                    self._waiting_logged = True
                return []
            self._started = True
        idle = [d for d in available if d.device_id not in self._flights]
        room = len(idle) if self.buffer.concurrency is None else self.buffer.concurrency - len(self._flights)
        if not idle or room <= 0:
            return []
        self._dispatches += 1
        assignments = self._announced(self.strategy.configure_round(self._dispatches, idle)[:room])
        assert self._open is not None
        deadline = now + self.config.round_timeout_s
        for a in assignments:
            self._flights[a.device_id] = _Flight(a, self._open.number, self.record.version, deadline)
            self.registry.asked(a.device_id, self._open.number)
        if assignments:
            log.info("version %d: tasks for %s", self.record.version, ", ".join(f"{a.device_id} (tier {a.tier})" for a in assignments))
        return [self._task(a, self._open.number, deadline) for a in assignments]

    def on_update(self, device_id: str, msg_id: str, update: Update, tensors: Mapping[str, np.ndarray], nbytes: int, now: float) -> list[Outgoing]:
        """Validate one update and fold it into the buffer (scaled by its staleness), or reject it with a reason."""
        flight = self._flights.get(device_id)
        if update.unchanged and flight and not tensors:
            tensors = self._zero_update(flight.assignment.tier)
        problem = self._check_buffered(device_id, update, tensors, flight)
        norm = update_norm(tensors) if problem is None else 0.0
        if problem is None and flight is not None and self._open is not None:
            client = self._buffered(flight.assignment, update, tensors)
            problem = self._check_weight(self._open, client, norm, flight.assignment.weighted)
        if problem:
            refusal = self._refuse_update(device_id, msg_id, update, *problem)
            if problem[0] is not RejectReason.TOO_STALE:
                return refusal
            del self._flights[device_id]  # its task is over: a fresh one on the newest version
            return refusal + self.tick(now)
        assert self._open is not None and flight is not None
        del self._flights[device_id]
        in_buffer = update.model_copy(update={"round": self._open.number})  # spooled with the buffer it joins
        self.store.open_round.assign(flight.assignment)
        self.store.open_round.accept(device_id, in_buffer, nbytes, dict(tensors))  # on disk before the ledger says accepted
        self._record_accepted(self._open.number, device_id, update, nbytes)
        self.registry.answered(device_id, None if update.unchanged else update.train_loss)
        self._fold_buffered(device_id, flight.assignment, update, tensors, norm, nbytes)
        out: list[Outgoing] = []
        if self._open.accumulator.count >= self.buffer.buffer_size:
            out = self._close_round(now)  # commits the buffer as the next version
        return out + self.tick(now)

    def _buffered(self, assignment: Assignment, update: Update, tensors: Mapping[str, np.ndarray]) -> ClientUpdate:
        """The accumulator's view of an update, its delta scaled by its staleness."""
        assert self._open is not None
        staleness = self.record.version - update.base_version
        return self._client_update(self._open, assignment, update, tensors,
                                   scale=staleness_factor(staleness, self.buffer.staleness_exponent))

    def _fold_buffered(self, device_id: str, assignment: Assignment, update: Update, tensors: Mapping[str, np.ndarray],
                       norm: float, nbytes: int) -> None:
        """Count one accepted update toward the buffer, its delta scaled by its staleness."""
        assert self._open is not None
        self._seen_update_ids.add(update.update_id)
        staleness = self.record.version - update.base_version
        self._staleness.append(staleness)
        self._open.assignments.setdefault(device_id, assignment)  # a buffer learns its devices as they answer
        self._fold(self._open, self._buffered(assignment, update, tensors), update, norm, nbytes)
        if update.eval_accuracy is not None and update.eval_loss is not None and update.eval_samples:
            self._open.evals.append((update.tier, update.eval_loss, update.eval_accuracy, update.eval_samples))
        log.info("buffer %d: update %d/%d from %s (staleness %d)", self._open.number, self._open.accumulator.count,
                 self.buffer.buffer_size, device_id, staleness)

    def on_statistics(self, device_id: str, msg_id: str, body: Statistics, tensors: Mapping[str, np.ndarray], now: float) -> list[Outgoing]:
        """Refused: buffered aggregation has no statistics phase."""
        return self._refuse_update(device_id, msg_id, body, RejectReason.UNEXPECTED, "buffered aggregation asks for no statistics")

    def _check_buffered(self, device_id: str, update: Update, tensors: Mapping[str, np.ndarray], flight: _Flight | None) -> tuple[RejectReason, str] | None:
        if device_id not in self.registry:
            return RejectReason.UNKNOWN_DEVICE, f"{device_id} has not announced itself"
        if update.update_id in self._seen_update_ids:
            return RejectReason.DUPLICATE, f"update {update.update_id} was already counted"
        if flight is None:
            return RejectReason.NOT_SELECTED, f"{device_id} has no task awaited (given up, or never sent)"
        if update.round != flight.round:
            return RejectReason.STALE_ROUND, f"answers the task of buffer {update.round}, awaited the one of buffer {flight.round}"
        if update.base_version != flight.base_version:
            return RejectReason.WRONG_VERSION, f"trained on version {update.base_version}, the task sent {flight.base_version}"
        if (staleness := self.record.version - update.base_version) > self.buffer.max_staleness:
            return RejectReason.TOO_STALE, f"trained on version {update.base_version}, {staleness} versions old (bound {self.buffer.max_staleness})"
        if update.tier != flight.assignment.tier:
            return RejectReason.UNKNOWN_TIER, f"tier {update.tier!r} but the task was for tier {flight.assignment.tier!r}"
        return self._check_samples(device_id, flight.assignment, update.num_samples) or check_update_tensors(
            update, tensors, flight.assignment.tier, self.artifacts)

    def _round_complete(self, now: float) -> bool:
        return False  # a buffer closes on its count alone (on_update)

    def _summarise(self, current: OpenRound, now: float, committed: bool) -> RoundSummary:
        summary = super()._summarise(current, now, committed)
        staleness = {"staleness_mean": float(np.mean(self._staleness)) if self._staleness else 0.0,
                     "staleness_max": float(max(self._staleness, default=0)), "in_flight": float(len(self._flights))}
        updates = current.accumulator.count  # a fast device may answer twice within one buffer
        return summary.model_copy(update={"metrics": {**summary.metrics, **staleness}, "selected": updates, "answered": updates})
