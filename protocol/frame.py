"""The binary frame: fixed prefix + pydantic-validated JSON header + raw tensor bytes.

    b"TFL1" | header length (uint32 LE) | header JSON (UTF-8) | payload

The payload is the tensors' encoded bytes back to back, in header order; its sha256 is in the
header (and so under the sender's signature, protocol.signing), required whenever there is a
payload, and checked before any tensor is decoded. It is the only hash a frame's bytes go
through on receipt, chunked or not (protocol.chunking). Nothing is pickled; decoding checks
every length, hash and value before returning. Quantised tensors come back as
`protocol.quantized.QuantizedTensor`, validated but not yet dequantised.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from protocol.codecs import Codec, CodecError, get_codec, parse_codec
from protocol.messages import Body, FrameHeader, RejectReason, TensorEntry
from protocol.quantized import Tensor

MAGIC = b"TFL1"
_PREFIX = struct.Struct("<4sI")
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_FRAME_BYTES = 64 << 20
# What numpy, zlib and struct raise on inputs they refuse (zlib.error and struct.error are Exception subclasses).
_NUMPY_ERRORS = (ArithmeticError, LookupError, MemoryError, TypeError, ValueError, zlib.error, struct.error)


class FrameError(ValueError):
    """A frame that must not be applied, with the reason to report back."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Frame:
    """A decoded frame: its header and its tensors by name (arrays, or quantised tensors that stand for them)."""

    header: FrameHeader
    tensors: dict[str, Tensor]
    nbytes: int

    @property
    def body(self) -> Body:
        return self.header.body


def encode_frame(
    fleet: str,
    sender: str,
    body: Body,
    tensors: Mapping[str, np.ndarray] | None = None,
    codec: str | Codec = "float32",
    rng: np.random.Generator | None = None,
    signer: Callable[[FrameHeader], str] | None = None,
    sent_at: float | None = None,
) -> bytes:
    """Serialise one message and its tensors (all with `codec`, a Codec or a parse_codec spec) into frame bytes.

    A stochastic codec draws from `rng` (fresh entropy when None); a seeded generator makes the
    bytes reproducible. `signer` (protocol.signing.DeviceKey.sign) adds the sender's signature.
    `sent_at` stamps the header (now when None).
    """
    coder = parse_codec(codec) if isinstance(codec, str) else codec
    if rng is None and getattr(coder, "stochastic", False):
        rng = np.random.default_rng()
    entries: list[TensorEntry] = []
    parts: list[bytes] = []
    for name, array in (tensors or {}).items():
        data, meta = coder.encode(array, rng=rng)
        entries.append(
            TensorEntry(name=name, codec=coder.name, dtype=coder.dtype, shape=list(array.shape), nbytes=len(data), meta=meta)
        )
        parts.append(data)
    payload = b"".join(parts)
    header = FrameHeader(
        fleet=fleet, sender=sender, body=body, tensors=entries, payload_sha256=hashlib.sha256(payload).hexdigest(),
        **({} if sent_at is None else {"sent_at": sent_at}),
    )
    if signer is not None:
        header = header.model_copy(update={"signature": signer(header)})
    header_bytes = header.model_dump_json().encode()
    return _PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes + payload


@dataclass(frozen=True)
class RawFrame:
    """A frame whose header is validated but whose payload is neither hashed nor decoded yet.

    What `read_header` returns, so a receiver can run its cheap checks (fleet, sender, known
    device, signature, the tensor table against the shapes it expects) before touching the payload.
    """

    header: FrameHeader
    payload: memoryview
    nbytes: int

    @property
    def body(self) -> Body:
        return self.header.body


