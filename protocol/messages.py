"""Message schemas: the JSON header of every frame, validated by pydantic on both sides."""

from __future__ import annotations

import math
import time
import uuid
from enum import Enum
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

PROTOCOL_VERSION = 1

# Bounds of every field a peer can send: far above what a real fleet reaches, low enough that no
# count overflows SQLite's int64 or a float64 sum, and no message costs more than its bytes.
MAX_ROUND = 10**9  # rounds, model versions, FedMut variants
MAX_SAMPLES = 10**9  # samples one device (or one relay) claims
MAX_DEVICES = 10**6  # devices behind one count (a round's selected/answered, a relay's tier, secure rounds)
MAX_STEPS = 10**12  # optimiser steps of one task
MAX_TOTAL_BYTES = 1 << 50  # byte counters of a round summary
MAX_SECONDS = 1e9  # durations (train_seconds, a round's seconds)
MAX_UNIX_TIME = 1e13  # timestamps (sent_at, deadline): 300,000 years from 1970
MAX_LOSS = 1e12  # |loss| reported by a device
MAX_SEED = 2**63 - 1  # |TrainTask.seed|: an int64
MAX_TIERS = 64  # entries of a per-tier dict (holds, seconds_per_sample, contributors, accuracy_by_tier)
MAX_ARTIFACTS = 64  # files of one tier (TierFiles.artifacts, Fetch.sha256)
MAX_LIBRARIES = 64  # Hello.libraries entries
MAX_SHORT_TEXT = 64  # Hello.backend, library names, metric and reason names
MAX_TEXT = 256  # names: files, tensors, library versions
MAX_DETAIL = 2048  # Reject.detail (longer details are cut, never refused)
MAX_METRICS = 64  # RoundSummary.rejected / metrics entries
MAX_TENSORS = 4096  # tensor entries of one frame (and tensors of a secure round)
MAX_TENSOR_DIMS = 8  # axes of one tensor
MAX_TENSOR_ELEMENTS = 1 << 26  # elements of one tensor, and so of any one axis
MAX_FRAME_ELEMENTS = 1 << 26  # elements all the tensors of one frame decode to (256 MiB of float32)
MAX_TENSOR_BYTES = 1 << 40  # TensorEntry.nbytes
MAX_META_ENTRIES = 8  # TensorEntry.meta entries (codecs use one: "scale")
MAX_META_INT = 2**63 - 1  # |int| in TensorEntry.meta
MAX_DP = 1e9  # TrainTask.dp_clip, TrainTask.dp_noise
MAX_SECAGG_CLIP = 1e9  # SecureAggregation.clip
MAX_SECAGG_WEIGHT = 1e12  # SecureAggregation.weight
MAX_BINS = 4096  # Query.bins: fixed bins of a quantile sketch
MAX_CLASSES = 100_000  # Query.classes (as ModelCard bounds them)
MAX_VALUE_RANGE = 1e6  # |Query.low|, |Query.high|: the stated range of input values
MAX_LOSS_CLIP = 1e4  # Query.loss_clip
MAX_FINETUNE_STEPS = 100_000  # TrainTask.finetune_steps: local steps of the personalization fine-tune


def _shape_fits(shape: list[int]) -> list[int]:
    if math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise ValueError(f"shape {shape} has more than {MAX_TENSOR_ELEMENTS} elements")
    return shape


