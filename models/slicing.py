"""HeteroFL slicing: a tier's tensor is the leading block of the global tensor of the same name."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from protocol.blocks import leading_slices


def slice_params(
    global_params: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Leading block of each global tensor, as contiguous copies, in the order of `shapes`."""
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name not in global_params:
            raise KeyError(f"global params have no tensor {name!r}")
        full = global_params[name]
        if len(shape) != full.ndim or any(s > f for s, f in zip(shape, full.shape)):
            raise ValueError(f"{name}: tier shape {tuple(shape)} does not fit in global shape {full.shape}")
        out[name] = np.array(full[leading_slices(shape)], order="C", copy=True)  # never a view
    return out
