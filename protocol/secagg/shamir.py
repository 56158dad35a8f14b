"""Shamir secret sharing of byte strings over the prime field GF(2^127 - 1).

A secret of any length is cut into 15-byte limbs (each below the prime); every limb is the
constant term of its own random polynomial of degree threshold - 1, and a share is the values
of all those polynomials at the share's point x (x >= 1). Any `threshold` shares with distinct
points give the secret back by Lagrange interpolation at zero; fewer reveal nothing about it
and are refused with ShamirError.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PRIME = 2**127 - 1  # a Mersenne prime
LIMB_BYTES = 15  # 120 bits: every limb is below PRIME, so decoding can check the range
MAX_SECRET_BYTES = 1024
MAX_THRESHOLD = 10**6  # shares a secret may need (protocol.messages.MAX_DEVICES)


class ShamirError(ValueError):
    """Shares that cannot give a secret back: too few, duplicated, mismatched or out of range."""


class Share(BaseModel):
    """One share of a secret: the point x and the value of each limb's polynomial at x."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x: int = Field(ge=1, lt=PRIME)
    threshold: int = Field(ge=1, le=MAX_THRESHOLD)
    length: int = Field(ge=0, le=MAX_SECRET_BYTES)  # the secret's length in bytes
    limbs: Annotated[list[Annotated[int, Field(ge=0, lt=PRIME)]], Field(max_length=-(-MAX_SECRET_BYTES // LIMB_BYTES))]


def _limbs_of(secret: bytes) -> list[int]:
    return [int.from_bytes(secret[i:i + LIMB_BYTES], "big") for i in range(0, len(secret), LIMB_BYTES)]


def _bytes_of(limbs: Sequence[int], length: int) -> bytes:
    out = bytearray()
    for index, limb in enumerate(limbs):
        size = min(LIMB_BYTES, length - index * LIMB_BYTES)
        if limb >= 1 << (8 * size):
            raise ShamirError("the shares do not interpolate to a valid secret (a share is tampered or mismatched)")
        out += limb.to_bytes(size, "big")
    return bytes(out)


def split(secret: bytes, threshold: int, points: Sequence[int]) -> list[Share]:
    """Shares of `secret` at `points` (distinct, >= 1); any `threshold` of them give it back."""
    if not 1 <= threshold <= len(points):
        raise ShamirError(f"threshold {threshold} must be between 1 and the number of shares {len(points)}")
    if len(set(points)) != len(points) or any(not 1 <= x < PRIME for x in points):
        raise ShamirError(f"share points must be distinct integers in [1, p): {list(points)}")
    if len(secret) > MAX_SECRET_BYTES:
        raise ShamirError(f"a secret of {len(secret)} bytes is longer than {MAX_SECRET_BYTES}")
    polynomials = [[limb] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)] for limb in _limbs_of(secret)]
    shares = []
    for x in points:
        values = []
        for coefficients in polynomials:
            value = 0
            for coefficient in reversed(coefficients):  # Horner
                value = (value * x + coefficient) % PRIME
            values.append(value)
        shares.append(Share(x=x, threshold=threshold, length=len(secret), limbs=values))
    return shares


def _lagrange_at_zero(points: Sequence[int]) -> list[int]:
    """Weights w_i with f(0) = sum w_i f(x_i) for every polynomial of degree < len(points)."""
    weights = []
    for i, xi in enumerate(points):
        numerator, denominator = 1, 1
        for j, xj in enumerate(points):
            if j != i:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return weights


def reconstruct(shares: Sequence[Share]) -> bytes:
    """The secret behind `shares` (at least its threshold of them, from one split)."""
    if not shares:
        raise ShamirError("no shares to reconstruct from")
    first = shares[0]
    for share in shares:
        if (share.threshold, share.length) != (first.threshold, first.length):
            raise ShamirError("the shares come from different splits (threshold or secret length differ)")
        if len(share.limbs) != -(-first.length // LIMB_BYTES) or any(not 0 <= v < PRIME for v in share.limbs):
            raise ShamirError(f"the share at x={share.x} has malformed limbs")
    points = [share.x for share in shares]
    if len(set(points)) != len(points):
        raise ShamirError(f"duplicate share points: {sorted(points)}")
    if len(shares) < first.threshold:
        raise ShamirError(f"need {first.threshold} shares to reconstruct the secret, got {len(shares)}")
    chosen = sorted(shares, key=lambda share: share.x)[:first.threshold]
    weights = _lagrange_at_zero([share.x for share in chosen])
    limbs = [sum(w * share.limbs[k] for w, share in zip(weights, chosen)) % PRIME for k in range(len(first.limbs))]
    return _bytes_of(limbs, first.length)
