"""Robust aggregation: norm clipping, coordinate-wise median and trimmed mean.

Accumulators with the protocol of `ElementwiseMean` (add updates, read the new global weights),
handed to FedAvg as its `accumulator` factory, so the round engine does not change.

- `NormClipping` (fixed bound C): each update's delta, all its tensors together as one vector,
  is scaled to L2 norm at most C, then the usual element-wise mean. Streams: memory O(model).
- `AdaptiveClipping` (no C): the bound is `multiple` x the median norm of the round's updates, so
  no threshold has to be tuned per model and learning rate, and a minority of attackers cannot
  move it. The median needs every norm before the first update can be clipped, so the round's
  updates are kept: memory O(updates x model). This is what `--robust clip` does without
  `--clip-norm`.
- `CoordinateMedian`, `TrimmedMean` (Yin et al., 2018): per element, the median, or the mean
  after dropping the floor(beta x n) lowest and highest values, of the deltas of the n updates
  that hold that element. They need all of the round's updates: memory O(updates x model).

HeteroFL tiers: an update covers the leading block of each tensor. An element's statistic is
taken over the updates that cover it (fewer for the outer elements only wide tiers hold, so
they are robust only while attackers are a minority of those devices); an element no update
covers keeps its global value. Updates of the same block shape cover the same elements, so
each tensor is cut into cells of equal coverage and each cell is reduced in one numpy call.

Weighting: clipping keeps FedAvg's weighting by samples (or not, `weighted=False`). Median and
trimmed mean count every device once, as in the literature: weighting by the sample count a
device reports would let a single attacker claim a huge count and decide every element.

Whatever the accumulator, the round engine first refuses an update whose norm is NaN or Inf
(non_finite) or over `NormBound.multiple` x the median norm of the last `NORM_WINDOW` accepted
updates of its tier (outlier), once `MIN_KNOWN_NORMS` are known (`NormBound`, `update_norm`).
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np

from aggregator.strategies.fedavg import AccumulatorFactory, ClientUpdate, ElementwiseMean, Weights
from protocol.messages import RejectReason
from protocol.quantized import QuantizedTensor, Tensor, row_grid

Reducer = Callable[[np.ndarray], np.ndarray]
log = logging.getLogger(__name__)
ROBUST_MODES = ("none", "clip", "median", "trimmed-mean")
DEFAULT_TRIM_FRACTION = 0.2
# Update norms: honest digits federations (MLP and CNN, 3 IID to 20 Dirichlet(0.5) devices, E 1-2)
# stay within 2.8x the median of their tier's last 32 norms; 10x leaves room for data-size skew.
DEFAULT_OUTLIER_MULTIPLE = 10.0
NORM_WINDOW = 32  # accepted norms per tier the median is taken over
MIN_KNOWN_NORMS = 3  # fewer known norms: no median yet, only finiteness is checked
_ROW_BLOCK_ELEMENTS = 1 << 14  # the numpy kernel of quantized norms: float32 dots of this many codes


def check_clip_norm(value: float) -> float:
    """`value` if it can bound a norm (> 0), else ValueError."""
    if not value > 0:
        raise ValueError(f"the clipping bound must be > 0, got {value}")
    return value


def check_trim_fraction(beta: float) -> float:
    """`beta` if it leaves some values per element (0 <= beta < 0.5), else ValueError."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"the trim fraction must be in [0, 0.5), got {beta}")
    return beta


def update_norm(delta: Mapping[str, Tensor]) -> float:
    """L2 norm of all of an update's tensors taken together as one vector (NaN or Inf if an element is).

    Finite float32 elements never overflow it (a 3e38 delta has a finite norm); quantised tensors
    are measured from their codes and scales, never dequantised.
    """
    return math.sqrt(sum(squared_norm(d) for d in delta.values()))


