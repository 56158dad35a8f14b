"""Secure aggregation (Bonawitz et al., CCS 2017) for HeteroFL tiers, as network-free protocol logic.

The aggregator learns the sum of the devices' weighted updates and nothing else about any one
of them, even when some devices drop out mid-round. Four phases, each a pydantic message that
serializes to JSON (the transport is the caller's: MQTT later, `run_secure_round` in tests):

1. AdvertiseKeys: each device sends two fresh X25519 public keys (c for encrypting shares, s for
   pairwise masks) and its tier's block shapes; the aggregator broadcasts the KeyRoster (U1).
2. ShareKeys: each device draws a self-mask seed b and Shamir-shares b and its s private key
   (threshold t) among U1, each peer's pair of shares encrypted with AES-GCM under a key agreed
   from the c keys, so the aggregator routes them (ShareDelivery) without reading them (U2).
3. MaskedInput: y_u = q(w_u x_u) + PRG(b_u) + sum_{v in U2, v != u} +-PRG(s_uv) in Z_{2^k},
   where q is fixed-point quantization and s_uv = HKDF(X25519(s_u, s_v)) (+ if u < v, - if u > v).
   HeteroFL: device u holds the leading block of each global tensor; the pair mask of u and v
   covers the leading block of both shapes' element-wise minimum (the intersection of the two
   blocks, where both add it, so it cancels), the self mask covers the device's own block.
   The aggregator sums the masked inputs that arrive (U3).
4. Unmasking: each survivor reveals its b-shares of the devices in U3 and its s-shares of the
   devices in U2 \\ U3, never both kinds for one device (a request asking for that is refused).
   The aggregator rebuilds b_u (removing the self masks) and the dropped devices' s keys
   (removing the survivors' pair masks with them) and reads the sum in the clear.

No wrap-around: the sum of |q(w x)| over at most `max_devices` devices is kept below 2^(k-1) by
SecAggParams (max_devices * ceil(clip * 2^frac_bits) < 2^(k-1)); a device refuses to mask an
update with |w x| > clip. The weights w_u and tier shapes are public, so the per-element mass
(sum of w over the included devices holding an element) is public too and the mean is
sum / mass. Threat model: honest-but-curious aggregator and up to t - 1 colluding devices; an
active aggregator that substitutes public keys is stopped when the fleet enrols Ed25519 device
keys (`signing_key` / `enrolled`), but the cross-device consistency check of the paper's active
variant (signed survivor lists) is not implemented, so a lying aggregator can still tell
different devices different survivor sets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Literal

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.slicing import leading_slices
from protocol import shamir
from protocol.shamir import Share, ShamirError

log = logging.getLogger(__name__)

DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
TensorName = Annotated[str, Field(min_length=1, max_length=256)]
Shape = Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(min_length=1, max_length=8)]
KeyHex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
AGGREGATOR = "aggregator"  # the aggregator's name in WireMessage


class SecAggError(ValueError):
    """A secure-aggregation message or step refused, with the reason."""


class Phase(str, Enum):
    """The protocol's phases, named by the message a device sends in each."""

    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASKING = "unmasking"
    DONE = "done"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecAggParams(_Strict):
    """What every participant of one secure round agrees on beforehand."""

    round: Annotated[int, Field(ge=1)]
    threshold: Annotated[int, Field(ge=2)]  # shares needed to rebuild a secret; > half the devices is advised
    shapes: dict[TensorName, Shape]  # the global tensors' shapes
    ring_bits: Literal[32, 64] = 32
    frac_bits: Annotated[int, Field(ge=0, le=52)] = 16
    clip: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 64.0  # bound on |weight * update| per element
    max_devices: Annotated[int, Field(ge=2)] = 256

    @model_validator(mode="after")
    def _sum_never_wraps(self) -> SecAggParams:
        largest = self.max_devices * math.ceil(self.clip * 2**self.frac_bits)
        if largest >= 2 ** (self.ring_bits - 1):
            raise ValueError(f"{self.max_devices} devices x clip {self.clip} x 2^{self.frac_bits} can reach {largest}, "
                             f"which wraps the signed ring Z_2^{self.ring_bits}: lower clip, frac_bits or max_devices, "
                             "or use ring_bits=64")
        if self.threshold > self.max_devices:
            raise ValueError(f"threshold {self.threshold} exceeds max_devices {self.max_devices}")
        return self

    @property
    def dtype(self) -> np.dtype:
        """Little-endian unsigned integers of the ring Z_{2^ring_bits}."""
        return np.dtype("<u4" if self.ring_bits == 32 else "<u8")


