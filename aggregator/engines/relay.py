"""Hierarchical aggregation, the local side of a relay: one local round per upstream task.

A relay is a device to its parent and an aggregator to its own group. A task from the
parent (round r, version v, the parent's weights for the relay's tier, E, B, lr, mu, deadline)
starts one local round: the group's devices train their tiers' slices of those weights, with
the parent's settings, until a deadline a margin before the parent's. Their updates fold into
the same element-wise mean the parent uses, weighted the way the parent's task says. The relay
then forwards one update: that per-element mean, plus its contributors (samples and devices per
tier). The parent weighs the mean back into its sum by exactly the mass those contributors
carry, so it computes what flat aggregation over all the devices would (aggregator.strategies.fedavg).

Weight integrity: the relay checks its own devices' updates as the round engine does (counts
within their hellos, norms, the float32 sums, --max-share); a combined mean holding NaN or Inf
is not forwarded. The parent bounds the combined update's samples by what the relay announced
(its group's total) and its contributors by those samples.

Pure logic with the clock passed in, like the round engine, and built from the same parts: the
open round (aggregator.engines.sync), the checks of updates (.intake) and the tasks (.tasks). Each
parent task runs on a fresh model of its own (aggregator.engines.model.GlobalModel.for_task), never
committed: the parent commits. aggregator.relay_service binds it to the two brokers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from aggregator.engines.base import OpenRound, Outgoing
from aggregator.engines.intake import UpdateIntake
from aggregator.engines.model import GlobalModel, non_finite
from aggregator.engines.parts import EngineParts, forwarded
from aggregator.engines.sync import SyncRounds
from aggregator.engines.tasks import TaskBuilder, settings_of
from aggregator.registry import DeviceInfo
from aggregator.store.round_spool import Assignment
from aggregator.strategies.fedavg import Accumulator, ClientUpdate, ElementwiseMean, FedAvg
from protocol.messages import (BnStatistics, MeasureBnStatistics, RejectReason, Task, TierShare, TrainTask, Update,
                               new_id)

log = logging.getLogger(__name__)


class CombinedMean(ElementwiseMean):
    """The element-wise mean that also counts, per tier, the samples and devices behind it."""

    def __init__(self, global_weights: Mapping[str, np.ndarray], weighted: bool = True) -> None:
        super().__init__(global_weights, weighted)
        self.parts: dict[str, TierShare] = {}

    def add(self, update: ClientUpdate) -> None:
        """Fold one update (a device's, or a lower relay's combined one) and count its contributors."""
        super().add(update)
        shares = [(c.tier, c.samples, c.devices) for c in update.contributions] or [(update.tier, update.num_samples, 1)]
        for tier, samples, devices in shares:
            old = self.parts.get(tier)
            self.parts[tier] = TierShare(samples=samples + (old.samples if old else 0), devices=devices + (old.devices if old else 0))


class FollowTask(FedAvg):
    """Selects the group's devices like FedAvg, with the settings of the parent's current task."""

    name = "relay"

    def __init__(self, task: TrainTask | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.task = task

    def configure_round(self, round_number: int, available: Sequence[DeviceInfo]) -> list[Assignment]:
        """FedAvg's selection and tiers, training as the parent's task asks."""
        task = self.task
        if task is None:
            return []
        return [replace(a, **settings_of(task)) for a in super().configure_round(round_number, available)]

    def start_aggregation(self, global_weights: Mapping[str, np.ndarray]) -> Accumulator:
        """The parent's mean, counting contributors."""
        return CombinedMean(global_weights, weighted=self.task.weighted if self.task else True)


