"""Personalization on the device: its own copy of the personal layers, kept across restarts, and the fine-tune.

`PersonalLayers` keeps, per model, the device's own values of the layers a task names personal
(FedPer/FedRep: `TrainTask.personal_layers`) in `CACHE_DIR/personal-layers-<model>.npz`, written
atomically (protocol.atomic_file) together with the update that trained them. The first task of
a model starts them from the task's (global) values; a later task whose tier is another width
fits them to it (models.personal.fit_personal: own values on the shared leading block, global
values where the tier is wider), and the trained block is written back over the copy, which keeps
its wider part (models.personal.merge_personal). Every file is read when the agent starts: one
that does not load stops the start with its path and the way out, never silently discarded.

`finetune` is `--personalize finetune:K`'s measurement: K local steps from the round's starting
weights on the training split, then the local test split; the caller keeps it away from the update.
"""

from __future__ import annotations

import logging
import math
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge_client.trainer import EvalStats, Trainer
from models.data import Dataset
from models.personal import fit_personal, merge_personal
from protocol.atomic_file import atomic_write

log = logging.getLogger(__name__)
FILE_PREFIX = "personal-layers-"
Tensors = dict[str, np.ndarray]


class PersonalLayersCorrupt(ValueError):
    """A personal-layers file that does not load: its path, what is wrong, and the way out."""


class PersonalLayers:
    """The device's own personal layers, per model, persisted under `folder`."""

    def __init__(self, folder: Path, max_bytes: int | None = None) -> None:
        """Read every personal-layers file in `folder`; PersonalLayersCorrupt naming the first that does not load (or
        whose arrays take more than `max_bytes`, the cache bound: no layer of a model is larger than its artifacts)."""
        self.folder = folder
        self._layers: dict[str, Tensors] = {}  # model name -> parameter -> the device's copy
        for path in sorted(folder.glob(f"{FILE_PREFIX}*.npz")) if folder.is_dir() else []:
            self._layers[path.stem[len(FILE_PREFIX):]] = _load(path, max_bytes)

    def path(self, model: str) -> Path:
        """The file of `model`'s personal layers."""
        return self.folder / f"{FILE_PREFIX}{model}.npz"

    def held(self, model: str) -> Tensors:
        """A copy of what this device holds of `model`'s personal layers (empty before its first task)."""
        return dict(self._layers.get(model, {}))

    def start(self, model: str, names: list[str], received: Mapping[str, np.ndarray]) -> Tensors:
        """`received` (the task's weights) with each personal layer replaced by the device's own copy fitted to the
        task's tier; a layer the device never trained starts from the received (global) values."""
        own = self._layers.get(model, {})
        started = dict(received)
        for name in names:
            if name in own:
                started[name] = fit_personal(own[name], received[name])
        fresh = [name for name in names if name not in own]
        if fresh:
            log.info("personal layers %s of %s start from the global model", ", ".join(fresh), model)
        return started

    def trained(self, model: str, trained: Mapping[str, np.ndarray]) -> Tensors:
        """The device's copy of `model`'s personal layers after a task trained `trained` (those layers at its tier)."""
        own = self._layers.get(model, {})
        return {**own, **{name: merge_personal(own.get(name), value) for name, value in trained.items()}}

    def save(self, model: str, layers: Tensors) -> None:
        """Keep `layers` as `model`'s personal layers, on disk (atomic) and in memory."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(model), lambda out: np.savez(out, **layers))
        self._layers[model] = layers


def _load(path: Path, max_bytes: int | None) -> Tensors:
    """The personal layers saved in `path`: float32 arrays, all finite, within `max_bytes`; PersonalLayersCorrupt
    otherwise."""
    try:
        with path.open("rb") as file:
            if file.read(4) != b"PK\x03\x04":  # numpy would read other bytes as a .npy, or ask for pickle
                raise ValueError("not an .npz archive")
        with np.load(path, allow_pickle=False) as saved:
            declared = sum(info.file_size for info in saved.zip.infolist())  # checked before reading any array
            if max_bytes is not None and declared > max_bytes:
                raise ValueError(f"its arrays take {declared / 1e6:.2f} MB, more than the cache bound of "
                                 f"{max_bytes / 1e6:.2f} MB (--cache-max-mb)")
            layers = {name: np.asarray(saved[name], np.float32) for name in saved.files}
        if bad := [name for name, value in layers.items() if not np.isfinite(value).all()]:
            raise ValueError(f"{bad[:4]} hold NaN or Inf")
        if not layers:
            raise ValueError("it holds no layer")
    except (OSError, ValueError, EOFError, AttributeError, zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
        raise PersonalLayersCorrupt(
            f"personal layers file {path} cannot be read ({type(exc).__name__}: {exc}); this device's own layers are "
            f"lost: delete the file to start them again from the global model at the next task") from None
    return layers


def finetune(trainer: Trainer, start: Mapping[str, np.ndarray], train: Dataset, test: Dataset, steps: int,
             batch_size: int, learning_rate: float, seed: int, mask_classes: bool,
             stop_at: float | None = None) -> EvalStats:
    """The local test split's loss and accuracy after `steps` local steps from `start` on `train` (the trainer's weights
    are left fine-tuned: the caller has taken its update from them before)."""
    trainer.set_weights(start)
    epochs = math.ceil(steps / max(1, math.ceil(len(train) / batch_size)))
    trainer.train(train, epochs, batch_size, learning_rate, seed, mask_classes, stop_at=stop_at, max_steps=steps)
    return trainer.evaluate(test)
