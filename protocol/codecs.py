"""Tensor codecs: how one tensor becomes bytes in a frame and back.

A codec is named in each tensor's entry of the frame header, so the receiver never guesses.
`float32` carries updates and weights uncompressed; compressed codecs register here too.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Protocol

import numpy as np

from protocol.messages import TensorEntry


class CodecError(ValueError):
    """A tensor's bytes do not match what its entry declares."""


class Codec(Protocol):
    """Turns an array into bytes plus small metadata, and back."""

    name: str
    dtype: str  # dtype of the decoded array

    def encode(self, array: np.ndarray) -> tuple[bytes, dict[str, float | int | str]]: ...

    def decode(self, data: memoryview, entry: TensorEntry) -> np.ndarray: ...


def _expected_count(entry: TensorEntry) -> int:
    return int(np.prod(entry.shape, dtype=np.int64)) if entry.shape else 1


class RawCodec:
    """Little-endian raw values of one dtype, no compression."""

    def __init__(self, name: str, dtype: str) -> None:
        self.name = name
        self.dtype = dtype
        self._wire = np.dtype(dtype).newbyteorder("<")

    def encode(self, array: np.ndarray) -> tuple[bytes, dict[str, float | int | str]]:
        """Raw little-endian bytes of `array` cast to this codec's dtype."""
        return np.ascontiguousarray(array, dtype=self._wire).tobytes(), {}

    def decode(self, data: memoryview, entry: TensorEntry) -> np.ndarray:
        """The array of `entry.shape`; rejects a length mismatch or non-finite floats."""
        count = _expected_count(entry)
        if len(data) != count * self._wire.itemsize:
            raise CodecError(f"tensor {entry.name!r}: {len(data)} bytes, expected {count * self._wire.itemsize}")
        array = np.frombuffer(data, dtype=self._wire).reshape(entry.shape).astype(self.dtype, copy=False)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise CodecError(f"tensor {entry.name!r} holds NaN or Inf")
        return array


CODECS: MappingProxyType[str, Codec] = MappingProxyType(
    {
        "float32": RawCodec("float32", "float32"),
        "uint8": RawCodec("uint8", "uint8"),
    }
)


def get_codec(name: str) -> Codec:
    """The codec called `name`; CodecError lists the known ones otherwise."""
    try:
        return CODECS[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r} (known: {', '.join(sorted(CODECS))})") from None
