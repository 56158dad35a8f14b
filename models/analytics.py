"""Federated analytics: the fixed menu of what a device computes on its local data, and how answers combine.

Both roles use this module: the device computes an answer (`compute` on its data, `score` on the
global model's logits), the aggregator knows every answer's tensor shapes before it decodes them
(`QuerySpec.shapes`), checks each answer against what the device could truthfully send
(`QuerySpec.problem`), sums the answers element-wise and turns the sum into the result (`finish`).
Every answer is a set of sums, so answers merge by addition (and can be summed by secure
aggregation). The menu (a sample's "channels": its first axis for a sample of 2 or more axes, its
features for a flat sample; `P` positions per channel):

- `label_histogram`: `counts` [classes], the samples per label.
- `sample_count`: `count` [1].
- `feature_moments`: `count` [1], `sum` [C], `sum_sq` [C] of every value clipped to [low, high]:
  per channel mean and (population) variance over all the fleet's samples and positions.
- `quantile_sketch`: `histogram` [C, bins], a fixed-bin histogram per channel over [low, high]
  (values outside counted in the edge bins). Mergeable by addition; a quantile read from it is
  within one bin width, (high - low) / bins, of the true quantile of the clipped values.
- `model_metrics`: `count` [1], `loss_sum` [1] (cross-entropy per sample clipped to
  loss_clip), `confusion` [classes, classes] (rows: true label, columns: predicted) of the
  global model's tier slice on the device; accuracy is the confusion's trace over the count.

Differential privacy (`sensitivity`): the unit is one sample. Adding or removing one sample of
one device changes the summed answer by at most `sensitivity` in L2 norm (the clipping above is
what bounds it), which the aggregator's Gaussian noise is calibrated to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from models.data import Dataset, fit_to_model
from protocol.messages import Query

COMPUTATIONS = ("label_histogram", "sample_count", "feature_moments", "quantile_sketch", "model_metrics")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)  # what a quantile sketch's result reads off its histogram
TOLERANCE = 1e-5  # relative slack of the bounds checks: float32 sums of integers and clipped values


@dataclass(frozen=True)
class QuerySpec:
    """One query's computation and parameters, as both roles read them from a Query message."""

    computation: str
    input_shape: tuple[int, ...]
    classes: int
    low: float = Query.model_fields["low"].default  # the defaults (and bounds) of a Query's parameters
    high: float = Query.model_fields["high"].default
    bins: int = Query.model_fields["bins"].default
    loss_clip: float = Query.model_fields["loss_clip"].default

    def __post_init__(self) -> None:
        if self.computation not in COMPUTATIONS:
            raise ValueError(f"unknown computation {self.computation!r}; the menu: {', '.join(COMPUTATIONS)}")
        if not self.low < self.high:
            raise ValueError(f"the value range needs low < high, got [{self.low}, {self.high}]")

    @property
    def channels(self) -> int:
        """C: the first axis of a sample of 2 or more axes, else its features."""
        return self.input_shape[0]

    @property
    def positions(self) -> int:
        """P: values per channel of one sample."""
        return math.prod(self.input_shape[1:]) if len(self.input_shape) > 1 else 1

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The answer's tensors: name -> shape."""
        c = self.channels
        return {
            "label_histogram": {"counts": (self.classes,)},
            "sample_count": {"count": (1,)},
            "feature_moments": {"count": (1,), "sum": (c,), "sum_sq": (c,)},
            "quantile_sketch": {"histogram": (c, self.bins)},
            "model_metrics": {"count": (1,), "loss_sum": (1,), "confusion": (self.classes, self.classes)},
        }[self.computation]

    @property
    def bound(self) -> float:
        """The largest |value| a clipped input value can have."""
        return max(abs(self.low), abs(self.high))

    def sensitivity(self) -> float:
        """L2 norm by which one sample more or less changes the summed answer."""
        c, p, b = self.channels, self.positions, self.bound
        return {
            "label_histogram": 1.0,
            "sample_count": 1.0,
            "feature_moments": math.sqrt(1 + c * (p * b) ** 2 + c * (p * b * b) ** 2),
            "quantile_sketch": math.sqrt(c) * p,
            "model_metrics": math.sqrt(2 + self.loss_clip**2),
        }[self.computation]

    def element_limit(self) -> float:
        """The largest |element| one device's answer may hold per sample: what secure aggregation must fit in its ring."""
        p, b = self.positions, self.bound
        return {"feature_moments": p * max(b, b * b), "quantile_sketch": float(p),
                "model_metrics": max(1.0, self.loss_clip)}.get(self.computation, 1.0)

    def problem(self, tensors: Mapping[str, np.ndarray], samples: int) -> str | None:
        """Why an answer claiming `samples` samples cannot be a true one (shape, finite, bounds), or None."""
        expected = self.shapes()
        if set(tensors) != set(expected):
            return f"tensors {sorted(tensors)}, expected {sorted(expected)}"
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                return f"tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)}"
            if not np.isfinite(tensors[name]).all():
                return f"tensor {name!r} holds NaN or Inf"
        t = {name: np.asarray(value, np.float64) for name, value in tensors.items()}
        n, slack = float(samples), TOLERANCE * max(1.0, samples)
        for name in ("counts", "count", "histogram", "confusion"):
            if name in t and ((t[name] < 0).any() or (np.abs(t[name] - np.round(t[name])) > slack).any()):
                return f"{name!r} must hold counts (integers >= 0)"
        if "count" in t and abs(t["count"][0] - n) > slack:
            return f"count {t['count'][0]:g} is not the {samples} samples the answer claims"
        if "counts" in t and abs(t["counts"].sum() - n) > slack:
            return f"the label counts add up to {t['counts'].sum():g}, not the {samples} samples the answer claims"
        if "histogram" in t:
            per_channel = n * self.positions
            if (np.abs(t["histogram"].sum(axis=1) - per_channel) > TOLERANCE * max(1.0, per_channel)).any():
                return f"a channel's histogram does not count {samples} x {self.positions} values"
        if "sum" in t:
            most = n * self.positions * self.bound * (1 + TOLERANCE)
            if (np.abs(t["sum"]) > most).any() or (t["sum_sq"] < 0).any() or (
                    t["sum_sq"] > n * self.positions * self.bound**2 * (1 + TOLERANCE)).any():
                return f"sums beyond what {samples} samples of values within [{self.low}, {self.high}] can reach"
        if "confusion" in t:
            if abs(t["confusion"].sum() - n) > slack:
                return f"the confusion matrix counts {t['confusion'].sum():g} samples, not {samples}"
            if not -slack <= t["loss_sum"][0] <= n * self.loss_clip * (1 + TOLERANCE):
                return f"loss_sum {t['loss_sum'][0]:g} is outside [0, {samples} x loss_clip {self.loss_clip}]"
        return None