def _cut_detail(value: object) -> object:
    return value[:MAX_DETAIL] if isinstance(value, str) else value


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Count = Annotated[int, Field(ge=0, le=MAX_SAMPLES)]
Version = Annotated[int, Field(ge=0, le=MAX_ROUND)]
Round = Annotated[int, Field(ge=1, le=MAX_ROUND)]
Samples = Annotated[int, Field(ge=1, le=MAX_SAMPLES)]
Loss = Annotated[float, Field(ge=-MAX_LOSS, le=MAX_LOSS, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
ShortText = Annotated[str, Field(max_length=MAX_SHORT_TEXT)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
SessionId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
TensorName = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
Dimension = Annotated[int, Field(ge=0, le=MAX_TENSOR_ELEMENTS)]
Shape = Annotated[list[Dimension], Field(max_length=MAX_TENSOR_DIMS), AfterValidator(_shape_fits)]
BlockShape = Annotated[list[Annotated[int, Field(ge=1, le=MAX_TENSOR_ELEMENTS)]], Field(max_length=MAX_TENSOR_DIMS),
                       AfterValidator(_shape_fits)]
MetaValue = Union[
    Annotated[int, Field(ge=-MAX_META_INT, le=MAX_META_INT)],
    Annotated[float, Field(allow_inf_nan=False)],
    ShortText,
]


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
    tier: Identifier | None = None  # a fixed tier the device asks for; None lets the aggregator choose
    num_samples: Count
    num_test_samples: Count = 0
    backend: ShortText = "ort-training"
    libraries: Annotated[dict[ShortText, Text], Field(max_length=MAX_LIBRARIES)] = {}
    holds: Annotated[dict[Identifier, Version], Field(max_length=MAX_TIERS)] = {}  # tier -> model version whose weights the device still holds
    seconds_per_sample: Annotated[dict[Identifier, Annotated[float, Field(gt=0, le=3600)]],
                                  Field(max_length=MAX_TIERS)] = {}  # tier -> benchmark
    session: SessionId | None = None  # fresh per agent start: binds this device's later Status messages to this hello


class Status(_Strict):
    """Retained liveness of a device; `online=False` is its last will."""

    kind: Literal["status"] = "status"
    online: bool
    session: SessionId | None = None  # the Hello.session of the agent that sent it (a replayed old status differs)


class SecureAggregation(_Strict):
    """TrainTask.secure: the round is summed by secure aggregation (protocol.secagg.messages); answer with SecAgg messages, no Update."""

    session: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]  # this attempt at the round; messages of another are stale
    threshold: Annotated[int, Field(ge=2, le=MAX_DEVICES)]  # shares that rebuild a device's secrets
    max_devices: Annotated[int, Field(ge=2, le=MAX_DEVICES)]
    ring_bits: Literal[32, 64] = 32
    frac_bits: Annotated[int, Field(ge=0, le=52)]  # fixed-point fraction bits of the masked integers
    clip: Annotated[float, Field(gt=0, le=MAX_SECAGG_CLIP, allow_inf_nan=False)]  # bound on |weight * delta| per element
    weight: Annotated[float, Field(gt=0, le=MAX_SECAGG_WEIGHT, allow_inf_nan=False)]  # this device's public weight in the mean
    shapes: Annotated[dict[TensorName, BlockShape], Field(max_length=MAX_TENSORS)]  # the global tensors
    block: Annotated[dict[TensorName, BlockShape], Field(max_length=MAX_TENSORS)]  # this device's tier: the leading block of each


class AttachedWeights(_Strict):
    """How a task's attached weights are encoded."""

    delta_from: Version | None = None  # a delta to add to this version of the tier, held by the device (None: whole)
    variant: Version = 0  # FedMut: this device's mutation of the model version (0: the model itself, and to measure)
    control: bool = False  # SCAFFOLD: the server's control variate rides along as scaffold/<param> (protocol.control)


class TierFiles(_Strict):
    """A tier's files: its manifest's sha256 and every file of its folder by name, as a task or a Catalogue names them."""

    tier: Identifier
    manifest_sha256: Sha256
    artifacts: Annotated[dict[Text, Sha256], Field(max_length=MAX_ARTIFACTS)]  # file name inside the tier folder -> sha256 (includes manifest.json)


class TaskScope(TierFiles):
    """What every task carries: the round, the tier's weights at a model version, the tier's files, the deadline."""

    round: Round
    model_version: Version
    deadline: Annotated[float, Field(ge=0, le=MAX_UNIX_TIME, allow_inf_nan=False)]  # unix time by which the answer must arrive
    weights: AttachedWeights = AttachedWeights()


class TrainTask(TaskScope):
    """Aggregator -> device: train the attached weights of `tier` for one round, reply Update (SecAgg when `secure`)."""

    kind: Literal["train"] = "train"
    epochs: Annotated[int, Field(ge=1, le=1000)]
    batch_size: Annotated[int, Field(ge=1, le=65536)]
    learning_rate: Annotated[float, Field(gt=0, le=10)]
    seed: Annotated[int, Field(ge=-MAX_SEED, le=MAX_SEED)] = 0
    evaluate: bool = True  # also report loss/accuracy of the received weights on the local test split
    mask_classes: bool = False  # leave the classes the device has no data for out of its softmax
    logit_adjust: Annotated[float, Field(ge=0, le=10)] = 0.0  # >0: add this times log(local label shares) to the logits in the loss
    proximal_mu: Annotated[float, Field(ge=0, le=100)] = 0.0  # FedProx: mu/2 ||w - w_received||^2 added to the loss
    weighted: bool = True  # the aggregator weights updates by samples (False: one vote per device); relays follow it
    dp_clip: Annotated[float, Field(ge=0, le=MAX_DP)] = 0.0  # local differential privacy: clip the delta to this L2 norm ...
    dp_noise: Annotated[float, Field(ge=0, le=MAX_DP)] = 0.0  # ... and add Gaussian noise of std dp_noise * dp_clip (0: off)
    secure: SecureAggregation | None = None  # secure aggregation: mask the delta, send it as SecAgg messages
    personal_layers: Annotated[list[TensorName], Field(max_length=MAX_TENSORS)] = []  # FedPer: kept on the device, never sent
    finetune_steps: Annotated[int, Field(ge=0, le=MAX_FINETUNE_STEPS)] = 0  # >0: report accuracy after this many local steps


class MeasureBnStatistics(TaskScope):
    """Aggregator -> device: no training; measure the batch-norm statistics of the attached weights, reply BnStatistics."""

    kind: Literal["measure_bn_statistics"] = "measure_bn_statistics"


Task = TrainTask | MeasureBnStatistics  # any task a device carries out

Computation = Literal["label_histogram", "sample_count", "feature_moments", "quantile_sketch", "model_metrics"]
# A query's parameters, bounded here once (Query, and the operator's AnalyticsRequest in aggregator.analytics):
ValueBound = Annotated[float, Field(ge=-MAX_VALUE_RANGE, le=MAX_VALUE_RANGE, allow_inf_nan=False)]  # low, high
Bins = Annotated[int, Field(ge=1, le=MAX_BINS)]
LossClip = Annotated[float, Field(gt=0, le=MAX_LOSS_CLIP, allow_inf_nan=False)]


class Query(_Strict):
    """Aggregator -> device: compute one federated-analytics answer on local data (models.analytics), reply Answer
    (or, when `secure`, the answer masked as SecAgg messages whose round is `number`). Not a task: it never
    supersedes or delays a training task beyond the one in progress."""

    kind: Literal["query"] = "query"
    query: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    round: Round  # the aggregator's count of queries; a secure query's SecAgg messages carry it as their round
    computation: Computation
    split: Literal["train", "test"] = "train"
    deadline: Annotated[float, Field(ge=0, le=MAX_UNIX_TIME, allow_inf_nan=False)]
    input_shape: Annotated[BlockShape, Field(min_length=1)]  # one sample's shape, as the model card says
    classes: Annotated[int, Field(ge=1, le=MAX_CLASSES)]
    low: ValueBound = 0.0
    high: ValueBound = 1.0
    bins: Bins = 32
    loss_clip: LossClip = 20.0
    files: TierFiles | None = None  # model_metrics: the tier whose forward graph scores the attached weights
    model_version: Version | None = None  # model_metrics: the version of the attached weights
    secure: SecureAggregation | None = None  # sum the answer by secure aggregation

    @model_validator(mode="after")
    def _consistent(self) -> Query:
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if (self.computation == "model_metrics") != (self.files is not None):
            raise ValueError("a model_metrics query, and only one, names a tier's files")
        return self


class Answer(_Strict):
    """Device -> aggregator: one Query's answer on the device's data; tensors as models.analytics names them."""

    kind: Literal["answer"] = "answer"
    query: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    tier: Identifier | None = None  # model_metrics: the tier that scored
    num_samples: Count  # samples of the split the answer covers


class Fetch(_Strict):
    """Device -> aggregator: send me these artifact files."""

    kind: Literal["fetch"] = "fetch"
    sha256: Annotated[list[Sha256], Field(min_length=1, max_length=MAX_ARTIFACTS)]


class CatalogueRequest(_Strict):
    """Device -> aggregator: name me the files of this tier (answered by Catalogue, or refused unknown_tier)."""

    kind: Literal["catalogue_request"] = "catalogue_request"
    tier: Identifier


class Catalogue(TierFiles):
    """Aggregator -> device: the files of a tier, as a task of it would name them, answering one CatalogueRequest."""

    kind: Literal["catalogue"] = "catalogue"
    request: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]  # the msg_id of the CatalogueRequest answered


class Blob(_Strict):
    """Aggregator -> device: one artifact file, as a single uint8 tensor named `data`."""

    kind: Literal["blob"] = "blob"
    sha256: Sha256
    name: Text


class Update(_Strict):
    """Device -> aggregator: the result of a task; tensors are deltas (trained minus received)."""

    kind: Literal["update"] = "update"
    update_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    round: Round
    base_version: Version
    tier: Identifier
    num_samples: Samples
    steps: Annotated[int, Field(ge=0, le=MAX_STEPS)]
    train_loss: Loss
    train_accuracy: Fraction
    train_seconds: Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
    eval_loss: Loss | None = None
    eval_accuracy: Fraction | None = None
    eval_samples: Count = 0
    unchanged: bool = False  # selective upload: no tensors, count me as a zero update
    declined: bool = False  # no tensors, nothing to fold: the device has no result for this task (see below)
    personal_loss: Loss | None = None  # TrainTask.finetune_steps: the fine-tuned model on the local test split
    personal_accuracy: Fraction | None = None
    contributors: Annotated[dict[Identifier, "TierShare"], Field(max_length=MAX_TIERS)] | None = None  # a relay's combined update: tier -> who trained it

    @model_validator(mode="after")
    def _one_kind_of_empty(self) -> Update:
        """`declined`: the device's training diverged, or its update for this task was refused for what it carried;
        the round waits no more for it. Not also `unchanged` (a zero update that counts) or a relay's combination."""
        if self.declined and (self.unchanged or self.contributors is not None):
            raise ValueError("a declined update is neither unchanged nor a relay's combined update")
        return self


class TierShare(_Strict):
    """The devices of one tier behind a relay's combined update."""

    samples: Samples
    devices: Annotated[int, Field(ge=1, le=MAX_DEVICES)]


class BnStatistics(_Strict):
    """Device -> aggregator: batch-norm statistics of the task's weights on the device's training data.

    Tensors `<bn>.running_mean` and `<bn>.running_var` (population variance), one pair per layer.
    """

    kind: Literal["bn_statistics"] = "bn_statistics"
    round: Round
    base_version: Version
    tier: Identifier
    num_samples: Samples


class SecAgg(_Strict):
    """Either way in a secure round: one protocol.secagg.messages message, its JSON in `payload`.

    A masked input's ring integers travel as uint8 frame tensors (one per tensor, its bytes), not
    in the payload; its eval fields are the device's federated evaluation, as in Update.
    """

    kind: Literal["secagg"] = "secagg"
    round: Round
    session: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]  # TrainTask.secure.session
    phase: Literal["advertise", "roster", "share_keys", "delivery", "masked_input", "unmask_request", "unmasking"]
    payload: Annotated[str, Field(max_length=1 << 20)]
    eval_loss: Loss | None = None
    eval_accuracy: Fraction | None = None
    eval_samples: Count = 0


