"""Frames, chunking and topics: round trips and every refusal."""

import hashlib
import json
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.chunking import CHUNK_MAGIC, MIN_PIECE_BYTES, ChunkHeader, Reassembler, split_message
from protocol.frame import MAGIC, FrameError, decode_frame, encode_frame
from protocol.messages import Fetch, Hello, RejectReason, Status, Update, new_id
from protocol.topics import Topics


def _update_frame(tensors):
    body = Update(update_id=new_id(), round=3, base_version=2, tier="a", num_samples=50, steps=4,
                  train_loss=0.5, train_accuracy=0.8, train_seconds=0.1)
    return encode_frame("fleet1", "dev-1", body, tensors)


def _reencode(frame: bytes, mutate) -> bytes:
    """Edit a frame's JSON header and re-serialise it with a correct prefix."""
    (header_len,) = struct.unpack_from("<I", frame, 4)
    header = json.loads(frame[8 : 8 + header_len])
    mutate(header)
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + frame[8 + header_len :]


def test_round_trip_keeps_tensors_and_body():
    tensors = {"fc1.weight": np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32),
               "fc1.bias": np.zeros(5, np.float32)}
    frame = decode_frame(_update_frame(tensors))
    assert frame.header.fleet == "fleet1" and frame.header.sender == "dev-1"
    assert isinstance(frame.body, Update) and frame.body.round == 3
    for name, value in tensors.items():
        np.testing.assert_array_equal(frame.tensors[name], value)
        assert frame.tensors[name].dtype == np.float32


@pytest.mark.parametrize(
    "cut,reason", [(3, RejectReason.MALFORMED), (20, RejectReason.MALFORMED), (-4, RejectReason.MALFORMED)]
)
def test_truncated_frames_are_refused(cut, reason):
    data = _update_frame({"w": np.ones(10, np.float32)})
    with pytest.raises(FrameError) as err:
        decode_frame(data[:cut])
    assert err.value.reason == reason


def test_flipped_payload_byte_fails_hash():
    data = bytearray(_update_frame({"w": np.ones(10, np.float32)}))
    data[-1] ^= 0xFF
    with pytest.raises(FrameError) as err:
        decode_frame(bytes(data))
    assert err.value.reason == RejectReason.BAD_HASH


def test_nan_is_refused_even_with_a_correct_hash():
    data = _update_frame({"w": np.array([1.0, np.nan], np.float32)})
    with pytest.raises(FrameError) as err:
        decode_frame(data)
    assert err.value.reason == RejectReason.BAD_TENSOR and "NaN" in err.value.detail


def test_shape_that_disagrees_with_bytes_is_refused():
    data = _reencode(_update_frame({"w": np.ones(10, np.float32)}), lambda h: h["tensors"][0].update(shape=[11]))
    with pytest.raises(FrameError) as err:
        decode_frame(data)
    assert err.value.reason == RejectReason.BAD_TENSOR


def test_unknown_codec_and_unknown_kind_are_refused():
    data = _reencode(_update_frame({"w": np.ones(4, np.float32)}), lambda h: h["tensors"][0].update(codec="zip"))
    with pytest.raises(FrameError, match="unknown codec"):
        decode_frame(data)
    data = _reencode(_update_frame({}), lambda h: h["body"].update(kind="rm -rf"))
    with pytest.raises(FrameError) as err:
        decode_frame(data)
    assert err.value.reason == RejectReason.MALFORMED


def test_extra_fields_and_bad_ids_are_refused():
    with pytest.raises(FrameError):
        decode_frame(_reencode(_update_frame({}), lambda h: h["body"].update(admin=True)))
    with pytest.raises(FrameError):
        decode_frame(_reencode(_update_frame({}), lambda h: h.update(sender="../../etc")))


def test_oversize_frame_is_refused_before_parsing():
    data = _update_frame({"w": np.ones(1000, np.float32)})
    with pytest.raises(FrameError) as err:
        decode_frame(data, max_bytes=1000)
    assert err.value.reason == RejectReason.OVERSIZE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_escape_as_anything_but_frame_error(data):
    for payload in (data, MAGIC + data):
        try:
            decode_frame(payload)
        except FrameError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=255))
