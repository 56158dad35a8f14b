"""One secure round run in process (protocol.secagg.messages), every message passed as JSON bytes: for tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from protocol.secagg.device import SecAggDevice
from protocol.secagg.messages import (AGGREGATOR, AdvertiseKeys, KeyRoster, MaskedInput, Phase, SecAggParams,
                                      ShareDelivery, ShareKeys, UnmaskRequest, UnmaskResponse)
from protocol.secagg.server import SecAggResult, SecAggServer


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
