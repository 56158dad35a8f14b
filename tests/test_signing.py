"""Ed25519 signatures on frames: what verifies, and every way a frame is refused."""

from __future__ import annotations

import json
import stat
import struct

import numpy as np
import pytest

from protocol.frame import decode_frame, encode_frame
from protocol.messages import RejectReason, Update, new_id
from protocol.signing import KEY_FILE, DeviceKey, EnrolledKeys, SignatureCheck, SignatureError


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
