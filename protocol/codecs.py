"""Tensor codecs: how one tensor becomes bytes in a frame and back.

A codec is named in each tensor's entry of the frame header, so the receiver never guesses:
the name, the entry's shape and meta, and the bytes are all a decoder needs.

    float32    raw little-endian float32 (weights, lossless updates)
    uint8      raw bytes (artifact blobs)
    float16    IEEE half, little-endian
    int8       per-tensor scale (meta["scale"] = max|x|/127), int8 in [-127, 127]
    int8-row   one float32 scale per row (first axis) at the start of the bytes, then int8
    int4       per-tensor scale (max|x|/7), signed nibbles in [-7, 7], two per byte, low nibble first,
               an odd length padded with a zero nibble
    topk       the k largest |x|: a bitmap of their positions and their values, deflated; values float32
    topk+int8  the same, values int8 with meta["scale"]

Quantisers use unbiased stochastic rounding, q = floor(x / scale + U[0, 1)), so E[decode] = x.

Sparse layout:

    uint32 k (little-endian) | one zlib stream

The stream inflates to exactly ceil(n / 8) + k * width bytes: the bitmap of kept positions
(np.packbits order: element 0 is the high bit of byte 0; padding bits are zero, exactly k bits
set) followed by the k kept values in position order, float32 little-endian (width 4) or int8
(width 1). At fraction 0.1 deflate codes a random bitmap in ~0.56 bit per element (entropy
0.47), less when kept positions cluster, and also squeezes int8 values bunched above the
top-k threshold.

int8, int8-row and int4 decode to a `protocol.quantized.QuantizedTensor`: checked as strictly as
ever when decoded, dequantised only when asked (`np.asarray`), or added straight into a running
sum by `add_into`, which is how the aggregator gets near memory speed.

Encoders choose codecs with `parse_codec` ("float32", "float16", "int8", "int8-row", "int4",
"topk:0.1", "topk:0.1+int8"); decoders look them up by entry name with `get_codec`.
"""

from __future__ import annotations

import math
import struct
import zlib
from types import MappingProxyType
from typing import Protocol

import numpy as np

from protocol.messages import MAX_TENSOR_DIMS, MAX_TENSOR_ELEMENTS, TensorEntry
from protocol.quantized import QuantizedTensor, Tensor, pack_nibbles, row_grid, unpack_nibbles

Meta = dict[str, float | int | str]
_MAX_F32 = float(np.finfo(np.float32).max)
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_SPARSE_HEAD = struct.Struct("<I")
# Deflate level of the sparse stream. Measured on 1M elements, k = 100k, int8 values (Laplace;
# Student-t with row scales and dead columns):
#     level 1: encode  6 /  4 ms, decode 1.5 / 1.0 ms, 149.0 / 104.1 kB
#     level 6: encode 27 / 19 ms, decode 1.3 / 0.8 ms, 144.0 /  96.7 kB
#     level 9: encode 98 / 94 ms, decode 1.3 / 1.0 ms, 142.2 /  94.7 kB
# Level 6 is 3-7% smaller than 1 for ~20 ms more per 1M parameters on the device, about what
# the top-k selection already costs; 9 buys 1-2% more for 4x the encode time. Decoding, the
# aggregator's side, costs the same at every level.
_ZLIB_LEVEL = 6


class CodecError(ValueError):
    """A tensor's bytes do not match what its entry declares."""


class Codec(Protocol):
    """Turns an array into bytes plus small metadata, and back."""

    name: str
    dtype: str  # dtype of the decoded array
    stochastic: bool  # encode draws from `rng`

    def encode(self, array: np.ndarray, rng: np.random.Generator | None = None) -> tuple[bytes, Meta]: ...

    def decode(self, data: memoryview, entry: TensorEntry) -> Tensor: ...


def _expected_count(entry: TensorEntry) -> int:
    """The element count of the entry's shape; CodecError for a shape no tensor may have (checked before any allocation).

    The schema bounds shapes already; checked again so that a codec is total on any entry it is handed.
    """
    shape = entry.shape
    if len(shape) > MAX_TENSOR_DIMS or any(not isinstance(d, int) or d < 0 or d > MAX_TENSOR_ELEMENTS for d in shape):
        raise CodecError(f"tensor {entry.name!r} ({entry.codec}): shape {list(shape)[:MAX_TENSOR_DIMS + 1]} is not a "
                         f"list of at most {MAX_TENSOR_DIMS} axes of 0 to {MAX_TENSOR_ELEMENTS}")
    count = math.prod(shape)  # exact (no int64 wrap-around), and 1 for a scalar
    if count > MAX_TENSOR_ELEMENTS:
        raise CodecError(f"tensor {entry.name!r} ({entry.codec}): {count} elements exceed the limit of {MAX_TENSOR_ELEMENTS}")
    return count


