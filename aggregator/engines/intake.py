"""Checking and folding updates, the part every engine shares: what may count, and the books of what did.

`UpdateIntake` holds the checks that need no round logic: an update claims no more samples than
its device announced (too_many_samples), its tensors fit its tier, its norm is finite and within
`outlier_multiple` x its tier's recent median (non_finite, outlier; aggregator.strategies.robust),
its weighted norm leaves the round's float32 sums finite (non_finite), an update counted once is
a duplicate ever after; with `max_share` < 1 its weight is capped (aggregator.strategies.fedavg.share_caps).
It folds accepted updates into an open round and keeps the books: the ledger rows of what was
accepted, every refusal counted by reason (`rejected`) and recorded.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np

from aggregator.engines.base import OpenRound, Outgoing, reject
from aggregator.engines.parts import EngineParts
from aggregator.engines.personal import carried_personal, update_shapes
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.round_spool import Assignment, SpooledUpdate
from aggregator.strategies.fedavg import ClientUpdate, Contribution, share_caps
from aggregator.strategies.robust import NormBound
from aggregator.strategies.scaffold import VariateMean, derived_change, tier_control_shapes
from protocol.messages import BnStatistics, RejectReason, SecAgg, Update
from protocol.quantized import Tensor

log = logging.getLogger(__name__)
RECORDED_ON_RESTART = "recorded on restart from the open-round spool"
# A round's weighted norms must sum below this, so no float32 sum of weight x delta can overflow.
SUM_BOUND = float(np.finfo(np.float32).max) / 2
Problem = tuple[RejectReason, str]  # why something is refused: the reason and its detail


class UpdateIntake:
    """Checks updates against what needs no round logic, folds accepted ones, and counts and records every decision."""

    def __init__(self, parts: EngineParts, committed_round: int) -> None:
        """`committed_round`: the last committed round, whose ledger's accepted update ids stay duplicates."""
        self.registry, self.artifacts, self.ledger = parts.registry, parts.artifacts, parts.ledger
        self.max_share = parts.config.max_share
        self.personal = parts.config.personal_layers
        self.personalized = bool(self.personal or parts.config.finetune_steps)  # per-device accuracies in the summary
        self.rejected: collections.Counter[str] = collections.Counter()
        self.norms = NormBound(parts.config.outlier_multiple)
        self.scaffold = parts.config.scaffold  # SCAFFOLD: each accepted update's delta c_i is derived from it
        # update ids counted so far: replays of updates counted before a restart stay duplicates
        self.seen: set[str] = self.ledger.accepted_update_ids(committed_round) if self.ledger else set()

    # -- checks ---------------------------------------------------------------------------------

    def announced(self, assignments: Sequence[Assignment]) -> list[Assignment]:
        """`assignments` with each device's announced sample count, the bound on what its answers may claim."""
        return [replace(a, announced_samples=info.num_samples) if (info := self.registry.get(a.device_id)) else a
                for a in assignments]

    def share_caps(self, assignments: Sequence[Assignment]) -> dict[str, int]:
        """Each device's cap on the samples its update weighs, from `max_share` (empty: no caps)."""
        return share_caps(assignments, {t: a.manifest.rate for t, a in self.artifacts.tiers.items()}, self.max_share)

    def check_samples(self, device_id: str, assignment: Assignment, claimed: int) -> Problem | None:
        """Why a claimed sample count is refused: more than the device announced (in its hello), or None.

        The bound is the larger of the count announced when the task was given (kept in the round's
        plan, so a resumed round needs no hello) and the device's latest hello.
        """
        info = self.registry.get(device_id)
        known = [n for n in (assignment.announced_samples, info.num_samples if info else None) if n is not None]
        if not known:
            return RejectReason.UNKNOWN_DEVICE, f"{device_id} has announced no sample count yet"
        if claimed > max(known):
            return RejectReason.TOO_MANY_SAMPLES, f"claims {claimed} samples, {device_id} announced {max(known)}"
        return None

    def check_tensors(self, device_id: str, assignment: Assignment, update: Update,
                      tensors: Mapping[str, np.ndarray]) -> Problem | None:
        """Why an update's samples or tensors are refused for its task (`assignment`), or None."""
        return self.check_samples(device_id, assignment, update.num_samples) or check_update_tensors(
            update, tensors, assignment.tier, self.artifacts, self.personal)

    def variate_mean(self, control: Mapping[str, np.ndarray]) -> VariateMean | None:
        """SCAFFOLD: an empty sum of a round's delta c_i, of the shapes of the server's `control`; None without it."""
        return VariateMean({name: value.shape for name, value in control.items()}) if self.scaffold else None

    def fold_variate(self, current: OpenRound, control: Mapping[str, np.ndarray], client: ClientUpdate,
                     update: Update) -> None:
        """SCAFFOLD: add the delta c_i derived from an accepted update (live or replayed) to the round's sum; the task
        carried `control`, the server's c of the round's base version. Nothing for a device that took no steps."""
        if current.variates is None:
            return
        assignment = current.assignments[client.device_id]
        shapes = tier_control_shapes(self.artifacts.tiers[assignment.tier])
        if (change := derived_change(client.delta, control, shapes, update.steps, assignment.learning_rate)) is not None:
            current.variates.add(change)

    def check_weight(self, current: OpenRound, client: ClientUpdate, norm: float, weighted: bool) -> Problem | None:
        """Why an update's delta is refused: a NaN/Inf or outlier norm, or a weighted norm overflowing the sums."""
        if problem := self.norms.check(client.tier, norm):
            return problem
        weight = fold_weight(client, weighted)
        if current.weighted_norms + weight * norm > SUM_BOUND:
            return RejectReason.NON_FINITE, f"its delta (L2 norm {norm:.4g}) weighted by {weight:g} would overflow the round's float32 sum"
        return None

    # -- folding --------------------------------------------------------------------------------

    def client_update(self, current: OpenRound, assignment: Assignment, update: Update, tensors: Mapping[str, np.ndarray],
                      scale: float = 1.0) -> ClientUpdate:
        """The accumulator's view of an accepted update: its samples capped by `max_share`, its work, its contributors."""
        device_id = assignment.device_id
        samples = update.num_samples if update.contributors else min(update.num_samples, current.caps.get(device_id, update.num_samples))
        if samples < update.num_samples:
            log.info("round %d: %s's weight capped at %d of its %d samples (--max-share %g)", current.number, device_id,
                     samples, update.num_samples, self.max_share)
        return ClientUpdate(device_id, update.tier, samples, tensors, scale=scale, work=work_done(update, assignment),
                            contributions=contributions(update, self.artifacts))

    def zero_update(self, tier: str) -> dict[str, np.ndarray]:
        """The tensors of a selective-upload "unchanged" answer: a zero delta of the tier's shapes."""
        return {n: np.zeros(s, np.float32) for n, s in update_shapes(self.artifacts.tiers[tier].shapes, self.personal).items()}

    def fold(self, current: OpenRound, client: ClientUpdate, update: Update, norm: float, nbytes: int) -> None:
        """Count one accepted update toward `current`: live, or replayed from the spool after a restart."""
        self.seen.add(update.update_id)
        current.answered.add(client.device_id)
        current.bytes_up += nbytes
        current.weighted_norms += fold_weight(client, current.assignments[client.device_id].weighted) * norm
        self.norms.accepted(client.tier, norm)
        current.accumulator.add(client)
        if update.eval_accuracy is not None and update.eval_loss is not None and update.eval_samples:
            current.evals.append((update.tier, update.eval_loss, update.eval_accuracy, update.eval_samples))
        if self.personalized and (update.eval_accuracy is not None or update.personal_accuracy is not None):
            current.device_accuracies[client.device_id] = (update.eval_accuracy, update.personal_accuracy)

    def replay(self, round_number: int, spooled: Sequence[tuple[SpooledUpdate, Mapping[str, Tensor]]],
               fold: Callable[[SpooledUpdate, Mapping[str, Tensor]], None]) -> None:
        """Fold the updates a restart found spooled for `round_number`, in order, and write the ledger rows it missed."""
        recorded = self.ledger.accepted_update_ids(round_number) if self.ledger else set()
        for meta, tensors in spooled:
            fold(meta, tensors)
            if meta.update.update_id not in recorded:  # spooled, then stopped before the ledger row
                self.record_accepted(round_number, meta.device_id, meta.update, meta.nbytes, RECORDED_ON_RESTART)

    # -- the books ------------------------------------------------------------------------------

    def record_accepted(self, round_number: int, device_id: str, update: Update, nbytes: int, detail: str = "") -> None:
        """The ledger row of an accepted (already spooled) update."""
        if self.ledger:
            self.ledger.record(kind="update", accepted=True, round_number=round_number, device=device_id, detail=detail,
                               update_id=update.update_id, num_samples=update.num_samples, nbytes=nbytes)

    def record_decline(self, round_number: int, device_id: str, update: Update) -> None:
        """The ledger row of a device's decline of a round (taken: nothing of it is folded)."""
        if self.ledger:
            self.ledger.record(kind="decline", accepted=True, round_number=round_number, device=device_id,
                               update_id=update.update_id, detail="no result for this round")

    def refuse(self, device_id: str, msg_id: str, body: Update | BnStatistics | SecAgg, reason: RejectReason,
               detail: str) -> list[Outgoing]:
        """Count and record a refusal decided by an engine, and the rejection to send back."""
        self.count_rejection(reason, detail, device_id, body)  # the service logs and answers it, at a bounded rate
        return [reject(device_id, reason, detail, msg_id, body.round)]

    def on_secagg(self, device_id: str, msg_id: str, body: SecAgg, tensors: Mapping[str, np.ndarray], nbytes: int,
                  now: float) -> list[Outgoing]:
        """Refused, as every engine whose rounds are not summed by secure aggregation answers such a message."""
        return self.refuse(device_id, msg_id, body, RejectReason.UNEXPECTED,
                           f"{body.phase}: this fleet does not aggregate securely (no --secure-aggregation)")

    def masked_tensors(self, device_id: str, body: SecAgg, now: float) -> dict[str, tuple[int, ...]]:
        """Nothing: a secure-aggregation message may carry no tensors to an engine that refuses it."""
        return {}

    def count_rejection(self, reason: RejectReason, detail: str = "", device_id: str | None = None,
                        body: Update | BnStatistics | SecAgg | None = None) -> None:
        """Count a rejection (and write it to the ledger), including those decided outside the engine."""
        self.rejected[reason.value] += 1
        if self.ledger:
            self.ledger.record(kind=body.kind if body else "frame", accepted=False, reason=reason.value, detail=detail,
                               round_number=body.round if body else None, device=device_id,
                               update_id=getattr(body, "update_id", None), num_samples=getattr(body, "num_samples", None))

    def refuse_round(self, round_number: int, detail: str, version: int) -> None:
        """Count a round refused whole (non_finite): nothing of it is committed, `version` stays."""
        self.rejected[RejectReason.NON_FINITE.value] += 1
        log.error("round %d refused: %s: %s; version %d stays", round_number, RejectReason.NON_FINITE.value, detail, version)
        if self.ledger:
            self.ledger.record(kind="round", accepted=False, reason=RejectReason.NON_FINITE.value, detail=detail,
                               round_number=round_number)


