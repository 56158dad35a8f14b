"""Secure aggregation (Bonawitz et al., CCS 2017) for HeteroFL tiers, as network-free protocol logic.

The aggregator learns the sum of the devices' weighted updates and nothing else about any one
of them, even when some devices drop out mid-round. Four phases, each a pydantic message that
serializes to JSON (the transport is the caller's: MQTT in aggregator.engines.secure and
edge_client.secure_client, tests.secagg_driver.run_secure_round in process):

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

This module holds what both sides share: parameters, messages and fixed point in the ring.
protocol.secagg.masks derives the keys and masks, protocol.secagg.device and
protocol.secagg.server are the two sides of a round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from protocol.messages import (MAX_DEVICES, MAX_ROUND, MAX_SECAGG_CLIP, MAX_SECAGG_WEIGHT, MAX_TENSOR_DIMS,
                               MAX_TENSOR_ELEMENTS, MAX_TENSORS)
from protocol.secagg.shamir import Share


def _shape_fits(shape: tuple[int, ...]) -> tuple[int, ...]:
    if math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise ValueError(f"shape {list(shape)} has more than {MAX_TENSOR_ELEMENTS} elements")
    return shape


DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
TensorName = Annotated[str, Field(min_length=1, max_length=256)]
Shape = Annotated[tuple[Annotated[int, Field(ge=1, le=MAX_TENSOR_ELEMENTS)], ...],
                  Field(min_length=1, max_length=MAX_TENSOR_DIMS), AfterValidator(_shape_fits)]
Shapes = Annotated[dict[TensorName, Shape], Field(max_length=MAX_TENSORS)]
KeyHex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Round = Annotated[int, Field(ge=1, le=MAX_ROUND)]
Devices = Annotated[list[DeviceId], Field(max_length=MAX_DEVICES)]
# base64 of the largest masked tensor (MAX_TENSOR_ELEMENTS 64-bit ring integers), filled in locally by unwrap
_MAX_MASKED_CHARS = 4 * math.ceil(MAX_TENSOR_ELEMENTS * 8 / 3)
AGGREGATOR = "aggregator"  # the aggregator's name as the sender or recipient of a message


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

    round: Round
    threshold: Annotated[int, Field(ge=2, le=MAX_DEVICES)]  # shares needed to rebuild a secret; > half the devices is advised
    shapes: Shapes  # the global tensors' shapes
    ring_bits: Literal[32, 64] = 32
    frac_bits: Annotated[int, Field(ge=0, le=52)] = 16
    clip: Annotated[float, Field(gt=0, le=MAX_SECAGG_CLIP, allow_inf_nan=False)] = 64.0  # bound on |weight * update| per element
    max_devices: Annotated[int, Field(ge=2, le=MAX_DEVICES)] = 256

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
    round: Round
    device: DeviceId
    c_public: KeyHex  # X25519, for the keys that encrypt shares
    s_public: KeyHex  # X25519, for the pairwise mask seeds
    shapes: Shapes
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")] | None = None  # Ed25519 over the rest


class KeyRoster(_Strict):
    """Aggregator -> devices: every advertisement accepted for the round (U1)."""

    kind: Literal["secagg_roster"] = "secagg_roster"
    round: Round
    devices: Annotated[list[AdvertiseKeys], Field(max_length=MAX_DEVICES)]


class EncryptedShares(_Strict):
    """One sender's shares for one recipient, AES-GCM encrypted under their c-key agreement."""

    sender: DeviceId
    recipient: DeviceId
    nonce: Annotated[str, Field(pattern=r"^[0-9a-f]{24}$")]
    ciphertext: Annotated[str, Field(pattern=r"^([0-9a-f]{2})+$", max_length=65536)]


class ShareKeys(_Strict):
    """Device -> aggregator: my encrypted shares, one entry per other device of the roster."""

    kind: Literal["secagg_share_keys"] = "secagg_share_keys"
    round: Round
    device: DeviceId
    shares: Annotated[list[EncryptedShares], Field(max_length=MAX_DEVICES)]


class ShareDelivery(_Strict):
    """Aggregator -> device: the shares other devices (U2) encrypted for it."""

    kind: Literal["secagg_share_delivery"] = "secagg_share_delivery"
    round: Round
    device: DeviceId
    shares: Annotated[list[EncryptedShares], Field(max_length=MAX_DEVICES)]


class MaskedInput(_Strict):
    """Device -> aggregator: the masked quantized update (base64 ring integers per tensor) and its public weight."""

    kind: Literal["secagg_masked_input"] = "secagg_masked_input"
    round: Round
    device: DeviceId
    weight: Annotated[float, Field(gt=0, le=MAX_SECAGG_WEIGHT, allow_inf_nan=False)]
    tensors: Annotated[dict[TensorName, Annotated[str, Field(max_length=_MAX_MASKED_CHARS)]], Field(max_length=MAX_TENSORS)]


class UnmaskRequest(_Strict):
    """Aggregator -> survivors: who sent a masked input (U3) and who dropped after sharing keys."""

    kind: Literal["secagg_unmask_request"] = "secagg_unmask_request"
    round: Round
    survivors: Devices
    dropped: Devices


class UnmaskResponse(_Strict):
    """Survivor -> aggregator: b-shares of the survivors, s-shares of the dropped devices."""

    kind: Literal["secagg_unmask_response"] = "secagg_unmask_response"
    round: Round
    device: DeviceId
    b_shares: Annotated[dict[DeviceId, Share], Field(max_length=MAX_DEVICES)]
    s_shares: Annotated[dict[DeviceId, Share], Field(max_length=MAX_DEVICES)]


class SharePlaintext(_Strict):
    """What EncryptedShares holds once decrypted: the sender's shares of its b seed and s key for the recipient."""

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


def to_ring(integers: np.ndarray, params: SecAggParams) -> np.ndarray:
    """Signed integers as elements of Z_{2^ring_bits}."""
    return integers.view(np.uint64).astype(params.dtype)  # two's complement, reduced mod 2^k


def from_ring(ring: np.ndarray, params: SecAggParams) -> np.ndarray:
    """Elements of Z_{2^ring_bits} read back as signed int64."""
    signed = np.dtype("<i4" if params.ring_bits == 32 else "<i8")
    return ring.astype(params.dtype).view(signed).astype(np.int64)


# ---------------------------------------------------------------- the roster's tier blocks and Shamir points

def check_block_shapes(shapes: Mapping[str, Shape], params: SecAggParams, who: str) -> None:
    """Refuses a tier whose tensors differ from the round's or whose blocks do not fit the global shapes."""
    if set(shapes) != set(params.shapes):
        raise SecAggError(f"{who}: tensors {sorted(shapes)} differ from the round's {sorted(params.shapes)}")
    for name, shape in shapes.items():
        full = params.shapes[name]
        if len(shape) != len(full) or any(s > f for s, f in zip(shape, full)):
            raise SecAggError(f"{who}: block {tuple(shape)} of {name!r} does not fit in the global shape {full}")


def shamir_points(devices: Sequence[str]) -> dict[str, int]:
    """Each device's Shamir point: its 1-based position in the sorted roster."""
    return {device: index + 1 for index, device in enumerate(sorted(devices))}