def _check_length(entry: TensorEntry, data: memoryview, expected: int) -> None:
    if len(data) != expected:
        raise CodecError(f"tensor {entry.name!r} ({entry.codec}): {len(data)} bytes, expected {expected}")


def _finite_input(array: np.ndarray) -> np.ndarray:
    flat = np.asarray(array, dtype=np.float32).reshape(-1)
    if not np.isfinite(flat).all():
        raise CodecError("cannot encode NaN or Inf")
    return flat


def _scale_of(entry: TensorEntry, limit: int) -> np.float32:
    scale = entry.meta.get("scale")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise CodecError(f"tensor {entry.name!r} ({entry.codec}): meta 'scale' missing or not a number")
    if not (math.isfinite(scale) and 0 <= scale <= _MAX_F32 / (limit + 1)):
        raise CodecError(f"tensor {entry.name!r} ({entry.codec}): scale {scale!r} is NaN, Inf, negative or too large")
    return np.float32(scale)


def _stochastic_round(scaled: np.ndarray, limit: int, rng: np.random.Generator | None) -> np.ndarray:
    """floor(scaled + U[0,1)) clipped to [-limit, limit], as int8."""
    rng = rng if rng is not None else np.random.default_rng()
    noise = rng.random(scaled.shape, dtype=np.float32)
    return np.clip(np.floor(scaled + noise), -limit, limit).astype(np.int8)


def _quantize(flat: np.ndarray, limit: int, rng: np.random.Generator | None) -> tuple[np.ndarray, float]:
    """Per-tensor stochastic quantisation to [-limit, limit]; returns (int8 values, scale)."""
    peak = np.abs(flat).max() if flat.size else np.float32(0)
    scale = np.float32(peak / np.float32(limit))  # exactly representable, so meta round-trips
    if scale == 0:
        return np.zeros(flat.shape, np.int8), 0.0
    return _stochastic_round(flat / scale, limit, rng), float(scale)


def _check_ints(entry: TensorEntry, q: np.ndarray, limit: int) -> None:
    if not q.size:
        return
    if int(q.min()) < -limit or (limit < 127 and int(q.max()) > limit):  # int8 cannot exceed 127: one pass
        raise CodecError(f"tensor {entry.name!r} ({entry.codec}): quantised value outside [-{limit}, {limit}]")


class RawCodec:
    """Little-endian raw values of one dtype, no compression."""

    stochastic = False

    def __init__(self, name: str, dtype: str, wire_dtype: str | None = None) -> None:
        self.name = name
        self.dtype = dtype
        self._wire = np.dtype(wire_dtype or dtype).newbyteorder("<")

    def encode(self, array: np.ndarray, rng: np.random.Generator | None = None) -> tuple[bytes, Meta]:
        """Raw little-endian bytes of `array` cast to this codec's dtype."""
        return np.ascontiguousarray(array, dtype=self._wire).tobytes(), {}

    def decode(self, data: memoryview, entry: TensorEntry) -> np.ndarray:
        """The array of `entry.shape`; rejects a length mismatch or non-finite floats."""
        _check_length(entry, data, _expected_count(entry) * self._wire.itemsize)
        array = np.frombuffer(data, dtype=self._wire).reshape(entry.shape).astype(self.dtype, copy=False)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise CodecError(f"tensor {entry.name!r} holds NaN or Inf")
        return array


class Float16Codec(RawCodec):
    """IEEE half precision, little-endian; decodes to float32."""

    def __init__(self) -> None:
        super().__init__("float16", "float32", wire_dtype="float16")

    def encode(self, array: np.ndarray, rng: np.random.Generator | None = None) -> tuple[bytes, Meta]:
        """Half-precision bytes; values beyond the float16 range are clipped to it."""
        limit = float(np.finfo(np.float16).max)
        return np.clip(_finite_input(array), -limit, limit).astype(_F16).tobytes(), {}


class Int8Codec:
    """int8 with one per-tensor scale in meta, stochastic rounding."""

    name = "int8"
    dtype = "float32"
    stochastic = True

    def encode(self, array: np.ndarray, rng: np.random.Generator | None = None) -> tuple[bytes, Meta]:
        """int8 bytes and {"scale": max|x|/127}."""
        q, scale = _quantize(_finite_input(array), 127, rng)
        return q.tobytes(), {"scale": scale}

    def decode(self, data: memoryview, entry: TensorEntry) -> QuantizedTensor:
        """The validated tensor q * scale of `entry.shape` (dequantised on demand)."""
        scale = _scale_of(entry, 127)
        _check_length(entry, data, _expected_count(entry))
        q = np.frombuffer(data, dtype=np.int8)
        _check_ints(entry, q, 127)
        return QuantizedTensor(q, scale, tuple(entry.shape))


