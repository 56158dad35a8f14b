"""A task's checks and encodings that do not depend on how a device is run.

The device agent (edge_client.agent, one device per process) and the virtual fleet
(edge_client.fleet, many devices in one process) both carry a task through the same stages: the
task's manifest against the files it lists and the cache bound, the received weights against the
tier's manifest (or a delta against the version held), the trained update checked for NaN/Inf, and
the update encoded into a signed frame with error feedback and selective upload around the codec.
These functions hold no state of their own: what a device keeps (held weights, the residual) is
passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_client.cache import ArtifactCache, ArtifactTooLarge
from edge_client.compression import ErrorFeedback
from edge_client.scaffold import ControlVariate, Variate, variate_shapes
from edge_client.trainer import EvalStats, TrainStats
from models.manifest import TierManifest
from protocol.codecs import encode_decode, parse_codec
from protocol.control import with_control
from protocol.frame import encode_frame
from protocol.messages import MAX_LOSS, Blob, FrameHeader, RejectReason, Task, TierFiles, TrainTask, Update, new_id
from protocol.quantized import Tensor

Signer = Callable[[FrameHeader], str]
Held = tuple[int, dict[str, np.ndarray]]  # (model version, weights) of one tier


class TaskRefused(Exception):
    """A task the device will not carry out: the reason and a detail naming what is wrong."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class TrainingDiverged(TaskRefused):
    """Training went to NaN/Inf: nothing to send (the device declines the task: edge_client.declines)."""


class TaskSkipped(Exception):
    """A task let go without a refusal (superseded, too late, files or held weights missing, stopping); logged."""


class NotHeld(TaskSkipped):
    """A delta against a version of the tier this device does not hold: refuse as wrong_version and say hello again."""


def check_manifest(task: TierFiles, manifest_bytes: bytes, max_bytes: int | None) -> TierManifest:
    """The tier manifest a task (or catalogue) names, once its files are the manifest's and fit `max_bytes`.

    TaskRefused otherwise (unknown_artifact, oversize)."""
    try:
        manifest = TierManifest.model_validate_json(manifest_bytes)
    except ValueError as exc:
        raise TaskRefused(RejectReason.UNKNOWN_ARTIFACT, f"manifest.json is not a tier manifest: {exc}") from None
    listed = {name: entry.sha256 for name, entry in manifest.files.items()} | {"manifest.json": task.manifest_sha256}
    if listed != task.artifacts:
        raise TaskRefused(RejectReason.UNKNOWN_ARTIFACT, "the task's artifact files are not those of its manifest")
    total = manifest.artifact_bytes
    if max_bytes is not None and total > max_bytes:
        raise TaskRefused(RejectReason.OVERSIZE, f"its artifacts take {total / 1e6:.2f} MB, more than the cache "
                          f"bound of {max_bytes / 1e6:.2f} MB; raise --cache-max-mb")
    return manifest


def store_blob(cache: ArtifactCache, blob: Blob, tensors: Mapping[str, Tensor]) -> None:
    """Cache the artifact file a Blob frame carries (its uint8 `data` tensor).

    ArtifactTooLarge (from the cache) when it does not fit the cache bound; TaskRefused (bad_hash)
    when the frame's bytes are not the named file's."""
    data = tensors.get("data")
    try:
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
            raise ValueError("blob carries no uint8 'data' tensor")
        cache.put(blob.sha256, data.tobytes())
    except ArtifactTooLarge:
        raise
    except ValueError as exc:
        raise TaskRefused(RejectReason.BAD_HASH, f"{blob.name}: {exc}") from None


def task_weights(task: Task, tensors: Mapping[str, Tensor], manifest: TierManifest,
                 held: Held | None) -> dict[str, np.ndarray]:
    """The task's weights, as sent or as the `held` version plus the sent delta.

    TaskRefused unless every tensor is float32 of a name and shape of the tier's manifest (all of
    them when not a delta; with `task.weights.control` the server's SCAFFOLD variate too, as
    scaffold/<param> tensors) and the weights are finite; NotHeld when the delta is against a
    version other than the one held.
    """
    shapes = {p.name: tuple(p.shape) for p in manifest.params}
    if task.weights.control:  # SCAFFOLD: the server's c rides along, held with the weights (deltas apply to it too)
        shapes |= with_control({}, variate_shapes(manifest))
    for name, value in tensors.items():
        if name not in shapes or tuple(value.shape) != shapes[name] or value.dtype != np.float32:
            raise TaskRefused(RejectReason.BAD_TENSOR, f"tensor {name!r} ({value.dtype} {list(value.shape)}) is not "
                              f"a float32 parameter of tier {task.tier} (expected {list(shapes.get(name, ()))})")
    if task.weights.delta_from is None:
        if set(tensors) != set(shapes):
            raise TaskRefused(RejectReason.BAD_TENSOR, f"weights lack {sorted(set(shapes) - set(tensors))[:8]}")
        weights = {name: np.asarray(tensors[name], np.float32) for name in shapes}
    else:
        version, weights_held = held if held is not None else (None, {})
        if version != task.weights.delta_from or set(weights_held) != set(shapes):
            raise NotHeld(f"round {task.round}: a delta against version {task.weights.delta_from} of tier {task.tier}, "
                          f"but we hold {version}; announcing what we hold")
        weights = {name: weights_held[name] + np.asarray(tensors[name], np.float32) if name in tensors
                   else weights_held[name] for name in weights_held}
    if not all(np.isfinite(value).all() for value in weights.values()):
        raise TaskRefused(RejectReason.NON_FINITE, "the received weights hold NaN or Inf")
    return weights


