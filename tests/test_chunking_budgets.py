"""Chunk reassembly under many senders: an upload under way survives a crowd of invented sources (protocol.chunking)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from protocol.chunking import CHUNK_MAGIC, ChunkHeader, Reassembler, split_message
from protocol.frame import FrameError, encode_frame
from protocol.messages import RejectReason, Update, new_id

PIECE = 64 << 10
BUDGET = 16 << 20


def _frame(nbytes: int) -> bytes:
    values = np.random.default_rng(5).standard_normal(nbytes // 4).astype(np.float32)
    update = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=10, steps=1, train_loss=1.0,
                    train_accuracy=0.5, train_seconds=0.1)
    return encode_frame("f", "honest", update, {"w": values})


def _pieces(frame: bytes) -> list[bytes]:
    """The frame in 64 KiB pieces (the message room split_message leaves for a chunk's header is 512 bytes)."""
    return split_message(frame, PIECE + 512)


def _chunk(index: int, count: int, piece: bytes) -> bytes:
    """The first piece of a new transfer of `count` pieces, as an attacker would send it and never finish."""
    header = ChunkHeader(transfer_id=new_id(), index=index, count=count,
                         total_bytes=count * len(piece)).model_dump_json().encode()
    return CHUNK_MAGIC + struct.pack("<I", len(header)) + header + piece


def _flood(reassembler: Reassembler, senders: int) -> list[FrameError]:
    refused = []
    for i in range(senders):
        try:
            reassembler.feed(f"tierfl/v1/f/up/invented-{i}", _chunk(0, 16, b"\0" * PIECE))
        except FrameError as exc:
            refused.append(exc)
        assert reassembler.pending_bytes <= BUDGET
    return refused


def test_many_invented_senders_do_not_evict_an_honest_half_done_upload() -> None:
    """300 senders of one 64 KiB piece each evicted a 640 KiB half-done upload under a 16 MiB budget."""
    frame = _frame(1280 << 10)
    honest = _pieces(frame)
    assert len(honest) > 19
    reassembler = Reassembler(max_pending_bytes=BUDGET)
    half = len(honest) // 2
    assert [reassembler.feed("tierfl/v1/f/up/honest", p) for p in honest[:half]] == [None] * half
    refused = _flood(reassembler, 300)
    done = [out for p in honest[half:] if (out := reassembler.feed("tierfl/v1/f/up/honest", p)) is not None]
    assert done == [frame]
    assert refused and all(exc.reason is RejectReason.OVERSIZE for exc in refused)  # the crowd waited for room


def test_a_transfer_opened_while_the_budget_is_full_waits_and_older_ones_finish() -> None:
    """Youngest gives way: the newest transfer is refused, no older one is evicted, room comes back as they finish."""
    reassembler = Reassembler(max_pending_bytes=4 * PIECE, max_transfers=1024)
    frame = _frame(3 * PIECE)
    first, second = _pieces(frame), _pieces(_frame(3 * PIECE))
    reassembler.feed("up/a", first[0])
    reassembler.feed("up/b", second[0])
    reassembler.feed("up/a", first[1])
    reassembler.feed("up/b", second[1])  # the budget is full: 4 pieces held
    with pytest.raises(FrameError) as err:
        reassembler.feed("up/c", _chunk(0, 4, b"\0" * PIECE))
    assert err.value.reason is RejectReason.OVERSIZE and reassembler.pending_transfers == 2
    # "a" is older than "b": a's next piece makes "b", the youngest, give way
    assert reassembler.feed("up/a", first[2]) is None and reassembler.pending_transfers == 1
    assert [out for p in first[3:] if (out := reassembler.feed("up/a", p)) is not None] == [frame]
    assert reassembler.pending_bytes == 0


def test_the_transfer_budget_refuses_the_newcomer_not_the_oldest() -> None:
    reassembler = Reassembler(max_transfers=3)
    frame = _frame(3 * PIECE)
    honest = _pieces(frame)
    reassembler.feed("up/honest", honest[0])
    _flood(reassembler, 10)
    assert reassembler.pending_transfers == 3
    assert [out for p in honest[1:] if (out := reassembler.feed("up/honest", p)) is not None] == [frame]


def test_unadmitted_sources_get_no_reassembly_room() -> None:
    """With an admission check (the aggregator's: known devices only), invented senders hold nothing."""
    known = {"tierfl/v1/f/up/honest"}
    reassembler = Reassembler(max_pending_bytes=BUDGET, admit=known.__contains__)
    frame = _frame(1280 << 10)
    honest = _pieces(frame)
    reassembler.feed("tierfl/v1/f/up/honest", honest[0])
    refused = _flood(reassembler, 300)
    assert len(refused) == 300 and {exc.reason for exc in refused} == {RejectReason.UNKNOWN_DEVICE}
    assert reassembler.pending_transfers == 1
    assert [out for p in honest[1:] if (out := reassembler.feed("tierfl/v1/f/up/honest", p)) is not None] == [frame]
    assert reassembler.feed("tierfl/v1/f/up/invented-1", frame) == frame  # a whole frame holds no room