class Int8RowCodec:
    """int8 with one float32 scale per row (first axis), scales first in the bytes."""

    name = "int8-row"
    dtype = "float32"
    stochastic = True

    def encode(self, array: np.ndarray, rng: np.random.Generator | None = None) -> tuple[bytes, Meta]:
        """float32 row scales (max|row|/127) followed by int8 values; meta stays empty."""
        flat = _finite_input(array)
        rows, _ = row_grid(np.shape(array))
        matrix = flat.reshape(rows, flat.size // rows if rows else 0)
        peaks = np.abs(matrix).max(axis=1) if matrix.size else np.zeros(rows, np.float32)
        scales = (peaks / np.float32(127)).astype(_F32)
        safe = np.where(scales > 0, scales, np.float32(1))
        q = _stochastic_round(matrix / safe[:, None], 127, rng)
        q[scales == 0] = 0
        return scales.tobytes() + q.tobytes(), {}

    def decode(self, data: memoryview, entry: TensorEntry) -> QuantizedTensor:
        """The validated tensor q * scale of its row, of `entry.shape` (dequantised on demand)."""
        _expected_count(entry)
        rows, columns = row_grid(entry.shape)
        _check_length(entry, data, 4 * rows + rows * columns)
        scales = np.frombuffer(data, dtype=_F32, count=rows)
        if not (np.isfinite(scales) & (scales >= 0) & (scales <= _MAX_F32 / 128)).all():
            raise CodecError(f"tensor {entry.name!r} (int8-row): row scale NaN, Inf, negative or too large")
        q = np.frombuffer(data, dtype=np.int8, offset=4 * rows)
        _check_ints(entry, q, 127)
        return QuantizedTensor(q, scales, tuple(entry.shape))


class Int4Codec:
    """Signed 4-bit values in [-7, 7] with a per-tensor scale, two per byte."""

    name = "int4"
    dtype = "float32"
    stochastic = True

    def encode(self, array: np.ndarray, rng: np.random.Generator | None = None) -> tuple[bytes, Meta]:
        """Packed nibbles (low first, zero-padded) and {"scale": max|x|/7}."""
        q, scale = _quantize(_finite_input(array), 7, rng)
        return pack_nibbles(q.astype(np.int8)).tobytes(), {"scale": scale}

    def decode(self, data: memoryview, entry: TensorEntry) -> QuantizedTensor:
        """The validated tensor q * scale of `entry.shape`, unpacked to int8 (dequantised on demand);
        rejects -8 and a non-zero padding nibble."""
        scale = _scale_of(entry, 7)
        count = _expected_count(entry)
        _check_length(entry, data, (count + 1) // 2)
        try:
            q = unpack_nibbles(np.frombuffer(data, dtype=np.uint8), count, f"tensor {entry.name!r} (int4)")
        except ValueError as exc:
            raise CodecError(str(exc)) from None
        if q.size and q.min() == -8:  # the one nibble outside [-7, 7]
            raise CodecError(f"tensor {entry.name!r} (int4): quantised value -8 outside [-7, 7]")
        return QuantizedTensor(q, scale, tuple(entry.shape))


class TopKCodec:
    """The k = max(1, ceil(fraction * n)) largest |x|, sparse; values float32 or int8."""

    dtype = "float32"

    def __init__(self, fraction: float = 0.1, quantized: bool = False) -> None:
        if not (0.0 < fraction <= 1.0):
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction!r}")
        self.fraction = fraction
        self.quantized = quantized
        self.name = "topk+int8" if quantized else "topk"
        self.stochastic = quantized
        self._width = 1 if quantized else 4

    def encode(self, array: np.ndarray, rng: np.random.Generator | None = None) -> tuple[bytes, Meta]:
        """Sparse layout of the module docstring; {"scale": ...} when values are int8."""
        flat = _finite_input(array)
        n = flat.size
        k = min(n, max(1, math.ceil(round(self.fraction * n, 6))))  # round: 2e-5 * 3e5 is 6, not 7
        kept = np.ones(n, bool)
        if k < n:
            kept[np.argpartition(np.abs(flat), n - k)[: n - k]] = False
        values = flat[kept]
        meta: Meta = {}
        if self.quantized:
            q, scale = _quantize(values, 127, rng)
            value_bytes, meta = q.tobytes(), {"scale": scale}
        else:
            value_bytes = values.astype(_F32).tobytes()
        stream = zlib.compress(np.packbits(kept).tobytes() + value_bytes, _ZLIB_LEVEL)
        return _SPARSE_HEAD.pack(k) + stream, meta

    def decode(self, data: memoryview, entry: TensorEntry) -> np.ndarray:
        """Dense float32 array of `entry.shape`, zero outside the kept positions."""
        where = f"tensor {entry.name!r} ({entry.codec})"
        scale = _scale_of(entry, 127) if self.quantized else np.float32(1)
        n = _expected_count(entry)  # bounded by MAX_TENSOR_ELEMENTS before anything is inflated
        if len(data) < _SPARSE_HEAD.size:
            raise CodecError(f"{where}: {len(data)} bytes, shorter than the {_SPARSE_HEAD.size}-byte sparse header")
        (k,) = _SPARSE_HEAD.unpack_from(data)
        if k > n:
            raise CodecError(f"{where}: count {k} too large for {n} elements")
        bitmap_bytes = (n + 7) // 8
        body = _inflate_exactly(where, data[_SPARSE_HEAD.size :], bitmap_bytes + self._width * k)
        bits = np.unpackbits(np.frombuffer(body, np.uint8, count=bitmap_bytes)).view(bool)  # bool: faster nonzero
        if bits[n:].any():
            raise CodecError(f"{where}: bitmap padding bits are not zero")
        positions = np.flatnonzero(bits[:n])
        if positions.size != k:
            raise CodecError(f"{where}: bitmap has {positions.size} bits set, expected {k}")
        if self.quantized:
            q = np.frombuffer(body, np.int8, count=k, offset=bitmap_bytes)
            _check_ints(entry, q, 127)
            values = q.astype(np.float32) * scale
        else:
            values = np.frombuffer(body, _F32, count=k, offset=bitmap_bytes).astype(np.float32)
            if not np.isfinite(values).all():
                raise CodecError(f"{where}: value NaN or Inf")
        dense = np.zeros(n, np.float32)
        dense[positions] = values
        return dense.reshape(entry.shape)


def _inflate_exactly(where: str, stream: memoryview, expected: int) -> bytes:
    """The `expected` bytes a complete zlib stream inflates to; CodecError for anything else."""
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(stream, expected + 1)  # never inflates past one byte too many
    except zlib.error as exc:
        raise CodecError(f"{where}: corrupt zlib stream ({exc})") from None
    if len(body) > expected:
        raise CodecError(f"{where}: zlib stream inflates to more than the expected {expected} bytes")
    if not inflater.eof:
        raise CodecError(f"{where}: zlib stream truncated after {len(body)} of {expected} bytes")
    if inflater.unused_data:
        raise CodecError(f"{where}: {len(inflater.unused_data)} bytes after the end of the zlib stream")
    if len(body) != expected:
        raise CodecError(f"{where}: zlib stream inflates to {len(body)} bytes, expected {expected}")
    return body


CODECS: MappingProxyType[str, Codec] = MappingProxyType(
    {
        "float32": RawCodec("float32", "float32"),
        "uint8": RawCodec("uint8", "uint8"),
        "float16": Float16Codec(),
        "int8": Int8Codec(),
        "int8-row": Int8RowCodec(),
        "int4": Int4Codec(),
        "topk": TopKCodec(),
        "topk+int8": TopKCodec(quantized=True),
    }
)


def get_codec(name: str) -> Codec:
    """The codec called `name` (for decoding); CodecError lists the known ones otherwise."""
    try:
        return CODECS[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r} (known: {', '.join(sorted(CODECS))})") from None


def parse_codec(spec: str) -> Codec:
    """The encoder for a spec: "float32", "float16", "int8", "int8-row", "int4", "topk:0.1", "topk:0.1+int8"."""
    spec = spec.strip()
    if spec.startswith("topk:"):
        body, plus, suffix = spec[len("topk:") :].partition("+")
        if plus and suffix != "int8":
            raise ValueError(f"codec spec {spec!r}: only '+int8' may follow a top-k fraction")
        try:
            fraction = float(body)
        except ValueError:
            raise ValueError(f"codec spec {spec!r}: top-k fraction {body!r} is not a number") from None
        if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise ValueError(f"codec spec {spec!r}: top-k fraction must be in (0, 1]")
        return TopKCodec(fraction, quantized=bool(plus))
    if spec in CODECS and not spec.startswith("topk"):
        return CODECS[spec]
    raise ValueError(
        f"unknown codec spec {spec!r} (expected float32, uint8, float16, int8, int8-row, int4, topk:F or topk:F+int8)"
    )


def encode_decode(codec: Codec, array: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """The dense array the receiver will decode from `array` encoded with `codec` (for error feedback)."""
    data, meta = codec.encode(array, rng=rng)
    entry = TensorEntry(name="t", codec=codec.name, dtype=codec.dtype, shape=list(np.shape(array)), nbytes=len(data), meta=meta)
    return np.asarray(codec.decode(memoryview(data), entry))
