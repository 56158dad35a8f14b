"""Per-device Ed25519 signatures on frames, so a spoofed update is refused even behind a misconfigured broker.

A device keeps its private key in its state folder (`device.key`, PEM, mode 0600, written atomically) and signs
every frame it sends. The operator enrols the device's public key on the aggregator (a JSON file
of device id -> hex public key, `tierfl aggregator --enrolled FILE`); from then on a frame from
that device must carry a valid signature by that key. What is signed is the frame header as JSON
with the signature left out: it names the fleet, sender, message id, body and the payload's
sha256, which the decoder checks against the tensor bytes.

The aggregator signs what it sends the same way, with `aggregator.key` in its state folder. A
device given its public key (`tierfl client --aggregator-key`) verifies every downlink frame
against it; without one it pins the key of the aggregator's first key announcement (a Blob named
`aggregator.pub` carrying the 32-byte key, signed by that key) in its cache folder: trust on first use.

The `cryptography` package is imported only here and only when keys are used, so a device
without it can still join a fleet that does not require signatures.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import ConfigDict, Field, RootModel, ValidationError

from protocol.atomic_file import atomic_write
from protocol.messages import Blob, FrameHeader, RejectReason

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_FILE = "device.key"
AGGREGATOR_KEY_FILE = "aggregator.key"
KEY_ANNOUNCEMENT = "aggregator.pub"  # the name of the Blob that announces the aggregator's public key
PublicKeyHex = str
_PUBLIC_HEX = re.compile(r"^[0-9a-f]{64}$")


class SignatureError(ValueError):
    """A frame's sender is not enrolled, or its signature is missing or made by another key."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def signed_bytes(header: FrameHeader) -> bytes:
    """The bytes a signature covers: the header's JSON without its signature."""
    return header.model_copy(update={"signature": None}).model_dump_json().encode()


def verify_signature(header: FrameHeader, public: PublicKeyHex) -> None:
    """Raise SignatureError(BAD_SIGNATURE) unless `header` carries a valid signature by `public`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if header.signature is None:
        raise SignatureError(RejectReason.BAD_SIGNATURE, f"a frame from {header.sender} carries no signature")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(bytes.fromhex(header.signature),
                                                                          signed_bytes(header))
    except (InvalidSignature, ValueError):
        raise SignatureError(RejectReason.BAD_SIGNATURE,
                             f"the signature of a frame from {header.sender} does not match its key") from None


def parse_public_key(text: str, where: str) -> PublicKeyHex:
    """A hex Ed25519 public key from `text`: bare hex, or JSON {"<name>": "<hex>"} as --show-key prints it."""
    text = text.strip()
    if text.startswith("{"):
        try:
            values = list(json.loads(text).values())
        except (ValueError, AttributeError):
            raise ValueError(f"{where}: not a JSON object of one key") from None
        if len(values) != 1 or not isinstance(values[0], str):
            raise ValueError(f"{where}: expected one entry, as `tierfl aggregator --show-key` prints")
        text = values[0]
    if not _PUBLIC_HEX.fullmatch(text.lower()):
        raise ValueError(f"{where}: not 64 hex digits (an Ed25519 public key)")
    return text.lower()


MAX_KEY_FILE_BYTES = 4096  # a PEM private key or a public key's hex or JSON is a few hundred bytes


def read_key_file(path: Path) -> bytes:
    """The bytes of a key file, read only up to MAX_KEY_FILE_BYTES; KeyFileError naming a larger file."""
    with open(path, "rb") as file:
        content = file.read(MAX_KEY_FILE_BYTES + 1)
    if len(content) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: over {MAX_KEY_FILE_BYTES} bytes, so no key file: point the option at the key")
    return content


def read_public_key(value: str, option: str = "--aggregator-key") -> PublicKeyHex:
    """An aggregator's key option: 64 hex digits, or a file holding them (bare, or the JSON of --show-key)."""
    if _PUBLIC_HEX.fullmatch(value.lower()):
        return value.lower()
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"{option} {value!r} is neither 64 hex digits nor a file")
    return parse_public_key(read_key_file(path).decode(errors="replace"), str(path))