class AdvertiseKeys(_Strict):
    """Device -> aggregator: my public keys and my tier's block shapes."""

    kind: Literal["secagg_advertise"] = "secagg_advertise"
    round: int
    device: DeviceId
    c_public: KeyHex  # X25519, for the keys that encrypt shares
    s_public: KeyHex  # X25519, for the pairwise mask seeds
    shapes: dict[TensorName, Shape]
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")] | None = None  # Ed25519 over the rest


class KeyRoster(_Strict):
    """Aggregator -> devices: every advertisement accepted for the round (U1)."""

    kind: Literal["secagg_roster"] = "secagg_roster"
    round: int
    devices: list[AdvertiseKeys]


class EncryptedShares(_Strict):
    """One sender's shares for one recipient, AES-GCM encrypted under their c-key agreement."""

    sender: DeviceId
    recipient: DeviceId
    nonce: Annotated[str, Field(pattern=r"^[0-9a-f]{24}$")]
    ciphertext: Annotated[str, Field(pattern=r"^([0-9a-f]{2})+$", max_length=65536)]


class ShareKeys(_Strict):
    """Device -> aggregator: my encrypted shares, one entry per other device of the roster."""

    kind: Literal["secagg_share_keys"] = "secagg_share_keys"
    round: int
    device: DeviceId
    shares: list[EncryptedShares]


class ShareDelivery(_Strict):
    """Aggregator -> device: the shares other devices (U2) encrypted for it."""

    kind: Literal["secagg_share_delivery"] = "secagg_share_delivery"
    round: int
    device: DeviceId
    shares: list[EncryptedShares]


class MaskedInput(_Strict):
    """Device -> aggregator: the masked quantized update (base64 ring integers per tensor) and its public weight."""

    kind: Literal["secagg_masked_input"] = "secagg_masked_input"
    round: int
    device: DeviceId
    weight: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    tensors: dict[TensorName, str]


class UnmaskRequest(_Strict):
    """Aggregator -> survivors: who sent a masked input (U3) and who dropped after sharing keys."""

    kind: Literal["secagg_unmask_request"] = "secagg_unmask_request"
    round: int
    survivors: list[DeviceId]
    dropped: list[DeviceId]


class UnmaskResponse(_Strict):
    """Survivor -> aggregator: b-shares of the survivors, s-shares of the dropped devices."""

    kind: Literal["secagg_unmask_response"] = "secagg_unmask_response"
    round: int
    device: DeviceId
    b_shares: dict[DeviceId, Share]
    s_shares: dict[DeviceId, Share]


class _SharePlaintext(_Strict):
    sender: DeviceId
    recipient: DeviceId
    b_share: Share
    s_share: Share


# ---------------------------------------------------------------- fixed point in Z_{2^k}

def quantize(values: np.ndarray, params: SecAggParams) -> np.ndarray:
    """Fixed-point integers round(values * 2^frac_bits) as int64; refuses |values| > clip or non-finite."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise SecAggError("the update holds NaN or Inf")
    worst = float(np.abs(values).max(initial=0.0))
    if worst > params.clip:
        raise SecAggError(f"|weight * update| reaches {worst:.6g}, above the agreed clip {params.clip}: "
                          "clip the update before masking it")
    return np.rint(values * 2.0**params.frac_bits).astype(np.int64)


def _to_ring(integers: np.ndarray, params: SecAggParams) -> np.ndarray:
    return integers.view(np.uint64).astype(params.dtype)  # two's complement, reduced mod 2^k


def _from_ring(ring: np.ndarray, params: SecAggParams) -> np.ndarray:
    signed = np.dtype("<i4" if params.ring_bits == 32 else "<i8")
    return ring.astype(params.dtype).view(signed).astype(np.int64)


# ---------------------------------------------------------------- key agreement and masks

def _public_hex(key: X25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _agree(private: X25519PrivateKey, public_hex: str, purpose: str, round_number: int, a: str, b: str) -> bytes:
    """A 32-byte key both ends of the pair (a, b) derive alike: HKDF-SHA256 of their X25519 secret."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)))
    except ValueError:  # a low-order point: the exchange would give a secret anyone can compute
        raise SecAggError(f"public key {public_hex[:16]}... is not a usable X25519 key") from None
    low, high = sorted((a, b))
    info = f"tierfl-secagg/v1/{purpose}/{round_number}/{low}/{high}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _prg(seed: bytes, name: str, shape: Shape, params: SecAggParams) -> np.ndarray:
    """Uniform ring elements for the leading `shape` block of tensor `name`: AES-256-CTR keyed by `seed`."""
    count = math.prod(shape)
    counter = hashlib.sha256(b"tierfl-secagg/v1/tensor/" + name.encode()).digest()[:8] + bytes(8)
    stream = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor().update(bytes(count * params.dtype.itemsize))
    return np.frombuffer(stream, dtype=params.dtype).reshape(shape)


