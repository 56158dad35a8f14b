"""Secure-aggregation messages (protocol.secagg.messages) on the wire, inside SecAgg bodies.

Each phase's message travels as its JSON in `SecAgg.payload`, except a masked input's ring
integers: those go as uint8 frame tensors (each tensor's little-endian bytes), so a large model
never inflates the frame header. `wrap` and `unwrap` convert both ways; `unwrap` refuses a
payload of the wrong kind or round, and tensors on any other phase, with SecAggError.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

import numpy as np
from pydantic import BaseModel, ValidationError

from protocol.messages import SecAgg
from protocol.secagg.messages import (AdvertiseKeys, KeyRoster, MaskedInput, SecAggError, ShareDelivery, ShareKeys,
                                      UnmaskRequest, UnmaskResponse)

PHASES: dict[str, type[BaseModel]] = {
    "advertise": AdvertiseKeys,
    "roster": KeyRoster,
    "share_keys": ShareKeys,
    "delivery": ShareDelivery,
    "masked_input": MaskedInput,
    "unmask_request": UnmaskRequest,
    "unmasking": UnmaskResponse,
}
DEVICE_PHASES = ("advertise", "share_keys", "masked_input", "unmasking")  # what devices send, in protocol order
_PHASE_OF = {model: phase for phase, model in PHASES.items()}


def wrap(message: BaseModel, session: str, **evaluation: float | int | None) -> tuple[SecAgg, dict[str, np.ndarray] | None]:
    """The SecAgg body (and, for a masked input, the uint8 tensors) that carry `message`."""
    phase = _PHASE_OF[type(message)]
    tensors = None
    if isinstance(message, MaskedInput):
        tensors = {name: np.frombuffer(base64.b64decode(text), np.uint8) for name, text in message.tensors.items()}
        message = message.model_copy(update={"tensors": {}})
    body = SecAgg(round=message.round, session=session, phase=phase, payload=message.model_dump_json(), **evaluation)
    return body, tensors


def unwrap(body: SecAgg, tensors: Mapping[str, np.ndarray]) -> BaseModel:
    """The protocol.secagg.messages message a SecAgg body carries; SecAggError when it does not parse or fit the body."""
    try:
        message = PHASES[body.phase].model_validate_json(body.payload)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "payload"
        raise SecAggError(f"the {body.phase} payload does not parse: {where}: {error['msg']}") from None
    if message.round != body.round:
        raise SecAggError(f"a {body.phase} payload of round {message.round} in a message of round {body.round}")
    if not isinstance(message, MaskedInput):
        if tensors:
            raise SecAggError(f"a {body.phase} message carries no tensors, this one has {len(tensors)}")
        return message
    if message.tensors:
        raise SecAggError("masked tensors travel as uint8 frame tensors, not in the payload")
    encoded = {}
    for name, value in tensors.items():
        if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
            raise SecAggError(f"masked tensor {name!r} must be the uint8 bytes of its ring integers")
        encoded[name] = base64.b64encode(value.tobytes()).decode("ascii")
    return message.model_copy(update={"tensors": encoded})
