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
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np

from aggregator.strategy import AccumulatorFactory, ClientUpdate, ElementwiseMean, Weights

Reducer = Callable[[np.ndarray], np.ndarray]
ROBUST_MODES = ("none", "clip", "median", "trimmed-mean")
DEFAULT_TRIM_FRACTION = 0.2


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


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all of an update's tensors taken together as one vector."""
    return math.sqrt(sum(float(np.vdot(d, d)) for d in delta.values()))


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


def add_robust_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--robust`, `--clip-norm` and `--trim-fraction` options of `tierfl aggregator`."""
    group = parser.add_argument_group("robust aggregation (against faulty or malicious updates)")
    group.add_argument("--robust", choices=ROBUST_MODES, default="none",
                       help="none: the mean of --aggregation; clip: every update's delta scaled to L2 norm at most "
                            "--clip-norm, then that mean; median: coordinate-wise median of the deltas; trimmed-mean: "
                            "coordinate-wise mean without the --trim-fraction lowest and highest values. Median and "
                            "trimmed mean count each device once (no sample weighting) and keep the round's updates in "
                            "memory (O(updates x model)); each element is combined over the devices whose tier holds "
                            "it (default: %(default)s)")
    group.add_argument("--clip-norm", type=float, metavar="C",
                       help="--robust clip: fixed bound on each update's L2 norm (streams, memory O(model)); "
                            "default: adaptive, the median norm of the round's updates (keeps them in memory)")
    group.add_argument("--trim-fraction", type=float, metavar="BETA",
                       help=f"--robust trimmed-mean: fraction in [0, 0.5) dropped from each side of every element "
                            f"(default: {DEFAULT_TRIM_FRACTION})")


def accumulator_from_args(args: argparse.Namespace, weighted: bool = True) -> AccumulatorFactory:
    """The accumulator factory chosen by the options of `add_robust_arguments`."""
    return robust_accumulator(args.robust, args.clip_norm, args.trim_fraction, weighted)
