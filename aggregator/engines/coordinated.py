"""Synchronous rounds whose updates aggregator workers fold: the coordinator decides, the workers add.

Several worker processes (aggregator.worker_service) share the devices' uplink through an MQTT 5
shared subscription; this engine, in the one coordinator that owns the rounds, the state and the
downlink, never sees a device's tensors. A worker checks an update's frame and tensors and sends a
`WorkerClaim` (the Update header, the delta's norm); the coordinator runs every check that needs
round state on it (known, duplicate, round, selection, version, tier, deadline, samples, outlier
norm, overflow: the same aggregator.engines.sync and .intake code a single aggregator runs) and
answers a `WorkerGrant`: fold it with this weight, or drop it (the coordinator answers the device's
refusal). A granted update is *acknowledged*: from then on it is counted exactly once or its device
is asked again. Once every selected device is granted (or the deadline passed) the coordinator
asks the workers holding grants for their `PartialSum` (the element-wise sum of weight x delta over
the granted updates it names); a partial is taken whole only if every update it names is a live
grant of that worker's session and the sums fit those grants (zero outside the blocks their
updates hold, an L2 norm within the sum of their weight x norm), and its sums are added to the
round's element-wise mean (each update's mass from the coordinator's own grant, so HeteroFL blocks
and relays' contributors count as they would in one process). Counting writes the ledger's
accepted rows. Sessions are ordered by their frames' send times: a frame of another session than
the live one, sent no later than that session's newest frame (a replay, or a dead process's frame
arriving late), is refused and changes nothing.

A worker that dies mid-round (its last will on workers/ID/status, or a claim from a new session of
it) loses the updates it held: its uncounted grants are voided, and every selected device that is
neither counted nor granted to a live worker is sent its task again, with the deadline moved to a
full --round-timeout from now. A voided update is never counted (a late partial naming it is refused
whole); a device asked again that had already answered through a live worker is refused as a
duplicate when its second update is claimed. Past the deadline, workers get --flush-wait seconds
for their partials; grants still unflushed then are voided and the round closes without them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.engines.base import Outgoing, reject
from aggregator.engines.intake import Problem, check_update_tensors, fold_weight
from aggregator.engines.model import non_finite
from aggregator.engines.parts import EngineParts, listing
from aggregator.engines.rounds import RoundEngine
from aggregator.strategies.fedavg import ClientUpdate, ElementwiseMean
from protocol.blocks import leading_slices
from protocol.messages import Body, PartialSum, RejectReason, Update, WorkerClaim, WorkerFlush, WorkerGrant

log = logging.getLogger(__name__)
FLUSH_ASK_EVERY_S = 1.0  # a worker still holding grants is asked for its partial sum again after this long
PARTIAL_NORM_SLACK = 1e-3  # float32 sums against the float64 norms claimed: relative slack on a partial sum's bound


@dataclass(frozen=True)
class Grant:
    """A claimed update the coordinator granted, not yet counted: who holds it and how it weighs."""

    worker: str
    session: str
    update: Update
    client: ClientUpdate  # its weight and blocks (the delta: zero-size views, for the shapes only)
    norm_weight: float  # its weight x norm, toward the round's overflow bound
    nbytes: int


@dataclass(frozen=True)
class ToWorker:
    """A message for the service to publish on a worker's downlink."""

    worker: str
    body: Body