def _overlap(a: Shape, b: Shape) -> Shape:
    return tuple(min(x, y) for x, y in zip(a, b))


def _add_mask(target: dict[str, np.ndarray], seed: bytes, block: Mapping[str, Shape], sign: int,
              params: SecAggParams) -> None:
    """target[name][leading block] += sign * PRG(seed) for every tensor (mod 2^k, in place)."""
    for name, shape in block.items():
        view = target[name][leading_slices(shape)]
        if sign > 0:
            view += _prg(seed, name, shape, params)
        else:
            view -= _prg(seed, name, shape, params)


def _pair_sign(me: str, peer: str) -> int:
    return 1 if me < peer else -1


def _check_shapes(shapes: Mapping[str, Shape], params: SecAggParams, who: str) -> None:
    if set(shapes) != set(params.shapes):
        raise SecAggError(f"{who}: tensors {sorted(shapes)} differ from the round's {sorted(params.shapes)}")
    for name, shape in shapes.items():
        full = params.shapes[name]
        if len(shape) != len(full) or any(s > f for s, f in zip(shape, full)):
            raise SecAggError(f"{who}: block {tuple(shape)} of {name!r} does not fit in the global shape {full}")


def _advert_bytes(advert: AdvertiseKeys) -> bytes:
    return advert.model_copy(update={"signature": None}).model_dump_json().encode()


def _points(devices: Sequence[str]) -> dict[str, int]:
    """Each device's Shamir point: its 1-based position in the sorted roster."""
    return {device: index + 1 for index, device in enumerate(sorted(devices))}


def _share_aad(round_number: int, sender: str, recipient: str) -> bytes:
    return f"tierfl-secagg/v1/shares/{round_number}/{sender}/{recipient}".encode()


# ---------------------------------------------------------------- device side