def squared_norm(tensor: Tensor) -> float:
    """The sum of squares of one tensor's elements, as a Python float."""
    if isinstance(tensor, QuantizedTensor):
        return _quantized_squares(tensor)
    flat = np.asarray(tensor, np.float32).reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is handled below
        total = float(np.dot(flat, flat))  # BLAS in float32: as fast as one pass over the tensor
    if math.isfinite(total) or flat.size == 0:
        return total
    peak = float(np.max(np.abs(flat)))  # NaN or Inf in the tensor, or squares past float32's range
    if not math.isfinite(peak):
        return peak
    scaled = flat.astype(np.float64) / peak
    return peak * peak * float(np.dot(scaled, scaled))


def _quantized_squares(tensor: QuantizedTensor) -> float:
    """Sum over rows of scale^2 x (sum of the row's squared codes); one scale: all the codes as one row."""
    scales = tensor.scales.astype(np.float64)
    codes = tensor.codes.reshape(row_grid(tensor.shape) if scales.size > 1 else (1, -1))
    kernel = _compiled_row_squares()
    per_row = kernel(codes) if kernel is not None else _row_squares_numpy(codes)
    return float(np.dot(scales * scales, per_row))


def _row_squares_numpy(codes: np.ndarray) -> np.ndarray:
    """Per row, the sum of the squared codes, in float32 pieces of about _ROW_BLOCK_ELEMENTS (BLAS dots)."""
    rows, columns = codes.shape
    out = np.zeros(rows, np.float64)
    if columns >= _ROW_BLOCK_ELEMENTS:  # long rows: pieces of one row
        for row in range(rows):
            for start in range(0, columns, _ROW_BLOCK_ELEMENTS):
                piece = codes[row, start : start + _ROW_BLOCK_ELEMENTS].astype(np.float32)
                out[row] += float(np.dot(piece, piece))
        return out
    step = _ROW_BLOCK_ELEMENTS // max(columns, 1)
    for start in range(0, rows, step):
        block = codes[start : start + step].astype(np.float32)
        out[start : start + step] = np.einsum("ij,ij->i", block, block)
    return out


@functools.cache
def _compiled_row_squares() -> Callable[[np.ndarray], np.ndarray] | None:
    """`_row_squares_loop` compiled by numba (one pass over the int8 codes); None without numba."""
    try:
        import numba
    except ImportError:
        return None
    try:
        return numba.njit(cache=True, nogil=True)(_row_squares_loop)
    except RuntimeError:  # no writable folder for numba's cache
        return numba.njit(nogil=True)(_row_squares_loop)


def _row_squares_loop(codes: np.ndarray) -> np.ndarray:
    """Per row, the sum of the squared int8 codes, exact (for numba to compile)."""
    out = np.zeros(codes.shape[0], np.float64)
    for row in range(codes.shape[0]):
        total = 0
        for column in range(codes.shape[1]):
            value = np.int64(codes[row, column])
            total += value * value
        out[row] = total
    return out


class NormBound:
    """Update norms must be finite and at most `multiple` x the median norm of their tier's recent updates.

    The median is over the norms of the last `window` updates of the tier accepted so far (this
    round's and earlier rounds'; zero updates are left out), once `MIN_KNOWN_NORMS` are known:
    the accumulator streams, so the round's own median is not known when an update arrives.
    `multiple` 0 checks finiteness only. After a restart the history starts again from the
    resumed round's spooled updates.
    """

    def __init__(self, multiple: float = DEFAULT_OUTLIER_MULTIPLE, window: int = NORM_WINDOW) -> None:
        if multiple != 0 and not multiple >= 1:
            raise ValueError(f"the outlier multiple must be 0 (off) or >= 1, got {multiple}")
        self.multiple = multiple
        self.window = window
        self._known: dict[str, collections.deque[float]] = {}

    def median(self, tier: str) -> float | None:
        """The median of the tier's known norms, or None while fewer than MIN_KNOWN_NORMS are known."""
        known = self._known.get(tier, ())
        return float(np.median(known)) if len(known) >= MIN_KNOWN_NORMS else None

    def check(self, tier: str, norm: float) -> tuple[RejectReason, str] | None:
        """Why an update of `tier` with this L2 norm is refused, or None."""
        if not math.isfinite(norm):
            return RejectReason.NON_FINITE, f"the delta holds NaN or Inf (L2 norm {norm})"
        median = self.median(tier)
        if self.multiple and median is not None and norm > self.multiple * median:
            return RejectReason.OUTLIER, (f"L2 norm {norm:.4g} is over {self.multiple:g} x {median:.4g}, the median of "
                                          f"the last {len(self._known[tier])} accepted updates of tier {tier}")
        return None

    def accepted(self, tier: str, norm: float) -> None:
        """Count an accepted update's norm toward its tier's median."""
        if norm > 0:
            self._known.setdefault(tier, collections.deque(maxlen=self.window)).append(norm)


