"""Tasks: the messages that ask a device to train (or to measure batch-norm statistics), with its tier's weights.

This module owns the mapping between an assignment (aggregator.store.round_spool) and its
training task both ways: `task_for` writes the task, `settings_of` reads back the training
settings an assignment takes (a relay's group follows its parent's task), and
`with_delta` and `with_secure` are the only later changes a task gets (the downlink's encoding,
secure aggregation's settings).

`TaskBuilder` turns an assignment into a task on a model's current version, its tensors the
tier's slice of the weights the strategy starts that device from (the global ones, or a FedMut
mutation) with the tier's own batch-norm statistics. The tensors are shared: one copy per round,
tier and variant however many devices get it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np

from aggregator.engines.base import EngineConfig, Outgoing
from aggregator.engines.model import GlobalModel
from aggregator.engines.parts import EngineParts
from aggregator.store.round_spool import Assignment
from aggregator.strategies.scaffold import tier_control_shapes
from models.slicing import slice_params
from protocol.control import with_control
from protocol.messages import AttachedWeights, MeasureBnStatistics, SecureAggregation, Task, TaskScope, TrainTask

MemoKey = tuple[int, str, int, bool]  # round, tier, variant, statistics
TRAINING_SETTINGS = ("epochs", "batch_size", "learning_rate", "mask_classes", "logit_adjust", "proximal_mu", "weighted")  # both say
AnyTask = TypeVar("AnyTask", TrainTask, MeasureBnStatistics)


def task_for(assignment: Assignment, scope: TaskScope, config: EngineConfig) -> TrainTask:
    """The training task of `assignment` in `scope`: its settings and variant, the fleet's seed, evaluation, local DP."""
    return TrainTask(
        **dict(scope) | {"weights": AttachedWeights(variant=assignment.variant, control=config.scaffold is not None)},
        **settings_of(assignment),
        seed=config.seed * 100_003 + scope.round,
        evaluate=config.evaluate_on_devices,
        dp_clip=config.local_dp_clip,
        dp_noise=config.local_dp_noise,
        personal_layers=list(config.personal_layers),
        finetune_steps=config.finetune_steps,
    )


def settings_of(source: Assignment | TrainTask) -> dict[str, object]:
    """The training settings an assignment and its task share (TRAINING_SETTINGS), read from either."""
    return {name: getattr(source, name) for name in TRAINING_SETTINGS}


def with_delta(task: AnyTask, delta_from: int | None) -> AnyTask:
    """`task` whose attached weights are a delta from version `delta_from` of its tier (None: whole weights)."""
    return task.model_copy(update={"weights": task.weights.model_copy(update={"delta_from": delta_from})})


def with_secure(task: TrainTask, settings: SecureAggregation) -> TrainTask:
    """`task` summed by secure aggregation with this device's `settings`."""
    return task.model_copy(update={"secure": settings})


class TaskBuilder:
    """Makes tasks for assignments, sharing their tensors per round, tier and variant."""

    def __init__(self, parts: EngineParts) -> None:
        self.parts = parts
        # key -> (weights, BN statistics it was cut from, the task's tensors)
        self._memo: dict[MemoKey, tuple[object, object, dict[str, np.ndarray]]] = {}

    def task(self, model: GlobalModel, assignment: Assignment, number: int, deadline: float,
             trained: Mapping[str, np.ndarray] | None = None, control: Mapping[str, np.ndarray] | None = None) -> Outgoing:
        """A training task on `model`'s weights, or with `trained` a batch-norm statistics task on those (next version,
        whose SCAFFOLD variate is `control`). With SCAFFOLD every task carries the tier's slice of c beside the weights,
        so what a device holds of a version (and a downlink delta against it) is the same for every task."""
        tier = self.parts.artifacts.tiers[assignment.tier]
        scope = TaskScope(round=number, model_version=model.record.version + (trained is not None),
                          tier=assignment.tier, manifest_sha256=tier.manifest_sha256, artifacts=tier.files, deadline=deadline,
                          weights=AttachedWeights(control=self.parts.config.scaffold is not None))
        if trained is None:
            body: Task = task_for(assignment, scope, self.parts.config)
        else:
            body = MeasureBnStatistics(**dict(scope))
        return Outgoing(assignment.device_id, body, self._tensors(model, assignment, number, trained, control))

    def _tensors(self, model: GlobalModel, assignment: Assignment, number: int, trained: Mapping[str, np.ndarray] | None,
                 control: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
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
        if self.parts.config.scaffold is not None:  # c changes with the weights: the memo's check holds for it too
            variate = model.control if control is None else control  # a statistics task: the next version's c
            tensors = with_control(tensors, slice_params(variate, tier_control_shapes(self.parts.artifacts.tiers[assignment.tier])))
        self._memo[key] = (source, model.bn_statistics, tensors)
        return tensors
