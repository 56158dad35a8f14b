"""Personal layers (FedPer/FedRep): which parameters stay on each device, and how a device's copy follows its tier.

Both roles use this module: the aggregator resolves `--personal-layers` against the model's
parameter names (`personal_names`); a device fits its own copy of those layers to the tier a task
gives it (`fit_personal`). Every tier's parameter is the leading block of the global one
(models.tier_graph), so a device whose tier changes between rounds keeps what overlaps: its own
values on the leading block both tiers share, the task's (global) values where the new tier is wider
than anything it trained; a narrower tier trains the leading block of its copy, and the rest of the
copy is kept for when the device is wider again (`merge_personal`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import numpy as np

from models.spec import RUNNING_STATISTICS
from protocol.blocks import leading_slices

MAX_LISTED = 40  # parameter names an error lists before "and N more"


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown if len(names) <= MAX_LISTED else f"{shown} and {len(names) - MAX_LISTED} more"


def personal_names(patterns: Iterable[str], parameters: Sequence[str]) -> tuple[str, ...]:
    """The parameters named by `patterns` (exact names or shell-style globs: `fc3.*`), in the model's order.

    ValueError naming the pattern and listing the model's parameters when a pattern matches none,
    when one names a batch-norm running statistic (it follows its layer's weights), or when every
    parameter would stay on the devices (nothing would be federated).
    """
    chosen: set[str] = set()
    for pattern in patterns:
        matched = [name for name in parameters if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"--personal-layers: the model has no parameter {pattern!r}; it has: {_listed(list(parameters))}")
        if statistics := [name for name in matched if name.endswith(RUNNING_STATISTICS)]:
            raise ValueError(f"--personal-layers: {pattern!r} names batch-norm running statistics ({_listed(statistics)}), "
                             "which are not trained; name the layer's weights instead")
        chosen.update(matched)
    if not chosen:
        raise ValueError("--personal-layers names no parameter")
    if chosen >= set(parameters):
        raise ValueError("--personal-layers names every parameter of the model: nothing would be federated")
    return tuple(name for name in parameters if name in chosen)


def fit_personal(own: np.ndarray, received: np.ndarray) -> np.ndarray:
    """A device's copy `own` of one personal layer fitted to the tier's shape of `received` (the task's global values).

    Where both hold an element (their common leading block) the device's own value wins; where the
    tier is wider than `own` the global value fills in. Same shape: `own` itself (a copy).
    """
    if own.ndim != received.ndim:
        return np.array(received, np.float32)
    fitted = np.array(received, np.float32)
    common = tuple(min(a, b) for a, b in zip(own.shape, received.shape))
    fitted[leading_slices(common)] = own[leading_slices(common)]
    return fitted


def merge_personal(own: np.ndarray | None, trained: np.ndarray) -> np.ndarray:
    """The device's new copy of one personal layer after training `trained` (the tier's block): `trained` written over
    the leading block of `own`, which keeps its wider part (for a later wider tier) when it is larger on some axis."""
    if own is None or own.ndim != trained.ndim:
        return np.array(trained, np.float32)
    shape = tuple(max(a, b) for a, b in zip(own.shape, trained.shape))
    merged = np.zeros(shape, np.float32)
    merged[leading_slices(own.shape)] = own
    merged[leading_slices(trained.shape)] = trained
    return merged

