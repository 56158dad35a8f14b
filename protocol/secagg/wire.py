"""Secure-aggregation messages (protocol.secagg.messages) on the wire, inside SecAgg bodies.

Each phase's message travels as its JSON in `SecAgg.payload`, except a masked input's ring
integers: those go as uint8 frame tensors (each tensor's little-endian bytes), so a large model
never inflates the frame header. In memory such a masked input is a `MaskedTensors`: the message
with its JSON `tensors` left empty and the ring integers' bytes beside it, so they cross from the
device's masking to the aggregator's sum as raw bytes, never through base64. `wrap` and `unwrap`
convert both ways; `unwrap` refuses a payload of the wrong kind or round, and tensors on any
other phase, with SecAggError.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydantic import BaseModel, PrivateAttr, ValidationError

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


class MaskedTensors(MaskedInput):
    """A masked input whose ring integers ride beside the message as raw bytes (a frame's uint8 tensors)."""

    _ring_bytes: dict[str, np.ndarray] = PrivateAttr(default_factory=dict)

    @classmethod
    def carrying(cls, message: MaskedInput, ring_bytes: Mapping[str, np.ndarray]) -> MaskedTensors:
        """`message` (its JSON `tensors` empty) with `ring_bytes`: per tensor, the uint8 little-endian bytes of its ring."""
        if message.tensors:
            raise SecAggError("masked tensors travel as uint8 frame tensors, not in the payload")
        carried = cls(round=message.round, device=message.device, weight=message.weight, tensors={})
        carried._ring_bytes = dict(ring_bytes)
        return carried

    @property
    def ring_bytes(self) -> dict[str, np.ndarray]:
        """Per tensor, the uint8 little-endian bytes of its ring integers."""
        return dict(self._ring_bytes)


def wrap(message: BaseModel, session: str, **evaluation: float | int | None) -> tuple[SecAgg, dict[str, np.ndarray] | None]:
    """The SecAgg body (and, for a masked input, its uint8 tensors) that carry `message`.

    A masked input must be a MaskedTensors (its ring integers as raw bytes); TypeError otherwise.
    """
    tensors = None
    if isinstance(message, MaskedInput):
        if not isinstance(message, MaskedTensors):
            raise TypeError("a masked input goes on the wire as MaskedTensors: its ring integers as raw bytes")
        tensors = message.ring_bytes
    phase = _PHASE_OF[MaskedInput if isinstance(message, MaskedInput) else type(message)]
    body = SecAgg(round=message.round, session=session, phase=phase, payload=message.model_dump_json(), **evaluation)
    return body, tensors


def unwrap(body: SecAgg, tensors: Mapping[str, np.ndarray]) -> BaseModel:
    """The protocol.secagg.messages message a SecAgg body carries (a masked input as MaskedTensors, the frame's bytes
    beside it); SecAggError when it does not parse or fit the body."""
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
    for name, value in tensors.items():
        if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
            raise SecAggError(f"masked tensor {name!r} must be the uint8 bytes of its ring integers")
    return MaskedTensors.carrying(message, tensors)