def check_update_tensors(update: Update, tensors: Mapping[str, np.ndarray], tier: str, artifacts: ArtifactStore,
                         personal: tuple[str, ...] = ()) -> Problem | None:
    """Why an update's tensors (and a relay's contributors) do not fit `tier` (less the `personal` layers), or None."""
    if problem := carried_personal(tensors, personal):
        return problem
    shapes = update_shapes(artifacts.tiers[tier].shapes, personal)
    if set(tensors) != set(shapes):
        return RejectReason.BAD_TENSOR, f"tensors {sorted(set(tensors) ^ set(shapes))} do not match tier {tier}"
    for name, value in tensors.items():
        if value.dtype != np.float32 or tuple(value.shape) != shapes[name]:
            return RejectReason.BAD_TENSOR, f"{name}: {value.dtype}{list(value.shape)}, expected float32{list(shapes[name])}"
    if update.contributors is None:
        return None
    if unknown := sorted(set(update.contributors) - set(artifacts.tiers)):
        return RejectReason.UNKNOWN_TIER, f"contributors of tiers {', '.join(unknown)} that are not exported"
    for part_tier in update.contributors:
        if any(any(p > s for p, s in zip(artifacts.tiers[part_tier].shapes[n], shapes[n])) for n in shapes):
            return RejectReason.UNKNOWN_TIER, f"contributor tier {part_tier} is wider than the task's tier {tier}"
    if (total := sum(part.samples for part in update.contributors.values())) != update.num_samples:
        return RejectReason.BAD_TENSOR, f"contributors hold {total} samples, the update says {update.num_samples}"
    for part_tier, part in update.contributors.items():  # every device holds a sample at least
        if part.devices > part.samples:
            return RejectReason.TOO_MANY_SAMPLES, f"contributors of tier {part_tier}: {part.devices} devices with {part.samples} samples"
    return None


def fold_weight(update: ClientUpdate, weighted: bool) -> float:
    """The largest weight any element of `update`'s delta gets in the accumulator's sum (times |scale|)."""
    if update.contributions:
        weight = sum(float(part.samples if weighted else part.devices) for part in update.contributions)
    else:
        weight = (float(update.num_samples) if weighted else 1.0) * update.work
    return weight * abs(update.scale)


def work_done(update: Update, assignment: Assignment) -> float:
    """With `weigh_work`, the share of the asked local steps (E epochs of ceil(n / B) batches) the device did, else 1."""
    if not assignment.weigh_work or update.contributors or update.unchanged or update.steps <= 0:
        return 1.0
    asked = assignment.epochs * -(-update.num_samples // assignment.batch_size)
    return min(1.0, update.steps / asked)


def contributions(update: Update, artifacts: ArtifactStore) -> tuple[Contribution, ...]:
    """A relay's contributors with their tiers' block shapes (empty for a device's own update)."""
    return tuple(Contribution(tier, part.samples, part.devices, artifacts.tiers[tier].shapes)
                 for tier, part in sorted((update.contributors or {}).items()))
