"""The round engine: synchronous rounds of select -> dispatch -> collect -> aggregate -> commit.

Pure logic with the clock passed in: it never touches the network. The service feeds it
devices and updates, calls `tick` often, and publishes what it returns. A round closes when
every selected device answered, when the deadline passes, or when every device still owing an
update has gone offline; it commits if at least `min_updates` arrived.

Batch-norm models add a statistics phase before the commit (static BN): the devices that
answered get the new weights, measure each layer's statistics on their data and send them back;
the pooled statistics of each tier replace the running averages that training left behind.

Weight integrity: an update may claim no more samples than its device announced (too_many_samples);
its norm must be finite and within `outlier_multiple` x its tier's recent median (non_finite,
outlier; aggregator.strategies.robust.NormBound), and its weighted norm must leave the round's float32 sums
finite (non_finite); with `max_share` < 1 its weight is capped (aggregator.strategies.fedavg.share_caps).
The new global model is checked before commit: a round that would commit NaN or Inf is refused
whole (non_finite, a failed round) and the previous version stays.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from aggregator.engines.base import EngineConfig, OpenRound, Outgoing, RoundView, reject
from aggregator.evaluate import HeldOutEvaluator
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.ledger import Ledger
from aggregator.store.round_spool import Assignment, RoundPlan
from aggregator.store.state import StateRecord, StateStore
from aggregator.strategies.batchnorm import StatisticsPool, statistic_names, with_statistics
from aggregator.strategies.fedavg import Accumulator, ClientUpdate, Contribution, Strategy, share_caps
from aggregator.strategies.privacy import PrivacyBudget
from aggregator.strategies.robust import NormBound, update_norm
from aggregator.strategies.server_optimizer import split_state, touched_mask, with_state
from models.slicing import slice_params
from models.zoo import init_global_params
from protocol.messages import RejectReason, RoundSummary, SecAgg, Statistics, Task, Update

log = logging.getLogger(__name__)
RECORDED_ON_RESTART = "recorded on restart from the open-round spool"
# A round's weighted norms must sum below this, so no float32 sum of weight x delta can overflow.
SUM_BOUND = float(np.finfo(np.float32).max) / 2


class RoundEngine:
    """Runs rounds of one strategy over the registry's devices, committing each version durably."""

    UNIT = "round"  # what the logs call one applied version

    def __init__(
        self,
        config: EngineConfig,
        strategy: Strategy,
        artifacts: ArtifactStore,
        store: StateStore,
        registry: DeviceRegistry,
        evaluator: HeldOutEvaluator | None = None,
        ledger: Ledger | None = None,
        now: float | None = None,
        privacy: PrivacyBudget | None = None,
    ) -> None:
        self.config = config
        self.strategy = strategy
        self.privacy = privacy  # differential privacy: the (epsilon, delta) books, one step per released model
        self.artifacts = artifacts
        self.store = store
        self.registry = registry
        self.evaluator = evaluator
        self.ledger = ledger
        self.rejected: collections.Counter[str] = collections.Counter()
        self.norms = NormBound(config.outlier_multiple)
        self._seen_update_ids: set[str] = set()
        self._open: OpenRound | None = None
        # (round, tier, variant, statistics) -> (weights, BN statistics it was cut from, the task's tensors)
        self._task_tensors_memo: dict[tuple[int, str, int, bool], tuple[object, object, dict[str, np.ndarray]]] = {}
        self._resend_owed_tasks = False  # a resumed round sends its owed tasks again at the first tick
        self._waiting_logged = False
        self.bn_statistics: dict[str, dict[str, np.ndarray]] = {}  # tier -> last pooled statistics
        self._measures_statistics = config.static_batch_norm and artifacts.spec.batch_norm
        self.optimizer_state: dict[str, np.ndarray] = {}  # the server optimizer's moments, committed with each version
        loaded = store.load(config.fleet, artifacts.identity)
        if loaded:
            self.record, (self.weights, self.optimizer_state) = loaded[0], split_state(loaded[1])
            log.info("resumed from %s at version %d after round %d", store.root, self.record.version, self.record.round)
        else:
            self.record = StateRecord(fleet=config.fleet, model=artifacts.identity, version=0, round=0)
            self.weights = init_global_params(artifacts.spec)
            store.commit(self.record, self.weights)
        if ledger is not None:  # replays of updates counted before a restart stay duplicates
            self._seen_update_ids = ledger.accepted_update_ids(self.record.round)
        if privacy is not None:
            self._replay_privacy()
        self._resume_open_round(time.time() if now is None else now)

    @property
    def finished(self) -> bool:
        return self.record.round >= self.config.rounds

    def view(self) -> RoundView | None:
        """A frozen copy of the open round, or None between rounds."""
        return self._open.view() if self._open else None

    @property
    def current_round(self) -> int | None:
        return self._open.number if self._open else None

    def note_bytes(self, up: int = 0, down: int = 0) -> None:
        """Count wire bytes toward the open round."""
        if self._open:
            self._open.bytes_up += up
            self._open.bytes_down += down

    def tick(self, now: float) -> list[Outgoing]:
        """Start a round when none is open and enough devices are available; close a finished one."""
        if self.finished:
            return []
        if self._open is None:
            return self._start_round(now)
        if self._round_complete(now):
            return self._close_round(now)
        return self._owed_tasks_again()

    def on_update(self, device_id: str, msg_id: str, update: Update, tensors: Mapping[str, np.ndarray], nbytes: int, now: float) -> list[Outgoing]:
        """Validate one update and fold it into the open round, or reject it with a reason."""
        assignment = self._open.assignments.get(device_id) if self._open else None
        if self._open and self._open.trained is not None:
            return self._refuse_update(device_id, msg_id, update, RejectReason.LATE, "the round is measuring statistics")
        if update.unchanged and assignment:  # selective upload: a participant with a zero update
            if tensors:
                return self._refuse_update(device_id, msg_id, update, RejectReason.BAD_TENSOR, "an unchanged update carries tensors")
            tensors = self._zero_update(assignment.tier)
        problem = self._check_update(device_id, update, tensors, now)
        if problem:
            return self._refuse_update(device_id, msg_id, update, *problem)
        assert self._open is not None
        assignment = self._open.assignments[device_id]
        client = self._client_update(self._open, assignment, update, tensors)
        norm = update_norm(tensors)
        if problem := self._check_weight(self._open, client, norm, assignment.weighted):
            return self._refuse_update(device_id, msg_id, update, *problem)
        self.store.open_round.accept(device_id, update, nbytes, dict(tensors))  # on disk before the ledger says accepted
        self._seen_update_ids.add(update.update_id)
        self._record_accepted(update.round, device_id, update, nbytes)
        self._fold(self._open, client, update, norm, nbytes)
        self.registry.answered(device_id, None if update.unchanged else update.train_loss)
        if update.train_seconds > 0 and update.steps and not update.unchanged and not update.contributors:  # per step
            samples = min(update.steps * self._open.assignments[device_id].batch_size, update.steps * update.num_samples)
            self.registry.measured_speed(device_id, update.tier, update.train_seconds / samples)
        log.info("round %d: update %d/%d from %s (%d samples)", update.round, len(self._open.answered),
                 len(self._open.assignments), device_id, update.num_samples)
        return self.tick(now) if self._round_complete(now) else []

    def on_secagg(self, device_id: str, msg_id: str, body: SecAgg, tensors: Mapping[str, np.ndarray], nbytes: int,
                  now: float) -> list[Outgoing]:
        """Refused: this engine's rounds are not summed by secure aggregation."""
        detail = f"{body.phase}: this fleet does not aggregate securely (no --secure-aggregation)"
        self.count_rejection(RejectReason.UNEXPECTED, detail, device_id, body)
        return [reject(device_id, RejectReason.UNEXPECTED, detail, msg_id, body.round)]

    def masked_tensors(self, device_id: str, body: SecAgg, now: float) -> dict[str, tuple[int, ...]]:
        """Nothing: a secure-aggregation message may carry no tensors to an engine that refuses it."""
        return {}

    def on_statistics(self, device_id: str, msg_id: str, body: Statistics, tensors: Mapping[str, np.ndarray], now: float) -> list[Outgoing]:
        """Pool one device's batch-norm statistics, or reject them with a reason."""
        problem = self._check_statistics(device_id, body, tensors)
        if problem:
            return self._refuse_update(device_id, msg_id, body, *problem)
        assert self._open is not None
        self._open.measured.add(device_id)
        if self.ledger:
            self.ledger.record(kind="statistics", accepted=True, round_number=body.round, device=device_id,
                               num_samples=body.num_samples)
        self._open.statistics.setdefault(body.tier, StatisticsPool()).add(body.num_samples, tensors)
        return self.tick(now) if self._round_complete(now) else []

    def _check_statistics(self, device_id: str, body: Statistics, tensors: Mapping[str, np.ndarray]) -> tuple[RejectReason, str] | None:
        current = self._open
        if current is None or current.trained is None or body.round != current.number:
            return RejectReason.STALE_ROUND, f"round {body.round} is not measuring statistics"
        if device_id not in current.answered or device_id in current.measured:
            return RejectReason.NOT_SELECTED, f"{device_id} owes no statistics for round {current.number}"
        tier = current.assignments[device_id].tier
        if body.tier != tier or body.base_version != self.record.version + 1:
            return RejectReason.WRONG_VERSION, f"statistics of {body.tier} v{body.base_version}, asked for {tier} v{self.record.version + 1}"
        if problem := self._check_samples(device_id, current.assignments[device_id], body.num_samples):
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

    def _check_samples(self, device_id: str, assignment: Assignment, claimed: int) -> tuple[RejectReason, str] | None:
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

    def _check_weight(self, current: OpenRound, client: ClientUpdate, norm: float, weighted: bool) -> tuple[RejectReason, str] | None:
        """Why an update's delta is refused: a NaN/Inf or outlier norm, or a weighted norm overflowing the sums."""
        if problem := self.norms.check(client.tier, norm):
            return problem
        weight = fold_weight(client, weighted)
        if current.weighted_norms + weight * norm > SUM_BOUND:
            return RejectReason.NON_FINITE, f"its delta (L2 norm {norm:.4g}) weighted by {weight:g} would overflow the round's float32 sum"
        return None

    def _client_update(self, current: OpenRound, assignment: Assignment, update: Update, tensors: Mapping[str, np.ndarray],
                       scale: float = 1.0) -> ClientUpdate:
        """The accumulator's view of an accepted update: its samples capped by `max_share`, its work, its contributors."""
        device_id = assignment.device_id
        samples = update.num_samples if update.contributors else min(update.num_samples, current.caps.get(device_id, update.num_samples))
        if samples < update.num_samples:
            log.info("round %d: %s's weight capped at %d of its %d samples (--max-share %g)", current.number, device_id,
                     samples, update.num_samples, self.config.max_share)
        return ClientUpdate(device_id, update.tier, samples, tensors, scale=scale, work=work_done(update, assignment),
                            contributions=contributions(update, self.artifacts))

    def _zero_update(self, tier: str) -> dict[str, np.ndarray]:
        """The tensors of a selective-upload "unchanged" answer: a zero delta of the tier's shapes."""
        return {n: np.zeros(s, np.float32) for n, s in self.artifacts.tiers[tier].shapes.items()}

    def _record_accepted(self, round_number: int, device_id: str, update: Update, nbytes: int, detail: str = "") -> None:
        """The ledger row of an accepted (already spooled) update."""
        if self.ledger:
            self.ledger.record(kind="update", accepted=True, round_number=round_number, device=device_id, detail=detail,
                               update_id=update.update_id, num_samples=update.num_samples, nbytes=nbytes)

    def _refuse_update(self, device_id: str, msg_id: str, update: Update | Statistics, reason: RejectReason, detail: str) -> list[Outgoing]:
        self.count_rejection(reason, detail, device_id, update)  # the service logs and answers it, at a bounded rate
        return [reject(device_id, reason, detail, msg_id, update.round)]

    def count_rejection(
        self, reason: RejectReason, detail: str = "", device_id: str | None = None, body: Update | Statistics | SecAgg | None = None
    ) -> None:
        """Count a rejection (and write it to the ledger), including those decided outside the engine."""
        self.rejected[reason.value] += 1
        if self.ledger:
            self.ledger.record(kind=body.kind if body else "frame", accepted=False, reason=reason.value, detail=detail,
                               round_number=body.round if body else None, device=device_id,
                               update_id=getattr(body, "update_id", None), num_samples=getattr(body, "num_samples", None))

    # -- rounds -----------------------------------------------------------------------------

    def _start_round(self, now: float) -> list[Outgoing]:
        number = self.record.round + 1
        available = self.registry.available(now)
        assignments = self._announced(self.strategy.configure_round(number, available))
        if not assignments:
            if not self._waiting_logged:
                log.info("round %d: waiting for devices (%d available)", number, len(self.registry.available(now)))
                self._waiting_logged = True
            return []
        self._waiting_logged = False
        self._open = OpenRound(
            number=number,
            started=now,
            deadline=now + self.config.round_timeout_s,
            assignments={a.device_id: a for a in assignments},
            accumulator=self.strategy.start_aggregation(self.weights),
            available=len(available),
            caps=self._share_caps(assignments),
        )
        self.store.open_round.begin(RoundPlan(round=number, base_version=self.record.version, started=now,
                                              deadline=self._open.deadline, assignments=assignments,
                                              available=len(available)))
        for a in assignments:
            self.registry.asked(a.device_id, number)
        log.info("round %d: %d devices selected: %s", number, len(assignments),
                 _listing([f"{a.device_id} (tier {a.tier})" for a in sorted(assignments, key=lambda a: a.device_id)]))
        return [self._task(a, number, self._open.deadline) for a in assignments]

    def _announced(self, assignments: list[Assignment]) -> list[Assignment]:
        """`assignments` with each device's announced sample count, the bound on what its answers may claim."""
        return [replace(a, announced_samples=info.num_samples) if (info := self.registry.get(a.device_id)) else a
                for a in assignments]

    def _share_caps(self, assignments: list[Assignment]) -> dict[str, int]:
        """Each device's cap on the samples its update weighs, from `max_share` (empty: no caps)."""
        return share_caps(assignments, {t: a.manifest.rate for t, a in self.artifacts.tiers.items()}, self.config.max_share)

    def _server_step(self, current: OpenRound, aggregate: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """The round's new global model and server-optimizer state: the aggregate itself without a server optimizer."""
        optimizer = self.config.server_optimizer
        if optimizer is None:
            return aggregate, None
        blocks = [self.artifacts.tiers[current.assignments[d].tier].shapes for d in current.answered]
        touched = touched_mask({n: w.shape for n, w in self.weights.items()}, blocks)
        return optimizer.step(self.weights, aggregate, touched, self.optimizer_state)

    def _start_statistics(self, current: OpenRound, trained: dict[str, np.ndarray], now: float) -> list[Outgoing]:
        """Keep the aggregated weights aside and ask the devices that answered to measure them."""
        current.trained = trained
        current.deadline = now + self.config.round_timeout_s
        self.store.open_round.mark_measuring_statistics()
        log.info("round %d: measuring batch-norm statistics on %d devices", current.number, len(current.answered))
        return [self._task(current.assignments[d], current.number, current.deadline, current.trained)
                for d in sorted(current.answered)]

    def _task(self, assignment: Assignment, number: int, deadline: float, trained: Mapping[str, np.ndarray] | None = None) -> Outgoing:
        """A training task on the committed weights, or with `trained` a statistics task on those."""
        tier = self.artifacts.tiers[assignment.tier]
        body = Task(
            round=number,
            model_version=self.record.version + (trained is not None),
            tier=assignment.tier,
            manifest_sha256=tier.manifest_sha256,
            artifacts=tier.files,
            epochs=assignment.epochs,
            batch_size=assignment.batch_size,
            learning_rate=assignment.learning_rate,
            mask_classes=assignment.mask_classes,
            proximal_mu=assignment.proximal_mu,
            deadline=deadline,
            seed=self.config.seed * 100_003 + number,
            evaluate=self.config.evaluate_on_devices,
            statistics_only=trained is not None,
            variant=0 if trained is not None else assignment.variant,
            weighted=assignment.weighted,
            dp_clip=self.config.local_dp_clip,
            dp_noise=self.config.local_dp_noise,
        )
        return Outgoing(assignment.device_id, body, self._task_tensors(assignment, number, trained))

    def _task_tensors(self, assignment: Assignment, number: int, trained: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """The tensors of a task: one shared copy per round, tier and variant, however many devices get it."""
        source = self.weights if trained is None else trained
        key = (number, assignment.tier, assignment.variant if trained is None else 0, trained is not None)
        if self._task_tensors_memo and next(iter(self._task_tensors_memo))[0] != number:
            self._task_tensors_memo.clear()
        known = self._task_tensors_memo.get(key)
        if known is not None and known[0] is source and known[1] is self.bn_statistics:
            return known[2]
        if trained is None:  # training starts from the strategy's model: the global one, or a FedMut mutation
            trained = dict(self.strategy.task_weights(assignment, self.weights))
        tensors = self._tier_weights(assignment.tier, trained)
        self._task_tensors_memo[key] = (source, self.bn_statistics, tensors)
        return tensors

    def _tier_weights(self, tier: str, weights: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The tier's slice of `weights` (default: the global weights) with the tier's own BN statistics."""
        sliced = slice_params(self.weights if weights is None else weights, self.artifacts.tiers[tier].shapes)
        own = self.bn_statistics.get(tier)
        return with_statistics(sliced, {tier: own}) if own else sliced

    def _round_complete(self, now: float) -> bool:
        current = self._open
        if current is None:
            return False
        owing = current.owing
        if not owing or now >= current.deadline:
            return True
        # Unknown is not gone: a resumed round's devices are unknown until their retained hello is back.
        return all((d := self.registry.get(dev)) is not None and not d.online for dev in owing)

    def _close_round(self, now: float) -> list[Outgoing]:
        current = self._open
        assert current is not None
        refused = None
        if committed := current.accumulator.count >= self.config.min_updates:
            with np.errstate(over="ignore", invalid="ignore"):  # NaN and Inf are looked for below
                if current.trained is None:
                    trained, current.optimizer_state = self._server_step(current, current.accumulator.result())
                    if self._measures_statistics and not non_finite(trained):
                        return self._start_statistics(current, trained, now)
                else:
                    trained = current.trained
                weights, bn_statistics = self._with_statistics(current, trained)
            if refused := non_finite(weights):
                self._refuse_round(current, f"the new global model would hold NaN or Inf in {', '.join(refused)}")
                committed = False
            else:
                self.weights, self.bn_statistics = weights, bn_statistics
                if current.optimizer_state is not None:
                    self.optimizer_state = current.optimizer_state
        self._open = None
        summary = self._summarise(current, now, committed)
        if refused:
            summary = summary.model_copy(update={"metrics": {**summary.metrics, RejectReason.NON_FINITE.value: 1.0}})
        if self.privacy is not None and committed:
            summary = self._charge_privacy(summary, len(current.assignments), max(current.available, len(current.assignments)))
        self.record = StateRecord(
            fleet=self.record.fleet,
            model=self.record.model,
            version=self.record.version + int(committed),
            round=current.number,
            history=[*self.record.history, summary],
        )
        self.store.commit(self.record, with_state(self.weights, self.optimizer_state) if committed else None)
        missing = sorted(set(current.assignments) - current.answered)
        for device_id in missing:
            self.registry.missed(device_id)
        log.info(
            "%s %d %s: %d/%d answered%s; version %d; accuracy %s (%s)",
            self.UNIT, current.number, "committed" if committed else f"FAILED ({'non_finite' if refused else 'too few updates'})",
            len(current.answered), len(current.assignments),
            f", dropped {_listing(missing)}" if missing else "",
            self.record.version, f"{summary.accuracy:.4f}" if summary.accuracy is not None else "n/a",
            summary.accuracy_source,
        )
        return [Outgoing(None, summary)]

    def _refuse_round(self, current: OpenRound, detail: str) -> None:
        """Count a round refused whole (non_finite): nothing of it is committed."""
        self.rejected[RejectReason.NON_FINITE.value] += 1
        log.error("round %d refused: %s: %s; version %d stays", current.number, RejectReason.NON_FINITE.value, detail,
                  self.record.version)
        if self.ledger:
            self.ledger.record(kind="round", accepted=False, reason=RejectReason.NON_FINITE.value, detail=detail,
                               round_number=current.number)

    def _with_statistics(self, current: OpenRound, trained: dict[str, np.ndarray]
                         ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
        """`trained` with this round's pooled BN statistics (each tier keeps its own for its slice), and those."""
        if not current.statistics:
            if self._measures_statistics and current.trained is not None:
                log.warning("round %d: no batch-norm statistics arrived; keeping the averaged running statistics", current.number)
            return trained, self.bn_statistics
        bn_statistics = {tier: pool.result() for tier, pool in current.statistics.items()}
        log.info("round %d: batch-norm statistics from %d devices (%s)", current.number, len(current.measured),
                 ", ".join(f"tier {t}: {p.samples} samples" for t, p in sorted(current.statistics.items())))
        return with_statistics(trained, bn_statistics), bn_statistics

    def _charge_privacy(self, summary: RoundSummary, selected: int, available: int) -> RoundSummary:
        """One accountant step for a released model; (epsilon, delta) so far into the summary's metrics."""
        assert self.privacy is not None
        spent = self.privacy.record_round(selected, available)
        log.info("round %d: differential privacy spent so far: epsilon %.3f at delta %g over %d rounds",
                 summary.round, spent.epsilon, spent.delta, spent.rounds)
        return summary.model_copy(update={"metrics": {**summary.metrics, **spent.metrics(),
                                                      "dp_selected": float(selected), "dp_available": float(available)}})

    def _replay_privacy(self) -> None:
        """Rebuild the privacy books from the committed history (each charged round kept its sampling)."""
        assert self.privacy is not None
        for summary in self.record.history:
            if "dp_selected" in summary.metrics:
                self.privacy.record_round(int(summary.metrics["dp_selected"]), int(summary.metrics["dp_available"]))

    def _summarise(self, current: OpenRound, now: float, committed: bool) -> RoundSummary:
        accuracy = loss = None
        source = "none"
        by_tier: dict[str, float] = {}
        if self.evaluator is not None:
            by_rate = {1.0: self.evaluator.evaluate(self.weights, self.artifacts.spec, 1.0)}
            for tier in sorted({a.tier for a in current.assignments.values()}):
                artifacts = self.artifacts.tiers[tier]
                rate = artifacts.manifest.rate
                if rate not in by_rate:  # each width once; full width is the global weights (widest statistics)
                    by_rate[rate] = self.evaluator.evaluate(self._tier_weights(tier), self.artifacts.spec, rate)
                by_tier[tier] = by_rate[rate][1]
            loss, accuracy = by_rate[1.0]
            source = "held-out"
        elif current.evals:
            samples = sum(n for *_, n in current.evals)
            loss = sum(l * n for _, l, _, n in current.evals) / samples
            accuracy = sum(a * n for _, _, a, n in current.evals) / samples
            source = "federated"
            for tier in {t for t, *_ in current.evals}:
                rows = [(a, n) for t, _, a, n in current.evals if t == tier]
                by_tier[tier] = sum(a * n for a, n in rows) / sum(n for _, n in rows)
        return RoundSummary(
            round=current.number,
            version=self.record.version + int(committed),
            selected=len(current.assignments),
            answered=len(current.answered),
            accuracy=accuracy,
            loss=loss,
            accuracy_source=source,
            accuracy_by_tier=by_tier,
            bytes_up=current.bytes_up,
            bytes_down=current.bytes_down,
            seconds=now - current.started,
            rejected=dict(self.rejected),
            metrics=self.strategy.metrics(),
            final=current.number >= self.config.rounds,
        )

    # -- the open round on disk (aggregator.store.round_spool) ----------------------------------------

    def _fold(self, current: OpenRound, client: ClientUpdate, update: Update, norm: float, nbytes: int) -> None:
        """Count one accepted update toward `current`: live, or replayed from the spool after a restart."""
        current.answered.add(client.device_id)
        current.bytes_up += nbytes
        current.weighted_norms += fold_weight(client, current.assignments[client.device_id].weighted) * norm
        self.norms.accepted(client.tier, norm)
        current.accumulator.add(client)
        if update.eval_accuracy is not None and update.eval_loss is not None and update.eval_samples:
            current.evals.append((update.tier, update.eval_loss, update.eval_accuracy, update.eval_samples))

    def _resume_open_round(self, now: float) -> None:
        """Rebuild the round a crash cut short from its spool: same plan, same updates added in the same order.

        The deadline is at least a fresh timeout from `now`: updates that waited at the broker while
        we were down were sent in time. A round that was measuring batch-norm statistics closes its
        training phase at the first tick and asks for the statistics again (measuring is idempotent).
        """
        spooled = self.store.open_round.load(self.record.round, self.record.version)
        if spooled is None:
            return
        plan = spooled.plan
        current = self._open = OpenRound(
            number=plan.round,
            started=plan.started,
            deadline=now if plan.measuring_statistics else max(plan.deadline, now + self.config.round_timeout_s),
            assignments={a.device_id: a for a in plan.assignments},
            accumulator=self.strategy.start_aggregation(self.weights),
            available=plan.available,
            caps=self._share_caps(plan.assignments),
        )
        recorded = self.ledger.accepted_update_ids(plan.round) if self.ledger else set()
        for meta, tensors in spooled.updates:
            client = self._client_update(current, current.assignments[meta.device_id], meta.update, tensors)
            self._fold(current, client, meta.update, update_norm(tensors), meta.nbytes)
            self._seen_update_ids.add(meta.update.update_id)
            if meta.update.update_id not in recorded:  # spooled, then stopped before the ledger row
                self._record_accepted(plan.round, meta.device_id, meta.update, meta.nbytes, RECORDED_ON_RESTART)
        self._resend_owed_tasks = not plan.measuring_statistics
        log.info("round %d resumed from %s: %d of %d updates were accepted before the restart%s", plan.round,
                 self.store.open_round.folder, len(current.answered), len(current.assignments),
                 "; measuring batch-norm statistics again" if plan.measuring_statistics else "")

    def _owed_tasks_again(self) -> list[Outgoing]:
        """Once after a restart, the resumed round's tasks to the devices still owing: they may have died with us.

        A device that had the task already answers twice; its second update is refused as a duplicate.
        """
        if not self._resend_owed_tasks or self._open is None:
            return []
        self._resend_owed_tasks = False
        current = self._open
        log.info("round %d: tasks sent again to %s", current.number, ", ".join(sorted(current.owing)) or "nobody")
        return [self._task(current.assignments[d], current.number, current.deadline) for d in sorted(current.owing)]

    def _check_update(self, device_id: str, update: Update, tensors: Mapping[str, np.ndarray], now: float) -> tuple[RejectReason, str] | None:
        current = self._open
        if device_id not in self.registry and not (current and device_id in current.assignments):  # resumed: hello may lag
            return RejectReason.UNKNOWN_DEVICE, f"{device_id} has not announced itself"
        if update.update_id in self._seen_update_ids:
            return RejectReason.DUPLICATE, f"update {update.update_id} was already counted"
        if current is None or update.round < current.number:
            return RejectReason.STALE_ROUND, f"round {update.round} is closed (current: {current.number if current else 'none'})"
        if update.round > current.number:
            return RejectReason.FUTURE_ROUND, f"round {update.round} has not started (current: {current.number})"
        assignment = current.assignments.get(device_id)
        if assignment is None:
            return RejectReason.NOT_SELECTED, f"{device_id} was not selected for round {current.number}"
        if device_id in current.answered:
            return RejectReason.DUPLICATE, f"{device_id} already answered round {current.number}"
        if update.base_version != self.record.version:
            return RejectReason.WRONG_VERSION, f"trained on version {update.base_version}, round uses {self.record.version}"
        if update.tier != assignment.tier:
            return RejectReason.UNKNOWN_TIER, f"tier {update.tier!r} but the task was for tier {assignment.tier!r}"
        if now > current.deadline:
            return RejectReason.LATE, f"arrived {now - current.deadline:.1f} s after the deadline"
        return self._check_samples(device_id, assignment, update.num_samples) or check_update_tensors(
            update, tensors, assignment.tier, self.artifacts)


def check_update_tensors(update: Update, tensors: Mapping[str, np.ndarray], tier: str, artifacts: ArtifactStore) -> tuple[RejectReason, str] | None:
    """Why an update's tensors (and an edge aggregator's contributors) do not fit `tier`, or None."""
    shapes = artifacts.tiers[tier].shapes
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


def non_finite(weights: Mapping[str, np.ndarray]) -> list[str]:
    """The names of the tensors that hold NaN or Inf."""
    return [name for name, value in weights.items() if not np.isfinite(value).all()]


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
    """An edge aggregator's contributors with their tiers' block shapes (empty for a device's own update)."""
    return tuple(Contribution(tier, part.samples, part.devices, artifacts.tiers[tier].shapes)
                 for tier, part in sorted((update.contributors or {}).items()))


def _listing(names: list[str], limit: int = 20) -> str:
    """Names for a log line: all of a few, the first `limit` of many and how many more."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
