"""Rounds summed by secure aggregation (protocol.secagg.messages): the aggregator only ever sees masked updates.

A secure round is the round engine's usual round (selection, tasks, deadline, commit: the secure
engine holds a RoundEngine and runs its rounds through that engine's public start and close) with
the four phases of Bonawitz et al. run through it, every message a SecAgg body (protocol.secagg.wire):

    task (TrainTask.secure) -> advertise -> roster -> share_keys -> delivery -> [training] ->
    masked_input -> unmask_request -> unmasking -> commit: global + per-element weighted mean

A phase closes once every device it waits for has answered, once all those still owing are
offline, or at its deadline: advertising and sharing keys get `keys_fraction` of the round
timeout each, masked inputs run to the round's deadline, unmasking gets `unmask_fraction` more.
A device that misses a phase takes no further part; when fewer than the threshold remain the
round fails, with the reason in the log, and no version is made. Plain updates are refused.

Each device's weight in the mean is public and fixed when the round starts: its sample count
over the mean count of the selected devices (1 with unweighted aggregation). The device masks
weight x delta, clipped to `clip` per element; fixed point uses as many fraction bits (up to 24)
as the ring holds without the sum of the round's devices wrapping around.

Not resumable: the keys and the partial sum live in memory only, so a round open when the
aggregator stopped is started again from its tasks (fresh keys, a new session).

With the enrolled device keys (`enrolled`), an advertisement not signed by its device's key for
the round's session is refused (bad_signature) and the device left out, as devices that verify
the roster (`tierfl client --fleet-keys`) would refuse the whole roster over it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from aggregator.engines.base import OpenRound, Outgoing
from aggregator.engines.intake import Problem
from aggregator.engines.parts import EngineParts, forwarded
from aggregator.engines.rounds import RoundEngine
from aggregator.engines.tasks import with_secure
from aggregator.strategies.fedavg import ClientUpdate, Weights
from protocol.frame import FrameError
from protocol.messages import BnStatistics, RejectReason, SecAgg, SecureAggregation, TrainTask, Update, new_id
from protocol.secagg.device import verify_advertisement
from protocol.secagg.messages import (AdvertiseKeys, MaskedInput, Phase, SecAggError, SecAggParams, ShareKeys,
                                      UnmaskResponse)
from protocol.secagg.server import SecAggResult, SecAggServer
from protocol.secagg.wire import DEVICE_PHASES, unwrap, wrap

log = logging.getLogger(__name__)
MAX_FRACTION_BITS = 24  # float32 deltas carry 24 significant bits; more buys nothing
MIN_FRACTION_BITS = 8
_SENT_IN = dict(zip((Phase.ADVERTISE, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.UNMASKING), DEVICE_PHASES))


class SecureConfig(BaseModel):
    """Settings of secure rounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold_fraction: float = Field(2 / 3, gt=0, le=1)  # of the selected devices, rounded up (at least 2)
    clip: float = Field(16.0, gt=0, allow_inf_nan=False)  # bound on |weight x delta| per element
    ring_bits: Literal[32, 64] = 32
    keys_fraction: float = Field(0.2, gt=0, lt=0.5)  # of the round timeout, for advertising and again for sharing keys
    unmask_fraction: float = Field(0.25, gt=0, le=1)  # of the round timeout, for unmasking after the deadline


def fraction_bits(devices: int, clip: float, ring_bits: int) -> int:
    """The most fraction bits (up to 24) at which `devices` inputs of magnitude <= clip sum without wrapping."""
    for bits in range(MAX_FRACTION_BITS, MIN_FRACTION_BITS - 1, -1):
        if devices * math.ceil(clip * 2**bits) < 2 ** (ring_bits - 1):
            return bits
    raise ValueError(f"{devices} devices x clip {clip} leave fewer than {MIN_FRACTION_BITS} fraction bits in a "
                     f"{ring_bits}-bit ring: lower the clip or use 64 ring bits")


