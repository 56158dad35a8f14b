"""The device's side of secure rounds (protocol.secagg.messages): keys, shares, the masked delta, unmasking.

The agent's device loop is its one caller. A secure task (TrainTask.secure) opens a session as soon as
it is received: fresh keys are advertised before training starts. The roster is answered with
encrypted shares, the share delivery is kept; the task pipeline hands in the trained delta, and
whichever of the two comes last masks weight x delta (clipped to the agreed bound) and sends it. The unmask request gets the
shares the protocol allows it. A refused step ends the session, and the aggregator counts the
device as dropped. Only the newest secure task has a session; messages of another are ignored.

A secure task's settings are checked as this device will use them (`secure_params`) when it is
handed in: `on_task` refuses one that fails (`malformed`), and the agent then neither queues nor
trains it. Every refusal (settings `malformed`, a message whose payload does not parse `malformed`,
a step the protocol does not allow or a roster that does not verify `unexpected`) goes to the
`refuse` callback with its reason: the agent counts it in `refused` and logs it through its
throttled refusal path, like any other (without a callback it is logged here).

The device signs its advertisement with its Ed25519 device key (bound to the round attempt's
session). Given the fleet's keys (device id -> public key, `tierfl client --fleet-keys`), it
refuses a roster holding an advertisement that is unsigned, signed by another key or from a
device not in them: an aggregator that substitutes a device's keys to read the shares meant for
it gets none. Without them the roster is taken on trust (a warning says so once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ValidationError

from edge_client.trainer import EvalStats
from protocol.messages import Query, RejectReason, SecAgg, SecureAggregation, TrainTask
from protocol.secagg.device import SecAggDevice
from protocol.secagg.messages import (KeyRoster, SecAggError, SecAggParams, ShareDelivery, UnmaskRequest,
                                      check_block_shapes)
from protocol.secagg.wire import unwrap, wrap

log = logging.getLogger(__name__)
Send = Callable[[SecAgg, Mapping[str, np.ndarray] | None], int]  # publish one message up; returns the bytes sent
Refuse = Callable[[RejectReason, str], None]  # a refusal's reason and detail, counted by the agent


def secure_params(task: TrainTask | Query) -> SecAggParams:
    """The secure task's parameters, checked as the device uses them (the ring holds the sum, the tier's blocks fit
    the round's shapes); SecAggError naming what fails."""
    settings = task.secure
    if settings is None:
        raise SecAggError(f"round {task.round}: not a secure task")
    try:
        params = SecAggParams(round=task.round, threshold=settings.threshold, max_devices=settings.max_devices,
                              ring_bits=settings.ring_bits, frac_bits=settings.frac_bits, clip=settings.clip,
                              shapes={n: tuple(s) for n, s in settings.shapes.items()})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()[:4])
        raise SecAggError(f"round {task.round}: its secure-aggregation settings fail: {problems}") from None
    check_block_shapes({n: tuple(int(x) for x in s) for n, s in settings.block.items()}, params,
                       f"round {task.round}: secure-aggregation settings")
    return params


@dataclass
class _Session:
    task: TrainTask | Query
    settings: SecureAggregation
    device: SecAggDevice
    delivery: ShareDelivery | None = None
    delta: dict[str, np.ndarray] | None = None
    evaluation: dict[str, float | int | None] = field(default_factory=dict)
    sent: bool = False


