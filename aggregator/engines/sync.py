"""The open synchronous round, as every round-based engine runs it up to its close.

`SyncRounds` selects a round's devices (the strategy's choice), opens the round and writes its
plan to the spool (aggregator.store.round_spool), takes updates against it (right round, version,
tier and deadline, selected and not yet answered, then the shared checks of
aggregator.engines.intake), and knows when it is over: every selected device answered or
declined (its training diverged, or its update was refused: `Update.declined`), the deadline
passed, or every device still owing has gone offline. After a restart it rebuilds the
round a crash cut short from its spool and sends the owed tasks again once.

What happens at the close is the engine's: the round engine commits a version
(aggregator.engines.rounds), a relay forwards a combined update (aggregator.engines.relay).
The model a round runs on is passed in, so a relay can run each parent task on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from aggregator.engines.base import OpenRound, Outgoing, RoundSlot
from aggregator.engines.intake import Problem, UpdateIntake
from aggregator.engines.model import GlobalModel
from aggregator.engines.parts import EngineParts, listing
from aggregator.engines.tasks import TaskBuilder
from aggregator.store.round_spool import RoundPlan, SpooledUpdate
from aggregator.strategies.robust import update_norm
from protocol.control import split_control
from protocol.messages import RejectReason, Update
from protocol.quantized import Tensor

log = logging.getLogger(__name__)


class SyncRounds:
    """One synchronous round at a time: open it, take updates against it, tell when it is over, resume it."""

    def __init__(self, parts: EngineParts, intake: UpdateIntake, tasks: TaskBuilder) -> None:
        self.parts, self.intake, self.tasks = parts, intake, tasks
        self.slot = RoundSlot()  # the open round, or None
        self._resend_owed_tasks = False  # a resumed round sends its owed tasks again at the first tick
        self._waiting_logged = False
        self._short: tuple[int, float] | None = None  # (devices online, time) when a round last could not start

    def start(self, model: GlobalModel, now: float, timeout_s: float) -> list[Outgoing]:
        """Open the next round on `model` with the strategy's devices and send their tasks (none: keep waiting).

        Drawing scans the registry, O(devices): after a draw that found too few, the next one waits for more
        devices online or a second to pass, so a fleet saying hello (a message each) costs O(devices), not
        O(devices^2)."""
        registry, strategy = self.parts.registry, self.parts.strategy
        if self._short is not None and registry.online_count <= self._short[0] and 0 <= now - self._short[1] < 1.0:
            return []
        number = model.record.round + 1
        available = registry.available()
        assignments = self.intake.announced(strategy.configure_round(number, available))
        self._short = None if assignments else (registry.online_count, now)
        if not assignments:
            if not self._waiting_logged:
                log.info("round %d: waiting for devices (%d available)", number, len(registry.available()))
                self._waiting_logged = True
            return []
        self._waiting_logged = False
        current = self.slot.current = OpenRound(
            number=number, started=now, deadline=now + timeout_s, assignments={a.device_id: a for a in assignments},
            accumulator=strategy.start_aggregation(model.weights), available=len(available),
            caps=self.intake.share_caps(assignments), variates=self.intake.variate_mean(model.control),
        )
        self.parts.store.open_round.begin(RoundPlan(round=number, base_version=model.record.version, started=now,
                                                    deadline=current.deadline, assignments=assignments,
                                                    available=len(available)))
        for a in assignments:
            registry.asked(a.device_id, number)
        registry.take_moved()  # holdings announced before these tasks went out are what they are encoded against
        log.info("round %d: %d devices selected: %s", number, len(assignments),
                 listing([f"{a.device_id} (tier {a.tier})" for a in sorted(assignments, key=lambda a: a.device_id)]))
        return [self.tasks.task(model, a, number, current.deadline) for a in assignments]

    def complete(self, now: float) -> bool:
        """Whether the open phase is over: nobody owes it, its deadline passed, or all who owe it are offline."""
        current = self.slot.current
        if current is None:
            return False
        owing = current.owing
        if not owing or now >= current.deadline:
            return True
        # Unknown is not gone: a resumed round's devices are unknown until their retained hello is back.
        return all((d := self.parts.registry.get(dev)) is not None and not d.online for dev in owing)

    def take_update(self, model: GlobalModel, device_id: str, msg_id: str, update: Update,
                    tensors: Mapping[str, np.ndarray], nbytes: int, now: float) -> list[Outgoing]:
        """Check one update against the open round and fold it in: [] when taken, else the refusal."""
        current = self.slot.current
        assignment = current.assignments.get(device_id) if current else None
        if current and current.trained is not None:
            return self.intake.refuse(device_id, msg_id, update, RejectReason.LATE, "the round is measuring statistics")
        if update.declined:
            return self.take_decline(model, device_id, msg_id, update, tensors, now)
        if update.unchanged and assignment:  # selective upload: a participant with a zero update
            if tensors:
                return self.intake.refuse(device_id, msg_id, update, RejectReason.BAD_TENSOR, "an unchanged update carries tensors")
            tensors = self.intake.zero_update(assignment.tier)
        if problem := self._check(model, device_id, update, tensors, now):
            return self.intake.refuse(device_id, msg_id, update, *problem)
        assert current is not None
        assignment = current.assignments[device_id]
        client = self.intake.client_update(current, assignment, update, tensors)
        norm = update_norm(tensors)
        if problem := self.intake.check_weight(current, client, norm, assignment.weighted):
            return self.intake.refuse(device_id, msg_id, update, *problem)
        self.parts.store.open_round.accept(device_id, update, nbytes, dict(tensors))  # on disk before the ledger says accepted
        self.intake.record_accepted(update.round, device_id, update, nbytes)
        self.intake.fold(current, client, update, norm, nbytes)
        self.intake.fold_variate(current, model.control, client, update)  # SCAFFOLD: delta c_i derived once accepted
        self.parts.registry.answered(device_id, None if update.unchanged else update.train_loss)
        if update.train_seconds > 0 and update.steps and not update.unchanged and not update.contributors:  # per step
            samples = min(update.steps * assignment.batch_size, update.steps * update.num_samples)
            self.parts.registry.measured_speed(device_id, update.tier, update.train_seconds / samples)
        log.info("round %d: update %d/%d from %s (%d samples)", update.round, len(current.answered),
                 len(current.assignments), device_id, update.num_samples)
        return []

    def take_decline(self, model: GlobalModel, device_id: str, msg_id: str, update: Update,
                     tensors: Mapping[str, np.ndarray], now: float) -> list[Outgoing]:
        """A selected device says it has no result for the open round (`Update.declined`): the round waits no more
        for it and folds nothing of it; [] when taken, else the refusal (a decline that does not fit the round)."""
        if problem := self.check_round(model, device_id, update, now):
            return self.intake.refuse(device_id, msg_id, update, *problem)
        if tensors:
            return self.intake.refuse(device_id, msg_id, update, RejectReason.BAD_TENSOR, "a declined update carries tensors")
        current = self.slot.current
        assert current is not None
        self.intake.seen.add(update.update_id)
        current.declined.add(device_id)
        self.intake.record_decline(update.round, device_id, update)
        log.info("round %d: %s declined the round (no result); %d/%d answered", update.round, device_id,
                 len(current.answered), len(current.assignments))
        return []

    def resume(self, model: GlobalModel, now: float) -> None:
        """Rebuild the round a crash cut short from its spool: same plan, same updates added in the same order.

        The deadline is at least a fresh timeout from `now`: updates that waited at the broker while
        we were down were sent in time. A round that was measuring batch-norm statistics closes its
        training phase at the first tick and asks for the statistics again (measuring is idempotent).
        """
        spool = self.parts.store.open_round
        spooled = spool.load(model.record.round, model.record.version)
        if spooled is None:
            return
        plan = spooled.plan
        current = self.slot.current = OpenRound(
            number=plan.round, started=plan.started,
            deadline=now if plan.measuring_statistics else max(plan.deadline, now + self.parts.config.round_timeout_s),
            assignments={a.device_id: a for a in plan.assignments},
            accumulator=self.parts.strategy.start_aggregation(model.weights), available=plan.available,
            caps=self.intake.share_caps(plan.assignments), variates=self.intake.variate_mean(model.control),
        )

        def fold(meta: SpooledUpdate, tensors: Mapping[str, Tensor]) -> None:
            weights = split_control(tensors)[0]  # an older spool's scaffold/ tensors: ignored, derived now
            client = self.intake.client_update(current, current.assignments[meta.device_id], meta.update, weights)
            self.intake.fold(current, client, meta.update, update_norm(weights), meta.nbytes)
            self.intake.fold_variate(current, model.control, client, meta.update)

        self.intake.replay(plan.round, spooled.updates, fold)
        self._resend_owed_tasks = not plan.measuring_statistics
        log.info("round %d resumed from %s: %d of %d updates were accepted before the restart%s", plan.round,
                 spool.folder, len(current.answered), len(current.assignments),
                 "; measuring batch-norm statistics again" if plan.measuring_statistics else "")

    def owed_tasks(self, model: GlobalModel) -> list[Outgoing]:
        """Tasks to send again: once after a restart, the resumed round's to the devices still owing (they may have
        died with us); and, once a round, the task of a device still owing a training update that has since
        announced it holds another version of its tier than when it was asked (it refuses a delta against a version
        it does not hold, `wrong_version`, and says what it holds: its task goes again, encoded against that).

        A device that had the task already answers twice; its second update is refused as a duplicate. That also
        happens to a device that reconnects while training (its hello says it holds the task's version): the price of
        never losing a round to a delta its device could not apply.
        """
        moved = self.parts.registry.take_moved()
        current = self.slot.current
        if current is None:
            return []
        if self._resend_owed_tasks:
            self._resend_owed_tasks = False
            devices = sorted(current.owing)
            log.info("round %d: tasks sent again to %s", current.number, ", ".join(devices) or "nobody")
        elif current.trained is None:
            devices = sorted(moved & (current.owing - current.resent))
            current.resent.update(devices)
            if devices:
                log.info("round %d: tasks sent again to %s, now holding other versions than when asked",
                         current.number, ", ".join(devices))
        else:
            return []
        return [self.tasks.task(model, current.assignments[d], current.number, current.deadline) for d in devices]

    def _check(self, model: GlobalModel, device_id: str, update: Update, tensors: Mapping[str, np.ndarray],
               now: float) -> Problem | None:
        """Why an update does not fit the open round (round, selection, version, tier, deadline, then the shared checks)."""
        if problem := self.check_round(model, device_id, update, now):
            return problem
        assert self.slot.current is not None
        return self.intake.check_tensors(device_id, self.slot.current.assignments[device_id], update, tensors)

    def check_round(self, model: GlobalModel, device_id: str, update: Update, now: float) -> Problem | None:
        """Why an update's header does not fit the open round (known, duplicate, round, selection, version, tier,
        deadline), or None; its samples and tensors are checked apart (an aggregator worker checks the tensors)."""
        current = self.slot.current
        if device_id not in self.parts.registry and not (current and device_id in current.assignments):  # resumed: hello may lag
            return RejectReason.UNKNOWN_DEVICE, f"{device_id} has not announced itself"
        if update.update_id in self.intake.seen:
            return RejectReason.DUPLICATE, f"update {update.update_id} was already counted"
        if current is None or update.round < current.number:
            return RejectReason.STALE_ROUND, f"round {update.round} is closed (current: {current.number if current else 'none'})"
        if update.round > current.number:
            return RejectReason.FUTURE_ROUND, f"round {update.round} has not started (current: {current.number})"
        assignment = current.assignments.get(device_id)
        if assignment is None:
            return RejectReason.NOT_SELECTED, f"{device_id} was not selected for round {current.number}"
        if device_id in current.answered or device_id in current.declined:
            return RejectReason.DUPLICATE, f"{device_id} already answered round {current.number}"
        if update.base_version != model.record.version:
            return RejectReason.WRONG_VERSION, f"trained on version {update.base_version}, round uses {model.record.version}"
        if update.tier != assignment.tier:
            return RejectReason.UNKNOWN_TIER, f"tier {update.tier!r} but the task was for tier {assignment.tier!r}"
        if now > current.deadline:
            return RejectReason.LATE, f"arrived {now - current.deadline:.1f} s after the deadline"
        return None