def clip_update(update: ClientUpdate, bound: float) -> ClientUpdate:
    """`update` with its delta scaled to norm at most `bound`; the same object if already within."""
    norm = update_norm(update.delta)
    if norm <= bound:
        return update
    scale = np.float32(bound / norm)
    return replace(update, delta={name: d * scale for name, d in update.delta.items()})


class NormClipping:
    """Clip every update's delta to norm `clip_norm`, then the element-wise mean; streams (O(model))."""

    def __init__(self, global_weights: Mapping[str, np.ndarray], clip_norm: float, weighted: bool = True) -> None:
        self.clip_norm = check_clip_norm(clip_norm)
        self.clipped = 0  # updates scaled down so far
        self._mean = ElementwiseMean(global_weights, weighted=weighted)
        self.count = 0

    def add(self, update: ClientUpdate) -> None:
        """Clip one update and fold it into the mean."""
        bounded = clip_update(update, self.clip_norm)
        self.clipped += bounded is not update
        self._mean.add(bounded)
        self.count += 1

    def result(self) -> Weights:
        """Global weights plus the mean of the clipped deltas."""
        return self._mean.result()


class RoundUpdates:
    """Keeps a float32 copy of every update of the round: memory O(updates x model)."""

    def __init__(self, global_weights: Mapping[str, np.ndarray]) -> None:
        self._global = global_weights
        self._updates: list[ClientUpdate] = []
        self.count = 0

    def add(self, update: ClientUpdate) -> None:
        """Keep the update (copied: the caller may reuse its buffers)."""
        delta = {name: np.array(d, dtype=np.float32) for name, d in update.delta.items()}
        self._updates.append(replace(update, delta=delta))
        self.count += 1


class AdaptiveClipping(RoundUpdates):
    """Clip every delta to `multiple` x the median update norm of the round, then the element-wise mean."""

    def __init__(self, global_weights: Mapping[str, np.ndarray], multiple: float = 1.0, weighted: bool = True) -> None:
        super().__init__(global_weights)
        self.multiple = check_clip_norm(multiple)
        self.weighted = weighted
        self.bound: float | None = None  # the last round's bound, once computed

    def result(self) -> Weights:
        """Global weights plus the mean of the deltas clipped to the round's bound."""
        mean = ElementwiseMean(self._global, weighted=self.weighted)
        if self._updates:
            self.bound = self.multiple * float(np.median([update_norm(u.delta) for u in self._updates]))
            for update in self._updates:
                mean.add(clip_update(update, self.bound))
        return mean.result()


def coverage_cells(shape: tuple[int, ...], blocks: Sequence[tuple[int, ...]]) -> Iterator[tuple[slice, ...]]:
    """Cells of a tensor of `shape` inside which every element is held by the same leading blocks."""
    cuts = [sorted({0, full, *(min(b[d], full) for b in blocks)}) for d, full in enumerate(shape)]
    for bounds in itertools.product(*(list(zip(c, c[1:])) for c in cuts)):
        yield tuple(slice(lo, hi) for lo, hi in bounds)


def covers(block: tuple[int, ...], cell: tuple[slice, ...]) -> bool:
    """Whether the leading `block` holds every element of `cell`."""
    return all(c.stop <= b for c, b in zip(cell, block))


