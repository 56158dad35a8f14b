"""Ed25519 signatures on frames: what verifies, and every way a frame is refused."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protocol import atomic_file
from protocol.frame import decode_frame, encode_frame
from protocol.messages import RejectReason, Update, new_id
from protocol.signing import (AGGREGATOR_KEY_FILE, KEY_FILE, DeviceKey, EnrolledKeys, KeyFileError, SignatureCheck,
                              SignatureError, announced_key, key_announcement, read_public_key, verify_signature)


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


def _key_events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the file system sees while a key is written: file fsyncs, renames or links, folder fsyncs."""
    events: list[str] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(f"rename to {Path(dst).name}")
        real_replace(src, dst)

    def link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(f"link to {Path(dst).name}")
        real_link(src, dst)

    monkeypatch.setattr(atomic_file.os, "fsync", fsync)
    monkeypatch.setattr(atomic_file.os, "replace", replace)
    monkeypatch.setattr(atomic_file.os, "link", link)
    return events


@pytest.mark.parametrize("file_name", [KEY_FILE, AGGREGATOR_KEY_FILE])
def test_a_new_key_is_written_atomically_with_mode_0600_whatever_the_umask(tmp_path, monkeypatch, file_name):
    events = _key_events(monkeypatch)
    old = os.umask(0)
    try:
        key = DeviceKey(tmp_path, file_name=file_name)
    finally:
        os.umask(old)
    assert events == ["fsync file", f"link to {file_name}", "fsync folder"]  # complete before it has its name
    assert stat.S_IMODE((tmp_path / file_name).stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [file_name]  # no temporary file left
    assert DeviceKey(tmp_path, file_name=file_name).public_hex == key.public_hex


def test_a_key_made_meanwhile_by_another_process_is_used_not_overwritten(tmp_path, monkeypatch):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = DeviceKey(tmp_path / "other")
    real_generate = Ed25519PrivateKey.generate

    def racing() -> Ed25519PrivateKey:  # another process writes its key between our check and our write
        (tmp_path / "me").mkdir()
        shutil.copy(tmp_path / "other" / KEY_FILE, tmp_path / "me" / KEY_FILE)
        return real_generate()

    monkeypatch.setattr(Ed25519PrivateKey, "generate", staticmethod(racing))
    assert DeviceKey(tmp_path / "me").public_hex == other.public_hex


def _pem(tmp_path: Path) -> bytes:
    DeviceKey(tmp_path / "source")
    return (tmp_path / "source" / KEY_FILE).read_bytes()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "encrypted", "not ed25519"])
@pytest.mark.parametrize("file_name", [KEY_FILE, AGGREGATOR_KEY_FILE])
def test_a_corrupt_key_file_is_one_clear_error_naming_the_file_and_the_way_out(tmp_path, damage, file_name):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path / "state"
    folder.mkdir()
    pem = _pem(tmp_path)
    content = {
        "empty": b"",
        "truncated": pem[: len(pem) // 2],
        "garbage": b"\x00\xff" * 40,
        "encrypted": serialization.load_pem_private_key(pem, None).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")),
        "not ed25519": ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }[damage]
    (folder / file_name).write_bytes(content)
    with pytest.raises(KeyFileError) as caught:
        DeviceKey(folder, file_name=file_name)
    message = str(caught.value)
    assert str(folder / file_name) in message and f"({len(content)} bytes" in message
    assert "restore it from a backup, or move it aside" in message
    assert ("--aggregator-key" if file_name == AGGREGATOR_KEY_FILE else "enrol its new public key") in message
    assert (folder / file_name).read_bytes() == content  # left as it was, for the operator


def test_the_client_reports_a_truncated_device_key_in_one_line(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / KEY_FILE).write_bytes(_pem(tmp_path)[:40])
    result = subprocess.run([sys.executable, "-m", "tierfl.cli", "client", "--device-id", "pi-1", "--cache-dir",
                             str(cache), "--show-key"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TIERFL_LOG_FORMAT": "text"})
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"tierfl client: error: {cache / KEY_FILE} does not hold")


def test_a_key_option_pointing_at_a_large_file_is_refused_without_reading_it_whole(tmp_path):
    from protocol.signing import MAX_KEY_FILE_BYTES, KeyFileError, read_public_key

    big = tmp_path / "not-a-key.bin"
    big.write_bytes(b"0" * (MAX_KEY_FILE_BYTES * 1000))
    with pytest.raises(KeyFileError, match="not-a-key.bin: over 4096 bytes"):
        read_public_key(str(big))
