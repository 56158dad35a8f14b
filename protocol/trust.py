"""Which aggregator key a device (or an edge aggregator, toward its parent) trusts: the one it was
given, or the one it pinned on first contact.

With `--aggregator-key` every downlink frame must be signed by that key. Without it the key
pinned in the cache folder (`aggregator.pub`) is used; with neither, the aggregator's first key
announcement (a Blob named `aggregator.pub`, signed by the key it carries) is pinned, with a loud
warning naming the key: trust on first use. Until a key is known, frames are taken unverified
(an aggregator that does not sign yet), with a warning once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from protocol.atomic_file import atomic_write
from protocol.messages import FrameHeader, RejectReason
from protocol.signing import (KEY_ANNOUNCEMENT, PublicKeyHex, SignatureError, announced_key, parse_public_key,
                              verify_signature)

log = logging.getLogger(__name__)


class AggregatorTrust:
    """Verifies downlink frames against the aggregator's public key, pinning it on first use."""

    def __init__(self, folder: Path, configured: PublicKeyHex | None, option: str = "--aggregator-key") -> None:
        self.pin_path = folder / KEY_ANNOUNCEMENT
        self.key: PublicKeyHex | None = configured
        self.option = option  # how the key is given explicitly, for the messages
        self.source = option if configured else str(self.pin_path)
        if configured is None and self.pin_path.is_file():
            self.key = parse_public_key(self.pin_path.read_text(), str(self.pin_path))
        self._warned_unverified = False

    def verify(self, header: FrameHeader) -> None:
        """Raise SignatureError unless `header` is signed by the trusted key (anything goes while none is known)."""
        if self.key is not None:
            try:
                verify_signature(header, self.key)
            except SignatureError as exc:
                raise SignatureError(exc.reason, f"{exc.detail} (trusted key {self.key[:16]}... from {self.source})") from None
        elif not self._warned_unverified:
            log.warning("downlink frames are NOT verified: no aggregator key is known yet (none given with "
                        "%s, none pinned in %s); pass `tierfl aggregator --show-key`'s output with %s",
                        self.option, self.pin_path, self.option)
            self._warned_unverified = True

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
        atomic_write(self.pin_path, lambda out: out.write(f'{{"aggregator": "{public}"}}\n'.encode()))
        self.key, self.source = public, str(self.pin_path)
        log.warning("TRUST ON FIRST USE: pinned aggregator key %s in %s; from now on only frames signed by it are "
                    "accepted. Check it against `tierfl aggregator --show-key`, and pass it explicitly with "
                    "%s %s to trust nothing on first contact", public, self.pin_path, self.option, public)