class CoordinateWise(RoundUpdates):
    """Per element, `reduce` along axis 0 of the deltas of the updates that hold the element."""

    def __init__(self, global_weights: Mapping[str, np.ndarray], reduce: Reducer) -> None:
        super().__init__(global_weights)
        self._reduce = reduce

    def result(self) -> Weights:
        """Global weights plus the per-element statistic (0 where no update holds the element)."""
        return {name: (current + self._combined(name, current.shape)).astype(np.float32)
                for name, current in self._global.items()}

    def _combined(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        by_block: dict[tuple[int, ...], list[np.ndarray]] = {}
        for update in self._updates:
            if name in update.delta:
                by_block.setdefault(update.delta[name].shape, []).append(update.delta[name])
        stacks = {block: np.stack(deltas) for block, deltas in by_block.items()}
        out = np.zeros(shape, np.float32)
        for cell in coverage_cells(shape, list(stacks)):
            held = [stack[(slice(None), *cell)] for block, stack in stacks.items() if covers(block, cell)]
            if held:
                out[cell] = self._reduce(np.concatenate(held))
        return out


def coordinate_median(values: np.ndarray) -> np.ndarray:
    """Median along axis 0 (the updates)."""
    return np.median(values, axis=0)


def trimmed_mean(values: np.ndarray, beta: float) -> np.ndarray:
    """Mean along axis 0 after dropping the floor(beta x n) lowest and highest of the n values."""
    n = values.shape[0]
    k = int(beta * n)
    if k == 0:
        return values.mean(axis=0)
    middle = np.partition(values, [k, n - k - 1], axis=0)[k : n - k]
    return middle.mean(axis=0)


class CoordinateMedian(CoordinateWise):
    """Coordinate-wise median of the deltas, unweighted (one vote per device)."""

    def __init__(self, global_weights: Mapping[str, np.ndarray]) -> None:
        super().__init__(global_weights, coordinate_median)


class TrimmedMean(CoordinateWise):
    """Coordinate-wise beta-trimmed mean of the deltas, unweighted (one vote per device)."""

    def __init__(self, global_weights: Mapping[str, np.ndarray], beta: float = DEFAULT_TRIM_FRACTION) -> None:
        super().__init__(global_weights, functools.partial(trimmed_mean, beta=check_trim_fraction(beta)))
        self.beta = beta

    def result(self) -> Weights:
        """The trimmed mean; says so when too few updates came for anything to be trimmed (a plain mean)."""
        count = len(self._updates)
        if count and self.beta > 0 and int(self.beta * count) == 0:
            log.warning("trimmed mean of %d updates with --trim-fraction %g trims nothing (floor(%g x %d) = 0): this "
                        "round is a plain mean; it trims from %d updates on", count, self.beta, self.beta, count,
                        math.ceil(1 / self.beta))
        return super().result()


def robust_accumulator(mode: str, clip_norm: float | None = None, trim_fraction: float | None = None,
                       weighted: bool = True) -> AccumulatorFactory:
    """The accumulator factory of a `--robust` mode; raises ValueError on options the mode does not use."""
    if mode not in ROBUST_MODES:
        raise ValueError(f"unknown robust aggregation {mode!r}; expected one of {', '.join(ROBUST_MODES)}")
    if clip_norm is not None and mode != "clip":
        raise ValueError("--clip-norm applies to --robust clip only")
    if trim_fraction is not None and mode != "trimmed-mean":
        raise ValueError("--trim-fraction applies to --robust trimmed-mean only")
    if mode == "clip" and clip_norm is not None:  # options are checked now, not at the first round
        return functools.partial(NormClipping, clip_norm=check_clip_norm(clip_norm), weighted=weighted)
    if mode == "trimmed-mean":
        beta = DEFAULT_TRIM_FRACTION if trim_fraction is None else trim_fraction
        return functools.partial(TrimmedMean, beta=check_trim_fraction(beta))
    factories: dict[str, AccumulatorFactory] = {
        "none": functools.partial(ElementwiseMean, weighted=weighted),
        "clip": functools.partial(AdaptiveClipping, weighted=weighted),
        "median": CoordinateMedian,
    }
    return factories[mode]
