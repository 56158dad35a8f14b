"""Tiers of zoo models for tests, made the one way TierFL makes them: normalize, analyse, cut_forward.

The zoo builds its models at full width only (models.zoo); these helpers give a tier's graphs,
shapes and weights exactly as models.export.export_all does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from models.onnx_import import normalize
from models.slicing import slice_params
from models.tier_graph import cut_forward, statistics_graph
from models.widths import WidthPlan, analyse
from models.zoo import ModelSpec, build_forward, init_global_params


def zoo_forward(spec: ModelSpec) -> tuple[onnx.ModelProto, WidthPlan]:
    """The zoo model's normalized full-width forward graph (its global init as initializers) and its width plan."""
    forward, _ = normalize(build_forward(spec, init_global_params(spec)))
    return forward, analyse(forward)


def zoo_plan(spec: ModelSpec) -> WidthPlan:
    """The zoo model's width plan: trainable and frozen names, every parameter's shape at any rate."""
    return zoo_forward(spec)[1]


def zoo_tier(
    spec: ModelSpec,
    rate: float,
    weights: Mapping[str, np.ndarray] | None = None,
    *,
    class_mask: bool = False,
    scaler: bool = False,
    params_as_inputs: bool = False,
) -> onnx.ModelProto:
    """The forward graph of the zoo model's tier at `rate`, cut from full-width `weights` (default: the global init)."""
    forward, plan = zoo_forward(spec)
    return cut_forward(forward, plan, rate, weights, class_mask=class_mask, scaler=scaler,
                       params_as_inputs=params_as_inputs)


def zoo_shapes(spec: ModelSpec, rate: float = 1.0) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape at `rate`, trainable first then frozen (the manifest's order)."""
    return zoo_plan(spec).param_shapes(rate)


def zoo_weights(spec: ModelSpec, rate: float = 1.0) -> dict[str, np.ndarray]:
    """The tier's initial weights: the leading blocks of the global init."""
    return slice_params(init_global_params(spec), zoo_shapes(spec, rate))


def zoo_statistics(spec: ModelSpec, rate: float) -> onnx.ModelProto:
    """The tier's BatchNorm statistics graph (inputs: `input` and every parameter), as exported."""
    return statistics_graph(zoo_tier(spec, rate, params_as_inputs=True))