class Reject(_Strict):
    """Either side -> the other: your message was refused, and why."""

    kind: Literal["reject"] = "reject"
    reason: RejectReason
    detail: Annotated[str, BeforeValidator(_cut_detail), Field(max_length=MAX_DETAIL)]
    ref_msg_id: ShortText | None = None
    round: Annotated[int, Field(ge=0, le=MAX_ROUND)] | None = None


class RoundSummary(_Strict):
    """Aggregator -> observers: one committed round."""

    kind: Literal["round"] = "round"
    round: Annotated[int, Field(ge=0, le=MAX_ROUND)]
    version: Version
    selected: Annotated[int, Field(ge=0, le=MAX_DEVICES)]
    answered: Annotated[int, Field(ge=0, le=MAX_DEVICES)]
    accuracy: float | None = None
    loss: float | None = None
    accuracy_source: Literal["held-out", "federated", "none"] = "none"
    accuracy_by_tier: Annotated[dict[ShortText, float], Field(max_length=MAX_TIERS)] = {}
    bytes_up: Annotated[int, Field(ge=0, le=MAX_TOTAL_BYTES)] = 0  # frames of the updates counted this round
    bytes_down: Annotated[int, Field(ge=0, le=MAX_TOTAL_BYTES)] = 0  # tasks and artifact files sent this round
    seconds: float = 0.0
    rejected: Annotated[dict[ShortText, Annotated[int, Field(ge=0, le=MAX_STEPS)]], Field(max_length=MAX_METRICS)] = {}
    metrics: Annotated[dict[ShortText, float], Field(max_length=MAX_METRICS)] = {}  # the strategy's own: FedBuff staleness, FedMut radius, DP epsilon...
    final: bool = False



