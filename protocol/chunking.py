"""Chunking: frames larger than the broker's comfortable message size travel in pieces.

    b"TFC1" | header length (uint32 LE) | ChunkHeader JSON | piece of the frame

A frame at or under the limit is sent as it is. Every piece but the last has the same size (at
least MIN_PIECE_BYTES), the last is no larger, and together they are `total_bytes`; the receiver
refuses any piece that breaks this (so empty pieces cannot open transfers), reassembles per
(source, transfer id) and checks the sum before handing the frame on.

Budgets (Reassembler), so that neither one flooding source nor many invented ones break an
upload under way:

- Admission: given `admit`, a chunk from a source it refuses is refused at once (UNKNOWN_DEVICE),
  before its header is parsed and before it holds a byte. The aggregator admits only the topics
  of devices it knows, so invented senders get no reassembly room at all.
- Per source (an MQTT topic, so one device): at most `max_source_bytes` in
  `max_source_transfers` open transfers; a source over its budget first loses its own oldest
  transfers (a device that starts a new upload abandons its stalled one), and a piece that
  still does not fit is refused, dropping only that transfer.
- Overall: at most `max_pending_bytes` in `max_transfers` transfers. When a piece would pass
  either, transfers give way youngest first (the most recently opened, whoever holds it), down
  to the transfer the piece belongs to: if that one is the youngest, the piece is refused and
  its transfer dropped. So open transfers finish in the order they started; a newcomer, or a
  crowd of them from as many sources as it likes, waits for room and never evicts an upload
  already under way. Holding the room costs its holder: each source is capped as above, and
  every transfer expires `timeout_s` after it opened, so keeping newcomers out means sending
  the whole budget again every `timeout_s` from at least max_pending/max_source admitted sources.

A chunk costs O(1) amortised: running byte counters, expiry from the front and eviction from the
back of one start-ordered dict.

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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.frame import MAGIC, FrameError
from protocol.messages import RejectReason

CHUNK_MAGIC = b"TFC1"
_PREFIX = struct.Struct("<4sI")
_HEADER_ROOM = 512  # bytes of a chunk message left for its prefix and header
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
MIN_PIECE_BYTES = 1024  # every piece but the last of a chunked frame is at least this large
MAX_CHUNKS = 1 << 16  # pieces of one frame
MAX_TOTAL_BYTES = 1 << 40  # ChunkHeader.total_bytes (the receiver's max_frame_bytes is the real limit)


class ChunkHeader(BaseModel):
    """Which piece of which frame this message carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transfer_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    index: Annotated[int, Field(ge=0, lt=MAX_CHUNKS)]
    count: Annotated[int, Field(ge=1, le=MAX_CHUNKS)]
    total_bytes: Annotated[int, Field(ge=1, le=MAX_TOTAL_BYTES)]


