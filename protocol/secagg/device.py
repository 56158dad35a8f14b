"""A device's side of one secure round (protocol.secagg.messages): advertise keys, share them, mask the input, unmask."""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import ValidationError

from protocol.secagg import shamir
from protocol.secagg.masks import add_mask, agree_key, block_overlap, pair_sign, public_key_hex
from protocol.secagg.messages import (AdvertiseKeys, EncryptedShares, KeyRoster, MaskedInput, Phase, SecAggError,
                                      SecAggParams, Shape, ShareDelivery, ShareKeys, SharePlaintext, UnmaskRequest,
                                      UnmaskResponse, check_block_shapes, quantize, shamir_points, to_ring)
from protocol.secagg.wire import MaskedTensors


def _advert_bytes(advert: AdvertiseKeys, session: str) -> bytes:
    """What an advertisement's signature covers: a domain tag, the round attempt's session, all of it but the signature."""
    unsigned = advert.model_copy(update={"signature": None}).model_dump_json()
    return f"tierfl-secagg/v1/advertise/{session}/{unsigned}".encode()


def sign_advertisement(advert: AdvertiseKeys, key: Ed25519PrivateKey, session: str = "") -> AdvertiseKeys:
    """`advert` signed by the device's Ed25519 key for the round attempt `session`."""
    return advert.model_copy(update={"signature": key.sign(_advert_bytes(advert, session)).hex()})


def verify_advertisement(advert: AdvertiseKeys, keys: Mapping[str, str], session: str = "") -> None:
    """Raise SecAggError unless `advert` is signed, for `session`, by its device's key in `keys` (device -> public hex)."""
    public = keys.get(advert.device)
    if public is None:
        raise SecAggError(f"{advert.device} is not in the fleet's keys, so its keys cannot be verified")
    if advert.signature is None:
        raise SecAggError(f"the keys of {advert.device} are not signed (a device without a key, or a signature "
                          "stripped in transit)")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(
            bytes.fromhex(advert.signature), _advert_bytes(advert, session))
    except (InvalidSignature, ValueError):
        raise SecAggError(f"the signature on the keys of {advert.device} does not verify against its key in the "
                          "fleet's keys (keys substituted in transit, or replayed from another round)") from None


def _share_aad(round_number: int, sender: str, recipient: str) -> bytes:
    """The associated data binding a sealed share set to its round, sender and recipient."""
    return f"tierfl-secagg/v1/shares/{round_number}/{sender}/{recipient}".encode()


