"""An aggregator worker's engine: check updates' tensors, claim them from the coordinator, fold the granted ones.

The worker owns no round: the coordinator (aggregator.engines.coordinated) decides what counts. For
each update a worker receives it checks what needs no round state (the tensors fit the tier, the
contributors of a relay's update fit, the norm is finite), keeps the decoded tensors and sends a
`WorkerClaim`; a `WorkerGrant` folds them into the round's partial sum with the coordinator's weight
(aggregator.strategies.fedavg.ElementwiseMean, the arithmetic a single aggregator runs), a refusal
drops them. A `WorkerFlush` sends the partial sum of that round and starts a new one. Memory:
one partial sum per round in progress plus at most MAX_PENDING claimed updates waiting for an answer.
"""

from __future__ import annotations

import collections
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.engines.base import EngineConfig, Outgoing, reject
from aggregator.engines.intake import SUM_BOUND, check_update_tensors, contributions
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.strategies.fedavg import ClientUpdate, ElementwiseMean
from aggregator.strategies.robust import update_norm
from protocol.messages import (BnStatistics, Body, PartialSum, RejectReason, SecAgg, Update, WorkerClaim, WorkerFlush,
                               WorkerGrant)

log = logging.getLogger(__name__)
MAX_PENDING = 256  # claimed updates held while their grant is on its way; more are refused as rate_limited
PENDING_TTL_S = 120.0  # a claim the coordinator never answered is dropped after this long


@dataclass
class Pending:
    """A claimed update: its header, decoded tensors and when it was claimed."""

    device: str
    update: Update
    tensors: Mapping[str, np.ndarray]
    at: float


@dataclass
class Partial:
    """One round's partial sum: the element-wise sums and the update ids folded into them."""

    sums: ElementwiseMean
    update_ids: list[str]