class SecAggDevice:
    """One device's side of one secure round; call its four steps in order, each once."""

    def __init__(self, device: str, params: SecAggParams, shapes: Mapping[str, Sequence[int]],
                 signing_key: Ed25519PrivateKey | None = None, enrolled: Mapping[str, str] | None = None) -> None:
        """A device with tier blocks `shapes`; with `enrolled` (device -> Ed25519 public hex) every roster entry must be signed."""
        self.device = device
        self.params = params
        self.shapes: dict[str, Shape] = {name: tuple(int(n) for n in shape) for name, shape in shapes.items()}
        _check_shapes(self.shapes, params, device)
        self._signing_key = signing_key
        self._enrolled = dict(enrolled) if enrolled is not None else None
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._phase = Phase.ADVERTISE
        self._mine: AdvertiseKeys | None = None
        self._roster: dict[str, AdvertiseKeys] = {}
        self._point = 0  # my Shamir point, fixed by the roster
        self._b_seed = b""
        self._held: dict[str, _SharePlaintext] = {}  # sender -> the shares it gave me (mine included)

    def _enter(self, phase: Phase, round_number: int) -> None:
        if self._phase is not phase:
            raise SecAggError(f"{self.device}: a {phase.value} step while in phase {self._phase.value}")
        if round_number != self.params.round:
            raise SecAggError(f"{self.device}: a message for round {round_number}, not {self.params.round}")

    def advertise(self) -> AdvertiseKeys:
        """Phase 1: my public keys and block shapes (signed when the device has a signing key)."""
        self._enter(Phase.ADVERTISE, self.params.round)
        advert = AdvertiseKeys(round=self.params.round, device=self.device, c_public=_public_hex(self._c_key),
                               s_public=_public_hex(self._s_key), shapes=self.shapes)
        if self._signing_key is not None:
            advert = advert.model_copy(update={"signature": self._signing_key.sign(_advert_bytes(advert)).hex()})
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
            _check_shapes(advert.shapes, self.params, advert.device)
            if self._enrolled is not None:
                self._verify_signature(advert)

    def _verify_signature(self, advert: AdvertiseKeys) -> None:
        public = self._enrolled.get(advert.device) if self._enrolled is not None else None
        if public is None or advert.signature is None:
            raise SecAggError(f"{self.device}: the keys of {advert.device} are not signed by an enrolled key")
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(
                bytes.fromhex(advert.signature), _advert_bytes(advert))
        except (InvalidSignature, ValueError):
            raise SecAggError(f"{self.device}: the signature on the keys of {advert.device} does not verify "
                              "(keys substituted in transit?)") from None

    def share_keys(self, roster: KeyRoster) -> ShareKeys:
        """Phase 2: shares of my self-mask seed and s private key, encrypted for each other device of the roster."""
        self._enter(Phase.SHARE_KEYS, roster.round)
        self._check_roster(roster)
        self._roster = {a.device: a for a in roster.devices}
        points = _points(list(self._roster))
        self._point = points[self.device]
        self._b_seed = os.urandom(32)
        s_raw = self._s_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())
        order = list(points)
        b_shares = dict(zip(order, shamir.split(self._b_seed, self.params.threshold, [points[d] for d in order])))
        s_shares = dict(zip(order, shamir.split(s_raw, self.params.threshold, [points[d] for d in order])))
        encrypted = []
        for peer in order:
            plain = _SharePlaintext(sender=self.device, recipient=peer, b_share=b_shares[peer], s_share=s_shares[peer])
            if peer == self.device:
                self._held[peer] = plain
                continue
            key = _agree(self._c_key, self._roster[peer].c_public, "shares", self.params.round, self.device, peer)
            nonce = os.urandom(12)
            sealed = AESGCM(key).encrypt(nonce, plain.model_dump_json().encode(),
                                         _share_aad(self.params.round, self.device, peer))
            encrypted.append(EncryptedShares(sender=self.device, recipient=peer, nonce=nonce.hex(),
                                             ciphertext=sealed.hex()))
        self._phase = Phase.MASKED_INPUT
        return ShareKeys(round=self.params.round, device=self.device, shares=encrypted)

    def _open(self, sealed: EncryptedShares) -> _SharePlaintext:
        sender = sealed.sender
        if sealed.recipient != self.device or sender not in self._roster or sender == self.device:
            raise SecAggError(f"{self.device}: a share from {sender!r} to {sealed.recipient!r} is not for me "
                              "or not from a roster device")
        key = _agree(self._c_key, self._roster[sender].c_public, "shares", self.params.round, self.device, sender)
        try:
            plain = AESGCM(key).decrypt(bytes.fromhex(sealed.nonce), bytes.fromhex(sealed.ciphertext),
                                        _share_aad(self.params.round, sender, self.device))
        except InvalidTag:
            raise SecAggError(f"{self.device}: the shares from {sender} fail AES-GCM authentication "
                              "(tampered with, or encrypted under another key)") from None
        try:
            shares = _SharePlaintext.model_validate_json(plain)
        except ValidationError as exc:
            raise SecAggError(f"{self.device}: the shares from {sender} do not parse: {exc}") from None
        if (shares.sender, shares.recipient) != (sender, self.device) or \
                any(s.x != self._point or s.threshold != self.params.threshold for s in (shares.b_share, shares.s_share)):
            raise SecAggError(f"{self.device}: the shares from {sender} are addressed or parameterised wrongly")
        return shares

    def masked_input(self, delivery: ShareDelivery, update: Mapping[str, np.ndarray], weight: float) -> MaskedInput:
        """Phase 3: keep the delivered shares, then mask q(weight * update) with my self and pair masks."""
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
        masked = {name: _to_ring(quantize(np.asarray(update[name], np.float64) * weight, self.params), self.params)
                  for name in self.shapes}
        _add_mask(masked, self._b_seed, self.shapes, +1, self.params)
        for peer in senders:
            seed = _agree(self._s_key, self._roster[peer].s_public, "mask", self.params.round, self.device, peer)
            block = {n: _overlap(s, self._roster[peer].shapes[n]) for n, s in self.shapes.items()}
            _add_mask(masked, seed, block, _pair_sign(self.device, peer), self.params)
        self._phase = Phase.UNMASKING
        return MaskedInput(round=self.params.round, device=self.device, weight=weight,
                           tensors={n: base64.b64encode(a.tobytes()).decode("ascii") for n, a in masked.items()})

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