def phase_problem(device: str, sent: str, phase: Phase, expected: set[str], received: set[str], deadline: float,
                  now: float, what: str) -> Problem | None:
    """Why a device's message of phase `sent` is refused while the protocol of `what` ("round 3", "query 2") is in
    `phase`, expecting `expected` and having `received` by `deadline`; None if it is the one awaited."""
    if sent not in DEVICE_PHASES:
        return RejectReason.UNEXPECTED, f"devices do not send {sent} messages"
    now_phase = _SENT_IN[phase]
    if DEVICE_PHASES.index(sent) < DEVICE_PHASES.index(now_phase):
        return RejectReason.LATE, f"the {sent} phase of {what} has closed"
    if sent != now_phase:
        return RejectReason.UNEXPECTED, f"a {sent} message while {what} is in {now_phase}"
    if device not in expected:
        return RejectReason.NOT_SELECTED, f"{device} takes no part in the {now_phase} phase (it missed an earlier one)"
    if device in received:
        return RejectReason.DUPLICATE, f"{device} already sent its {now_phase} message"
    if now > deadline:
        return RejectReason.LATE, f"arrived {now - deadline:.1f} s after the {now_phase} deadline"
    return None


class UnmaskedMean:
    """A secure round's accumulator: the global weights plus the unmasked per-element weighted mean."""

    def __init__(self, global_weights: Mapping[str, np.ndarray], result: SecAggResult) -> None:
        self._global = global_weights
        self._result = result
        self.count = len(result.included)

    def add(self, update: ClientUpdate) -> None:
        """Never: a secure round's sum arrives unmasked whole."""
        raise TypeError("a secure round takes no individual updates")

    def result(self) -> Weights:
        """Global weights plus the mean delta (zero where no included device holds an element)."""
        return {name: (self._global[name] + mean).astype(np.float32) for name, mean in self._result.mean().items()}


class _UnsignedKeys(SecAggError):
    """An advertisement not signed by its device's enrolled key."""


@dataclass
class SecureRound:
    """The secure-aggregation state of the open round: its session, the protocol's server, the phase and who owes it."""

    session: str
    server: SecAggServer
    settings: dict[str, SecureAggregation]  # device -> what its task says
    phase: Phase = Phase.ADVERTISE
    deadline: float = 0.0
    expected: set[str] = field(default_factory=set)  # devices the phase waits for
    received: set[str] = field(default_factory=set)  # devices whose message of the phase was accepted