class WorkerEngine:
    """Checks and claims updates, folds the granted ones into per-round partial sums (no round of its own)."""

    UNIT = "partial"
    ledger = None  # the coordinator keeps the books; a worker logs and counts
    finished = False

    def __init__(self, config: EngineConfig, artifacts: ArtifactStore, registry: DeviceRegistry) -> None:
        self.config, self.artifacts, self.registry = config, artifacts, registry
        self.session = uuid.uuid4().hex  # this process: the coordinator voids a session's grants when it is gone
        self.rejected: collections.Counter[str] = collections.Counter()
        self._pending: dict[str, Pending] = {}  # update id -> claimed update
        self._partials: dict[int, Partial] = {}  # round -> its partial sum so far
        self._zeros = {name: np.zeros_like(value) for name, value in artifacts.global_weights().items()}
        self._outbox: list[tuple[Body, Mapping[str, np.ndarray] | None]] = []
        self.claimed = self.folded = self.flushed = 0

    # -- what the service asks of every engine --------------------------------------------------

    def view(self) -> None:
        """No open round: the coordinator has it."""
        return None

    def asked(self, device_id: str) -> bool:
        """Whether `device_id` has a claim waiting (its hello may lag)."""
        return any(p.device == device_id for p in self._pending.values())

    def round_key(self) -> None:
        """No open round."""
        return None

    def note_bytes(self, up: int = 0, down: int = 0) -> None:
        """Bytes are counted by the coordinator."""

    def tick(self, now: float) -> list[Outgoing]:
        """Drop claims the coordinator never answered."""
        for update_id in [u for u, p in self._pending.items() if now - p.at > PENDING_TTL_S]:
            pending = self._pending.pop(update_id)
            log.warning("dropped the claim on %s's update %s: no answer from the coordinator in %.0f s",
                        pending.device, update_id[:8], PENDING_TTL_S)
        return []

    def take_outbox(self) -> list[tuple[Body, Mapping[str, np.ndarray] | None]]:
        """Claims and partial sums for the coordinator, in order (emptied)."""
        messages, self._outbox = self._outbox, []
        return messages

    def on_update(self, device_id: str, msg_id: str, update: Update, tensors: Mapping[str, np.ndarray], nbytes: int,
                  now: float) -> list[Outgoing]:
        """Check an update's tensors and claim it; the refusals go to the coordinator through `count_rejection`."""
        if update.update_id in self._pending:
            return self._refuse(device_id, msg_id, update, RejectReason.DUPLICATE, f"update {update.update_id} is already claimed")
        if len(self._pending) >= MAX_PENDING:
            return self._refuse(device_id, msg_id, update, RejectReason.RATE_LIMITED,
                                f"{MAX_PENDING} updates wait for the coordinator's answer")
        if update.declined:  # nothing to check or fold: the coordinator takes the decline
            if tensors:
                return self._refuse(device_id, msg_id, update, RejectReason.BAD_TENSOR, "a declined update carries tensors")
            self._outbox.append((WorkerClaim(session=self.session, device=device_id, ref_msg_id=msg_id, update=update,
                                             norm=0.0, nbytes=nbytes), None))
            return []
        if update.unchanged:
            if tensors:
                return self._refuse(device_id, msg_id, update, RejectReason.BAD_TENSOR, "an unchanged update carries tensors")
            tensors = {n: np.zeros(s, np.float32) for n, s in self.artifacts.tiers[update.tier].shapes.items()}
        if problem := check_update_tensors(update, tensors, update.tier, self.artifacts):
            return self._refuse(device_id, msg_id, update, *problem)
        norm = update_norm(tensors)
        if not np.isfinite(norm):
            return self._refuse(device_id, msg_id, update, RejectReason.NON_FINITE, "its delta holds NaN or Inf")
        if norm > SUM_BOUND:  # as a single aggregator refuses it (and over what a claim can say)
            return self._refuse(device_id, msg_id, update, RejectReason.NON_FINITE,
                                f"its delta (L2 norm {norm:.4g}) would overflow the round's float32 sum")
        self._pending[update.update_id] = Pending(device_id, update, tensors, now)
        self._outbox.append((WorkerClaim(session=self.session, device=device_id, ref_msg_id=msg_id, update=update,
                                         norm=float(norm), nbytes=nbytes), None))
        self.claimed += 1
        return []

    def on_grant(self, grant: WorkerGrant) -> None:
        """Fold a granted update into its round's partial sum, or drop a refused one; a grant of another session or
        for an update we do not hold changes nothing."""
        pending = self._pending.get(grant.update_id)
        if grant.session != self.session or pending is None or pending.device != grant.device \
                or pending.update.round != grant.round:
            log.warning("a grant for %s's update %s that we do not hold", grant.device, grant.update_id[:8])
            return
        del self._pending[grant.update_id]
        if not grant.granted:
            return
        self._drop_before(grant.round)
        partial = self._partials.get(grant.round)
        if partial is None:
            partial = self._partials[grant.round] = Partial(ElementwiseMean(self._zeros, weighted=grant.weighted), [])
        update = pending.update
        partial.sums.add(ClientUpdate(grant.device, update.tier, grant.samples, pending.tensors, work=grant.work,
                                      contributions=contributions(update, self.artifacts)))
        partial.update_ids.append(update.update_id)
        self.folded += 1

    def on_flush(self, flush: WorkerFlush) -> None:
        """Send the partial sum of the round asked for (if we hold one); partial sums of earlier rounds are dropped."""
        self._drop_before(flush.round)
        partial = self._partials.pop(flush.round, None)
        if partial is None:
            return
        self._outbox.append((PartialSum(session=self.session, round=flush.round, update_ids=partial.update_ids),
                             partial.sums.sums()))
        self.flushed += 1
        log.info("round %d: partial sum of %d updates sent", flush.round, len(partial.update_ids))

    def _drop_before(self, number: int) -> None:
        """Drop the partial sums of rounds before `number`: the coordinator has moved on (it voided them)."""
        for earlier in [r for r in self._partials if r < number]:
            dropped = self._partials.pop(earlier)
            log.warning("dropped the partial sum of round %d (%d updates): the coordinator has moved on", earlier,
                        len(dropped.update_ids))

    def count_rejection(self, reason: RejectReason, detail: str = "", device_id: str | None = None,
                        body: Update | BnStatistics | SecAgg | None = None) -> None:
        """Count a refusal decided here (the service passes it on to the coordinator, which records and answers it)."""
        self.rejected[reason.value] += 1

    def on_bn_statistics(self, device_id: str, msg_id: str, body: BnStatistics, tensors: Mapping[str, np.ndarray],
                         now: float) -> list[Outgoing]:
        """Never called: the service forwards statistics to the coordinator."""
        raise NotImplementedError

    def on_secagg(self, device_id: str, msg_id: str, body: SecAgg, tensors: Mapping[str, np.ndarray], nbytes: int,
                  now: float) -> list[Outgoing]:
        """Never called: the service forwards everything but updates to the coordinator."""
        raise NotImplementedError

    def masked_tensors(self, device_id: str, body: SecAgg, now: float) -> dict[str, tuple[int, ...]]:
        """No secure aggregation through workers."""
        return {}

    def _refuse(self, device_id: str, msg_id: str, update: Update, reason: RejectReason, detail: str) -> list[Outgoing]:
        self.count_rejection(reason, detail, device_id, update)
        return [reject(device_id, reason, detail, msg_id, update.round)]
