"""Personalization as the engines see it: what an update may carry, and the per-device accuracies of a round.

With `--personal-layers` (EngineConfig.personal_layers) those parameters stay on the devices: an
update carries every parameter of its tier but them (`update_shapes`), and one that carries any of
them is refused, naming them (`carried_personal`); they are never aggregated, so the global
model keeps their first values, which a device's copy starts from. With `--personalize finetune:K`
or personal layers, each round's summary reports the devices' own accuracies, unweighted across
devices: the mean and the mean of the worst 10% (`device_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping

import numpy as np

from protocol.messages import RejectReason

WORST_FRACTION = 0.1  # "worst 10%": the mean of the lowest ceil(10%) of the devices' accuracies
PERSONAL_METRICS = ("acc_global_", "acc_finetuned_")  # the prefixes of `device_metrics`' names in a round summary
Problem = tuple[RejectReason, str]


def update_shapes(shapes: Mapping[str, tuple[int, ...]], personal: Collection[str]) -> dict[str, tuple[int, ...]]:
    """The tensors an update of a tier with these parameter `shapes` carries: all but the personal layers."""
    return {name: shape for name, shape in shapes.items() if name not in personal}


def carried_personal(names: Iterable[str], personal: Collection[str]) -> Problem | None:
    """Why an update carrying tensors `names` is refused: it carries personal layers (bad_tensor), or None."""
    if personal and (carried := sorted(set(names) & set(personal))):
        return RejectReason.BAD_TENSOR, (f"carries personal layers {carried[:8]}: they stay on the devices "
                                         "(--personal-layers) and are never aggregated")
    return None


def worst_mean(values: list[float], fraction: float = WORST_FRACTION) -> float:
    """The mean of the lowest ceil(fraction x n) of `values` (n >= 1)."""
    count = max(1, math.ceil(fraction * len(values)))
    return float(np.mean(sorted(values)[:count]))


def device_metrics(accuracies: Mapping[str, tuple[float | None, float | None]]) -> dict[str, float]:
    """A round's summary metrics from each device's (accuracy of the model it received, after fine-tuning), across
    devices: acc_global_* (with personal layers, the device's own ones in place) and acc_finetuned_* (mean, worst10)."""
    metrics: dict[str, float] = {}
    for index, name in enumerate(("global", "finetuned")):
        values = [pair[index] for pair in accuracies.values() if pair[index] is not None]
        if values:
            metrics |= {f"acc_{name}_mean": float(np.mean(values)), f"acc_{name}_worst10": worst_mean(values),
                        f"acc_{name}_devices": float(len(values))}
    return metrics
