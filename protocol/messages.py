"""Message schemas: the JSON header of every frame, validated by pydantic on both sides."""

from __future__ import annotations

import time
import uuid
from enum import Enum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Count = Annotated[int, Field(ge=0)]
SessionId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RejectReason(str, Enum):
    """Why a message was refused; sent back to the sender and counted by the receiver."""

    MALFORMED = "malformed"
    OVERSIZE = "oversize"
    BAD_HASH = "bad_hash"
    BAD_TENSOR = "bad_tensor"
    WRONG_FLEET = "wrong_fleet"
    SENDER_MISMATCH = "sender_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_TIER = "unknown_tier"
    NOT_SELECTED = "not_selected"
    STALE_ROUND = "stale_round"
    FUTURE_ROUND = "future_round"
    WRONG_VERSION = "wrong_version"
    DUPLICATE = "duplicate"
    LATE = "late"
    UNKNOWN_ARTIFACT = "unknown_artifact"
    UNEXPECTED = "unexpected"
    BAD_SIGNATURE = "bad_signature"
    NOT_ENROLLED = "not_enrolled"
    TOO_STALE = "too_stale"
    REPLAYED = "replayed"  # a signed message seen before, or bound to another session
    RATE_LIMITED = "rate_limited"  # the sender exceeded its budget of messages of this kind
    TOO_MANY_SAMPLES = "too_many_samples"  # claims more samples than the device announced
    OUTLIER = "outlier"  # an update whose norm is far beyond the round's
    NON_FINITE = "non_finite"  # would make the global model NaN or Inf
    INTERNAL_ERROR = "internal_error"  # a bug met while handling the message (last-resort guard)


class Hello(_Strict):
    """Device -> aggregator on connect: who I am and what I hold."""

    kind: Literal["hello"] = "hello"
    tier: str | None = None  # a fixed tier the device asks for; None lets the aggregator choose
    num_samples: Count
    num_test_samples: Count = 0
    backend: str = "ort-training"
    libraries: dict[str, str] = {}
    holds: dict[Identifier, Count] = {}  # tier -> model version whose weights the device still holds
    seconds_per_sample: dict[Identifier, Annotated[float, Field(gt=0, le=3600)]] = {}  # tier -> benchmark
    session: SessionId | None = None  # fresh per agent start: binds this device's later Status messages to this hello


class Status(_Strict):
    """Retained liveness of a device; `online=False` is its last will."""

    kind: Literal["status"] = "status"
    online: bool
    session: SessionId | None = None  # the Hello.session of the agent that sent it (a replayed old status differs)


class SecureAggregation(_Strict):
    """Task.secure: the round is summed by secure aggregation (protocol.secagg); answer with SecAgg messages, no Update."""

    session: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]  # this attempt at the round; messages of another are stale
    threshold: Annotated[int, Field(ge=2)]  # shares that rebuild a device's secrets
    max_devices: Annotated[int, Field(ge=2)]
    ring_bits: Literal[32, 64] = 32
    frac_bits: Annotated[int, Field(ge=0, le=52)]  # fixed-point fraction bits of the masked integers
    clip: Annotated[float, Field(gt=0, allow_inf_nan=False)]  # bound on |weight * delta| per element
    weight: Annotated[float, Field(gt=0, allow_inf_nan=False)]  # this device's public weight in the mean
    shapes: dict[str, list[Annotated[int, Field(ge=1)]]]  # the global tensors
    block: dict[str, list[Annotated[int, Field(ge=1)]]]  # this device's tier: the leading block of each


class Task(_Strict):
    """Aggregator -> device: train the attached weights of `tier` for one round."""

    kind: Literal["task"] = "task"
    round: Annotated[int, Field(ge=1)]
    model_version: Count
    tier: Identifier
    manifest_sha256: Sha256
    artifacts: dict[str, Sha256]  # file name inside the tier folder -> sha256 (includes manifest.json)
    epochs: Annotated[int, Field(ge=1, le=1000)]
    batch_size: Annotated[int, Field(ge=1, le=65536)]
    learning_rate: Annotated[float, Field(gt=0, le=10)]
    deadline: float  # unix time by which the update must arrive
    seed: int = 0
    evaluate: bool = True  # also report loss/accuracy of the received weights on the local test split
    mask_classes: bool = False  # leave the classes the device has no data for out of its softmax
    proximal_mu: Annotated[float, Field(ge=0, le=100)] = 0.0  # FedProx: mu/2 ||w - w_received||^2 added to the loss
    statistics_only: bool = False  # no training: measure batch-norm statistics of these weights, reply Statistics
    delta_from: Count | None = None  # tensors are a delta to add to this version of the tier, which the device holds
    variant: Count = 0  # FedMut: the weights are this device's mutation of the model version (0: the model itself)
    weighted: bool = True  # the aggregator weights updates by samples (False: one vote per device); edge aggregators follow it
    dp_clip: Annotated[float, Field(ge=0)] = 0.0  # local differential privacy: clip the delta to this L2 norm ...
    dp_noise: Annotated[float, Field(ge=0)] = 0.0  # ... and add Gaussian noise of std dp_noise * dp_clip (0: off)
    secure: SecureAggregation | None = None  # secure aggregation: mask the delta, send it as SecAgg messages