# -- between a coordinator and its aggregator workers (aggregator.worker_service, aggregator.coordinator_service) --


class WorkerClaim(_Strict):
    """Aggregator worker -> its coordinator: a device's update the worker checked and holds, to be granted (folded
    into the worker's partial sum) or refused; or, with `refused`, a refusal the worker decided, to be counted and
    answered to the device by the coordinator (workers cannot sign for the aggregator)."""

    kind: Literal["worker_claim"] = "worker_claim"
    session: SessionId  # the worker process's session: a restarted worker's claims are another session's
    device: Identifier
    ref_msg_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] | None = None  # the device frame's msg_id
    update: Update | None = None  # the device's update header (None: a refusal before its header was read)
    norm: Annotated[float, Field(ge=0, le=3.5e38, allow_inf_nan=False)] = 0.0  # L2 norm of its delta
    nbytes: Annotated[int, Field(ge=0, le=MAX_TOTAL_BYTES)] = 0  # the device frame's bytes
    refused: RejectReason | None = None
    detail: Annotated[str, BeforeValidator(_cut_detail), Field(max_length=MAX_DETAIL)] = ""


class WorkerGrant(_Strict):
    """Coordinator -> worker: fold a claimed update with this weight (`granted`), or drop it (refused, and answered to
    the device by the coordinator)."""

    kind: Literal["worker_grant"] = "worker_grant"
    session: SessionId  # the claiming worker's session
    round: Round
    device: Identifier
    update_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    granted: bool
    samples: Count = 0  # the samples the update weighs (capped by --max-share)
    work: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 1.0  # share of the asked steps done (--weigh-partial-work)
    weighted: bool = True  # the round's mean is weighted by samples (False: one vote per device)


