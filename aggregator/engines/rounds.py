"""The round engine: synchronous rounds of select -> dispatch -> collect -> aggregate -> commit.

Pure logic with the clock passed in: it never touches the network. The service feeds it
devices and updates, calls `tick` often, and publishes what it returns. A round closes when
every selected device answered, when the deadline passes, or when every device still owing an
update has gone offline; it commits if at least `min_updates` arrived.

Batch-norm models add a statistics phase before the commit (static BN): the devices that
answered get the new weights, measure each layer's statistics on their data and send them back;
the pooled statistics of each tier replace the running averages that training left behind.

Built from the shared parts: the open round (aggregator.engines.sync), the checks and books of
updates (.intake), the tasks (.tasks) and the committed model with its commit (.model). Its
public `start_round`, `round_complete` and `close_round` let the secure engine
(aggregator.engines.secure) run rounds through it.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Mapping

import numpy as np

from aggregator.engines.base import OpenRound, Outgoing
from aggregator.engines.intake import Problem, UpdateIntake
from aggregator.engines.model import GlobalModel, Weights, non_finite
from aggregator.engines.parts import EngineParts, forwarded
from aggregator.engines.sync import SyncRounds
from aggregator.engines.tasks import TaskBuilder
from aggregator.strategies.bn_statistics import BnStatisticsPool, statistic_names
from protocol.messages import BnStatistics, RejectReason, Update

log = logging.getLogger(__name__)


class RoundEngine:
    """Runs rounds of one strategy over the registry's devices, committing each version durably."""

    UNIT = "round"  # what the logs call one applied version
    # The Engine interface (aggregator.engines.base) and the rest of what callers read, served by the parts:
    config, strategy, artifacts, store, registry, ledger, privacy = forwarded(
        "parts", "config", "strategy", "artifacts", "store", "registry", "ledger", "privacy")
    record, weights, finished, bn_statistics, optimizer_state, control = forwarded(
        "model", "record", "weights", "finished", "bn_statistics", "optimizer_state", "control")
    rejected, count_rejection, on_secagg, masked_tensors = forwarded(
        "intake", "rejected", "count_rejection", "on_secagg", "masked_tensors")
    view, asked, round_key, note_bytes, current_round, open_round = forwarded(
        "rounds.slot", "view", "asked", "round_key", "note_bytes", "number", "current")

    def __init__(self, parts: EngineParts, now: float | None = None, *, resume: bool = True) -> None:
        """`resume`: rebuild a round a crash cut short from its spool (False: the spool is the caller's to handle)."""
        self.parts = parts
        self.model = GlobalModel.load(parts)
        self.intake = UpdateIntake(parts, self.model.record.round)
        self.rounds = SyncRounds(parts, self.intake, TaskBuilder(parts))
        self.measures_bn_statistics = parts.config.bn_statistics == "devices" and parts.artifacts.card.batch_norm
        if resume:
            self.rounds.resume(self.model, time.time() if now is None else now)

    def tick(self, now: float) -> list[Outgoing]:
        """Start a round when none is open and enough devices are available; close a finished one."""
        if self.finished:
            return []
        if self.rounds.slot.current is None:
            return self.start_round(now)
        if self.round_complete(now):
            return self.close_round(now)
        return self.rounds.owed_tasks(self.model)

    def on_update(self, device_id: str, msg_id: str, update: Update, tensors: Mapping[str, np.ndarray], nbytes: int,
                  now: float) -> list[Outgoing]:
        """Validate one update and fold it into the open round, or reject it with a reason."""
        if refused := self.rounds.take_update(self.model, device_id, msg_id, update, tensors, nbytes, now):
            return refused
        return self.tick(now) if self.round_complete(now) else []

    def on_bn_statistics(self, device_id: str, msg_id: str, body: BnStatistics, tensors: Mapping[str, np.ndarray],
                         now: float) -> list[Outgoing]:
        """Pool one device's batch-norm statistics, or reject them with a reason."""
        if problem := self._check_statistics(device_id, body, tensors):
            return self.intake.refuse(device_id, msg_id, body, *problem)
        current = self.rounds.slot.current
        assert current is not None
        current.measured.add(device_id)
        if self.ledger:
            self.ledger.record(kind="statistics", accepted=True, round_number=body.round, device=device_id,
                               num_samples=body.num_samples)
        current.statistics.setdefault(body.tier, BnStatisticsPool()).add(body.num_samples, tensors)
        return self.tick(now) if self.round_complete(now) else []

    # -- the round's life, public for the secure engine ---------------------------------------

    def start_round(self, now: float) -> list[Outgoing]:
        """Open the next round and return its tasks (none while too few devices are available)."""
        return self.rounds.start(self.model, now, self.config.round_timeout_s)

    def round_complete(self, now: float) -> bool:
        """Whether the open round's current phase is over."""
        return self.rounds.complete(now)

    def close_round(self, now: float) -> list[Outgoing]:
        """Close the open round: ask for batch-norm statistics first where the model measures them, else commit."""
        current = self.rounds.slot.current
        assert current is not None
        trained = current.trained if current.trained is not None else self.model.aggregate(current)
        if trained is not None and current.trained is None and self.measures_bn_statistics and not non_finite(trained):
            return self._start_statistics(current, trained, now)
        self.rounds.slot.current = None
        return [self.model.close(current, trained, now, self.intake, self.UNIT)]

    def _start_statistics(self, current: OpenRound, trained: Weights, now: float) -> list[Outgoing]:
        """Keep the aggregated weights aside and ask the devices that answered to measure them."""
        current.trained = trained
        current.deadline = now + self.config.round_timeout_s
        self.parts.store.open_round.mark_measuring_statistics()
        log.info("round %d: measuring batch-norm statistics on %d devices", current.number, len(current.answered))
        return [self.rounds.tasks.task(self.model, current.assignments[d], current.number, current.deadline, current.trained,
                                         current.control)
                for d in sorted(current.answered)]

    def _check_statistics(self, device_id: str, body: BnStatistics, tensors: Mapping[str, np.ndarray]) -> Problem | None:
        """Why a device's statistics are refused (phase, round, owed, version, samples, tensors), or None."""
        current = self.rounds.slot.current
        if current is None or current.trained is None or body.round != current.number:
            return RejectReason.STALE_ROUND, f"round {body.round} is not measuring statistics"
        if device_id not in current.answered or device_id in current.measured:
            return RejectReason.NOT_SELECTED, f"{device_id} owes no statistics for round {current.number}"
        tier = current.assignments[device_id].tier
        version = self.model.record.version
        if body.tier != tier or body.base_version != version + 1:
            return RejectReason.WRONG_VERSION, f"statistics of {body.tier} v{body.base_version}, asked for {tier} v{version + 1}"
        if problem := self.intake.check_samples(device_id, current.assignments[device_id], body.num_samples):
            return problem
        shapes = self.artifacts.tiers[tier].shapes
        if set(tensors) != set(statistic_names(shapes)):
            return RejectReason.BAD_TENSOR, f"tensors {sorted(tensors)} are not the running statistics of tier {tier}"
        for name, value in tensors.items():
            if value.dtype != np.float32 or tuple(value.shape) != shapes[name]:
                return RejectReason.BAD_TENSOR, f"{name}: {value.dtype}{list(value.shape)}, expected float32{list(shapes[name])}"
            if not np.isfinite(value).all():
                return RejectReason.NON_FINITE, f"{name}: NaN or Inf"
            if name.endswith(".running_var") and (value < 0).any():
                return RejectReason.BAD_TENSOR, f"{name}: negative variance"
        return None