def test_any_single_byte_corruption_is_refused_or_harmless(position, value):
    data = bytearray(_update_frame({"w": np.arange(16, dtype=np.float32)}))
    position %= len(data)
    if data[position] == value:
        return
    data[position] = value
    try:
        frame = decode_frame(bytes(data))
    except FrameError:
        return
    # The sha256 guards the tensor bytes; a header change that still validates (a renamed tensor,
    # another message id) is caught downstream by the receiver's name, shape and round checks.
    (values,) = frame.tensors.values()
    np.testing.assert_array_equal(values, np.arange(16, dtype=np.float32))


def test_chunked_frame_reassembles_in_any_order():
    frame = _update_frame({"w": np.random.default_rng(1).standard_normal(5000).astype(np.float32)})
    parts = split_message(frame, max_message_bytes=2048)
    assert len(parts) > 5 and all(len(p) <= 2048 for p in parts)
    reassembler = Reassembler()
    results = [reassembler.feed("dev-1", p) for p in reversed(parts)]
    assert results[:-1] == [None] * (len(parts) - 1) and results[-1] == frame
    assert reassembler.pending_transfers == 0


def test_small_frame_is_one_message():
    frame = encode_frame("f", "d", Fetch(sha256=[hashlib.sha256(b"").hexdigest()]))
    assert split_message(frame, 1 << 20) == [frame]
    assert Reassembler().feed("d", frame) == frame


def test_corrupted_chunk_fails_the_payload_hash():
    frame = _update_frame({"w": np.ones(3000, np.float32)})
    parts = split_message(frame, 4096)
    bad = bytearray(parts[1])
    bad[-1] ^= 1
    parts[1] = bytes(bad)
    reassembler = Reassembler()
    (whole,) = [out for p in parts if (out := reassembler.feed("x", p)) is not None]
    assert whole != frame and len(whole) == len(frame)
    with pytest.raises(FrameError) as err:
        decode_frame(whole)
    assert err.value.reason == RejectReason.BAD_HASH


def test_a_chunked_frame_is_hashed_once_on_receipt(monkeypatch):
    frame = _update_frame({"w": np.random.default_rng(2).standard_normal(20_000).astype(np.float32)})
    parts = split_message(frame, 8192)
    hashed = []
    real_sha256 = hashlib.sha256

    def counting_sha256(data=b""):
        hashed.append(len(memoryview(data).cast("B")))
        return real_sha256(data)

    monkeypatch.setattr(hashlib, "sha256", counting_sha256)
    reassembler = Reassembler()
    (whole,) = [out for p in parts if (out := reassembler.feed("x", p)) is not None]
    decoded = decode_frame(whole)
    payload_bytes = sum(entry.nbytes for entry in decoded.header.tensors)
    assert hashed == [payload_bytes]


def test_a_payload_without_its_sha256_is_refused():
    data = _reencode(_update_frame({"w": np.ones(4, np.float32)}), lambda h: h.update(payload_sha256=None))
    with pytest.raises(FrameError) as err:
        decode_frame(data)
    assert err.value.reason == RejectReason.BAD_HASH and "without its sha256" in err.value.detail
    empty = _reencode(_update_frame({}), lambda h: h.update(payload_sha256=None))
    assert decode_frame(empty).tensors == {}


def test_reassembly_is_bounded_and_expires():
    frame = _update_frame({"w": np.ones(3000, np.float32)})
    parts = split_message(frame, 4096)
    with pytest.raises(FrameError) as err:
        Reassembler(max_frame_bytes=1000).feed("x", parts[0])
    assert err.value.reason == RejectReason.OVERSIZE
    with pytest.raises(FrameError) as err:
        Reassembler(max_pending_bytes=100).feed("x", parts[0])
    assert err.value.reason == RejectReason.OVERSIZE
    now = [0.0]
    reassembler = Reassembler(timeout_s=10, clock=lambda: now[0])
    reassembler.feed("x", parts[0])
    now[0] = 11.0
    reassembler.feed("y", parts[1])  # a new feed drops the stalled transfer of "x"
    assert reassembler.pending_transfers == 1


def _chunk(index: int, count: int, total: int, piece: bytes, transfer_id: str | None = None) -> bytes:
    """A chunk message built by hand, as a hostile publisher would."""
    header = ChunkHeader(transfer_id=transfer_id or new_id(), index=index, count=count,
                         total_bytes=total).model_dump_json().encode()
    return CHUNK_MAGIC + struct.pack("<I", len(header)) + header + piece


