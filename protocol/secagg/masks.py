"""Key agreement and the pseudo-random masks of secure aggregation (protocol.secagg.messages).

Both sides derive the same keys and masks: a device adds them to its input, the aggregator
removes what the dropouts left behind once it has rebuilt the secrets.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.blocks import leading_slices
from protocol.secagg.messages import SecAggError, SecAggParams, Shape


def public_key_hex(key: X25519PrivateKey) -> str:
    """The raw X25519 public key of `key` as 64 hex digits."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def agree_key(private: X25519PrivateKey, public_hex: str, purpose: str, round_number: int, a: str, b: str) -> bytes:
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


def block_overlap(a: Shape, b: Shape) -> Shape:
    """The leading block two tiers both hold: the element-wise minimum of their shapes."""
    return tuple(min(x, y) for x, y in zip(a, b))


def add_mask(target: dict[str, np.ndarray], seed: bytes, block: Mapping[str, Shape], sign: int,
             params: SecAggParams) -> None:
    """target[name][leading block] += sign * PRG(seed) for every tensor (mod 2^k, in place)."""
    for name, shape in block.items():
        view = target[name][leading_slices(shape)]
        if sign > 0:
            view += _prg(seed, name, shape, params)
        else:
            view -= _prg(seed, name, shape, params)


def pair_sign(me: str, peer: str) -> int:
    """The sign with which `me` adds the pair mask it shares with `peer`: + for the lower name, - for the higher."""
    return 1 if me < peer else -1