class RelayEngine:
    """Runs one local round per parent task and hands back the combined update (`take_combined`)."""

    UNIT = "round"  # what the logs call one local round
    # The Engine interface (aggregator.engines.base), served by the parts; `record` and `weights` are the current
    # parent task's (its version, and the round before its round), `finished` never comes in practice.
    config, artifacts, registry, ledger = forwarded("parts", "config", "artifacts", "registry", "ledger")
    record, weights, finished = forwarded("model", "record", "weights", "finished")
    rejected, count_rejection, on_secagg, masked_tensors = forwarded(
        "intake", "rejected", "count_rejection", "on_secagg", "masked_tensors")
    view, asked, round_key, note_bytes, current_round = forwarded("rounds.slot", "view", "asked", "round_key", "note_bytes",
                                                                  "number")

    def __init__(self, parts: EngineParts, margin_s: float = 3.0) -> None:
        """`parts.strategy` is the FollowTask that selects the group; `margin_s`: close this long before the parent's deadline."""
        if not isinstance(parts.strategy, FollowTask):
            raise TypeError(f"a relay selects its group with FollowTask, not {type(parts.strategy).__name__}")
        self.parts = parts.with_config(bn_statistics="averaged", rounds=2**31 - 1)
        self.follow, self.margin_s = parts.strategy, margin_s
        self.model = GlobalModel.load(self.parts)  # replaced by each parent task's own (`start`)
        self.intake = UpdateIntake(self.parts, self.model.record.round)
        self.rounds = SyncRounds(self.parts, self.intake, TaskBuilder(self.parts))
        self.rounds.resume(self.model, time.time())
        self._combined: tuple[Update, dict[str, np.ndarray]] | None = None

    def start(self, task: Task, weights: Mapping[str, np.ndarray], now: float) -> list[Outgoing]:
        """Begin the local round of a parent task (ValueError, with the reason, for a task the relay cannot serve)."""
        if isinstance(task, MeasureBnStatistics):
            raise ValueError("a relay measures no batch-norm statistics: run the parent with --bn-statistics averaged")
        if task.weights.control:
            raise ValueError("a relay does not forward SCAFFOLD's control variates: run the parent without "
                             "--strategy scaffold, or connect its devices to it directly")
        if task.personal_layers or task.finetune_steps:
            raise ValueError("a relay does not forward personalization (--personal-layers, --personalize): run the "
                             "parent without them, or connect its devices to it directly")
        artifacts = self.artifacts.tiers.get(task.tier)
        if artifacts is None or artifacts.manifest_sha256 != task.manifest_sha256:
            raise ValueError(f"tier {task.tier} of the parent's task is not in this relay's --artifacts (export them once, copy the folder)")
        if set(weights) != set(artifacts.shapes) or any(tuple(w.shape) != artifacts.shapes[n] for n, w in weights.items()):
            raise ValueError(f"the task's weights do not fit tier {task.tier}")
        if self.rounds.slot.current is not None:
            log.warning("round %d: abandoned for the parent's newer task (round %d)", self.rounds.slot.current.number, task.round)
            self.rounds.slot.current = None
        self.follow.task = task
        self.model = GlobalModel.for_task(self.parts, task, weights)
        return self.rounds.start(self.model, now, max(1.0, task.deadline - self.margin_s - now))

    def tick(self, now: float) -> list[Outgoing]:
        """Close the local round when everyone answered, the deadline passed, or the rest went offline."""
        if self.rounds.slot.current is not None and self.rounds.complete(now):
            return self._close_round(now)
        return []

    def on_update(self, device_id: str, msg_id: str, update: Update, tensors: Mapping[str, np.ndarray], nbytes: int,
                  now: float) -> list[Outgoing]:
        """Validate one device's update and fold it into the local round, or reject it with a reason."""
        return self.rounds.take_update(self.model, device_id, msg_id, update, tensors, nbytes, now) or self.tick(now)

    def on_bn_statistics(self, device_id: str, msg_id: str, body: BnStatistics, tensors: Mapping[str, np.ndarray],
                         now: float) -> list[Outgoing]:
        """Refused: a relay's local rounds have no statistics phase."""
        return self.intake.refuse(device_id, msg_id, body, RejectReason.STALE_ROUND,
                                  f"round {body.round} is not measuring statistics")

    def take_combined(self) -> tuple[Update, dict[str, np.ndarray]] | None:
        """The combined update of the round that just closed (once), or None."""
        combined, self._combined = self._combined, None
        return combined

    def _close_round(self, now: float) -> list[Outgoing]:
        """End the local round: its combined update waits for `take_combined` (none if nobody answered or it is non-finite)."""
        current, task = self.rounds.slot.current, self.follow.task
        assert current is not None and task is not None
        self.rounds.slot.current, self.follow.task = None, None
        accumulator = current.accumulator
        if not isinstance(accumulator, CombinedMean) or accumulator.count == 0:
            log.warning("round %d: no device answered; nothing goes to the parent", current.number)
            return []
        mean = accumulator.mean_delta()
        if bad := non_finite(mean):
            self.intake.refuse_round(current.number, f"the combined update would hold NaN or Inf in {', '.join(bad)}; "
                                     "nothing goes to the parent", self.model.record.version)
            return []
        self._combined = (self._combined_update(current, accumulator, task, now), mean)
        log.info("round %d: %d/%d devices answered; forwarding one update of %d samples (%s)", current.number,
                 len(current.answered), len(current.assignments), self._combined[0].num_samples,
                 ", ".join(f"tier {t}: {p.devices} devices" for t, p in sorted(accumulator.parts.items())))
        return []

    def _combined_update(self, current: OpenRound, accumulator: CombinedMean, task: TrainTask, now: float) -> Update:
        """The one update the parent gets: the group's mean delta, its contributors, its training and evaluation."""
        samples = sum(p.samples for p in accumulator.parts.values())
        losses = [(d.last_loss, d.num_samples) for dev in current.answered if (d := self.registry.get(dev)) and d.last_loss is not None]
        evaluated = sum(n for *_, n in current.evals)
        return Update(
            update_id=new_id(),
            round=task.round,
            base_version=task.model_version,
            tier=task.tier,
            num_samples=samples,
            steps=len(current.answered),
            train_loss=sum(l * n for l, n in losses) / max(sum(n for _, n in losses), 1),
            train_accuracy=0.0,  # devices report their training loss only
            train_seconds=now - current.started,
            eval_loss=sum(l * n for _, l, _, n in current.evals) / evaluated if evaluated else None,
            eval_accuracy=sum(a * n for _, _, a, n in current.evals) / evaluated if evaluated else None,
            eval_samples=evaluated,
            contributors=dict(accumulator.parts),
        )