class WorkerFlush(_Strict):
    """Coordinator -> worker: send the partial sum of `round`'s granted updates now."""

    kind: Literal["worker_flush"] = "worker_flush"
    round: Round


class PartialSum(_Strict):
    """Worker -> coordinator: the element-wise sum of weight x delta over the granted updates named, one tensor per
    global tensor (float32, the global shapes); the coordinator adds each update's weight from its own grants."""

    kind: Literal["partial_sum"] = "partial_sum"
    session: SessionId
    round: Round
    update_ids: Annotated[list[Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]], Field(max_length=MAX_DEVICES)]


class WorkerForward(_Strict):
    """Worker -> coordinator: a device's uplink frame that is not an update (a fetch, a catalogue request, batch-norm
    statistics), passed on whole as the uint8 tensor `frame` (checked by the coordinator as if received directly)."""

    kind: Literal["worker_forward"] = "worker_forward"
    device: Identifier


Body = Annotated[
    Union[Hello, Status, TrainTask, MeasureBnStatistics, Fetch, CatalogueRequest, Catalogue, Blob, Update, BnStatistics,
          SecAgg, Reject, RoundSummary, Query, Answer,
          WorkerClaim, WorkerGrant, WorkerFlush, PartialSum, WorkerForward],
    Field(discriminator="kind"),
]


class TensorEntry(_Strict):
    """Where one tensor sits in the frame payload and how it is encoded."""

    name: TensorName
    codec: Annotated[str, Field(min_length=1, max_length=32)]
    dtype: Literal["float32", "uint8"]  # dtype after decoding
    shape: Shape
    nbytes: Annotated[int, Field(ge=0, le=MAX_TENSOR_BYTES)]
    meta: Annotated[dict[Annotated[str, Field(max_length=32)], MetaValue], Field(max_length=MAX_META_ENTRIES)] = {}


class FrameHeader(_Strict):
    """The JSON header of a frame: who sent what, for which fleet, plus the tensor table."""

    protocol: Literal[1] = PROTOCOL_VERSION
    fleet: Identifier
    sender: Identifier
    msg_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] = Field(default_factory=lambda: uuid.uuid4().hex)
    sent_at: Annotated[float, Field(ge=0, le=MAX_UNIX_TIME, allow_inf_nan=False)] = Field(default_factory=time.time)
    body: Body
    tensors: Annotated[list[TensorEntry], Field(max_length=MAX_TENSORS)] = []
    payload_sha256: Sha256 | None = None
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")] | None = None  # Ed25519 by the sender (protocol.signing)

    @model_validator(mode="after")
    def _bounded_tensors(self) -> FrameHeader:
        total = sum(math.prod(entry.shape) for entry in self.tensors)
        if total > MAX_FRAME_ELEMENTS:
            raise ValueError(f"the tensors declare {total} elements, more than the {MAX_FRAME_ELEMENTS} a frame may hold")
        return self


def new_id() -> str:
    """A fresh 32-hex-digit message or update id."""
    return uuid.uuid4().hex