def test_one_flooding_sender_cannot_fail_another_senders_chunked_upload():
    """Issue 13 case 4: the pending budget was global, so a flooder made every honest chunked upload fail as oversize."""
    frame = _update_frame({"w": np.random.default_rng(3).standard_normal(20_000).astype(np.float32)})
    honest = split_message(frame, 8192)
    reassembler = Reassembler(max_frame_bytes=1 << 20, max_pending_bytes=2 << 20)
    piece = b"\0" * 4096
    got = None
    for step in range(4000):  # stalled transfers of 1 MiB frames from one topic and from 50 others, interleaved
        source = "up/evil" if step % 2 else f"up/evil-{step % 50}"
        try:
            reassembler.feed(source, _chunk(0, 256, 256 * 4096, piece))
        except FrameError as exc:
            assert exc.reason is RejectReason.OVERSIZE
        if step % 100 == 99 and step // 100 < len(honest):
            got = reassembler.feed("up/dev-1", honest[step // 100]) or got
        assert reassembler.pending_bytes <= 2 << 20
    assert got == frame


def test_empty_and_wrongly_sized_pieces_are_refused():
    """Issue 13 case 4: zero-byte pieces opened unlimited transfers; pieces must be equal and add up to the total."""
    reassembler = Reassembler()
    for _ in range(10_000):
        with pytest.raises(FrameError) as err:
            reassembler.feed("up/evil", _chunk(0, 3, 3000, b""))
        assert err.value.reason is RejectReason.MALFORMED
    assert reassembler.pending_transfers == 0
    bad = [
        _chunk(0, 2, 3000, b"x" * 1000),  # 2 pieces of 1000 cannot make 3000
        _chunk(1, 2, 3000, b"x" * 2000),  # the last piece larger than the others would be
        _chunk(0, 2, 3000, b"x" * 10),  # pieces below the minimum size
        _chunk(0, 1, 3000, b"x" * 2999),  # one piece that is not the whole frame
    ]
    for message in bad:
        with pytest.raises(FrameError) as err:
            reassembler.feed("up/evil", message)
        assert err.value.reason is RejectReason.MALFORMED
    tid = new_id()
    reassembler.feed("up/evil", _chunk(0, 3, 5000, b"x" * 2000, tid))
    with pytest.raises(FrameError, match="expected 2000"):
        reassembler.feed("up/evil", _chunk(1, 3, 5000, b"x" * 1999, tid))
    assert reassembler.pending_transfers == 0  # the refused piece dropped its transfer


def test_a_chunk_flood_stays_within_the_budgets():
    """Issue 13 case 4: tiny last pieces from many topics, under many transfer ids: transfers and bytes stay bounded."""
    reassembler = Reassembler(max_frame_bytes=1 << 20, max_pending_bytes=1 << 20, max_transfers=256)
    tracemalloc.start()
    try:
        for step in range(5000):
            try:
                reassembler.feed(f"up/evil-{step % 300}", _chunk(1, 2, MIN_PIECE_BYTES + 1, b"x"))
            except FrameError as exc:
                assert exc.reason is RejectReason.OVERSIZE
            assert reassembler.pending_transfers <= 256
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"a flood of 1-byte pieces traced {peak} bytes"


def test_a_redelivered_chunk_is_held_once():
    """MQTT QoS 1 may deliver a piece twice: it neither counts twice nor breaks the transfer."""
    frame = _update_frame({"w": np.ones(3000, np.float32)})
    parts = split_message(frame, 4096)
    reassembler = Reassembler()
    assert reassembler.feed("d", parts[0]) is None
    held = reassembler.pending_bytes
    assert reassembler.feed("d", parts[0]) is None and reassembler.pending_bytes == held
    assert [out for p in parts[1:] if (out := reassembler.feed("d", p)) is not None] == [frame]
    assert reassembler.pending_bytes == 0


def test_topics_and_device_parsing():
    topics = Topics("lab")
    assert topics.up("pi-1") == "tierfl/v1/lab/up/pi-1"
    assert topics.device_of("tierfl/v1/lab/up/pi-1") == "pi-1"
    assert topics.device_of("tierfl/v1/other/up/pi-1") is None
    assert topics.all_up("workers") == "$share/workers/tierfl/v1/lab/up/+"
    for bad in ("a/b", "+", "#", "", "x" * 65):
        with pytest.raises(ValueError):
            topics.up(bad)
    with pytest.raises(ValueError):
        Topics("lab/#")


def test_hello_and_status_validate():
    assert Hello(num_samples=10).tier is None
    assert decode_frame(encode_frame("f", "d", Status(online=False))).body.online is False
    with pytest.raises(ValueError):
        Hello(num_samples=-1)