class Fetch(_Strict):
    """Device -> aggregator: send me these artifact files."""

    kind: Literal["fetch"] = "fetch"
    sha256: Annotated[list[Sha256], Field(min_length=1, max_length=64)]


class Blob(_Strict):
    """Aggregator -> device: one artifact file, as a single uint8 tensor named `data`."""

    kind: Literal["blob"] = "blob"
    sha256: Sha256
    name: str


class Update(_Strict):
    """Device -> aggregator: the result of a task; tensors are deltas (trained minus received)."""

    kind: Literal["update"] = "update"
    update_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    round: Annotated[int, Field(ge=1)]
    base_version: Count
    tier: Identifier
    num_samples: Annotated[int, Field(ge=1)]
    steps: Count
    train_loss: float
    train_accuracy: Annotated[float, Field(ge=0, le=1)]
    train_seconds: Annotated[float, Field(ge=0)]
    eval_loss: float | None = None
    eval_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    eval_samples: Count = 0
    unchanged: bool = False  # selective upload: no tensors, count me as a zero update
    contributors: dict[Identifier, "TierShare"] | None = None  # an edge aggregator's combined update: tier -> who trained it


class TierShare(_Strict):
    """The devices of one tier behind an edge aggregator's combined update."""

    samples: Annotated[int, Field(ge=1)]
    devices: Annotated[int, Field(ge=1)]


class Statistics(_Strict):
    """Device -> aggregator: batch-norm statistics of the task's weights on the device's training data.

    Tensors `<bn>.running_mean` and `<bn>.running_var` (population variance), one pair per layer.
    """

    kind: Literal["statistics"] = "statistics"
    round: Annotated[int, Field(ge=1)]
    base_version: Count
    tier: Identifier
    num_samples: Annotated[int, Field(ge=1)]


class SecAgg(_Strict):
    """Either way in a secure round: one protocol.secagg message, its JSON in `payload`.

    A masked input's ring integers travel as uint8 frame tensors (one per tensor, its bytes), not
    in the payload; its eval fields are the device's federated evaluation, as in Update.
    """

    kind: Literal["secagg"] = "secagg"
    round: Annotated[int, Field(ge=1)]
    session: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]  # Task.secure.session
    phase: Literal["advertise", "roster", "share_keys", "delivery", "masked_input", "unmask_request", "unmasking"]
    payload: Annotated[str, Field(max_length=1 << 20)]
    eval_loss: float | None = None
    eval_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    eval_samples: Count = 0


class Reject(_Strict):
    """Either side -> the other: your message was refused, and why."""

    kind: Literal["reject"] = "reject"
    reason: RejectReason
    detail: str
    ref_msg_id: str | None = None
    round: int | None = None


class RoundSummary(_Strict):
    """Aggregator -> observers: one committed round."""

    kind: Literal["round"] = "round"
    round: int
    version: int
    selected: int
    answered: int
    accuracy: float | None = None
    loss: float | None = None
    accuracy_source: Literal["held-out", "federated", "none"] = "none"
    accuracy_by_tier: dict[str, float] = {}
    bytes_up: Count = 0  # frames of the updates counted this round
    bytes_down: Count = 0  # tasks and artifact files sent this round
    seconds: float = 0.0
    rejected: dict[str, int] = {}
    metrics: dict[str, float] = {}  # the strategy's own: FedBuff staleness, FedMut radius, DP epsilon...
    final: bool = False


Body = Annotated[
    Union[Hello, Status, Task, Fetch, Blob, Update, Statistics, SecAgg, Reject, RoundSummary],
    Field(discriminator="kind"),
]


class TensorEntry(_Strict):
    """Where one tensor sits in the frame payload and how it is encoded."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    codec: Annotated[str, Field(min_length=1, max_length=32)]
    dtype: Literal["float32", "uint8"]  # dtype after decoding
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=8)]
    nbytes: Count
    meta: dict[str, float | int | str] = {}


class FrameHeader(_Strict):
    """The JSON header of a frame: who sent what, for which fleet, plus the tensor table."""

    protocol: Literal[1] = PROTOCOL_VERSION
    fleet: Identifier
    sender: Identifier
    msg_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] = Field(default_factory=lambda: uuid.uuid4().hex)
    sent_at: float = Field(default_factory=time.time)
    body: Body
    tensors: list[TensorEntry] = []
    payload_sha256: Sha256 | None = None
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")] | None = None  # Ed25519 by the sender (protocol.signing)


def new_id() -> str:
    """A fresh 32-hex-digit message or update id."""
    return uuid.uuid4().hex