def key_announcement(key: DeviceKey) -> tuple[Blob, dict[str, np.ndarray]]:
    """The Blob body and tensors announcing `key`'s public half; sent signed by that same key."""
    public = bytes.fromhex(key.public_hex)
    return Blob(sha256=hashlib.sha256(public).hexdigest(), name=KEY_ANNOUNCEMENT), {
        "data": np.frombuffer(public, np.uint8).copy()}


def announced_key(header: FrameHeader, data: np.ndarray | None) -> PublicKeyHex:
    """The public key a key announcement carries, once checked to have signed the announcement itself.

    Raises SignatureError when it is not a well-formed announcement signed by the key it carries.
    """
    body = header.body
    if not isinstance(body, Blob) or body.name != KEY_ANNOUNCEMENT or data is None or data.dtype != np.uint8 \
            or data.size != 32 or hashlib.sha256(data.tobytes()).hexdigest() != body.sha256:
        raise SignatureError(RejectReason.MALFORMED, "not a key announcement of 32 bytes matching its sha256")
    public = data.tobytes().hex()
    verify_signature(header, public)
    return public


class KeyFileError(ValueError):
    """A private key file that cannot be read as an Ed25519 key: names the file and the way out."""


class DeviceKey:
    """An Ed25519 key pair (a device's, or the aggregator's as `aggregator.key`), created on first use and kept on disk.

    A new key is written atomically with mode 0600 and never over an existing file (two processes
    starting at once end up with the same key); a file that does not hold a key is KeyFileError.
    """

    def __init__(self, folder: Path, file_name: str = KEY_FILE) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        path = folder / file_name
        if not path.exists():
            key = Ed25519PrivateKey.generate()
            folder.mkdir(parents=True, exist_ok=True)
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            try:
                atomic_write(path, lambda out: out.write(pem), mode=0o600, exclusive=True)
            except FileExistsError:  # another process made it meanwhile: use that one
                key = _load_private_key(path)
        else:
            key = _load_private_key(path)
        self._key = key
        self.public_hex: PublicKeyHex = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()

    def sign(self, header: FrameHeader) -> str:
        """Hex signature of `header` (over signed_bytes)."""
        return self._key.sign(signed_bytes(header)).hex()

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The Ed25519 private key, for signing what is not a frame (secure aggregation's key advertisements)."""
        return self._key


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in `path`; KeyFileError naming the file and what to do when it holds none."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    content = read_key_file(path)
    try:
        key = serialization.load_pem_private_key(content, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if isinstance(key, Ed25519PrivateKey):
        return key
    if path.name == AGGREGATOR_KEY_FILE:
        after = ("devices that know the old key (--aggregator-key, or their pinned aggregator.pub) then refuse the "
                 "aggregator until given the new one (`tierfl aggregator --show-key`)")
    else:
        after = "enrol its new public key again (`--show-key`) wherever the old one was enrolled"
    raise KeyFileError(f"{path} does not hold an unencrypted Ed25519 private key in PEM ({len(content)} bytes: "
                       f"truncated, changed or another kind of key); restore it from a backup, or move it aside to "
                       f"make a new key on the next start and {after}")


class EnrolledKeys(RootModel[dict[str, PublicKeyHex]]):
    """The enrolment file: device id -> hex Ed25519 public key (32 bytes)."""

    root: dict[str, str] = Field(default_factory=dict)
    model_config = ConfigDict(frozen=True)

    @classmethod
    def load(cls, path: Path) -> EnrolledKeys:
        """Read and check an enrolment file (--enrolled, a coordinator's --workers); ValueError naming it if bad."""
        try:
            keys = cls.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise ValueError(f"{path} is not JSON of id -> hex Ed25519 public key ({exc.errors()[0]['msg']})") from None
        for device, public in keys.root.items():
            if len(public) != 64 or any(c not in "0123456789abcdef" for c in public):
                raise ValueError(f"{path}: the key of {device!r} is not 64 hex digits (an Ed25519 public key)")
        return keys


class SignatureCheck:
    """Verifies frames against the enrolled keys."""

    def __init__(self, keys: Mapping[str, PublicKeyHex]) -> None:
        self.keys = dict(keys)

    def verify(self, header: FrameHeader) -> None:
        """Raise SignatureError unless `header` is signed by its sender's enrolled key."""
        public = self.keys.get(header.sender)
        if public is None:
            raise SignatureError(RejectReason.NOT_ENROLLED, f"{header.sender} is not enrolled on this aggregator")
        verify_signature(header, public)
