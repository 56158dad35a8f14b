"""Which aggregator key a device (or a relay, toward its parent) trusts: the one it was
given, or the one it pinned on first contact.

With `--aggregator-key` every downlink frame must be signed by that key. Without it the key
pinned in the cache folder (`aggregator.pub`) is used; with neither, the aggregator's first key
announcement (a Blob named `aggregator.pub`, signed by the key it carries) is pinned, with a loud
warning naming the key: trust on first use. Until a key is known every other frame is refused: the
aggregator signs everything and announces its key before it sends anything else.

Without the `cryptography` package (`verifiable=False`) no signature can be checked: the trust
says so once, refuses unsigned frames (the aggregator signs every frame) and takes signed ones
unchecked; a configured or pinned key then is an error, since it could not be honoured.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from protocol.atomic_file import atomic_write
from protocol.messages import FrameHeader, RejectReason
from protocol.signing import (KEY_ANNOUNCEMENT, PublicKeyHex, SignatureError, announced_key, parse_public_key,
                              read_key_file, verify_signature)

log = logging.getLogger(__name__)


class AggregatorTrust:
    """Verifies downlink frames against the aggregator's public key, pinning it on first use."""

    def __init__(self, folder: Path, configured: PublicKeyHex | None, option: str = "--aggregator-key",
                 verifiable: bool = True, durable: bool = True) -> None:
        """`durable=False`: the pinned key is written without fsync (a virtual device of `tierfl fleet`)."""
        self.pin_path = folder / KEY_ANNOUNCEMENT
        self.key: PublicKeyHex | None = configured
        self.option = option  # how the key is given explicitly, for the messages
        self.source = option if configured else str(self.pin_path)
        self.verifiable = verifiable  # False: no `cryptography` here, signatures cannot be checked
        self.durable = durable
        if configured is None and self.pin_path.is_file():
            self.key = parse_public_key(read_key_file(self.pin_path).decode(errors="replace"), str(self.pin_path))
        if not verifiable and self.key is not None:
            raise ValueError(f"verifying the aggregator's key (from {self.source}) needs the cryptography package "
                             "(pip install 'tierfl[signing]')")
        if not verifiable:
            log.warning("the cryptography package is missing: downlink frames (tasks, weights, artifact files, "
                        "rejects) are NOT checked against the aggregator's key, only refused when unsigned; anyone "
                        "who can publish on this device's downlink topic can give it work and files. Install it "
                        "(pip install 'tierfl[signing]') and pass %s", option)

    def verify(self, header: FrameHeader) -> None:
        """Raise SignatureError unless `header` is signed by the trusted key (refused too while none is known)."""
        if not self.verifiable:
            if header.signature is None:
                raise SignatureError(RejectReason.BAD_SIGNATURE, f"a frame from {header.sender} carries no signature")
            return
        if self.key is None:
            raise SignatureError(RejectReason.BAD_SIGNATURE,
                                 f"a frame from {header.sender} cannot be verified: no aggregator key is known yet "
                                 f"(none given with {self.option}, none pinned in {self.pin_path}); only the "
                                 "aggregator's key announcement is taken until then")
        try:
            verify_signature(header, self.key)
        except SignatureError as exc:
            raise SignatureError(exc.reason, f"{exc.detail} (trusted key {self.key[:16]}... from {self.source})") from None

    def announced(self, header: FrameHeader, data: np.ndarray | None) -> None:
        """Handle the aggregator's key announcement: pin its key if none is trusted yet; SignatureError if unusable."""
        public = announced_key(header, data)
        if self.key is not None:
            if public != self.key:
                raise SignatureError(RejectReason.BAD_SIGNATURE,
                                     f"the aggregator announces key {public}, not the trusted {self.key} from "
                                     f"{self.source}; if its key really changed, delete {self.pin_path} or pass "
                                     f"the new one with {self.option}")
            return
        self.pin_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.pin_path, lambda out: out.write(f'{{"aggregator": "{public}"}}\n'.encode()),
                     durable=self.durable)
        self.key, self.source = public, str(self.pin_path)
        log.warning("TRUST ON FIRST USE: pinned aggregator key %s in %s; from now on only frames signed by it are "
                    "accepted. Check it against `tierfl aggregator --show-key`, and pass it explicitly with "
                    "%s %s to trust nothing on first contact", public, self.pin_path, self.option, public)
