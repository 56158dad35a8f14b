"""A secure analytics query: its answers summed by secure aggregation, so the aggregator sees only the sum.

The protocol is the round engine's (protocol.secagg: Bonawitz et al.'s four phases, the same
server, the same SecAgg wire messages and the same device client, edge_client.secure_client),
run for one query instead of a round:

    Query.secure -> advertise -> roster -> share_keys -> delivery -> [the device computes] ->
    masked_input -> unmask_request -> unmasking -> the unmasked sum of the surviving answers

Advertising and sharing keys get `KEYS_FRACTION` of the query's timeout each, masked inputs run to
the query's deadline, unmasking gets `UNMASK_FRACTION` more. A phase closes when every device it
waits for answered, when all those still owing are offline, or at its deadline; a device that
misses one takes no further part, and one that dropped after sharing its keys is unmasked out of
the sum. Every device weighs 1 and each element of its answer is clipped to `clip`, which the
desk sets to what a true answer can reach (the computation's per-sample limit x the largest
announced sample count): the only check a masked answer gets. Fewer survivors than the threshold
(2/3 of the asked devices, at least 2 and at least the query's min_devices, so the aggregator never
unmasks a sum of fewer) fail the query with the reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel

from aggregator.engines.base import Outgoing
from aggregator.engines.secure import fraction_bits, phase_problem
from protocol.frame import FrameError
from protocol.messages import Reject, RejectReason, SecAgg, SecureAggregation, new_id
from protocol.secagg.messages import (AdvertiseKeys, MaskedInput, Phase, SecAggError, SecAggParams, ShareKeys,
                                      UnmaskResponse)
from protocol.secagg.server import SecAggResult, SecAggServer
from protocol.secagg.wire import DEVICE_PHASES, unwrap, wrap

log = logging.getLogger(__name__)
KEYS_FRACTION = 0.2  # of the query's timeout, for advertising and again for sharing keys
UNMASK_FRACTION = 0.25  # of the query's timeout, for unmasking after the deadline
RING_BITS = 64  # counts of large fleets need room: 64-bit ring integers
_SENT_IN = dict(zip((Phase.ADVERTISE, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.UNMASKING), DEVICE_PHASES))


class SecureSum:
    """The secure-aggregation state of one query: its session, the protocol's server, the phase and who owes it."""

    def __init__(self, number: int, devices: Sequence[str], shapes: Mapping[str, tuple[int, ...]], clip: float,
                 now: float, timeout_s: float, minimum: int = 2) -> None:
        """ValueError when fewer than 2 (or `minimum`) devices are asked or the ring cannot hold their clipped sum.
        `minimum` (the query's min_devices) is a floor of the threshold: no sum of fewer is ever unmasked."""
        if len(devices) < max(2, minimum):
            raise ValueError(f"secure aggregation needs at least {max(2, minimum)} devices, {len(devices)} are asked")
        threshold = max(2, minimum, math.ceil(2 * len(devices) / 3))
        self.params = SecAggParams(round=number, threshold=threshold, shapes=dict(shapes),
                                   ring_bits=RING_BITS, frac_bits=fraction_bits(len(devices), clip, RING_BITS),
                                   clip=clip, max_devices=len(devices))
        self.session = new_id()
        self.server = SecAggServer(self.params)
        self.timeout_s = timeout_s
        self.end = now + timeout_s  # the query's deadline: masked inputs until then
        self.phase = Phase.ADVERTISE
        self.deadline = now + KEYS_FRACTION * timeout_s
        self.expected, self.received = set(devices), set[str]()
        self.result: SecAggResult | None = None
        self.failed: str | None = None

    def settings(self) -> SecureAggregation:
        """What each asked device's Query carries: the same for all (every device weighs 1, holds every element)."""
        p = self.params
        shapes = {name: list(shape) for name, shape in p.shapes.items()}
        return SecureAggregation(session=self.session, threshold=p.threshold, max_devices=p.max_devices,
                                 ring_bits=p.ring_bits, frac_bits=p.frac_bits, clip=p.clip, weight=1.0, shapes=shapes,
                                 block=shapes)

    @property
    def done(self) -> bool:
        """Unmasked, or failed."""
        return self.result is not None or self.failed is not None

    # -- messages -------------------------------------------------------------------------------

    def problem(self, device: str, body: SecAgg, now: float) -> tuple[RejectReason, str] | None:
        """Why a device's SecAgg message of this session is refused before it is decoded, or None."""
        if self.done:
            return RejectReason.LATE, f"query {self.params.round} is no longer summing"
        if body.round != self.params.round:
            return RejectReason.STALE_ROUND, f"round {body.round}, this query's is {self.params.round}"
        return phase_problem(device, body.phase, self.phase, self.expected, self.received, self.deadline, now,
                             f"query {self.params.round}")

    def masked_tensors(self, device: str, body: SecAgg, now: float) -> dict[str, tuple[int, ...]]:
        """The uint8 tensors a message must carry (a masked input's ring bytes, else none); FrameError if refused."""
        if body.phase != "masked_input":
            return {}
        if (problem := self.problem(device, body, now)) is not None:
            raise FrameError(*problem)
        size = self.params.dtype.itemsize
        return {name: (math.prod(shape) * size,) for name, shape in self.params.shapes.items()}

    def on_message(self, device: str, msg_id: str, body: SecAgg, tensors: Mapping[str, np.ndarray],
                   now: float) -> list[Outgoing]:
        """Take one message (then close the phases that are over), or a Reject with the reason."""
        problem = self.problem(device, body, now)
        if problem is None:
            try:
                self._accept(device, unwrap(body, tensors))
            except SecAggError as exc:
                problem = (RejectReason.BAD_TENSOR if body.phase == "masked_input" else RejectReason.MALFORMED, str(exc))
        if problem is not None:
            detail = f"query {self.params.round} {body.phase}: {problem[1]}"
            return [Outgoing(device, Reject(reason=problem[0], detail=detail, ref_msg_id=msg_id))]
        return []

    def _accept(self, device: str, message: BaseModel) -> None:
        if getattr(message, "device", device) != device:
            raise SecAggError(f"a message in the name of {getattr(message, 'device')} from {device}")
        if isinstance(message, AdvertiseKeys):
            if {n: tuple(s) for n, s in message.shapes.items()} != self.params.shapes:
                raise SecAggError(f"advertised blocks {message.shapes} are not the answer's shapes")
            self.server.add_advertisement(message)
        elif isinstance(message, ShareKeys):
            self.server.add_shares(message)
        elif isinstance(message, MaskedInput):
            if message.weight != 1.0:
                raise SecAggError(f"weight {message.weight}: every answer weighs 1")
            self.server.add_masked_input(message)
        elif isinstance(message, UnmaskResponse):
            self.server.add_unmasking(message)
        self.received.add(device)

    # -- phases ---------------------------------------------------------------------------------

    def advance(self, now: float, online: set[str]) -> list[Outgoing]:
        """Close every phase that is over (several at once when the next is over already)."""
        out: list[Outgoing] = []
        while not self.done and self._over(now, online):
            out += self._close_phase(now)
        return out

    def _over(self, now: float, online: set[str]) -> bool:
        owing = self.expected - self.received
        return not owing or now >= self.deadline or not owing & online

    def _close_phase(self, now: float) -> list[Outgoing]:
        if missing := sorted(self.expected - self.received):
            log.warning("query %d: no %s message from %s; left out of the rest of the query", self.params.round,
                        _SENT_IN[self.phase], ", ".join(missing))
        try:
            if self.phase is Phase.ADVERTISE:
                roster = self.server.roster()
                self._enter(Phase.SHARE_KEYS, {a.device for a in roster.devices}, now + KEYS_FRACTION * self.timeout_s)
                return [self._message(device, roster) for device in sorted(self.expected)]
            if self.phase is Phase.SHARE_KEYS:
                deliveries = self.server.deliveries()
                self._enter(Phase.MASKED_INPUT, set(deliveries), self.end)
                return [self._message(device, message) for device, message in sorted(deliveries.items())]
            if self.phase is Phase.MASKED_INPUT:
                request = self.server.unmask_request()
                self._enter(Phase.UNMASKING, set(request.survivors), now + UNMASK_FRACTION * self.timeout_s)
                return [self._message(device, request) for device in request.survivors]
            self.result = self.server.result()
        except SecAggError as exc:
            self.failed = f"secure aggregation failed: {exc}"
            return []
        dropped = self.result.dropped
        log.info("query %d: unmasked the sum of %d masked answers%s", self.params.round, len(self.result.included),
                 f" ({len(dropped)} dropped after sharing keys: {', '.join(dropped)})" if dropped else "")
        return []

    def _enter(self, phase: Phase, expected: set[str], deadline: float) -> None:
        self.phase, self.expected, self.received, self.deadline = phase, expected, set(), deadline

    def _message(self, device: str, message: BaseModel) -> Outgoing:
        body, _ = wrap(message, self.session)
        return Outgoing(device, body)