class SecureRoundEngine:
    """Rounds of the round engine, each summed by secure aggregation."""

    UNIT = RoundEngine.UNIT  # what the logs call one applied version
    # The Engine interface (aggregator.engines.base), served by the round engine that runs the rounds:
    (config, artifacts, registry, ledger, record, weights, finished, rejected, count_rejection, view, asked, round_key,
     note_bytes, current_round) = forwarded("rounds", "config", "artifacts", "registry", "ledger", "record", "weights",
                                            "finished", "rejected", "count_rejection", "view", "asked", "round_key",
                                            "note_bytes", "current_round")

    def __init__(self, parts: EngineParts, secure: SecureConfig, now: float | None = None,
                 enrolled: Mapping[str, str] | None = None) -> None:
        """`enrolled` (device -> Ed25519 public hex, the --enrolled file): refuse advertisements not signed by these keys."""
        if parts.config.bn_statistics == "devices" and parts.artifacts.card.batch_norm:
            raise ValueError("secure aggregation cannot pool batch-norm statistics measured on devices (each device's "
                             "would be in the clear): use --bn-statistics averaged")
        self.secure = secure
        self.enrolled = dict(enrolled) if enrolled is not None else None
        self.secure_round: SecureRound | None = None
        self.rounds = RoundEngine(parts, now, resume=False)
        self._drop_cut_round()

    def tick(self, now: float) -> list[Outgoing]:
        """Start a round, move the open one through its phases, or close it."""
        if self.finished:
            return []
        if self.secure_round is None:
            return self._start_round(now)
        return self._advance(now)

    def on_update(self, device_id: str, msg_id: str, update: Update, tensors: Mapping[str, np.ndarray], nbytes: int,
                  now: float) -> list[Outgoing]:
        """Refuse: in a secure fleet updates arrive masked, as SecAgg messages."""
        return self.rounds.intake.refuse(device_id, msg_id, update, RejectReason.UNEXPECTED,
                                         "this fleet aggregates securely: plain updates are refused (send masked input)")

    def on_bn_statistics(self, device_id: str, msg_id: str, body: BnStatistics, tensors: Mapping[str, np.ndarray],
                         now: float) -> list[Outgoing]:
        """Refused as the round engine refuses statistics outside a statistics phase (a secure round has none)."""
        return self.rounds.on_bn_statistics(device_id, msg_id, body, tensors, now)

    def on_secagg(self, device_id: str, msg_id: str, body: SecAgg, tensors: Mapping[str, np.ndarray], nbytes: int,
                  now: float) -> list[Outgoing]:
        """Take one device's message of the open secure round, or refuse it with a reason."""
        problem = self._check_secagg(device_id, body, now)
        if problem is None:
            try:
                self._accept(device_id, unwrap(body, tensors), body, nbytes)
            except _UnsignedKeys as exc:
                problem = (RejectReason.BAD_SIGNATURE, str(exc))
            except SecAggError as exc:
                problem = (RejectReason.BAD_TENSOR if body.phase == "masked_input" else RejectReason.MALFORMED, str(exc))
        if problem is not None:
            return self.rounds.intake.refuse(device_id, msg_id, body, problem[0], f"{body.phase}: {problem[1]}")
        return self._advance(now)

    def masked_tensors(self, device_id: str, body: SecAgg, now: float) -> dict[str, tuple[int, ...]]:
        """The uint8 tensors (name -> shape) this SecAgg message must carry, known before it is decoded: a masked
        input's ring integers as bytes, none in other phases; FrameError if the open round takes no such message."""
        if body.phase != "masked_input":
            return {}
        if (problem := self._check_secagg(device_id, body, now)) is not None:
            raise FrameError(problem[0], f"{body.phase}: {problem[1]}")
        assert self.secure_round is not None
        itemsize = self.secure_round.server.params.dtype.itemsize
        return {name: (math.prod(shape) * itemsize,) for name, shape in self.secure_round.settings[device_id].block.items()}

    def _drop_cut_round(self) -> None:
        """A secure round cut short cannot resume (its keys and sum were in memory): drop it, to be run again."""
        spooled = self.rounds.store.open_round.load(self.record.round, self.record.version)
        if spooled is not None:
            log.warning("round %d was open when the aggregator stopped; a secure round cannot resume, so it starts "
                        "again with fresh keys", spooled.plan.round)
            self.rounds.store.open_round.clear()

    # -- phases -----------------------------------------------------------------------------

    def _start_round(self, now: float) -> list[Outgoing]:
        """Open a round through the round engine and send its tasks with each device's secure-aggregation settings."""
        tasks = self.rounds.start_round(now)
        current = self.rounds.open_round
        if current is None:
            return tasks
        try:
            secure = self.secure_round = self._begin(current, now)
        except ValueError as exc:  # fewer than two devices, or a clip the ring cannot hold
            return self._fail(f"cannot start: {exc}", now)
        secured = []
        for task in tasks:
            assert task.device_id is not None
            assert isinstance(task.body, TrainTask)
            secured.append(Outgoing(task.device_id, with_secure(task.body, secure.settings[task.device_id]),
                                    task.tensors))
        log.info("round %d: secure aggregation, threshold %d of %d devices, %d-bit ring with %d fraction bits, clip %g",
                 current.number, secure.server.params.threshold, len(tasks), self.secure.ring_bits,
                 secure.server.params.frac_bits, self.secure.clip)
        return secured

    def _begin(self, current: OpenRound, now: float) -> SecureRound:
        devices = len(current.assignments)
        if devices < 2:
            raise ValueError(f"secure aggregation needs at least 2 devices, {devices} selected")
        params = SecAggParams(
            round=current.number, threshold=max(2, math.ceil(self.secure.threshold_fraction * devices)),
            shapes={name: tuple(value.shape) for name, value in self.weights.items()},
            ring_bits=self.secure.ring_bits, frac_bits=fraction_bits(devices, self.secure.clip, self.secure.ring_bits),
            clip=self.secure.clip, max_devices=devices,
        )
        session = new_id()
        weights = self._public_weights(current)
        settings = {
            device: SecureAggregation(
                session=session, threshold=params.threshold, max_devices=devices, ring_bits=params.ring_bits,
                frac_bits=params.frac_bits, clip=params.clip, weight=weights[device],
                shapes={n: list(s) for n, s in params.shapes.items()},
                block={n: list(s) for n, s in self.artifacts.tiers[a.tier].shapes.items()},
            )
            for device, a in current.assignments.items()
        }
        return SecureRound(session, SecAggServer(params), settings, Phase.ADVERTISE,
                            now + self.secure.keys_fraction * self.config.round_timeout_s, set(settings))

    def _public_weights(self, current: OpenRound) -> dict[str, float]:
        """Each device's weight in the mean: its announced samples (capped by --max-share) over the selected devices' mean (1 when unweighted)."""
        samples = {}
        for device, assignment in current.assignments.items():
            announced = assignment.announced_samples or 1
            samples[device] = max(1, min(announced, current.caps.get(device, announced))) if assignment.weighted else 1
        mean = sum(samples.values()) / len(samples)
        return {device: n / mean for device, n in samples.items()}

    def _advance(self, now: float) -> list[Outgoing]:
        """Close every phase that is over (several at once when the next is over already)."""
        out: list[Outgoing] = []
        while self.secure_round is not None and self._phase_over(self.secure_round, now):
            out += self._close_phase(self.secure_round, now)
        return out

    def _phase_over(self, secure: SecureRound, now: float) -> bool:
        owing = secure.expected - secure.received
        if not owing or now >= secure.deadline:
            return True
        return all((info := self.registry.get(device)) is not None and not info.online for device in owing)

    def _close_phase(self, secure: SecureRound, now: float) -> list[Outgoing]:
        current = self.rounds.open_round
        assert current is not None
        missing = sorted(secure.expected - secure.received)
        if missing:
            log.warning("round %d: no %s message from %s; left out of the rest of the round", current.number,
                        _SENT_IN[secure.phase], ", ".join(missing))
        server, timeout = secure.server, self.config.round_timeout_s
        try:
            if secure.phase is Phase.ADVERTISE:
                roster = server.roster()
                self._enter(secure, Phase.SHARE_KEYS, {a.device for a in roster.devices}, now + self.secure.keys_fraction * timeout)
                return [self._message(secure, device, roster) for device in sorted(secure.expected)]
            if secure.phase is Phase.SHARE_KEYS:
                deliveries = server.deliveries()
                self._enter(secure, Phase.MASKED_INPUT, set(deliveries), current.deadline)
                return [self._message(secure, device, message) for device, message in sorted(deliveries.items())]
            if secure.phase is Phase.MASKED_INPUT:
                request = server.unmask_request()
                self._enter(secure, Phase.UNMASKING, set(request.survivors), now + self.secure.unmask_fraction * timeout)
                return [self._message(secure, device, request) for device in request.survivors]
            result = server.result()
        except SecAggError as exc:
            hint = (" (a device that verifies the roster with --fleet-keys leaves the round when the roster holds keys "
                    "it cannot verify; its log says which)") if secure.phase is Phase.SHARE_KEYS else ""
            return self._fail(f"{exc}{hint}", now)
        current.accumulator = UnmaskedMean(self.weights, result)
        log.info("round %d: unmasked the sum of %d masked inputs%s", current.number, len(result.included),
                 f" ({len(result.dropped)} dropped after sharing keys: {', '.join(result.dropped)})" if result.dropped else "")
        return self._close_round(now)

    @staticmethod
    def _enter(secure: SecureRound, phase: Phase, expected: set[str], deadline: float) -> None:
        secure.phase, secure.expected, secure.received, secure.deadline = phase, expected, set(), deadline

    @staticmethod
    def _message(secure: SecureRound, device: str, message: BaseModel) -> Outgoing:
        body, _ = wrap(message, secure.session)
        return Outgoing(device, body)

    def _fail(self, reason: str, now: float) -> list[Outgoing]:
        assert self.rounds.open_round is not None
        log.warning("round %d: secure aggregation failed: %s", self.rounds.open_round.number, reason)
        return self._close_round(now)  # the strategy's accumulator took nothing: no version is made

    def _close_round(self, now: float) -> list[Outgoing]:
        self.secure_round = None
        return self.rounds.close_round(now)

    # -- messages -----------------------------------------------------------------------------

    def _check_secagg(self, device_id: str, body: SecAgg, now: float) -> Problem | None:
        current, secure = self.rounds.open_round, self.secure_round
        if current is None or secure is None or body.round < current.number:
            return RejectReason.STALE_ROUND, f"round {body.round} is not open (current: {current.number if current else 'none'})"
        if body.round > current.number:
            return RejectReason.FUTURE_ROUND, f"round {body.round} has not started (current: {current.number})"
        if body.session != secure.session:
            return RejectReason.STALE_ROUND, f"session {body.session} is an earlier attempt at round {current.number}"
        if device_id not in current.assignments:
            return RejectReason.NOT_SELECTED, f"{device_id} was not selected for round {current.number}"
        return phase_problem(device_id, body.phase, secure.phase, secure.expected, secure.received, secure.deadline,
                             now, f"round {current.number}")

    def _accept(self, device_id: str, message: BaseModel, body: SecAgg, nbytes: int) -> None:
        """Hand one parsed message to the protocol's server; SecAggError if it refuses it."""
        current, secure = self.rounds.open_round, self.secure_round
        assert current is not None and secure is not None
        sender = getattr(message, "device", device_id)
        if sender != device_id:
            raise SecAggError(f"a message in the name of {sender} from {device_id}")
        settings = secure.settings[device_id]
        if isinstance(message, AdvertiseKeys):
            if {n: list(s) for n, s in message.shapes.items()} != settings.block:
                raise SecAggError(f"advertised blocks {message.shapes} are not those of tier "
                                  f"{current.assignments[device_id].tier}")
            if self.enrolled is not None:
                try:
                    verify_advertisement(message, self.enrolled, secure.session)
                except SecAggError as exc:
                    raise _UnsignedKeys(f"{exc}: devices that verify the roster would refuse it") from None
            secure.server.add_advertisement(message)
        elif isinstance(message, ShareKeys):
            secure.server.add_shares(message)
        elif isinstance(message, MaskedInput):
            if message.weight != settings.weight:
                raise SecAggError(f"weight {message.weight} is not the task's public weight {settings.weight}")
            secure.server.add_masked_input(message)
            self._count_masked_input(current, device_id, body, nbytes)
        elif isinstance(message, UnmaskResponse):
            secure.server.add_unmasking(message)
        secure.received.add(device_id)
        current.bytes_up += nbytes

    def _count_masked_input(self, current: OpenRound, device_id: str, body: SecAgg, nbytes: int) -> None:
        current.answered.add(device_id)
        self.registry.answered(device_id, None)
        if body.eval_loss is not None and body.eval_accuracy is not None and body.eval_samples:
            current.evals.append((current.assignments[device_id].tier, body.eval_loss, body.eval_accuracy, body.eval_samples))
        if self.ledger:
            self.ledger.record(kind="secagg", accepted=True, round_number=body.round, device=device_id, nbytes=nbytes,
                               detail="masked input")
        log.info("round %d: masked input %d/%d from %s", current.number, len(current.answered),
                 len(current.assignments), device_id)
