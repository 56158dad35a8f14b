"""The committed model every engine builds on: its weights and record, and the commit of a closed round.

`GlobalModel` owns what a version is: the global weights, the state record (version, round,
history), the server optimizer's moments and each tier's pooled batch-norm statistics. It
resumes them from the state folder (aggregator.store.state), turns a closed round's aggregate into
the next version (a server optimizer's step, the measured statistics, the check that nothing
non-finite is committed: a round that would commit NaN or Inf is refused whole and the previous
version stays), summarises the round, charges differential privacy's books and commits durably.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np

from aggregator.engines.base import OpenRound, Outgoing
from aggregator.engines.intake import UpdateIntake
from aggregator.engines.parts import EngineParts, listing
from aggregator.engines.personal import device_metrics, update_shapes
from aggregator.store.state import StateRecord
from aggregator.strategies.bn_statistics import with_statistics
from aggregator.strategies.scaffold import global_control_shapes, initial_control
from aggregator.strategies.server_optimizer import split_state, touched_mask, with_state
from models.slicing import slice_params
from protocol.control import split_control, with_control
from protocol.messages import RejectReason, RoundSummary, Task

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]


def non_finite(weights: Mapping[str, np.ndarray]) -> list[str]:
    """The names of the tensors that hold NaN or Inf."""
    return [name for name, value in weights.items() if not np.isfinite(value).all()]


class GlobalModel:
    """The committed global model: weights, record, server-optimizer state and BN statistics, and their commits."""

    def __init__(self, parts: EngineParts, record: StateRecord, weights: Weights,
                 optimizer_state: Weights | None = None, control: Weights | None = None) -> None:
        self.parts = parts
        self.record = record
        self.weights = weights
        self.optimizer_state: Weights = optimizer_state or {}  # the server optimizer's moments, committed with each version
        self.control: Weights = control or {}  # SCAFFOLD's server variate c, committed with each version
        if parts.config.scaffold is not None and not self.control:  # c starts at zero
            self.control = initial_control(global_control_shapes(parts.artifacts, weights))
        self.bn_statistics: dict[str, Weights] = {}  # tier -> last pooled statistics

    @property
    def finished(self) -> bool:
        """True once the configured rounds are done."""
        return self.record.round >= self.parts.config.rounds

    @classmethod
    def load(cls, parts: EngineParts) -> GlobalModel:
        """The newest committed version in the state folder, or version 0 (initial weights, committed now)."""
        config, store = parts.config, parts.store
        loaded = store.load(config.fleet, parts.artifacts.identity)
        if loaded:
            stored, control = split_control(loaded[1])
            model = cls(parts, loaded[0], *split_state(stored), control=control)
            log.info("resumed from %s at version %d after round %d", store.root, model.record.version, model.record.round)
        else:
            model = cls(parts, StateRecord(fleet=config.fleet, model=parts.artifacts.identity, version=0, round=0),
                        parts.artifacts.global_weights())
            store.commit(model.record, model.weights)
        if parts.privacy is not None:  # rebuild the books from the history (each charged round kept its sampling)
            for summary in model.record.history:
                if "dp_selected" in summary.metrics:
                    parts.privacy.record_round(int(summary.metrics["dp_selected"]), int(summary.metrics["dp_available"]))
        return model

    @classmethod
    def for_task(cls, parts: EngineParts, task: Task, weights: Mapping[str, np.ndarray]) -> GlobalModel:
        """A relay's model for one parent task: the task's weights at its version, never committed."""
        record = StateRecord(fleet=parts.config.fleet, model=parts.artifacts.identity, version=task.model_version,
                             round=task.round - 1)
        return cls(parts, record, {n: np.asarray(w, np.float32) for n, w in weights.items()})

    def tier_weights(self, tier: str, weights: Mapping[str, np.ndarray] | None = None) -> Weights:
        """The tier's slice of `weights` (default: the global weights) with the tier's own BN statistics."""
        sliced = slice_params(self.weights if weights is None else weights, self.parts.artifacts.tiers[tier].shapes)
        own = self.bn_statistics.get(tier)
        return with_statistics(sliced, {tier: own}) if own else sliced

    def aggregate(self, current: OpenRound) -> Weights | None:
        """The round's new global model (a server optimizer's step from its aggregate), or None with too few updates.

        The server optimizer's new state waits in `current.optimizer_state` until the commit, and
        SCAFFOLD's new c in `current.control`.
        """
        if current.accumulator.count < self.parts.config.min_updates:
            return None
        with np.errstate(over="ignore", invalid="ignore"):  # NaN and Inf are looked for before the commit
            aggregate = current.accumulator.result()
            if (scaffold := self.parts.config.scaffold) is not None and current.variates is not None:
                population = scaffold.population(current.available, len(current.answered))
                current.control = current.variates.step(self.control, population)
            optimizer = self.parts.config.server_optimizer
            if optimizer is None:
                return aggregate
            blocks = [update_shapes(self.parts.artifacts.tiers[current.assignments[d].tier].shapes,
                                    self.parts.config.personal_layers) for d in current.answered]
            touched = touched_mask({n: w.shape for n, w in self.weights.items()}, blocks)
            trained, current.optimizer_state = optimizer.step(self.weights, aggregate, touched, self.optimizer_state)
        return trained

    def close(self, current: OpenRound, trained: Weights | None, now: float, intake: UpdateIntake, unit: str,
              amend: Callable[[RoundSummary], RoundSummary] | None = None) -> Outgoing:
        """Commit the closed round `current`: `trained` (None: no version) becomes the next version unless it holds
        NaN or Inf; the round's summary, amended by `amend`, goes to the rounds topic."""
        committed, refused = trained is not None, []
        if trained is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                weights, bn_statistics = self._with_statistics(current, trained)
            if refused := non_finite(weights) + non_finite(with_control({}, current.control or {})):
                intake.refuse_round(current.number, f"the new global model would hold NaN or Inf in {', '.join(refused)}",
                                    self.record.version)
                committed = False
            else:
                self.weights, self.bn_statistics = weights, bn_statistics
                if current.optimizer_state is not None:
                    self.optimizer_state = current.optimizer_state
                if current.control is not None:
                    self.control = current.control
        summary = self.summarise(current, now, committed, dict(intake.rejected))
        if amend is not None:
            summary = amend(summary)
        if refused:
            summary = summary.model_copy(update={"metrics": {**summary.metrics, RejectReason.NON_FINITE.value: 1.0}})
        if self.parts.privacy is not None and committed:
            summary = self._charge_privacy(summary, len(current.assignments), max(current.available, len(current.assignments)))
        self.record = StateRecord(fleet=self.record.fleet, model=self.record.model, version=self.record.version + int(committed),
                                  round=current.number, history=[*self.record.history, summary])
        if self.parts.ledger is not None:  # group commit: every acceptance of the round on disk before the version
            self.parts.ledger.flush()
        self.parts.store.commit(self.record, with_control(with_state(self.weights, self.optimizer_state), self.control)
                                if committed else None)
        missing = sorted(set(current.assignments) - current.answered)  # a decline is a miss too (sampling)
        for device_id in missing:
            self.parts.registry.missed(device_id)
        dropped = [d for d in missing if d not in current.declined]
        log.info(
            "%s %d %s: %d/%d answered%s%s; version %d; accuracy %s (%s)",
            unit, current.number, "committed" if committed else f"FAILED ({'non_finite' if refused else 'too few updates'})",
            len(current.answered), len(current.assignments), f", dropped {listing(dropped)}" if dropped else "",
            f", declined {listing(sorted(current.declined))}" if current.declined else "",
            self.record.version, f"{summary.accuracy:.4f}" if summary.accuracy is not None else "n/a", summary.accuracy_source,
        )
        return Outgoing(None, summary)

    def summarise(self, current: OpenRound, now: float, committed: bool, rejected: dict[str, int]) -> RoundSummary:
        """The summary of the closed round `current`: accuracy (held-out or the devices'), counts, bytes, time."""
        accuracy = loss = None
        source = "none"
        by_tier: dict[str, float] = {}
        evaluator, artifacts = self.parts.evaluator, self.parts.artifacts
        if evaluator is not None:
            by_rate = {1.0: evaluator.evaluate(self.weights, 1.0)}
            for tier in sorted({a.tier for a in current.assignments.values()}):
                rate = artifacts.tiers[tier].manifest.rate
                if rate not in by_rate:  # each width once; full width is the global weights (widest statistics)
                    by_rate[rate] = evaluator.evaluate(self.tier_weights(tier), rate)
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
            round=current.number, version=self.record.version + int(committed), selected=len(current.assignments),
            answered=len(current.answered), accuracy=accuracy, loss=loss, accuracy_source=source,
            accuracy_by_tier=by_tier, bytes_up=current.bytes_up, bytes_down=current.bytes_down,
            seconds=now - current.started, rejected=rejected,
            metrics={**self.parts.strategy.metrics(), **device_metrics(current.device_accuracies)},
            final=current.number >= self.parts.config.rounds,
        )

    def _with_statistics(self, current: OpenRound, trained: Weights) -> tuple[Weights, dict[str, Weights]]:
        """`trained` with this round's pooled BN statistics (each tier keeps its own for its slice), and those."""
        if not current.statistics:
            if current.trained is not None:  # a statistics phase ran, and nobody answered it
                log.warning("round %d: no batch-norm statistics arrived; keeping the averaged running statistics", current.number)
            return trained, self.bn_statistics
        bn_statistics = {tier: pool.result() for tier, pool in current.statistics.items()}
        log.info("round %d: batch-norm statistics from %d devices (%s)", current.number, len(current.measured),
                 ", ".join(f"tier {t}: {p.samples} samples" for t, p in sorted(current.statistics.items())))
        return with_statistics(trained, bn_statistics), bn_statistics

    def _charge_privacy(self, summary: RoundSummary, selected: int, available: int) -> RoundSummary:
        """One accountant step for a released model; (epsilon, delta) so far into the summary's metrics."""
        assert self.parts.privacy is not None
        spent = self.parts.privacy.record_round(selected, available)
        log.info("round %d: differential privacy spent so far: epsilon %.3f at delta %g over %d rounds",
                 summary.round, spent.epsilon, spent.delta, spent.rounds)
        return summary.model_copy(update={"metrics": {**summary.metrics, **spent.metrics(),
                                                      "dp_selected": float(selected), "dp_available": float(available)}})