class SecAggDevice:
    """One device's side of one secure round; call its four steps in order, each once."""

    def __init__(self, device: str, params: SecAggParams, shapes: Mapping[str, Sequence[int]],
                 signing_key: Ed25519PrivateKey | None = None, enrolled: Mapping[str, str] | None = None,
                 session: str = "") -> None:
        """A device with tier blocks `shapes`; with `enrolled` (device -> Ed25519 public hex) every roster entry must be
        signed by its device's key for this round attempt (`session`)."""
        self.device = device
        self.params = params
        self.shapes: dict[str, Shape] = {name: tuple(int(n) for n in shape) for name, shape in shapes.items()}
        check_block_shapes(self.shapes, params, device)
        self._signing_key = signing_key
        self._enrolled = dict(enrolled) if enrolled is not None else None
        self._session = session
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._phase = Phase.ADVERTISE
        self._mine: AdvertiseKeys | None = None
        self._roster: dict[str, AdvertiseKeys] = {}
        self._point = 0  # my Shamir point, fixed by the roster
        self._b_seed = b""
        self._held: dict[str, SharePlaintext] = {}  # sender -> the shares it gave me (mine included)

    def _enter(self, phase: Phase, round_number: int) -> None:
        if self._phase is not phase:
            raise SecAggError(f"{self.device}: a {phase.value} step while in phase {self._phase.value}")
        if round_number != self.params.round:
            raise SecAggError(f"{self.device}: a message for round {round_number}, not {self.params.round}")

    def advertise(self) -> AdvertiseKeys:
        """Phase 1: my public keys and block shapes (signed when the device has a signing key)."""
        self._enter(Phase.ADVERTISE, self.params.round)
        advert = AdvertiseKeys(round=self.params.round, device=self.device, c_public=public_key_hex(self._c_key),
                               s_public=public_key_hex(self._s_key), shapes=self.shapes)
        if self._signing_key is not None:
            advert = sign_advertisement(advert, self._signing_key, self._session)
        self._mine = advert
        self._phase = Phase.SHARE_KEYS
        return advert

    def _check_roster(self, roster: KeyRoster) -> None:
        adverts = roster.devices
        names = [a.device for a in adverts]
        if len(set(names)) != len(names):
            raise SecAggError(f"{self.device}: the roster names a device twice")
        if not self.params.threshold <= len(adverts) <= self.params.max_devices:
            raise SecAggError(f"{self.device}: a roster of {len(adverts)} devices is outside "
                              f"[threshold {self.params.threshold}, max_devices {self.params.max_devices}]")
        keys = [a.c_public for a in adverts] + [a.s_public for a in adverts]
        if len(set(keys)) != len(keys):
            raise SecAggError(f"{self.device}: the roster reuses a public key")
        if self._mine not in adverts:
            raise SecAggError(f"{self.device}: the roster does not carry my own advertisement unchanged")
        for advert in adverts:
            if advert.round != self.params.round:
                raise SecAggError(f"{self.device}: roster entry of {advert.device} is for round {advert.round}")
            check_block_shapes(advert.shapes, self.params, advert.device)
            if self._enrolled is not None:
                try:
                    verify_advertisement(advert, self._enrolled, self._session)
                except SecAggError as exc:
                    raise SecAggError(f"{self.device}: refusing the roster: {exc}") from None

    def share_keys(self, roster: KeyRoster) -> ShareKeys:
        """Phase 2: shares of my self-mask seed and s private key, encrypted for each other device of the roster."""
        self._enter(Phase.SHARE_KEYS, roster.round)
        self._check_roster(roster)
        self._roster = {a.device: a for a in roster.devices}
        points = shamir_points(list(self._roster))
        self._point = points[self.device]
        self._b_seed = os.urandom(32)
        s_raw = self._s_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())
        order = list(points)
        b_shares = dict(zip(order, shamir.split(self._b_seed, self.params.threshold, [points[d] for d in order])))
        s_shares = dict(zip(order, shamir.split(s_raw, self.params.threshold, [points[d] for d in order])))
        encrypted = []
        for peer in order:
            plain = SharePlaintext(sender=self.device, recipient=peer, b_share=b_shares[peer], s_share=s_shares[peer])
            if peer == self.device:
                self._held[peer] = plain
                continue
            key = agree_key(self._c_key, self._roster[peer].c_public, "shares", self.params.round, self.device, peer)
            nonce = os.urandom(12)
            sealed = AESGCM(key).encrypt(nonce, plain.model_dump_json().encode(),
                                         _share_aad(self.params.round, self.device, peer))
            encrypted.append(EncryptedShares(sender=self.device, recipient=peer, nonce=nonce.hex(),
                                             ciphertext=sealed.hex()))
        self._phase = Phase.MASKED_INPUT
        return ShareKeys(round=self.params.round, device=self.device, shares=encrypted)

    def _open(self, sealed: EncryptedShares) -> SharePlaintext:
        sender = sealed.sender
        if sealed.recipient != self.device or sender not in self._roster or sender == self.device:
            raise SecAggError(f"{self.device}: a share from {sender!r} to {sealed.recipient!r} is not for me "
                              "or not from a roster device")
        key = agree_key(self._c_key, self._roster[sender].c_public, "shares", self.params.round, self.device, sender)
        try:
            plain = AESGCM(key).decrypt(bytes.fromhex(sealed.nonce), bytes.fromhex(sealed.ciphertext),
                                        _share_aad(self.params.round, sender, self.device))
        except InvalidTag:
            raise SecAggError(f"{self.device}: the shares from {sender} fail AES-GCM authentication "
                              "(tampered with, or encrypted under another key)") from None
        try:
            shares = SharePlaintext.model_validate_json(plain)
        except ValidationError as exc:
            raise SecAggError(f"{self.device}: the shares from {sender} do not parse: {exc}") from None
        if (shares.sender, shares.recipient) != (sender, self.device) or \
                any(s.x != self._point or s.threshold != self.params.threshold for s in (shares.b_share, shares.s_share)):
            raise SecAggError(f"{self.device}: the shares from {sender} are addressed or parameterised wrongly")
        return shares

    def mask(self, delivery: ShareDelivery, update: Mapping[str, np.ndarray], weight: float) -> MaskedTensors:
        """Phase 3: keep the delivered shares, then mask q(weight * update) with my self and pair masks.

        The masked ring integers ride beside the message as raw bytes, as a frame carries them (protocol.secagg.wire).
        """
        self._enter(Phase.MASKED_INPUT, delivery.round)
        if delivery.device != self.device:
            raise SecAggError(f"{self.device}: a share delivery addressed to {delivery.device}")
        if not (math.isfinite(weight) and weight > 0):
            raise SecAggError(f"{self.device}: weight {weight} is not a positive finite number")
        if set(update) != set(self.shapes):
            raise SecAggError(f"{self.device}: update tensors {sorted(update)} differ from {sorted(self.shapes)}")
        for name, shape in self.shapes.items():
            if tuple(np.shape(update[name])) != shape:
                raise SecAggError(f"{self.device}: update {name!r} has shape {np.shape(update[name])}, not my block {shape}")
        opened = [self._open(sealed) for sealed in delivery.shares]
        senders = [p.sender for p in opened]
        if len(set(senders)) != len(senders):
            raise SecAggError(f"{self.device}: the delivery carries two share sets from one device")
        if len(senders) + 1 < self.params.threshold:
            raise SecAggError(f"{self.device}: only {len(senders) + 1} devices shared keys, "
                              f"below the threshold {self.params.threshold}")
        self._held.update({p.sender: p for p in opened})
        masked = {name: to_ring(quantize(np.asarray(update[name], np.float64) * weight, self.params), self.params)
                  for name in self.shapes}
        add_mask(masked, self._b_seed, self.shapes, +1, self.params)
        for peer in senders:
            seed = agree_key(self._s_key, self._roster[peer].s_public, "mask", self.params.round, self.device, peer)
            block = {n: block_overlap(s, self._roster[peer].shapes[n]) for n, s in self.shapes.items()}
            add_mask(masked, seed, block, pair_sign(self.device, peer), self.params)
        self._phase = Phase.UNMASKING
        message = MaskedInput(round=self.params.round, device=self.device, weight=weight, tensors={})
        ring_bytes = {n: np.ascontiguousarray(a).reshape(-1).view(np.uint8) for n, a in masked.items()}
        return MaskedTensors.carrying(message, ring_bytes)

    def masked_input(self, delivery: ShareDelivery, update: Mapping[str, np.ndarray], weight: float) -> MaskedInput:
        """Phase 3 as one JSON document: `mask`'s message with the ring integers in base64 (no frame to carry them)."""
        masked = self.mask(delivery, update, weight)
        return MaskedInput(round=masked.round, device=masked.device, weight=masked.weight,
                           tensors={n: base64.b64encode(a.tobytes()).decode("ascii") for n, a in masked.ring_bytes.items()})

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Phase 4: b-shares of the survivors and s-shares of the dropped; refuses requests that would unmask an input."""
        self._enter(Phase.UNMASKING, request.round)
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = survivors & dropped
        if both:
            raise SecAggError(f"{self.device}: refusing to unmask: the request asks for both the self-mask share "
                              f"and the key share of {sorted(both)}, which would reveal their input")
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise SecAggError(f"{self.device}: refusing to unmask: the request lists a device twice")
        if survivors | dropped != set(self._held):
            raise SecAggError(f"{self.device}: refusing to unmask: survivors and dropped do not partition "
                              f"the devices that shared keys {sorted(self._held)}")
        if self.device not in survivors:
            raise SecAggError(f"{self.device}: refusing to unmask: I sent my masked input but am listed as dropped")
        if len(survivors) < self.params.threshold:
            raise SecAggError(f"{self.device}: refusing to unmask: {len(survivors)} survivors are below "
                              f"the threshold {self.params.threshold}")
        self._phase = Phase.DONE
        return UnmaskResponse(round=self.params.round, device=self.device,
                              b_shares={d: self._held[d].b_share for d in sorted(survivors)},
                              s_shares={d: self._held[d].s_share for d in sorted(dropped)})