class CoordinatedEngine(RoundEngine):
    """A round engine whose updates arrive as claims and partial sums from aggregator workers."""

    def __init__(self, parts: EngineParts, flush_wait_s: float = 10.0, now: float | None = None) -> None:
        """A round a crash cut short runs again from its plan (partial sums are not spooled: every selected device is
        asked again). Which workers are trusted is the service's to check (aggregator.coordinator_service)."""
        super().__init__(parts, now)
        if not isinstance(parts.strategy.start_aggregation(self.model.weights), ElementwiseMean):
            raise ValueError("aggregator workers add partial sums: they need the element-wise mean (FedAvg/FedProx, "
                             "weighted or not), not a robust aggregator")
        self.flush_wait_s = flush_wait_s
        self.sessions: dict[str, str] = {}  # worker -> its live session
        self._newest: dict[str, float] = {}  # worker -> when its live (or last) session sent its newest frame
        self.grants: dict[str, Grant] = {}  # device -> its granted, uncounted update in the open round
        self._flush_asked: dict[str, float] = {}  # worker -> when it was last asked for its partial sum
        self._to_workers: list[ToWorker] = []
        self.counted = 0  # updates counted through partial sums
        self.voided = 0  # grants voided (their worker died, or never flushed)
        self.asked_again = 0  # tasks sent again after a worker died

    def take_worker_messages(self) -> list[ToWorker]:
        """The grants and flush requests to publish, in order (emptied)."""
        messages, self._to_workers = self._to_workers, []
        return messages

    def on_update(self, device_id: str, msg_id: str, update: Update, tensors: Mapping[str, np.ndarray], nbytes: int,
                  now: float) -> list[Outgoing]:
        """Refused: updates reach a coordinator as workers' claims, never whole (a worker forwarding one would have it
        folded beside the grants, unchecked against them)."""
        return self.intake.refuse(device_id, msg_id, update, RejectReason.UNEXPECTED,
                                  "an update reaches the coordinator as a worker's claim, not forwarded whole")

    # -- workers ----------------------------------------------------------------------------------

    def on_worker_status(self, worker: str, session: str, online: bool, now: float,
                         sent_at: float | None = None) -> list[Outgoing]:
        """A worker's retained status: online registers its session; offline (its last will) voids its grants.
        `sent_at` (the frame's header) orders sessions: see `stale_session`."""
        if problem := self.stale_session(worker, session, sent_at):
            if problem[0] is not RejectReason.REPLAYED:  # an earlier session's will arriving late is expected
                self.intake.count_rejection(*problem)
            return []
        if online:
            return self._session(worker, session, now, sent_at)
        if self.sessions.get(worker) != session:
            return []  # a worker we never met (an earlier run's retained will), or an earlier session's will
        gone = self.sessions.pop(worker)
        self._flush_asked.pop(worker, None)
        log.warning("aggregator worker %s is gone (session %s)", worker, gone[:8])
        return self._void(worker, gone, now, ask_again=True)

    def on_claim(self, worker: str, claim: WorkerClaim, now: float, sent_at: float | None = None) -> list[Outgoing]:
        """A worker's claim on an update it checked: grant it (the worker folds it) or refuse it (to the device); a claim
        of a stale session (`stale_session`) is refused and changes nothing."""
        if problem := self.stale_session(worker, claim.session, sent_at):
            self.intake.count_rejection(*problem)
            return []
        out = self._session(worker, claim.session, now, sent_at)
        device, update = claim.device, claim.update
        if claim.refused is not None or update is None:
            reason = claim.refused or RejectReason.MALFORMED
            self.intake.count_rejection(reason, claim.detail, device, update)
            return [*out, reject(device, reason, claim.detail, claim.ref_msg_id, update.round if update else None)]
        if update.declined:  # the worker holds nothing of it
            if device in self.grants and update.round == self.rounds.slot.number:
                return [*out, *self.intake.refuse(device, claim.ref_msg_id or "", update, RejectReason.DUPLICATE,
                                                  f"{device} already answered round {update.round}")]
            return [*out, *self.rounds.take_decline(self.model, device, claim.ref_msg_id or "", update, {}, now),
                    *(self.tick(now) if self.round_complete(now) else [])]
        client = self._check_claim(device, update, claim.norm, now)
        if not isinstance(client, ClientUpdate):
            self._to_workers.append(ToWorker(worker, WorkerGrant(session=claim.session, round=update.round,
                                                                 device=device, update_id=update.update_id, granted=False)))
            return [*out, *self.intake.refuse(device, claim.ref_msg_id or "", update, *client)]
        current = self.rounds.slot.current
        assert current is not None
        norm_weight = fold_weight(client, current.assignments[device].weighted) * claim.norm
        current.weighted_norms += norm_weight
        self.intake.seen.add(update.update_id)
        self.intake.norms.accepted(update.tier, claim.norm)
        self.grants[device] = Grant(worker, claim.session, update, client, norm_weight, claim.nbytes)
        assert isinstance(current.accumulator, ElementwiseMean)
        self._to_workers.append(ToWorker(worker, WorkerGrant(
            session=claim.session, round=update.round, device=device, update_id=update.update_id, granted=True,
            samples=client.num_samples, work=client.work, weighted=current.accumulator.weighted)))
        log.info("round %d: update of %s granted to worker %s (%d granted, %d counted of %d)", update.round, device,
                 worker, len(self.grants), len(current.answered), len(current.assignments))
        return out

    def on_partial(self, worker: str, body: PartialSum, sums: Mapping[str, np.ndarray], nbytes: int,
                   now: float, sent_at: float | None = None, refused: Problem | None = None) -> list[Outgoing]:
        """A worker's partial sum: counted whole (its updates' ledger rows written) or refused whole; one of a stale
        session (`stale_session`) changes nothing. `refused`: its tensors did not decode (the service says why)."""
        if problem := self.stale_session(worker, body.session, sent_at):
            self.intake.count_rejection(*problem)
            return []
        out = self._session(worker, body.session, now, sent_at)
        current = self.rounds.slot.current
        problem: Problem | None = None
        by_id = {g.update.update_id: d for d, g in self.grants.items() if g.worker == worker and g.session == body.session}
        if refused is not None:
            problem = refused
        elif current is None or body.round != current.number or current.trained is not None:
            problem = RejectReason.STALE_ROUND, f"a partial sum of round {body.round}, which is not collecting updates"
        elif len(set(body.update_ids)) != len(body.update_ids):
            problem = RejectReason.DUPLICATE, "a partial sum naming an update twice"
        elif missing := [u for u in body.update_ids if u not in by_id]:
            problem = RejectReason.NOT_SELECTED, (f"a partial sum naming {len(missing)} updates that are not live grants "
                                                  f"of worker {worker}'s session (voided or never granted)")
        elif bad := non_finite(sums):
            problem = RejectReason.NON_FINITE, f"a partial sum holding NaN or Inf in {', '.join(bad)}"
        else:
            problem = partial_problem(sums, [self.grants[by_id[u]] for u in body.update_ids])
        if problem is not None:
            log.warning("refused a partial sum from worker %s: %s: %s", worker, problem[0].value, problem[1])
            self.intake.count_rejection(*problem)
            # The live grants it names cannot be counted any more (their sums are in a refused partial): voided, and
            # their devices asked again (a coordinator restarted mid-round meets partials mixing old and new grants).
            named = {by_id[u] for u in body.update_ids if u in by_id}
            return [*out, *(self._void(worker, body.session, now, ask_again=True, only=named) if named else [])]
        assert current is not None and isinstance(current.accumulator, ElementwiseMean)
        counted = [self.grants.pop(by_id[u]) for u in body.update_ids]
        current.accumulator.merge(sums, [g.client for g in counted])
        self.counted += len(counted)
        for grant in counted:
            update, device = grant.update, grant.client.device_id
            self.intake.record_accepted(update.round, device, update, grant.nbytes, f"partial sum of worker {worker}")
            current.answered.add(device)
            current.bytes_up += grant.nbytes
            if update.eval_accuracy is not None and update.eval_loss is not None and update.eval_samples:
                current.evals.append((update.tier, update.eval_loss, update.eval_accuracy, update.eval_samples))
            self.registry.answered(device, None if update.unchanged else update.train_loss)
        log.info("round %d: partial sum of worker %s counted: %d updates (%d bytes); %d/%d counted", current.number,
                 worker, len(counted), nbytes, len(current.answered), len(current.assignments))
        return [*out, *(self.tick(now) if self.round_complete(now) else [])]

    # -- the round's close --------------------------------------------------------------------------

    def round_complete(self, now: float) -> bool:
        """Training: every selected device counted, or (every one granted, or the deadline passed, or every one
        owing offline) once the workers' partial sums are in (or --flush-wait passed); statistics as usual."""
        current = self.rounds.slot.current
        if current is None:
            return False
        if current.trained is not None:
            return super().round_complete(now)
        owing = current.owing
        if not owing:
            return True
        ungranted = owing - set(self.grants)
        late = now >= current.deadline
        if ungranted and not late and not self._all_offline(ungranted):
            return False
        if not self.grants:
            return True
        if late and now >= current.deadline + self.flush_wait_s:
            holders = sorted({g.worker for g in self.grants.values()})
            log.warning("round %d: workers %s sent no partial sum within %.0f s of the deadline (--flush-wait); "
                        "their %d updates are not counted", current.number, ", ".join(holders), self.flush_wait_s,
                        len(self.grants))
            for worker in holders:
                self._void(worker, None, now, ask_again=False)
            return True
        self._ask_for_partials(now)
        return False

    def close_round(self, now: float) -> list[Outgoing]:
        """Close the open round (no grant outlives it) and forget who was asked for partial sums."""
        self.grants.clear()
        self._flush_asked.clear()
        return super().close_round(now)

    # -- parts ----------------------------------------------------------------------------------

    def _check_claim(self, device: str, update: Update, norm: float, now: float) -> Problem | ClientUpdate:
        """Why a claimed update is refused (what a single aggregator would refuse it for, or an earlier grant); else the
        accumulator's view of it: its capped samples, work and contributors, its delta zero-size views of its tier's
        shapes (what the mass of its elements needs)."""
        current = self.rounds.slot.current
        if current is not None and current.trained is not None:
            return RejectReason.LATE, "the round is measuring statistics"
        if (held := self.grants.get(device)) is not None and current is not None and update.round == current.number:
            return RejectReason.DUPLICATE, f"{device} already answered round {current.number} (held by worker {held.worker})"
        if problem := self.rounds.check_round(self.model, device, update, now):
            return problem
        assert current is not None
        assignment = current.assignments[device]
        if problem := self.intake.check_samples(device, assignment, update.num_samples):
            return problem
        blocks = {n: np.broadcast_to(np.float32(0), shape) for n, shape in self.artifacts.tiers[update.tier].shapes.items()}
        if problem := check_update_tensors(update, blocks, update.tier, self.artifacts):
            return problem  # the worker checked the tensors; a relay's contributors are checked here too, on the header
        client = self.intake.client_update(current, assignment, update, blocks)
        return self.intake.check_weight(current, client, norm, assignment.weighted) or client

    def stale_session(self, worker: str, session: str, sent_at: float | None) -> Problem | None:
        """Why a frame of `worker` is refused unseen: it is of another session than the live one (or than the last one,
        after its will) but sent no later than that session's newest frame: a replay, or a dead process's frame that
        arrived late. Only a frame sent later starts a new session (`sent_at` None: not ordered, taken as new). A
        session another worker has live is refused too (sessions are never shared)."""
        if owner := next((w for w, live in self.sessions.items() if live == session and w != worker), None):
            return RejectReason.SENDER_MISMATCH, f"worker {worker}: a frame of session {session[:8]}, worker {owner}'s"
        newest = self._newest.get(worker)
        if session == self.sessions.get(worker) or sent_at is None or newest is None or sent_at > newest:
            return None
        return RejectReason.REPLAYED, (f"worker {worker}: a frame of session {session[:8]} sent at {sent_at:.3f}, "
                                       f"not after the newest frame of its live or last session ({newest:.3f})")

    def _session(self, worker: str, session: str, now: float, sent_at: float | None = None) -> list[Outgoing]:
        """Note `worker`'s live session (and its newest frame's `sent_at`); a new one means the old process is gone:
        its grants are void."""
        old = self.sessions.get(worker)
        if sent_at is not None:  # a new session's frames are ordered from its first one on
            self._newest[worker] = max(sent_at, self._newest[worker]) if old == session and worker in self._newest else sent_at
        if old == session:
            return []
        self.sessions[worker] = session
        if old is None:
            log.info("aggregator worker %s joined (session %s)", worker, session[:8])
            return []
        log.warning("aggregator worker %s restarted (session %s, was %s)", worker, session[:8], old[:8])
        return self._void(worker, old, now, ask_again=True)

    def _void(self, worker: str, session: str | None, now: float, ask_again: bool,
              only: Collection[str] | None = None) -> list[Outgoing]:
        """Void `worker`'s uncounted grants (of `session`, or any); with `ask_again`, send the round's task again to
        every selected device neither counted nor granted to a live worker, the deadline a full timeout away."""
        current = self.rounds.slot.current
        lost = [d for d, g in self.grants.items()
                if g.worker == worker and (session is None or g.session == session) and (only is None or d in only)]
        for device in lost:
            grant = self.grants.pop(device)
            if current is not None:
                current.weighted_norms -= grant.norm_weight
        self.voided += len(lost)
        if lost:
            log.warning("round %s: %d updates held by worker %s are void: %s", current.number if current else "-",
                        len(lost), worker, listing(sorted(lost)))
        if not ask_again or current is None or current.trained is not None:
            return []
        again = sorted(current.owing - set(self.grants))
        if not again:
            return []
        current.deadline = max(current.deadline, now + self.config.round_timeout_s)
        self.asked_again += len(again)
        log.warning("round %d: tasks sent again to %s (deadline now in %.0f s)", current.number, listing(again),
                    current.deadline - now)
        return [self.rounds.tasks.task(self.model, current.assignments[d], current.number, current.deadline)
                for d in again]

    def _ask_for_partials(self, now: float) -> None:
        """Ask each worker holding grants for its partial sum (again after FLUSH_ASK_EVERY_S)."""
        current = self.rounds.slot.current
        assert current is not None
        for worker in sorted({g.worker for g in self.grants.values()}):
            if now - self._flush_asked.get(worker, -float("inf")) >= FLUSH_ASK_EVERY_S:
                self._flush_asked[worker] = now
                self._to_workers.append(ToWorker(worker, WorkerFlush(round=current.number)))

    def _all_offline(self, devices: Collection[str]) -> bool:
        """Whether every device of `devices` is known and offline."""
        return all((d := self.registry.get(dev)) is not None and not d.online for dev in devices)


def partial_problem(sums: Mapping[str, np.ndarray], grants: Collection[Grant]) -> Problem | None:
    """Why a partial sum cannot be the sum of the `grants` it names: a value outside every block they hold (HeteroFL
    tiers, relays' contributors), or an L2 norm over the sum of their weight x norm (the triangle inequality on what
    the coordinator granted, with float32 slack); None when it may be added."""
    bound = sum(g.norm_weight for g in grants) * (1 + PARTIAL_NORM_SLACK)
    total = 0.0
    for name, value in sums.items():
        held = np.zeros(value.shape, bool)
        for grant in grants:
            blocks = [part.shapes[name] for part in grant.client.contributions] or [grant.client.delta[name].shape]
            for block in blocks:
                held[leading_slices(block)] = True
        if np.any(value[~held]):
            return RejectReason.BAD_TENSOR, f"a partial sum with values in {name} outside the blocks its updates hold"
        total += float(np.square(value, dtype=np.float64).sum())
    if math.sqrt(total) > bound:
        return RejectReason.OUTLIER, (f"a partial sum of L2 norm {math.sqrt(total):.4g}, over the {bound:.4g} its "
                                      f"{len(grants)} granted updates' weights x norms allow")
    return None