def channel_values(spec: QuerySpec, x: np.ndarray) -> np.ndarray:
    """Samples [N, *input_shape] as [N, C, P], clipped to the stated range."""
    return np.clip(x.reshape(len(x), spec.channels, spec.positions), spec.low, spec.high)


def compute(spec: QuerySpec, data: Dataset, source: str = "the local data") -> dict[str, np.ndarray]:
    """The answer (float32 tensors) of a data computation on `data`; ValueError when it does not fit the model."""
    if spec.computation == "model_metrics":
        raise ValueError("model_metrics scores a model: use score()")
    data = fit_to_model(data, spec.input_shape, spec.classes, source)
    n = len(data)
    if spec.computation == "label_histogram":
        out = {"counts": np.bincount(data.y, minlength=spec.classes)}
    elif spec.computation == "sample_count":
        out = {"count": np.array([n])}
    elif spec.computation == "feature_moments":
        values = channel_values(spec, data.x).astype(np.float64)
        out = {"count": np.array([n]), "sum": values.sum(axis=(0, 2)), "sum_sq": (values * values).sum(axis=(0, 2))}
    else:
        values = channel_values(spec, data.x)
        index = np.clip(((values - spec.low) / (spec.high - spec.low) * spec.bins).astype(np.int64), 0, spec.bins - 1)
        flat = index + np.arange(spec.channels)[None, :, None] * spec.bins
        out = {"histogram": np.bincount(flat.ravel(), minlength=spec.channels * spec.bins)
               .reshape(spec.channels, spec.bins)}
    return {name: np.asarray(value, np.float32) for name, value in out.items()}


