"""Quantised tensors as decoded: checked, dequantised only on demand, or added straight into a sum.

A `QuantizedTensor` holds a tensor's int8 values laid out as (rows, columns), rows along its
first axis (one row below two axes), and float32 scales, one per row or one for the tensor. It
stands for the float32 array q * scale: `np.asarray(tensor)` gives that array, arithmetic with
it gives plain arrays, and `.shape` / `.dtype` say what it stands for, so code written for
arrays keeps working. Its parts are public: `codes` (the int8 values in order) and `scales`, so
`QuantizedTensor(t.codes, t.scales, t.shape)` is `t` again, bit for bit (aggregator.store.round_spool
stores them so). `add_into(target, weight)` does `target += np.asarray(tensor) * weight`, bit for
bit, without materialising the float32 tensor:

- compiled by numba when it is installed (tierfl[full]): one pass over the int8 values and the
  sum; decode + accumulate of int8 and int8-row updates runs at 73-96% of the memory-bandwidth
  bound of benchmarks/aggregate.md;
- else numpy, in cache-sized blocks: cast, scale, weight and add, four passes over a small
  scratch and one over the sum: 20-28% of that bound for int8 (int8-row 12-16%), against 17-23%
  for dequantising whole.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt
from numpy.lib.mixins import NDArrayOperatorsMixin

# Elements per block of the numpy kernel: a 1 MB float32 scratch, the L2 of one core of the
# benchmark machine (AMD EPYC, 32 MB L3). Adding a 1M-parameter int8 update (best of 20, loaded
# machine, bound 115-140 us): blocks of 32K 370-395 us, 64K 320-390, 128K 295-305, 256K 287-296,
# 512K 282-309, the whole tensor 276-286; below 128K the per-block calls cost more than cache saves.
_BLOCK_ELEMENTS = 1 << 18

FusedAdd = Callable[[np.ndarray, np.ndarray, np.ndarray, np.float32], None]


def row_grid(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """(rows, columns) of a tensor of `shape`: rows along its first axis (one row below two axes)."""
    if len(shape) < 2:
        return 1, math.prod(shape)
    return int(shape[0]), math.prod(shape[1:])


class QuantizedTensor(NDArrayOperatorsMixin):
    """A checked quantised tensor standing for the float32 array q * scale (per tensor or per row)."""

    dtype = np.dtype(np.float32)

    def __init__(self, q: np.ndarray, scales: np.ndarray | np.float32, shape: tuple[int, ...]) -> None:
        """`q`: the int8 values in order; `scales`: one float32 scale, or one per row of `row_grid(shape)`.

        Raises ValueError when the counts or q's dtype do not fit `shape` (values are the decoder's to check).
        """
        rows, columns = row_grid(shape)
        flat_scales = np.asarray(scales, np.float32).reshape(-1)
        if q.dtype != np.int8 or q.size != rows * columns:
            raise ValueError(f"a quantized tensor of shape {list(shape)} needs {rows * columns} int8 values, "
                             f"not {q.size} of {q.dtype}")
        if flat_scales.size not in (1, rows):
            raise ValueError(f"a quantized tensor of shape {list(shape)} needs 1 scale or {rows} (one per row), "
                             f"not {flat_scales.size}")
        self._q = q.reshape(rows, columns)
        self._scales = flat_scales.reshape(-1, 1)
        self.shape = shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return self._q.size

    @property
    def codes(self) -> np.ndarray:
        """The int8 values in order (a read-only view, one-dimensional)."""
        return _read_only(self._q.reshape(-1))

    @property
    def scales(self) -> np.ndarray:
        """The float32 scales (a read-only view, one-dimensional): one for the tensor, or one per row."""
        return _read_only(self._scales.reshape(-1))

    def dense(self) -> np.ndarray:
        """The float32 array this tensor stands for (a new array)."""
        values = self._q.astype(np.float32)
        values *= self._scales  # in place: one pass less over the tensor than `q * scale`
        return values.reshape(self.shape)

    def __array__(self, dtype: npt.DTypeLike = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a quantized tensor has no float32 array to share: it is dequantized into a new one")
        values = self.dense()
        return values if dtype is None else values.astype(dtype, copy=False)

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: object, **kwargs: object) -> object:
        """NumPy ufuncs and operators see the dense float32 array (and return plain arrays)."""
        dense = [np.asarray(x) if isinstance(x, QuantizedTensor) else x for x in inputs]
        return getattr(ufunc, method)(*dense, **kwargs)

    def __repr__(self) -> str:
        per = "row" if self._scales.shape[0] > 1 else "tensor"
        return f"QuantizedTensor(shape={self.shape}, {self._q.size} int8 values, one scale per {per})"

    def add_into(self, target: np.ndarray, weight: np.float32, compiled: bool = True) -> None:
        """target += np.asarray(self) * weight, bit for bit, never holding the float32 tensor.

        `target` is a float32 array or view (e.g. a HeteroFL leading block) of this tensor's shape.
        `compiled=False` takes the numpy kernel even where numba is installed (for comparisons).
        """
        if target.dtype != np.float32 or tuple(target.shape) != self.shape:
            raise ValueError(f"cannot add a float32{list(self.shape)} tensor into {target.dtype}{list(target.shape)}")
        if self._q.size == 0:
            return
        grid = target.reshape(self._q.shape)
        if not np.may_share_memory(grid, target):  # a block whose rows are not one strided grid: reshape copied
            target += self.dense() * np.float32(weight)
            return
        kernel = _compiled_fused_add() if compiled else None
        if kernel is not None:
            kernel(grid, self._q, self._scales, np.float32(weight))
        else:
            self._add_in_blocks(grid, np.float32(weight))

    def _add_in_blocks(self, grid: np.ndarray, weight: np.float32) -> None:
        """The numpy kernel: each block of q cast, scaled and weighted in a small scratch, then added."""
        rows, columns = self._q.shape
        scratch = np.empty(min(self._q.size, _BLOCK_ELEMENTS), np.float32)
        for block in _blocks(rows, columns, _BLOCK_ELEMENTS):
            q = self._q[block]
            values = scratch[: q.size].reshape(q.shape)
            values[...] = q
            values *= self._scales if self._scales.shape[0] == 1 else self._scales[block[0]]
            values *= weight
            target_block = grid[block]
            target_block += values


Tensor = np.ndarray | QuantizedTensor  # what decoding yields: a plain array, or a quantised one that stands for it


def _read_only(view: np.ndarray) -> np.ndarray:
    """`view` with writing through it switched off (the tensor it looks into stays as it is)."""
    view = view.view()
    view.flags.writeable = False
    return view


def _blocks(rows: int, columns: int, size: int) -> Iterator[tuple[slice, slice]]:
    """(rows, columns) slices of about `size` elements covering a rows x columns grid in order."""
    if columns >= size:  # long rows: pieces of one row
        for row in range(rows):
            for start in range(0, columns, size):
                yield slice(row, row + 1), slice(start, min(columns, start + size))
        return
    step = size // columns
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step)), slice(0, columns)


def fused_kernel() -> str:
    """Which kernel `add_into` uses here: "numba <version>" or "numpy"."""
    if _compiled_fused_add() is None:
        return "numpy"
    import numba

    return f"numba {numba.__version__}"


@functools.cache
def _compiled_fused_add() -> FusedAdd | None:
    """`_fused_add_loop` compiled by numba (on first use, cached on disk); None without numba."""
    try:
        import numba
    except ImportError:  # not installed, or installed for another numpy
        return None
    try:
        return numba.njit(cache=True, nogil=True)(_fused_add_loop)
    except RuntimeError:  # no writable folder for numba's cache: compile in every process instead
        return numba.njit(nogil=True)(_fused_add_loop)


def _fused_add_loop(grid: np.ndarray, q: np.ndarray, scales: np.ndarray, weight: np.float32) -> None:
    """grid += (q * scale) * weight in float32, element by element, in one pass (for numba to compile)."""
    per_row = scales.shape[0] > 1
    for row in range(q.shape[0]):
        scale = scales[row, 0] if per_row else scales[0, 0]
        for column in range(q.shape[1]):
            grid[row, column] += np.float32(q[row, column]) * scale * weight


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """int8 codes in [-7, 7] two per byte, low nibble first, an odd count padded with a zero nibble."""
    nibbles = codes.view(np.uint8) & np.uint8(0x0F)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << np.uint8(4))


def unpack_nibbles(packed: np.ndarray, count: int, where: str) -> np.ndarray:
    """The `count` int8 codes `pack_nibbles` packed (a non-zero padding nibble is an error)."""
    nibbles = np.empty((packed.size, 2), np.uint8)
    np.bitwise_and(packed, np.uint8(0x0F), out=nibbles[:, 0])
    np.right_shift(packed, np.uint8(4), out=nibbles[:, 1])
    codes = nibbles.reshape(-1).view(np.int8)
    if count % 2 and codes[-1] != 0:
        raise ValueError(f"{where}: the padding nibble is not zero")
    codes ^= np.int8(8)  # sign-extend: 0..7 stay, 8..15 become -8..-1
    codes -= np.int8(8)
    return codes[:count]
