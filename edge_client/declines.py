"""A device with no result for its task says so: `Update.declined`, so its round stops waiting for it.

Two ways a device ends up with no result: its training diverged (NaN/Inf, nothing to send), or
the aggregator refused the update it sent for what it carried (its tensors, norm, sample count
or size, or a rate limit: RESULT_REFUSALS). Either way the device will send nothing more for that
task, and without a word the round would wait for it until its deadline. Other refusals need no
answer: a stale, late, duplicate or unselected update's round is gone or answered, and a task
refused `wrong_version` comes again.

`SentUpdates` keeps the last SENT_KEPT updates sent (by frame msg_id, with what sending them
changed on the device): a refusal naming one takes back its SCAFFOLD variate's change (the
aggregator moved c only by accepted updates; edge_client.scaffold) and its error-feedback
residual's change (none of the update reached the model; edge_client.compression) and, for a
refusal of what it carried, gives the decline to send. Both changes add up, so taking one back
is right whatever was sent after it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from edge_client.compression import ErrorFeedback
from edge_client.scaffold import Variate
from protocol.messages import Reject, RejectReason, TrainTask, Update, new_id

SENT_KEPT = 4  # sent updates whose refusal is still answered (a refusal follows its update within a second or so)
RESULT_REFUSALS = frozenset({RejectReason.BAD_TENSOR, RejectReason.NON_FINITE, RejectReason.OUTLIER,
                             RejectReason.TOO_MANY_SAMPLES, RejectReason.OVERSIZE, RejectReason.BAD_HASH,
                             RejectReason.RATE_LIMITED, RejectReason.INTERNAL_ERROR})


def decline(round_number: int, base_version: int, tier: str, num_samples: int) -> Update:
    """The decline of the task of that round, version and tier by a device with `num_samples` training samples."""
    return Update(update_id=new_id(), round=round_number, base_version=base_version, tier=tier,
                  num_samples=max(1, num_samples), steps=0, train_loss=0.0, train_accuracy=0.0, train_seconds=0.0,
                  declined=True)


def declined_task(task: TrainTask, num_samples: int) -> Update:
    """The decline of `task` (its training diverged)."""
    return decline(task.round, task.model_version, task.tier, num_samples)


@dataclass(frozen=True)
class _Sent:
    update: Update
    variate: Variate | None  # SCAFFOLD's c_i, its change committed with the update
    feedback: ErrorFeedback | None  # the tier's error feedback, and the change the update made to its residual
    residual_change: dict[str, np.ndarray] | None


class SentUpdates:
    """The last SENT_KEPT updates sent, until a refusal names one."""

    def __init__(self) -> None:
        self._sent: collections.OrderedDict[str, _Sent] = collections.OrderedDict()

    def sent(self, msg_id: str, update: Update, variate: Variate | None = None, feedback: ErrorFeedback | None = None,
             residual_change: dict[str, np.ndarray] | None = None) -> None:
        """Keep the update sent as frame `msg_id`, the SCAFFOLD variate committed with it and the change it made to
        `feedback`'s residual."""
        self._sent[msg_id] = _Sent(update, variate, feedback, residual_change)
        while len(self._sent) > SENT_KEPT:
            self._sent.popitem(last=False)

    def refused(self, reject: Reject) -> Update | None:
        """Undo what the refused update committed (its variate's and residual's changes); the decline to send when the
        refusal was of what it carried, else None (also for a refusal naming no update of ours, or one answered)."""
        sent = self._sent.pop(reject.ref_msg_id or "", None)
        if sent is None:
            return None
        if sent.variate is not None:
            sent.variate.roll_back()
        if sent.feedback is not None and sent.residual_change is not None:
            sent.feedback.undo(sent.residual_change)
        if reject.reason not in RESULT_REFUSALS or sent.update.declined:
            return None
        refused = sent.update
        return decline(refused.round, refused.base_version, refused.tier, refused.num_samples)
