"""Per-device Ed25519 signatures on frames, so a spoofed update is refused even behind a misconfigured broker.

A device keeps its private key in its state folder (`device.key`, PEM, mode 0600) and signs
every frame it sends. The operator enrols the device's public key on the aggregator (a JSON file
of device id -> hex public key, `tierfl aggregator --enrolled FILE`); from then on a frame from
that device must carry a valid signature by that key. What is signed is the frame header as JSON
with the signature left out: it names the fleet, sender, message id, body and the payload's
sha256, which the decoder checks against the tensor bytes.

The `cryptography` package is imported only here and only when keys are used, so a device
without it can still join a fleet that does not require signatures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ConfigDict, Field, RootModel

from protocol.messages import FrameHeader, RejectReason

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_FILE = "device.key"
PublicKeyHex = str


class SignatureError(ValueError):
    """A frame's sender is not enrolled, or its signature is missing or made by another key."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def signed_bytes(header: FrameHeader) -> bytes:
    """The bytes a signature covers: the header's JSON without its signature."""
    return header.model_copy(update={"signature": None}).model_dump_json().encode()


class DeviceKey:
    """An Ed25519 key pair (a device's, or the aggregator's as `aggregator.key`), created on first use and kept on disk."""

    def __init__(self, folder: Path, file_name: str = KEY_FILE) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        path = folder / file_name
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 private key")
        else:
            key = Ed25519PrivateKey.generate()
            folder.mkdir(parents=True, exist_ok=True)
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as out:
                out.write(pem)
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


class EnrolledKeys(RootModel[dict[str, PublicKeyHex]]):
    """The enrolment file: device id -> hex Ed25519 public key (32 bytes)."""

    root: dict[str, str] = Field(default_factory=dict)
    model_config = ConfigDict(frozen=True)

    @classmethod
    def load(cls, path: Path) -> EnrolledKeys:
        """Read and check an enrolment file."""
        keys = cls.model_validate_json(path.read_bytes())
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
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        public = self.keys.get(header.sender)
        if public is None:
            raise SignatureError(RejectReason.NOT_ENROLLED, f"{header.sender} is not enrolled on this aggregator")
        if header.signature is None:
            raise SignatureError(RejectReason.BAD_SIGNATURE, f"a frame from {header.sender} carries no signature")
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(
                bytes.fromhex(header.signature), signed_bytes(header))
        except (InvalidSignature, ValueError):
            raise SignatureError(RejectReason.BAD_SIGNATURE,
                                 f"the signature of a frame from {header.sender} does not match its enrolled key") from None
