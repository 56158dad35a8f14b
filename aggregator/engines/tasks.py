"""Building tasks: the message that asks a device to train (or to measure statistics), with its tier's weights.

`TaskBuilder` turns an assignment into a Task on a model's current version, its tensors the
tier's slice of the weights the strategy starts that device from (the global ones, or a FedMut
mutation) with the tier's own batch-norm statistics. The tensors are shared: one copy per round,
tier and variant however many devices get it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.engines.base import Outgoing
from aggregator.engines.model import GlobalModel
from aggregator.engines.parts import EngineParts
from aggregator.store.round_spool import Assignment
from protocol.messages import Task

MemoKey = tuple[int, str, int, bool]  # round, tier, variant, statistics


class TaskBuilder:
    """Makes tasks for assignments, sharing their tensors per round, tier and variant."""

    def __init__(self, parts: EngineParts) -> None:
        self.parts = parts
        # key -> (weights, BN statistics it was cut from, the task's tensors)
        self._memo: dict[MemoKey, tuple[object, object, dict[str, np.ndarray]]] = {}

    def task(self, model: GlobalModel, assignment: Assignment, number: int, deadline: float,
             trained: Mapping[str, np.ndarray] | None = None) -> Outgoing:
        """A training task on `model`'s weights, or with `trained` a statistics task on those (its next version)."""
        config = self.parts.config
        tier = self.parts.artifacts.tiers[assignment.tier]
        body = Task(
            round=number,
            model_version=model.record.version + (trained is not None),
            tier=assignment.tier,
            manifest_sha256=tier.manifest_sha256,
            artifacts=tier.files,
            epochs=assignment.epochs,
            batch_size=assignment.batch_size,
            learning_rate=assignment.learning_rate,
            mask_classes=assignment.mask_classes,
            proximal_mu=assignment.proximal_mu,
            deadline=deadline,
            seed=config.seed * 100_003 + number,
            evaluate=config.evaluate_on_devices,
            statistics_only=trained is not None,
            variant=0 if trained is not None else assignment.variant,
            weighted=assignment.weighted,
            dp_clip=config.local_dp_clip,
            dp_noise=config.local_dp_noise,
        )
        return Outgoing(assignment.device_id, body, self._tensors(model, assignment, number, trained))

    def _tensors(self, model: GlobalModel, assignment: Assignment, number: int,
                 trained: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """The tensors of a task: one shared copy per round, tier and variant, however many devices get it."""
        source = model.weights if trained is None else trained
        key = (number, assignment.tier, assignment.variant if trained is None else 0, trained is not None)
        if self._memo and next(iter(self._memo))[0] != number:
            self._memo.clear()
        known = self._memo.get(key)
        if known is not None and known[0] is source and known[1] is model.bn_statistics:
            return known[2]
        if trained is None:  # training starts from the strategy's model: the global one, or a FedMut mutation
            trained = dict(self.parts.strategy.task_weights(assignment, model.weights))
        tensors = model.tier_weights(assignment.tier, trained)
        self._memo[key] = (source, model.bn_statistics, tensors)
        return tensors