def split_message(frame: bytes, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[bytes]:
    """The MQTT payloads that carry `frame`: itself if small enough, else chunk messages."""
    if len(frame) <= max_message_bytes:
        return [frame]
    piece = max_message_bytes - _HEADER_ROOM
    if piece < MIN_PIECE_BYTES:
        raise ValueError(f"messages of {max_message_bytes} bytes leave no room for a {MIN_PIECE_BYTES}-byte piece")
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
    source: str
    header: ChunkHeader
    started: float
    piece_bytes: int  # the size of every piece but the last
    pieces: dict[int, bytes] = field(default_factory=dict)
    held: int = 0

    def expected_size(self, index: int) -> int:
        count, total = self.header.count, self.header.total_bytes
        return total - (count - 1) * self.piece_bytes if index == count - 1 else self.piece_bytes


@dataclass
class _Source:
    held: int = 0
    transfers: OrderedDict[str, None] = field(default_factory=OrderedDict)  # transfer ids, oldest first


class Reassembler:
    """Turns incoming MQTT payloads back into whole frames, within per-source and global budgets."""

    def __init__(
        self,
        max_frame_bytes: int = 64 << 20,
        max_pending_bytes: int = 256 << 20,
        timeout_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        max_source_bytes: int | None = None,
        max_source_transfers: int = 4,
        max_transfers: int = 1024,
        admit: Callable[[str], bool] | None = None,
    ) -> None:
        """`max_source_bytes` defaults to one frame (`max_frame_bytes`), but never above the global budget.

        `admit(source)`, when given, says whether chunks from `source` may hold reassembly room; it is
        called on the receiving (network) thread, so it must read only thread-safe state.
        """
        self.admit = admit
        self.max_frame_bytes = max_frame_bytes
        self.max_pending_bytes = max_pending_bytes
        self.max_source_bytes = min(max_frame_bytes if max_source_bytes is None else max_source_bytes, max_pending_bytes)
        self.max_source_transfers = max_source_transfers
        self.max_transfers = max_transfers
        self.timeout_s = timeout_s
        self._clock = clock
        self._transfers: OrderedDict[tuple[str, str], _Transfer] = OrderedDict()  # by start time, oldest first
        self._sources: dict[str, _Source] = {}
        self._held = 0

    def feed(self, source: str, message: bytes) -> bytes | None:
        """A whole frame when `message` completes one, None while pieces are missing.

        The frame is not yet checked beyond its length: hand it to `decode_frame`, which checks its hash.
        Raises FrameError (dropping only this source's transfer) for a chunk that is malformed or over budget.
        """
        if message[:4] == MAGIC:
            return message
        if message[:4] != CHUNK_MAGIC or len(message) < _PREFIX.size:
            raise FrameError(RejectReason.MALFORMED, "neither a frame nor a chunk (bad magic)")
        if self.admit is not None and not self.admit(source):
            raise FrameError(RejectReason.UNKNOWN_DEVICE, f"chunks on {source} get no reassembly room: its sender is "
                                                          "not known (a device's first hello travels unchunked)")
        self._expire()
        header, piece = self._parse(message)
        key = (source, header.transfer_id)
        transfer = self._transfers.get(key)
        if transfer is None:
            transfer = self._open(source, header, len(piece))
        elif transfer.header.model_dump(exclude={"index"}) != header.model_dump(exclude={"index"}):
            self._drop(key)
            raise FrameError(RejectReason.MALFORMED, f"chunk {header.index} disagrees with its transfer's header")
        if len(piece) != transfer.expected_size(header.index):
            self._drop(key)
            raise FrameError(RejectReason.MALFORMED, f"chunk {header.index} of {header.count} holds {len(piece)} bytes, "
                                                     f"expected {transfer.expected_size(header.index)}")
        if header.index in transfer.pieces:
            return None  # a QoS 1 redelivery: same index, same size, nothing new to hold
        self._make_room(source, key, len(piece))
        transfer.pieces[header.index] = piece
        transfer.held += len(piece)
        self._sources[source].held += len(piece)
        self._held += len(piece)
        if len(transfer.pieces) < header.count:
            return None
        self._drop(key)
        return b"".join(transfer.pieces[i] for i in range(header.count))  # sizes checked: exactly total_bytes

    @property
    def pending_transfers(self) -> int:
        return len(self._transfers)

    @property
    def pending_bytes(self) -> int:
        return self._held

    def _parse(self, message: bytes) -> tuple[ChunkHeader, bytes]:
        _, header_len = _PREFIX.unpack_from(message)
        if header_len > _HEADER_ROOM or _PREFIX.size + header_len > len(message):
            raise FrameError(RejectReason.MALFORMED, "chunk header length exceeds the message or its bound")
        try:
            header = ChunkHeader.model_validate_json(message[_PREFIX.size : _PREFIX.size + header_len])
        except ValidationError as exc:
            raise FrameError(RejectReason.MALFORMED, f"invalid chunk header: {exc.errors()[0]['msg']}") from None
        if header.index >= header.count:
            raise FrameError(RejectReason.MALFORMED, f"chunk index {header.index} >= count {header.count}")
        if header.total_bytes > self.max_frame_bytes:
            raise FrameError(RejectReason.OVERSIZE, f"frame of {header.total_bytes} bytes exceeds {self.max_frame_bytes}")
        return header, message[_PREFIX.size + header_len :]

    def _open(self, source: str, header: ChunkHeader, size: int) -> _Transfer:
        """A new transfer whose piece size follows from its first piece; FrameError if no piece size fits."""
        count, total = header.count, header.total_bytes
        if header.index < count - 1:
            piece_bytes = size
        elif count == 1:
            piece_bytes = total
        elif (total - size) % (count - 1) == 0:
            piece_bytes = (total - size) // (count - 1)  # the last piece came first: the others are all this size
        else:
            piece_bytes = 0
        if count > 1 and piece_bytes < MIN_PIECE_BYTES or not (count - 1) * piece_bytes < total <= count * piece_bytes:
            raise FrameError(RejectReason.MALFORMED, f"a {size}-byte piece {header.index} cannot be one of {count} equal "
                                                     f"pieces (of at least {MIN_PIECE_BYTES} bytes) of {total} bytes")
        transfer = _Transfer(source, header, self._clock(), piece_bytes)
        self._transfers[(source, header.transfer_id)] = transfer
        self._sources.setdefault(source, _Source()).transfers[header.transfer_id] = None
        return transfer

    def _make_room(self, source: str, key: tuple[str, str], size: int) -> None:
        """Evict transfers until `size` more bytes of `key` fit every budget; FrameError(OVERSIZE) if they cannot."""
        mine = self._sources[source]
        while (mine.held + size > self.max_source_bytes or len(mine.transfers) > self.max_source_transfers) \
                and next(iter(mine.transfers)) != key[1]:
            self._drop((source, next(iter(mine.transfers))))  # this source's own oldest transfer gives way first
        if mine.held + size > self.max_source_bytes or len(mine.transfers) > self.max_source_transfers:
            self._drop(key)
            raise FrameError(RejectReason.OVERSIZE, f"{source} holds too many bytes or transfers pending reassembly")
        while self._held + size > self.max_pending_bytes or len(self._transfers) > self.max_transfers:
            youngest = next(reversed(self._transfers))  # the most recently opened transfer gives way first
            if youngest == key:  # no transfer younger than this one is left: it waits, the older ones finish
                self._drop(key)
                raise FrameError(RejectReason.OVERSIZE, "the reassembly budget is full with transfers opened earlier")
            self._drop(youngest)

    def _drop(self, key: tuple[str, str]) -> None:
        transfer = self._transfers.pop(key)
        source = self._sources[transfer.source]
        del source.transfers[key[1]]
        source.held -= transfer.held
        self._held -= transfer.held
        if not source.transfers:
            del self._sources[transfer.source]

    def _expire(self) -> None:
        """Drop the transfers older than timeout_s: the oldest come first, so this stops at the first young one."""
        now = self._clock()
        while self._transfers:
            key, transfer = next(iter(self._transfers.items()))
            if now - transfer.started <= self.timeout_s:
                return
            self._drop(key)
