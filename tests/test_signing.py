"""Ed25519 signatures on frames: what verifies, and every way a frame is refused."""

from __future__ import annotations

import json
import stat
import struct

import numpy as np
import pytest

from protocol.frame import decode_frame, encode_frame
from protocol.messages import RejectReason, Update, new_id
from protocol.signing import (AGGREGATOR_KEY_FILE, KEY_FILE, DeviceKey, EnrolledKeys, SignatureCheck, SignatureError,
                              announced_key, key_announcement, read_public_key, verify_signature)


def _update(samples: int = 10) -> Update:
    return Update(update_id="0" * 32, round=1, base_version=0, tier="a", num_samples=samples, steps=1, train_loss=1.0,
                  train_accuracy=0.5, train_seconds=0.1)


def _refusal(check: SignatureCheck, frame: bytes) -> RejectReason | None:
    try:
        check.verify(decode_frame(frame).header)
    except SignatureError as exc:
        return exc.reason
    return None


def test_signed_frames_verify_and_every_forgery_is_refused(tmp_path):
    alice, mallory = DeviceKey(tmp_path / "alice"), DeviceKey(tmp_path / "mallory")
    check = SignatureCheck({"alice": alice.public_hex})
    tensors = {"w": np.ones(4, np.float32)}
    signed = encode_frame("f", "alice", _update(), tensors, signer=alice.sign)
    assert _refusal(check, signed) is None
    assert _refusal(check, encode_frame("f", "alice", _update(), tensors)) is RejectReason.BAD_SIGNATURE  # unsigned
    assert _refusal(check, encode_frame("f", "alice", _update(), tensors, signer=mallory.sign)) is RejectReason.BAD_SIGNATURE
    assert _refusal(check, encode_frame("f", "mallory", _update(), tensors, signer=mallory.sign)) is RejectReason.NOT_ENROLLED
    # Alice's signature on a header whose body was changed afterwards (a bigger sample count).
    (length,) = struct.unpack_from("<I", signed, 4)
    header = json.loads(signed[8 : 8 + length])
    header["body"]["num_samples"] = 10_000
    raw = json.dumps(header).encode()
    tampered = signed[:4] + struct.pack("<I", len(raw)) + raw + signed[8 + length:]
    assert _refusal(check, tampered) is RejectReason.BAD_SIGNATURE


def test_keys_persist_privately_and_enrolment_files_are_checked(tmp_path):
    key = DeviceKey(tmp_path)
    assert DeviceKey(tmp_path).public_hex == key.public_hex  # the same key on the next start
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    good = tmp_path / "enrolled.json"
    good.write_text(json.dumps({"alice": key.public_hex}))
    assert EnrolledKeys.load(good).root == {"alice": key.public_hex}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"alice": "abc"}))
    with pytest.raises(ValueError, match="not 64 hex digits"):
        EnrolledKeys.load(bad)


def test_a_new_message_id_cannot_reuse_a_signature(tmp_path):
    alice = DeviceKey(tmp_path)
    frame = decode_frame(encode_frame("f", "alice", _update(), None, signer=alice.sign))
    replayed = frame.header.model_copy(update={"msg_id": new_id()})
    with pytest.raises(SignatureError):
        SignatureCheck({"alice": alice.public_hex}).verify(replayed)


def test_the_aggregator_key_is_read_as_hex_or_from_its_show_key_file(tmp_path):
    key = DeviceKey(tmp_path, file_name=AGGREGATOR_KEY_FILE)
    as_json, bare = tmp_path / "agg.json", tmp_path / "agg.hex"
    as_json.write_text(json.dumps({"aggregator": key.public_hex}))
    bare.write_text(key.public_hex.upper() + "\n")
    assert read_public_key(key.public_hex) == read_public_key(str(as_json)) == read_public_key(str(bare)) == key.public_hex
    (tmp_path / "two.json").write_text(json.dumps({"a": key.public_hex, "b": key.public_hex}))
    for bad, message in (("abc", "neither 64 hex digits nor a file"), (str(tmp_path / "two.json"), "expected one entry")):
        with pytest.raises(ValueError, match=message):
            read_public_key(bad)


def test_a_key_announcement_must_be_signed_by_the_key_it_carries(tmp_path):
    aggregator, mallory = DeviceKey(tmp_path / "agg"), DeviceKey(tmp_path / "mallory")
    body, tensors = key_announcement(aggregator)
    frame = decode_frame(encode_frame("f", "aggregator", body, tensors, "uint8", signer=aggregator.sign))
    assert announced_key(frame.header, frame.tensors["data"]) == aggregator.public_hex
    forged = decode_frame(encode_frame("f", "aggregator", body, tensors, "uint8", signer=mallory.sign))
    with pytest.raises(SignatureError) as caught:
        announced_key(forged.header, forged.tensors["data"])
    assert caught.value.reason is RejectReason.BAD_SIGNATURE
    verify_signature(frame.header, aggregator.public_hex)  # the one check the aggregator and devices share
