"""Chunking: frames larger than the broker's comfortable message size travel in pieces.

    b"TFC1" | header length (uint32 LE) | ChunkHeader JSON | piece of the frame

A frame at or under the limit is sent as it is. The receiver reassembles per (source,
transfer id), bounds the bytes it holds, drops transfers that stall, and checks that the pieces
add up to the announced length before handing the frame on.

Chunks carry no hash of their own: the frame's payload sha256, in its header (and under the
sender's signature, protocol.signing), is what `decode_frame` checks before anything is
applied, so a payload corrupted in any chunk is refused there, as BAD_HASH. The bytes are hashed
once on receipt, not once per chunked message and again per frame. The frame header travels as
it does unchunked: validated by its schema, and authenticated by the signature where required.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.frame import MAGIC, FrameError
from protocol.messages import RejectReason

CHUNK_MAGIC = b"TFC1"
_PREFIX = struct.Struct("<4sI")
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20


class ChunkHeader(BaseModel):
    """Which piece of which frame this message carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transfer_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    index: Annotated[int, Field(ge=0)]
    count: Annotated[int, Field(ge=1, le=1 << 16)]
    total_bytes: Annotated[int, Field(ge=1)]


def split_message(frame: bytes, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[bytes]:
    """The MQTT payloads that carry `frame`: itself if small enough, else chunk messages."""
    if len(frame) <= max_message_bytes:
        return [frame]
    piece = max(1, max_message_bytes - 512)  # room for the chunk header
    count = -(-len(frame) // piece)
    transfer_id = uuid.uuid4().hex
    messages = []
    for index in range(count):
        header = ChunkHeader(
            transfer_id=transfer_id, index=index, count=count, total_bytes=len(frame)
        ).model_dump_json().encode()
        messages.append(_PREFIX.pack(CHUNK_MAGIC, len(header)) + header + frame[index * piece : (index + 1) * piece])
    return messages


@dataclass
class _Transfer:
    header: ChunkHeader
    started: float
    pieces: dict[int, bytes] = field(default_factory=dict)

    @property
    def held(self) -> int:
        return sum(len(p) for p in self.pieces.values())


class Reassembler:
    """Turns incoming MQTT payloads back into whole frames."""

    def __init__(
        self,
        max_frame_bytes: int = 64 << 20,
        max_pending_bytes: int = 256 << 20,
        timeout_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_pending_bytes = max_pending_bytes
        self.timeout_s = timeout_s
        self._clock = clock
        self._transfers: dict[tuple[str, str], _Transfer] = {}

    def feed(self, source: str, message: bytes) -> bytes | None:
        """A whole frame when `message` completes one, None while pieces are missing.

        The frame is not yet checked beyond its length: hand it to `decode_frame`, which checks its hash.
        """
        if message[:4] == MAGIC:
            return message
        if message[:4] != CHUNK_MAGIC or len(message) < _PREFIX.size:
            raise FrameError(RejectReason.MALFORMED, "neither a frame nor a chunk (bad magic)")
        self._expire()
        header, piece = self._parse(message)
        key = (source, header.transfer_id)
        transfer = self._transfers.setdefault(key, _Transfer(header, self._clock()))
        if transfer.header.model_dump(exclude={"index"}) != header.model_dump(exclude={"index"}):
            del self._transfers[key]
            raise FrameError(RejectReason.MALFORMED, f"chunk {header.index} disagrees with its transfer's header")
        if self._pending_bytes() + len(piece) > self.max_pending_bytes:
            del self._transfers[key]
            raise FrameError(RejectReason.OVERSIZE, "too many bytes pending reassembly")
        transfer.pieces[header.index] = piece
        if len(transfer.pieces) < header.count:
            return None
        del self._transfers[key]
        frame = b"".join(transfer.pieces[i] for i in range(header.count))
        if len(frame) != header.total_bytes:
            raise FrameError(RejectReason.MALFORMED, f"reassembled {len(frame)} bytes, expected {header.total_bytes}")
        return frame

    @property
    def pending_transfers(self) -> int:
        return len(self._transfers)

    def _parse(self, message: bytes) -> tuple[ChunkHeader, bytes]:
        _, header_len = _PREFIX.unpack_from(message)
        if _PREFIX.size + header_len > len(message):
            raise FrameError(RejectReason.MALFORMED, "chunk header length exceeds the message")
        try:
            header = ChunkHeader.model_validate_json(message[_PREFIX.size : _PREFIX.size + header_len])
        except ValidationError as exc:
            raise FrameError(RejectReason.MALFORMED, f"invalid chunk header: {exc.errors()[0]['msg']}") from None
        if header.index >= header.count:
            raise FrameError(RejectReason.MALFORMED, f"chunk index {header.index} >= count {header.count}")
        if header.total_bytes > self.max_frame_bytes:
            raise FrameError(RejectReason.OVERSIZE, f"frame of {header.total_bytes} bytes exceeds {self.max_frame_bytes}")
        return header, message[_PREFIX.size + header_len :]

    def _pending_bytes(self) -> int:
        return sum(t.held for t in self._transfers.values())

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, t in self._transfers.items() if now - t.started > self.timeout_s]:
            del self._transfers[key]