def task_variate(task: TrainTask, manifest: TierManifest, control: Mapping[str, np.ndarray], folder: Path,
                 kept: dict[str, ControlVariate], durable: bool = True) -> Variate | None:
    """SCAFFOLD: the tier's c_i (kept in `kept` by manifest sha256, on disk in `folder`) with the server's `control`
    sent with the task; None for a task that carries no c. TaskRefused when the tier trains with another optimizer
    than plain SGD (the per-step correction is exact for SGD)."""
    if not task.weights.control:
        return None
    if manifest.optimizer != "sgd":
        raise TaskRefused(RejectReason.UNEXPECTED, f"SCAFFOLD needs plain SGD; tier {task.tier} was exported with "
                          f"{manifest.optimizer}")
    if task.manifest_sha256 not in kept:
        kept[task.manifest_sha256] = ControlVariate(folder, manifest, durable)
    return Variate(kept[task.manifest_sha256], control)


def trained_delta(trained: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray],
                  loss: float) -> dict[str, np.ndarray]:
    """new - start of every parameter; TrainingDiverged (non_finite) when training diverged: NaN/Inf, or a loss beyond
    what an update may report (MAX_LOSS)."""
    delta = {name: trained[name] - start[name] for name in start}
    if not all(np.isfinite(value).all() for value in delta.values()) or not abs(loss) <= MAX_LOSS:
        raise TrainingDiverged(RejectReason.NON_FINITE, f"training diverged (loss {loss}): the update holds NaN or "
                               "Inf; none of it is sent (the round is declined), the error-feedback state is unchanged")
    return delta


@dataclass
class EncodedUpdate:
    """An update frame ready to send, and what to keep once it is sent (the error-feedback residual)."""

    frame: bytes
    update: Update  # the frame's message
    unchanged: bool  # below the selective-upload threshold: no tensors sent
    _feedback: ErrorFeedback | None
    _intended: dict[str, np.ndarray]
    _sent: dict[str, np.ndarray] | None

    def sent(self) -> dict[str, np.ndarray] | None:
        """Keep (and save) the residual of this update: call it with the frame's publication, not before; the
        residual's change (None without error feedback), for `ErrorFeedback.undo` if the update is refused."""
        if self._feedback is None:
            return None
        return self._feedback.remember(self._intended, self._sent)


def encode_update(fleet: str, device_id: str, task: TrainTask, delta: dict[str, np.ndarray],
                  start: Mapping[str, np.ndarray], stats: TrainStats, before: EvalStats | None, num_samples: int,
                  codec_name: str, feedback: ErrorFeedback | None, signer: Signer | None,
                  after: EvalStats | None = None) -> EncodedUpdate:
    """The update frame of a trained task, encoded with `codec_name`, error feedback and selective upload around it;
    `after`: the fine-tuned model's test-split measurement (--personalize), reported beside `before`'s. A
    measurement whose loss is beyond what an update may carry (MAX_LOSS; a global model gone bad) is left out."""
    before, after = (m if m is not None and abs(m.loss) <= MAX_LOSS else None for m in (before, after))
    intended = feedback.compensate(delta) if feedback else delta
    unchanged = bool(feedback and feedback.insignificant(intended, start))
    update = Update(
        update_id=new_id(),
        round=task.round,
        base_version=task.model_version,
        tier=task.tier,
        num_samples=num_samples,
        steps=stats.steps,
        train_loss=stats.loss,
        train_accuracy=stats.accuracy,
        train_seconds=stats.seconds,
        eval_loss=before.loss if before else None,
        eval_accuracy=before.accuracy if before else None,
        eval_samples=before.samples if before else 0,
        unchanged=unchanged,
        personal_loss=after.loss if after else None,
        personal_accuracy=after.accuracy if after else None,
    )
    codec = parse_codec(codec_name)
    rounding = np.random.SeedSequence()  # fresh; the frame and the feedback's copy of it draw the same rounding
    frame = encode_frame(fleet, device_id, update, None if unchanged else intended, codec,
                         rng=np.random.default_rng(rounding), signer=signer)
    sent = None  # what the aggregator will decode: the same codec, the same rounding
    if feedback and not unchanged:
        rng = np.random.default_rng(rounding)
        sent = {name: encode_decode(codec, value, rng) for name, value in intended.items()}
    return EncodedUpdate(frame, update, unchanged, feedback, intended, sent)
