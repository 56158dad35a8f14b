"""Asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022): no round barrier.

Every idle available device gets a task on the newest model version as soon as it is free. Each
update that comes back is folded into a buffer, its delta scaled by its staleness factor
s(tau) = (1 + tau) ** -exponent (tau = versions committed since the one it trained on; 0.5 gives
FedBuff's 1/sqrt(1 + tau)), its weight in the mean unchanged. Every `buffer_size` updates the
buffer is applied: a new version, committed durably like a synchronous round, and its summary
published. Updates staler than `max_staleness` are refused (too_stale). A task whose device
neither answers nor shows up by its deadline plus one more timeout is given up, and the device
may get a new one; a late answer to a task still awaited counts, with its staleness.

No round barrier, so no round: the open "round" is the buffer, and `rounds` counts applied
buffers (versions). It is built from the parts the round engine uses (aggregator.engines.intake,
.tasks, .model) with its own flights and buffer. Like a round, the buffer is spooled to the state
directory as it fills (aggregator.store.round_spool), so a restart resumes it with every accepted
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

from aggregator.engines.base import OpenRound, Outgoing, RoundSlot
from aggregator.engines.intake import Problem, UpdateIntake
from aggregator.engines.model import GlobalModel
from aggregator.engines.parts import EngineParts, forwarded
from aggregator.engines.tasks import TaskBuilder
from aggregator.store.round_spool import Assignment, RoundPlan, SpooledUpdate
from aggregator.strategies.fedavg import ClientUpdate
from aggregator.strategies.robust import update_norm
from protocol.messages import BnStatistics, RejectReason, RoundSummary, Update
from protocol.quantized import Tensor

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
class Flight:
    """A task out on a device."""

    assignment: Assignment
    round: int  # the buffer the task was sent in (the round field of its task)
    base_version: int
    deadline: float


class BufferedEngine:
    """Runs FedBuff over the registry's devices; same interface to the service as the round engine."""

    UNIT = "buffer"  # what the logs call one applied version
    # The Engine interface (aggregator.engines.base), served by the parts:
    config, strategy, artifacts, store, registry, ledger = forwarded(
        "parts", "config", "strategy", "artifacts", "store", "registry", "ledger")
    record, weights, finished = forwarded("model", "record", "weights", "finished")
    rejected, count_rejection, on_secagg, masked_tensors = forwarded(
        "intake", "rejected", "count_rejection", "on_secagg", "masked_tensors")
    view, asked, round_key, note_bytes, current_round = forwarded("slot", "view", "asked", "round_key", "note_bytes", "number")

    def __init__(self, parts: EngineParts, buffer: BufferConfig) -> None:
        """FedBuff over `parts` (without a statistics phase: batch-norm models keep averaged statistics)."""
        self.parts = parts.with_config(bn_statistics="averaged")  # DP: each applied buffer is charged as sampling rate 1
        self.buffer = buffer
        self.model = GlobalModel.load(self.parts)
        self.intake = UpdateIntake(self.parts, self.model.record.round)
        self.tasks = TaskBuilder(self.parts)
        self.slot = RoundSlot()  # the open buffer
        self.flights: dict[str, Flight] = {}
        self._dispatches = 0
        self._staleness: list[int] = []  # of the updates in the open buffer
        self._started = False  # min_clients devices were available once since this process started
        self._waiting_logged = False
        self._resume()

    def tick(self, now: float) -> list[Outgoing]:
        """Give up on overdue tasks, then send a task to every idle available device."""
        if self.finished:
            return []
        if self.slot.current is None:
            self._open_buffer(now)
        for device_id, flight in list(self.flights.items()):
            info = self.registry.get(device_id)
            if now > flight.deadline + self.config.round_timeout_s or info is None or not info.online:
                del self.flights[device_id]
                self.registry.missed(device_id)
                log.info("gave up on %s's task of version %d", device_id, flight.base_version)
        return self._dispatch(now)

    def on_update(self, device_id: str, msg_id: str, update: Update, tensors: Mapping[str, np.ndarray], nbytes: int, now: float) -> list[Outgoing]:
        """Validate one update and fold it into the buffer (scaled by its staleness), or reject it with a reason."""
        flight, current = self.flights.get(device_id), self.slot.current
        if update.declined:
            return self._take_decline(device_id, msg_id, update, tensors, flight, now)
        if update.unchanged and flight and not tensors:
            tensors = self.intake.zero_update(flight.assignment.tier)
        problem = self._check(device_id, update, tensors, flight)
        norm = update_norm(tensors) if problem is None else 0.0
        if problem is None and flight is not None and current is not None:
            client = self._client_update(current, flight.assignment, update, tensors)
            problem = self.intake.check_weight(current, client, norm, flight.assignment.weighted)
        if problem:
            refusal = self.intake.refuse(device_id, msg_id, update, *problem)
            if problem[0] is not RejectReason.TOO_STALE:
                return refusal
            del self.flights[device_id]  # its task is over: a fresh one on the newest version
            return refusal + self.tick(now)
        assert current is not None and flight is not None
        del self.flights[device_id]
        in_buffer = update.model_copy(update={"round": current.number})  # spooled with the buffer it joins
        self.store.open_round.assign(flight.assignment)
        self.store.open_round.accept(device_id, in_buffer, nbytes, dict(tensors))  # on disk before the ledger says accepted
        self.intake.record_accepted(current.number, device_id, update, nbytes)
        self.registry.answered(device_id, None if update.unchanged else update.train_loss)
        self._fold(current, flight.assignment, update, tensors, norm, nbytes)
        out: list[Outgoing] = []
        if current.accumulator.count >= self.buffer.buffer_size:
            out = self._apply(now)  # commits the buffer as the next version
        return out + self.tick(now)

    def _take_decline(self, device_id: str, msg_id: str, update: Update, tensors: Mapping[str, np.ndarray],
                      flight: Flight | None, now: float) -> list[Outgoing]:
        """A device in flight says it has no result for its task (`Update.declined`): its task is over, nothing folded,
        and it gets a fresh one; else the refusal."""
        if update.update_id in self.intake.seen:
            return self.intake.refuse(device_id, msg_id, update, RejectReason.DUPLICATE, f"update {update.update_id} was already counted")
        if flight is None or update.base_version != flight.base_version or update.tier != flight.assignment.tier:
            return self.intake.refuse(device_id, msg_id, update, RejectReason.NOT_SELECTED,
                                      f"{device_id} has no task of tier {update.tier} on version {update.base_version} in flight")
        if tensors:
            return self.intake.refuse(device_id, msg_id, update, RejectReason.BAD_TENSOR, "a declined update carries tensors")
        self.intake.seen.add(update.update_id)
        del self.flights[device_id]
        self.registry.missed(device_id)
        self.intake.record_decline(update.round, device_id, update)
        log.info("%s declined its task of version %d (no result)", device_id, flight.base_version)
        return self.tick(now)

    def on_bn_statistics(self, device_id: str, msg_id: str, body: BnStatistics, tensors: Mapping[str, np.ndarray], now: float) -> list[Outgoing]:
        """Refused: buffered aggregation has no statistics phase."""
        return self.intake.refuse(device_id, msg_id, body, RejectReason.UNEXPECTED, "buffered aggregation asks for no statistics")

    # -- the buffer ------------------------------------------------------------------------------

    def _open_buffer(self, now: float) -> None:
        current = self.slot.current = self._empty_buffer(now)
        self.store.open_round.begin(RoundPlan(round=current.number, base_version=self.record.version, started=now,
                                              deadline=now, assignments=[]))

    def _empty_buffer(self, started: float) -> OpenRound:
        self._staleness = []
        return OpenRound(number=self.record.round + 1, started=started, deadline=float("inf"), assignments={},
                         accumulator=self.strategy.start_aggregation(self.weights))

    def _resume(self) -> None:
        """Rebuild the buffer a crash cut short from its spool, each update with its staleness as accepted."""
        spooled = self.store.open_round.load(self.record.round, self.record.version)
        if spooled is None:
            return
        current = self.slot.current = self._empty_buffer(spooled.plan.started)  # the spool stays as it is and grows from here
        assignments = {a.device_id: a for a in spooled.plan.assignments}

        def fold(meta: SpooledUpdate, tensors: Mapping[str, Tensor]) -> None:
            self._fold(current, assignments[meta.device_id], meta.update, tensors, update_norm(tensors), meta.nbytes)

        self.intake.replay(current.number, spooled.updates, fold)
        log.info("buffer %d resumed from %s with %d updates accepted before the restart", current.number,
                 self.store.open_round.folder, current.accumulator.count)

    def _dispatch(self, now: float) -> list[Outgoing]:
        available = self.registry.available()
        if not self._started:
            if len(available) < self.buffer.min_clients:
                if not self._waiting_logged:
                    log.info("buffer %d: waiting for devices (%d of --min-clients %d available)",
                             self.record.round + 1, len(available), self.buffer.min_clients)
                    self._waiting_logged = True
                return []
            self._started = True
        idle = [d for d in available if d.device_id not in self.flights]
        room = len(idle) if self.buffer.concurrency is None else self.buffer.concurrency - len(self.flights)
        if not idle or room <= 0:
            return []
        self._dispatches += 1
        assignments = self.intake.announced(self.strategy.configure_round(self._dispatches, idle)[:room])
        number, deadline = self.slot.number, now + self.config.round_timeout_s
        assert number is not None
        for a in assignments:
            self.flights[a.device_id] = Flight(a, number, self.record.version, deadline)
            self.registry.asked(a.device_id, number)
        if assignments:
            log.info("version %d: tasks for %s", self.record.version, ", ".join(f"{a.device_id} (tier {a.tier})" for a in assignments))
        return [self.tasks.task(self.model, a, number, deadline) for a in assignments]

    def _client_update(self, current: OpenRound, assignment: Assignment, update: Update,
                       tensors: Mapping[str, np.ndarray]) -> ClientUpdate:
        """The accumulator's view of an update, its delta scaled by its staleness."""
        staleness = self.record.version - update.base_version
        return self.intake.client_update(current, assignment, update, tensors,
                                         scale=staleness_factor(staleness, self.buffer.staleness_exponent))

    def _fold(self, current: OpenRound, assignment: Assignment, update: Update, tensors: Mapping[str, np.ndarray],
              norm: float, nbytes: int) -> None:
        """Count one accepted update toward the buffer, its delta scaled by its staleness."""
        staleness = self.record.version - update.base_version
        self._staleness.append(staleness)
        current.assignments.setdefault(assignment.device_id, assignment)  # a buffer learns its devices as they answer
        self.intake.fold(current, self._client_update(current, assignment, update, tensors), update, norm, nbytes)
        log.info("buffer %d: update %d/%d from %s (staleness %d)", current.number, current.accumulator.count,
                 self.buffer.buffer_size, assignment.device_id, staleness)

    def _check(self, device_id: str, update: Update, tensors: Mapping[str, np.ndarray], flight: Flight | None) -> Problem | None:
        """Why an update does not answer the device's awaited task (or is too stale), or None."""
        if device_id not in self.registry:
            return RejectReason.UNKNOWN_DEVICE, f"{device_id} has not announced itself"
        if update.update_id in self.intake.seen:
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
        return self.intake.check_tensors(device_id, flight.assignment, update, tensors)

    def _apply(self, now: float) -> list[Outgoing]:
        """Commit the full buffer as the next version and publish its summary."""
        current = self.slot.current
        assert current is not None
        self.slot.current = None
        return [self.model.close(current, self.model.aggregate(current), now, self.intake, self.UNIT,
                                 lambda summary: self._amend(current, summary))]

    def _amend(self, current: OpenRound, summary: RoundSummary) -> RoundSummary:
        """A buffer's summary: its staleness and tasks in flight, and its updates as both selected and answered."""
        staleness = {"staleness_mean": float(np.mean(self._staleness)) if self._staleness else 0.0,
                     "staleness_max": float(max(self._staleness, default=0)), "in_flight": float(len(self.flights))}
        updates = current.accumulator.count  # a fast device may answer twice within one buffer
        return summary.model_copy(update={"metrics": {**summary.metrics, **staleness}, "selected": updates, "answered": updates})
