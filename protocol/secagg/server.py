"""The aggregator's side of one secure round (protocol.secagg.messages): route shares, sum masked inputs, unmask the sum."""

from __future__ import annotations

import base64
import binascii
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.blocks import leading_slices
from protocol.secagg import shamir
from protocol.secagg.masks import add_mask, agree_key, block_overlap, pair_sign, public_key_hex
from protocol.secagg.messages import (AGGREGATOR, AdvertiseKeys, EncryptedShares, KeyRoster, MaskedInput, Phase,
                                      SecAggError, SecAggParams, ShareDelivery, ShareKeys, UnmaskRequest,
                                      UnmaskResponse, check_block_shapes, from_ring, shamir_points)
from protocol.secagg.shamir import ShamirError, Share
from protocol.secagg.wire import MaskedTensors

log = logging.getLogger(__name__)


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
        check_block_shapes(advert.shapes, self.params, advert.device)
        probe = X25519PrivateKey.generate()
        for public in (advert.c_public, advert.s_public):  # refused here, not when every device agrees keys with it
            agree_key(probe, public, "probe", self.params.round, advert.device, AGGREGATOR)
        self._adverts[advert.device] = advert

    def roster(self) -> KeyRoster:
        """Close phase 1: the roster U1 to broadcast."""
        self._expect(Phase.ADVERTISE, self.params.round, AGGREGATOR, None)
        self._enough(len(self._adverts), "advertised keys")
        self._phase = Phase.SHARE_KEYS
        self._points = shamir_points(list(self._adverts))
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
        """Fold one masked input into the running ring sum (phase 3).

        A MaskedTensors (what protocol.secagg.wire.unwrap returns) brings its ring integers as the frame's raw
        bytes; a plain MaskedInput, the all-JSON form, brings them in base64.
        """
        self._expect(Phase.MASKED_INPUT, message.round, message.device, self._shares)
        if message.device in self._weights:
            raise SecAggError(f"{message.device} sent its masked input twice")
        shapes = self._adverts[message.device].shapes
        carried = message.ring_bytes if isinstance(message, MaskedTensors) else message.tensors
        if set(carried) != set(shapes):
            raise SecAggError(f"{message.device}: masked tensors {sorted(carried)} differ from {sorted(shapes)}")
        decoded = {}
        for name, value in carried.items():
            raw = value if isinstance(value, np.ndarray) else self._base64(message.device, name, value)
            if raw.nbytes != math.prod(shapes[name]) * self.params.dtype.itemsize:
                raise SecAggError(f"{message.device}: masked tensor {name!r} has {raw.nbytes} bytes, "
                                  f"not {math.prod(shapes[name])} x {self.params.dtype.itemsize}")
            decoded[name] = np.ascontiguousarray(raw).view(self.params.dtype).reshape(shapes[name])
        for name, values in decoded.items():
            self._sum[name][leading_slices(shapes[name])] += values
        self._weights[message.device] = message.weight

    @staticmethod
    def _base64(device: str, name: str, text: str) -> np.ndarray:
        """The bytes of a masked tensor in the all-JSON form."""
        try:
            return np.frombuffer(base64.b64decode(text, validate=True), np.uint8)
        except (binascii.Error, ValueError):
            raise SecAggError(f"{device}: masked tensor {name!r} is not base64") from None

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
            add_mask(total, self._rebuild(device, lambda r: r.b_shares), self._adverts[device].shapes, -1, self.params)
        for gone in dropped:
            s_key = X25519PrivateKey.from_private_bytes(self._rebuild(gone, lambda r: r.s_shares))
            if public_key_hex(s_key) != self._adverts[gone].s_public:
                raise SecAggError(f"the rebuilt key of {gone} does not match its advertised public key "
                                  "(a share was falsified)")
            for device in survivors:
                seed = agree_key(s_key, self._adverts[device].s_public, "mask", self.params.round, device, gone)
                own = self._adverts[device].shapes
                block = {n: block_overlap(s, self._adverts[gone].shapes[n]) for n, s in own.items()}
                add_mask(total, seed, block, -pair_sign(device, gone), self.params)
        self._phase = Phase.DONE
        return self._summarize(total, survivors, dropped)

    def _summarize(self, total: Mapping[str, np.ndarray], survivors: list[str], dropped: list[str]) -> SecAggResult:
        quantized = {name: from_ring(values, self.params) for name, values in total.items()}
        mass = {name: np.zeros(shape, np.float64) for name, shape in self.params.shapes.items()}
        counts = {name: np.zeros(shape, np.int64) for name, shape in self.params.shapes.items()}
        for device in survivors:
            for name, shape in self._adverts[device].shapes.items():
                mass[name][leading_slices(shape)] += self._weights[device]
                counts[name][leading_slices(shape)] += 1
        return SecAggResult(quantized_sum=quantized,
                            weighted_sum={n: q / 2.0**self.params.frac_bits for n, q in quantized.items()},
                            mass=mass, counts=counts, included=tuple(survivors), dropped=tuple(dropped))
