"""SCAFFOLD's server control variate on the downlink: tensors beside the weights, named with one prefix.

A task whose `weights.control` is set carries, beside the tier's weights, the server's control
variate c sliced to the tier: one tensor `scaffold/<param>` per trainable parameter, in the same
frame and through the same codecs as the weights (a version's committed file holds c the same
way). Nothing travels up: the aggregator derives a device's delta c_i from its update
(aggregator.strategies.scaffold), and an update carrying `scaffold/` tensors is refused like any
tensor its tier does not have.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

CONTROL_PREFIX = "scaffold/"
T = TypeVar("T")


def split_control(tensors: Mapping[str, T]) -> tuple[dict[str, T], dict[str, T]]:
    """(the weights, the control variates by parameter name) of a frame's or a file's tensors."""
    weights = {n: v for n, v in tensors.items() if not n.startswith(CONTROL_PREFIX)}
    control = {n[len(CONTROL_PREFIX):]: v for n, v in tensors.items() if n.startswith(CONTROL_PREFIX)}
    return weights, control


def with_control(weights: Mapping[str, T], control: Mapping[str, T]) -> dict[str, T]:
    """`weights` and the control variates beside them, prefixed (what a frame or a version's file holds)."""
    return {**weights, **{CONTROL_PREFIX + n: v for n, v in control.items()}}


def control_shapes(params: Iterable[tuple[str, tuple[int, ...], bool]]) -> dict[str, tuple[int, ...]]:
    """The control variate's tensors (by parameter name) of a tier's (name, shape, trainable) parameters."""
    return {name: tuple(shape) for name, shape, trainable in params if trainable}
