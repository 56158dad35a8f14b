"""Static batch-norm statistics (HeteroFL's sBN) of received weights, measured on the device's own data.

The statistics graph (`statistics.onnx`, exported for batch-norm models) runs the forward pass
with every BatchNorm normalising by its batch's statistics and outputs them. Pooled over the
device's batches they become the mean and population variance of each channel's input; the
aggregator pools them again over devices by sample count. No data leaves the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime

from models.data import Dataset
from models.spec import INPUT_NAME


def measure_bn_statistics(
    graph_path: Path, weights: Mapping[str, np.ndarray], data: Dataset, batch_size: int = 256, threads: int = 1
) -> dict[str, np.ndarray]:
    """`<bn>.running_mean` and `<bn>.running_var` of every BatchNorm layer over `data`, for `weights`."""
    if len(data) == 0:
        raise ValueError("no training data to measure batch-norm statistics on")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])
    params = {i.name: weights[i.name] for i in session.get_inputs() if i.name != INPUT_NAME}
    layers = [o.name.removesuffix(".batch_mean") for o in session.get_outputs() if o.name.endswith(".batch_mean")]
    sums: dict[str, np.ndarray] = {}
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size]
        outputs = dict(zip((o.name for o in session.get_outputs()), session.run(None, {INPUT_NAME: x, **params})))
        for layer in layers:
            mean, var = outputs[f"{layer}.batch_mean"].astype(np.float64), outputs[f"{layer}.batch_var"].astype(np.float64)
            sums[f"{layer}.mean"] = sums.get(f"{layer}.mean", 0) + len(x) * mean
            sums[f"{layer}.square"] = sums.get(f"{layer}.square", 0) + len(x) * (var + mean * mean)
    statistics = {}
    for layer in layers:
        mean = sums[f"{layer}.mean"] / len(data)
        statistics[f"{layer}.running_mean"] = mean.astype(np.float32)
        statistics[f"{layer}.running_var"] = np.maximum(sums[f"{layer}.square"] / len(data) - mean * mean, 0).astype(np.float32)
    return statistics