def read_header(data: bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> RawFrame:
    """Check the frame's size and prefix and validate its header; the payload is only measured.

    Raises FrameError with a reason on anything wrong; never hashes or allocates per tensor.
    """
    if len(data) > max_bytes:
        raise FrameError(RejectReason.OVERSIZE, f"frame of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < _PREFIX.size:
        raise FrameError(RejectReason.MALFORMED, f"frame of {len(data)} bytes is shorter than its prefix")
    if not isinstance(data, bytes):  # quantised tensors keep views of the payload: check and keep what cannot change
        data = bytes(data)
    magic, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(RejectReason.MALFORMED, f"bad magic {magic!r}, expected {MAGIC!r}")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(data):
        raise FrameError(RejectReason.MALFORMED, f"header length {header_len} does not fit a {len(data)}-byte frame")
    start = _PREFIX.size + header_len
    try:
        header = FrameHeader.model_validate_json(data[_PREFIX.size : start])
    except ValidationError as exc:
        raise FrameError(RejectReason.MALFORMED, f"invalid header: {_first_error(exc)}") from None
    payload = memoryview(data)[start:]
    declared = sum(entry.nbytes for entry in header.tensors)
    if declared != len(payload):
        raise FrameError(RejectReason.MALFORMED, f"payload is {len(payload)} bytes, tensors declare {declared}")
    return RawFrame(header=header, payload=payload, nbytes=len(data))


def decode_payload(raw: RawFrame, expected: Mapping[str, tuple[int, ...]] | None = None) -> Frame:
    """Check the tensor table (against `expected` names and shapes when given), then the payload's sha256, then decode.

    Raises FrameError with a reason on anything wrong.
    """
    header, payload = raw.header, raw.payload
    if expected is not None:
        check_tensor_table(header.tensors, expected)
    if header.payload_sha256 is None:
        if len(payload):
            raise FrameError(RejectReason.BAD_HASH, f"a {len(payload)}-byte payload without its sha256 in the header")
    elif hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise FrameError(RejectReason.BAD_HASH, "payload sha256 does not match the header")
    return Frame(header=header, tensors=_decode_tensors(header.tensors, payload), nbytes=raw.nbytes)


def check_tensor_table(entries: list[TensorEntry], expected: Mapping[str, tuple[int, ...]]) -> None:
    """FrameError(BAD_TENSOR) unless the entries name exactly the `expected` tensors, each of its expected shape."""
    names = [entry.name for entry in entries]
    if len(names) != len(set(names)) or set(names) != set(expected):
        diff = sorted(set(names) ^ set(expected)) or sorted({n for n in names if names.count(n) > 1})
        raise FrameError(RejectReason.BAD_TENSOR, f"tensors {diff[:8]} do not match what was expected")
    for entry in entries:
        if tuple(entry.shape) != tuple(expected[entry.name]):
            raise FrameError(RejectReason.BAD_TENSOR,
                             f"{entry.name}: shape {entry.shape}, expected {list(expected[entry.name])}")


def decode_frame(data: bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 expected: Mapping[str, tuple[int, ...]] | None = None) -> Frame:
    """Parse and fully validate frame bytes; raises FrameError with a reason on anything wrong."""
    return decode_payload(read_header(data, max_bytes), expected)


def _decode_tensors(entries: list[TensorEntry], payload: memoryview) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    offset = 0
    for entry in entries:
        if entry.name in tensors:
            raise FrameError(RejectReason.MALFORMED, f"tensor {entry.name!r} appears twice")
        chunk = payload[offset : offset + entry.nbytes]
        offset += entry.nbytes
        try:
            codec = get_codec(entry.codec)
            if codec.dtype != entry.dtype:
                raise CodecError(f"tensor {entry.name!r}: codec {entry.codec} decodes to {codec.dtype}, not {entry.dtype}")
            tensors[entry.name] = codec.decode(chunk, entry)
        except CodecError as exc:
            raise FrameError(RejectReason.BAD_TENSOR, str(exc)) from None
        except _NUMPY_ERRORS as exc:  # a case the codec's checks missed: still this tensor's fault, never the receiver's
            raise FrameError(RejectReason.BAD_TENSOR,
                             f"tensor {entry.name!r} ({entry.codec}) does not decode: {type(exc).__name__}: {exc}") from None
    return tensors


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "header"
    return f"{where}: {err['msg']}"