# ---------------------------------------------------------------- aggregator side

@dataclass(frozen=True)
class SecAggResult:
    """The unmasked sum of one secure round over global shapes, with its public per-element mass."""

    quantized_sum: dict[str, np.ndarray]  # int64: sum of the included devices' quantize(weight * update)
    weighted_sum: dict[str, np.ndarray]  # float64: quantized_sum / 2^frac_bits
    mass: dict[str, np.ndarray]  # float64: sum of the weights of the included devices holding each element
    counts: dict[str, np.ndarray]  # int64: how many included devices hold each element
    included: tuple[str, ...]  # devices whose masked input is in the sum
    dropped: tuple[str, ...]  # devices that shared keys but sent no masked input

    def mean(self) -> dict[str, np.ndarray]:
        """Per-element weighted mean (float32), zero where no included device holds the element."""
        return {name: np.divide(total, self.mass[name], out=np.zeros_like(total), where=self.mass[name] > 0)
                .astype(np.float32) for name, total in self.weighted_sum.items()}


class SecAggServer:
    """The aggregator's side of one secure round: routes shares, sums masked inputs, unmasks only the sum."""

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self._phase = Phase.ADVERTISE
        self._adverts: dict[str, AdvertiseKeys] = {}
        self._points: dict[str, int] = {}
        self._shares: dict[str, ShareKeys] = {}
        self._sum = {name: np.zeros(shape, params.dtype) for name, shape in params.shapes.items()}
        self._weights: dict[str, float] = {}
        self._responses: dict[str, UnmaskResponse] = {}

    def _expect(self, phase: Phase, round_number: int, sender: str, allowed: Mapping[str, object] | None) -> None:
        if self._phase is not phase:
            raise SecAggError(f"a {phase.value} message from {sender} while the round is in {self._phase.value}")
        if round_number != self.params.round:
            raise SecAggError(f"a message from {sender} for round {round_number}, not {self.params.round}")
        if allowed is not None and sender not in allowed:
            raise SecAggError(f"{sender} is not part of this phase of round {self.params.round}")

    def _enough(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise SecAggError(f"only {count} devices {what}, below the threshold {self.params.threshold}: "
                              "the round cannot complete securely")

    def add_advertisement(self, advert: AdvertiseKeys) -> None:
        """Accept one device's public keys (phase 1)."""
        self._expect(Phase.ADVERTISE, advert.round, advert.device, None)
        if advert.device in self._adverts:
            raise SecAggError(f"{advert.device} advertised keys twice")
        if len(self._adverts) >= self.params.max_devices:
            raise SecAggError(f"the round already has max_devices={self.params.max_devices} devices")
        used = {k for a in self._adverts.values() for k in (a.c_public, a.s_public)}
        if {advert.c_public, advert.s_public} & used or advert.c_public == advert.s_public:
            raise SecAggError(f"{advert.device} advertised a public key already in use")
        _check_shapes(advert.shapes, self.params, advert.device)
        probe = X25519PrivateKey.generate()
        for public in (advert.c_public, advert.s_public):  # refused here, not when every device agrees keys with it
            _agree(probe, public, "probe", self.params.round, advert.device, AGGREGATOR)
        self._adverts[advert.device] = advert

    def roster(self) -> KeyRoster:
        """Close phase 1: the roster U1 to broadcast."""
        self._expect(Phase.ADVERTISE, self.params.round, AGGREGATOR, None)
        self._enough(len(self._adverts), "advertised keys")
        self._phase = Phase.SHARE_KEYS
        self._points = _points(list(self._adverts))
        return KeyRoster(round=self.params.round, devices=[self._adverts[d] for d in sorted(self._adverts)])

    def add_shares(self, message: ShareKeys) -> None:
        """Accept one device's encrypted shares (phase 2)."""
        self._expect(Phase.SHARE_KEYS, message.round, message.device, self._adverts)
        if message.device in self._shares:
            raise SecAggError(f"{message.device} sent its shares twice")
        recipients = [s.recipient for s in message.shares]
        expected = set(self._adverts) - {message.device}
        if len(recipients) != len(expected) or set(recipients) != expected:
            raise SecAggError(f"{message.device} must send exactly one share set to each other roster device")
        if any(s.sender != message.device for s in message.shares):
            raise SecAggError(f"{message.device} sent shares in another device's name")
        self._shares[message.device] = message

    def deliveries(self) -> dict[str, ShareDelivery]:
        """Close phase 2: for each device of U2, the shares the others of U2 encrypted for it."""
        self._expect(Phase.SHARE_KEYS, self.params.round, AGGREGATOR, None)
        self._enough(len(self._shares), "shared their keys")
        self._phase = Phase.MASKED_INPUT
        inbox: dict[str, list[EncryptedShares]] = {d: [] for d in self._shares}
        for sender in sorted(self._shares):
            for sealed in self._shares[sender].shares:
                if sealed.recipient in inbox:
                    inbox[sealed.recipient].append(sealed)
        return {d: ShareDelivery(round=self.params.round, device=d, shares=s) for d, s in inbox.items()}

    def add_masked_input(self, message: MaskedInput) -> None:
        """Fold one masked input into the running ring sum (phase 3)."""
        self._expect(Phase.MASKED_INPUT, message.round, message.device, self._shares)
        if message.device in self._weights:
            raise SecAggError(f"{message.device} sent its masked input twice")
        shapes = self._adverts[message.device].shapes
        if set(message.tensors) != set(shapes):
            raise SecAggError(f"{message.device}: masked tensors {sorted(message.tensors)} differ from {sorted(shapes)}")
        decoded = {}
        for name, text in message.tensors.items():
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise SecAggError(f"{message.device}: masked tensor {name!r} is not base64") from None
            if len(raw) != math.prod(shapes[name]) * self.params.dtype.itemsize:
                raise SecAggError(f"{message.device}: masked tensor {name!r} has {len(raw)} bytes, "
                                  f"not {math.prod(shapes[name])} x {self.params.dtype.itemsize}")
            decoded[name] = np.frombuffer(raw, self.params.dtype).reshape(shapes[name])
        for name, values in decoded.items():
            self._sum[name][leading_slices(shapes[name])] += values
        self._weights[message.device] = message.weight

    def unmask_request(self) -> UnmaskRequest:
        """Close phase 3: survivors U3 and the devices that dropped after sharing keys."""
        self._expect(Phase.MASKED_INPUT, self.params.round, AGGREGATOR, None)
        self._enough(len(self._weights), "sent masked inputs")
        self._phase = Phase.UNMASKING
        dropped = sorted(set(self._shares) - set(self._weights))
        if dropped:
            log.info("secure round %d: %d devices dropped before masking: %s", self.params.round, len(dropped), dropped)
        return UnmaskRequest(round=self.params.round, survivors=sorted(self._weights), dropped=dropped)

    def add_unmasking(self, message: UnmaskResponse) -> None:
        """Accept one survivor's revealed shares (phase 4)."""
        self._expect(Phase.UNMASKING, message.round, message.device, self._weights)
        if message.device in self._responses:
            raise SecAggError(f"{message.device} answered the unmask request twice")
        if set(message.b_shares) != set(self._weights) or set(message.s_shares) != set(self._shares) - set(self._weights):
            raise SecAggError(f"{message.device}: the revealed shares do not match the unmask request")
        point = self._points[message.device]
        if any(s.x != point for s in [*message.b_shares.values(), *message.s_shares.values()]):
            raise SecAggError(f"{message.device}: a revealed share is not at its own point x={point}")
        self._responses[message.device] = message

    def _rebuild(self, device: str, pick: Callable[[UnmaskResponse], Mapping[str, Share]]) -> bytes:
        try:
            return shamir.reconstruct([pick(r)[device] for r in self._responses.values()])
        except ShamirError as exc:
            raise SecAggError(f"cannot rebuild the secret of {device}: {exc}") from None

    def result(self) -> SecAggResult:
        """Close phase 4: remove the masks and return the sum of the survivors' quantized weighted updates."""
        self._expect(Phase.UNMASKING, self.params.round, AGGREGATOR, None)
        self._enough(len(self._responses), "answered the unmask request")
        survivors, dropped = sorted(self._weights), sorted(set(self._shares) - set(self._weights))
        total = {name: values.copy() for name, values in self._sum.items()}
        for device in survivors:
            _add_mask(total, self._rebuild(device, lambda r: r.b_shares), self._adverts[device].shapes, -1, self.params)
        for gone in dropped:
            s_key = X25519PrivateKey.from_private_bytes(self._rebuild(gone, lambda r: r.s_shares))
            if _public_hex(s_key) != self._adverts[gone].s_public:
                raise SecAggError(f"the rebuilt key of {gone} does not match its advertised public key "
                                  "(a share was falsified)")
            for device in survivors:
                seed = _agree(s_key, self._adverts[device].s_public, "mask", self.params.round, device, gone)
                own = self._adverts[device].shapes
                block = {n: _overlap(s, self._adverts[gone].shapes[n]) for n, s in own.items()}
                _add_mask(total, seed, block, -_pair_sign(device, gone), self.params)
        self._phase = Phase.DONE
        return self._summarize(total, survivors, dropped)

    def _summarize(self, total: Mapping[str, np.ndarray], survivors: list[str], dropped: list[str]) -> SecAggResult:
        quantized = {name: _from_ring(values, self.params) for name, values in total.items()}
        mass = {name: np.zeros(shape, np.float64) for name, shape in self.params.shapes.items()}
        counts = {name: np.zeros(shape, np.int64) for name, shape in self.params.shapes.items()}
        for device in survivors:
            for name, shape in self._adverts[device].shapes.items():
                mass[name][leading_slices(shape)] += self._weights[device]
                counts[name][leading_slices(shape)] += 1
        return SecAggResult(quantized_sum=quantized,
                            weighted_sum={n: q / 2.0**self.params.frac_bits for n, q in quantized.items()},
                            mass=mass, counts=counts, included=tuple(survivors), dropped=tuple(dropped))


# ---------------------------------------------------------------- an in-process round over serialized messages

@dataclass(frozen=True)
class DeviceRound:
    """One device's part in `run_secure_round`: its tier blocks, update and public weight."""

    shapes: Mapping[str, Sequence[int]]
    update: Mapping[str, np.ndarray]
    weight: float = 1.0


@dataclass(frozen=True)
class WireMessage:
    """One message as it crossed the (simulated) wire."""

    sender: str
    recipient: str
    kind: str
    payload: bytes


@dataclass(frozen=True)
class SecureRound:
    """The outcome of `run_secure_round` and every message exchanged."""

    result: SecAggResult
    wire: list[WireMessage]


def run_secure_round(params: SecAggParams, inputs: Mapping[str, DeviceRound],
                     dropouts: Mapping[str, Phase] | None = None) -> SecureRound:
    """All four phases in process, every message passed as JSON bytes.

    `dropouts[d]` is the phase whose message device d never sends (it goes silent from there on).
    """
    dropouts = dict(dropouts or {})
    wire: list[WireMessage] = []

    def send(sender: str, recipient: str, message: BaseModel) -> bytes:
        payload = message.model_dump_json().encode()
        wire.append(WireMessage(sender, recipient, getattr(message, "kind"), payload))
        return payload

    def alive(device: str, phase: Phase) -> bool:
        stop = dropouts.get(device)
        order = list(Phase)
        return stop is None or order.index(phase) < order.index(stop)

    server = SecAggServer(params)
    devices = {d: SecAggDevice(d, params, part.shapes) for d, part in inputs.items()}
    for d, device in devices.items():
        if alive(d, Phase.ADVERTISE):
            server.add_advertisement(AdvertiseKeys.model_validate_json(send(d, AGGREGATOR, device.advertise())))
    roster = server.roster()
    for d, device in devices.items():
        if alive(d, Phase.SHARE_KEYS):
            mine = device.share_keys(KeyRoster.model_validate_json(send(AGGREGATOR, d, roster)))
            server.add_shares(ShareKeys.model_validate_json(send(d, AGGREGATOR, mine)))
    for d, delivery in server.deliveries().items():
        if alive(d, Phase.MASKED_INPUT):
            received = ShareDelivery.model_validate_json(send(AGGREGATOR, d, delivery))
            masked = devices[d].masked_input(received, inputs[d].update, inputs[d].weight)
            server.add_masked_input(MaskedInput.model_validate_json(send(d, AGGREGATOR, masked)))
    request = server.unmask_request()
    for d in request.survivors:
        if alive(d, Phase.UNMASKING):
            answer = devices[d].unmask(UnmaskRequest.model_validate_json(send(AGGREGATOR, d, request)))
            server.add_unmasking(UnmaskResponse.model_validate_json(send(d, AGGREGATOR, answer)))
    return SecureRound(result=server.result(), wire=wire)