def score(spec: QuerySpec, logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The model_metrics answer of `logits` [N, classes] against integer `labels` [N]."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    losses = np.minimum(-log_probs[np.arange(len(labels)), labels], spec.loss_clip)
    confusion = np.zeros((spec.classes, spec.classes), np.int64)
    np.add.at(confusion, (labels, logits.argmax(axis=1)), 1)
    return {"count": np.array([len(labels)], np.float32), "loss_sum": np.array([losses.sum()], np.float32),
            "confusion": confusion.astype(np.float32)}


def gaussian_bound(sigma: float, elements: int, confidence: float = 0.95) -> float:
    """|noise| bound that N(0, sigma^2) on each of `elements` elements stays within, all at once, with `confidence`."""
    if sigma == 0:
        return 0.0
    return sigma * NormalDist().inv_cdf(1 - (1 - confidence) / (2 * max(elements, 1)))


def _quantiles(histogram: np.ndarray, spec: QuerySpec) -> dict[str, list[float | None]]:
    """Per channel, each of QUANTILES read off a (noisy) histogram by linear interpolation inside its bin."""
    counts = np.maximum(histogram, 0)
    edges = np.linspace(spec.low, spec.high, spec.bins + 1)
    out: dict[str, list[float | None]] = {}
    for q in QUANTILES:
        values: list[float | None] = []
        for row in counts:
            total = row.sum()
            if total <= 0:
                values.append(None)
                continue
            cumulative = np.cumsum(row)
            b = int(np.searchsorted(cumulative, q * total))
            b = min(b, spec.bins - 1)
            before = cumulative[b - 1] if b else 0.0
            inside = (q * total - before) / row[b] if row[b] > 0 else 0.0
            values.append(float(edges[b] + inside * (edges[b + 1] - edges[b])))
        out[f"p{round(q * 100)}"] = values
    return out


def finish(spec: QuerySpec, sums: Mapping[str, np.ndarray]) -> dict[str, object]:
    """The JSON-ready result of the summed (possibly noisy) answer tensors."""
    t = {name: np.asarray(value, np.float64) for name, value in sums.items()}
    if spec.computation == "label_histogram":
        return {"counts": t["counts"].tolist(), "total": float(t["counts"].sum())}
    if spec.computation == "sample_count":
        return {"count": float(t["count"][0])}
    if spec.computation == "feature_moments":
        values = max(t["count"][0], 1e-12) * spec.positions
        mean = t["sum"] / values
        return {"count": float(t["count"][0]), "mean": mean.tolist(),
                "variance": np.maximum(t["sum_sq"] / values - mean * mean, 0.0).tolist(),
                "range": [spec.low, spec.high]}
    if spec.computation == "quantile_sketch":
        return {"range": [spec.low, spec.high], "bins": spec.bins, "histogram": t["histogram"].tolist(),
                "quantiles": _quantiles(t["histogram"], spec), "quantile_error": (spec.high - spec.low) / spec.bins}
    count = max(t["count"][0], 1e-12)
    return {"count": float(t["count"][0]), "loss": float(t["loss_sum"][0] / count),
            "accuracy": float(np.trace(t["confusion"]) / count), "confusion": t["confusion"].tolist()}


def true_answer(spec: QuerySpec, shards: Sequence[Dataset]) -> dict[str, np.ndarray]:
    """The exact sum of the data computation over `shards` (the truth an answer is checked against)."""
    answers = [compute(spec, shard) for shard in shards]
    return {name: np.sum([np.asarray(a[name], np.float64) for a in answers], axis=0) for name in spec.shapes()}