class SecureClient:
    """One device's secure sessions, fed by the agent's device loop (tasks, messages and trained deltas)."""

    def __init__(self, device_id: str, send: Send, signing_key: Ed25519PrivateKey | None = None,
                 fleet_keys: Mapping[str, str] | None = None, refuse: Refuse | None = None) -> None:
        """Sign advertisements with `signing_key`; with `fleet_keys` (device -> Ed25519 public hex) verify every roster;
        every refusal goes to `refuse` (else it is logged).

        ValueError when `fleet_keys` does not list `signing_key` for this device: every roster would be refused.
        """
        if fleet_keys is not None:
            listed = fleet_keys.get(device_id)
            if signing_key is None:
                raise ValueError("verifying the key roster with the fleet's keys needs this device's own signing key")
            if listed is None:
                raise ValueError(f"the fleet's keys do not list this device ({device_id}), so it would refuse every "
                                 "roster: add its `tierfl client --show-key` line to the file")
            mine = signing_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
            if mine != listed:
                raise ValueError(f"the fleet's keys list another key for {device_id} than this device's {mine} "
                                 "(a key created anew in another cache dir?)")
        self.device_id = device_id
        self._send = send
        self._signing_key = signing_key
        self._fleet_keys = dict(fleet_keys) if fleet_keys is not None else None
        self._warned_unverified = False
        self._session: _Session | None = None
        self._refuse = refuse

    def _refused(self, reason: RejectReason, detail: str) -> None:
        if self._refuse is not None:
            self._refuse(reason, detail)
        else:
            log.error("%s: %s", reason.value, detail)

    def on_task(self, task: TrainTask | Query) -> bool:
        """Open the session of a secure task (or analytics query) and advertise its fresh keys; False (refused) if its
        settings fail."""
        settings = task.secure
        assert settings is not None
        try:
            device = SecAggDevice(self.device_id, secure_params(task), settings.block, signing_key=self._signing_key,
                                  enrolled=self._fleet_keys, session=settings.session)
        except SecAggError as exc:
            self._refused(RejectReason.MALFORMED, f"refusing the secure task: {exc}")
            return False
        if self._fleet_keys is None and not self._warned_unverified:
            log.warning("secure aggregation: the key roster is not verified (no --fleet-keys): an aggregator that "
                        "substitutes another device's keys could read the shares this device sends it")
            self._warned_unverified = True
        self._session = _Session(task, settings, device)
        self._reply(self._session, device.advertise())
        log.info("round %d: secure aggregation (threshold %d of %d): keys advertised", task.round,
                 settings.threshold, settings.max_devices)
        return True

    def on_message(self, body: SecAgg) -> None:
        """Answer the aggregator's roster, keep its share delivery, answer its unmask request."""
        session = self._session
        if session is None or body.session != session.settings.session:
            log.info("ignored a secure-aggregation %s message of another session (round %d)", body.phase, body.round)
            return
        try:
            message = unwrap(body, {})
        except SecAggError as exc:
            self._refused(RejectReason.MALFORMED, f"round {body.round}: secure aggregation message refused, leaving "
                          f"the round: {exc}")
            self._session = None
            return
        try:
            if isinstance(message, KeyRoster):
                self._reply(session, session.device.share_keys(message))
                log.info("round %d: shared keys with a roster of %d devices%s", body.round, len(message.devices),
                         ", every advertisement verified against the fleet's keys" if self._fleet_keys else "")
            elif isinstance(message, ShareDelivery):
                session.delivery = message
                self._mask_when_ready(session)
            elif isinstance(message, UnmaskRequest):
                self._reply(session, session.device.unmask(message))
                log.info("round %d: unmasking answered (%d survivors, %d dropped)", body.round,
                         len(message.survivors), len(message.dropped))
            else:
                raise SecAggError(f"the aggregator does not send {body.phase} messages")
        except SecAggError as exc:
            self._refused(RejectReason.UNEXPECTED, f"round {body.round}: secure aggregation step refused, leaving the "
                          f"round: {exc}")
            self._session = None

    def owns(self, session: str) -> bool:
        """Whether `session` is this client's current session (the agent routes SecAgg messages by it)."""
        return self._session is not None and self._session.settings.session == session

    def trained(self, task: TrainTask | Query, delta: Mapping[str, np.ndarray], evaluation: EvalStats | None) -> None:
        """The trained delta of a secure task (or a secure query's answer): masked and sent once the share delivery
        is in."""
        session = self._session
        if session is None or task.secure is None or task.secure.session != session.settings.session:
            log.warning("round %d: trained, but its secure session is gone; nothing sent", task.round)
            return
        session.delta = self._clipped(task.round, delta, session.settings)
        if evaluation is not None:
            session.evaluation = dict(eval_loss=evaluation.loss, eval_accuracy=evaluation.accuracy,
                                      eval_samples=evaluation.samples)
        try:
            self._mask_when_ready(session)
        except SecAggError as exc:
            self._refused(RejectReason.UNEXPECTED, f"round {task.round}: cannot mask the update, leaving the round: {exc}")
            self._session = None

    def _mask_when_ready(self, session: _Session) -> None:
        """Mask and send the delta once both it and the share delivery are in (once per session)."""
        if session.delivery is None or session.delta is None or session.sent:
            return
        masked = session.device.mask(session.delivery, session.delta, session.settings.weight)
        sent = self._reply(session, masked, **session.evaluation)
        session.sent, session.delta = True, None
        log.info("round %d: sent the masked update (%d bytes)", session.task.round, sent)

    def _reply(self, session: _Session, message: BaseModel, **evaluation: float | int | None) -> int:
        body, tensors = wrap(message, session.settings.session, **evaluation)
        return self._send(body, tensors)

    @staticmethod
    def _clipped(round_number: int, delta: Mapping[str, np.ndarray], settings: SecureAggregation) -> dict[str, np.ndarray]:
        """The delta with every element within clip / weight, so that weight x delta stays within the clip."""
        bound = settings.clip / settings.weight * (1 - 1e-6)  # a hair inside: float rounding must not cross the clip
        clipped = {name: np.clip(np.asarray(value, np.float64), -bound, bound) for name, value in delta.items()}
        over = sum(int((np.abs(np.asarray(value)) > bound).sum()) for value in delta.values())
        if over:
            log.warning("round %d: %d update elements beyond +-%.4g clipped for secure aggregation", round_number, over, bound)
        return clipped
