"""On-disk description of exported training artifacts: one manifest per tier plus an index."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from models.spec import ModelSpec
from protocol.atomic_file import atomic_write

FORMAT_VERSION = 1
STATISTICS_FILE = "statistics.onnx"  # batch-norm models only: measures static BN statistics on the device
STEP_FILE = "step_model.onnx"  # the portable backend's training step, standard ONNX operators only
FORWARD_FILE = "forward.onnx"  # forward pass with the parameters as inputs (portable evaluation)


class _JsonFile(BaseModel):
    """A pydantic model stored as one JSON file, written atomically."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Read and validate the JSON file at `path`."""
        return cls.model_validate_json(Path(path).read_bytes())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to `path` atomically: a temp file in the same folder, fsync, then os.replace."""
        atomic_write(path, lambda out: out.write(self.model_dump_json(indent=2).encode() + b"\n"))


class FileEntry(BaseModel):
    """Content address of one artifact file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class ParamInfo(BaseModel):
    """One model parameter at the tier's width."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    shape: list[int]
    trainable: bool


class TierManifest(_JsonFile):
    """Everything a device needs to know about one tier's artifacts."""

    format_version: int = FORMAT_VERSION
    model: ModelSpec
    tier: str
    rate: float = Field(gt=0, le=1)
    optimizer: Literal["sgd", "adamw"]
    input_name: str
    input_shape: list[int | Literal["N"]]
    scaler: bool = False  # training/eval graphs take a `scale` [1] input: 1/rate to train, 1 to evaluate
    class_mask: bool = False  # training/eval graphs take a `class_mask` [classes] input added to the logits
    proximal: bool = False  # training/eval graphs take FedProx's `mu` [1] and `<param>.global` inputs
    output_name: str
    params: list[ParamInfo]
    files: dict[str, FileEntry]
    libraries: dict[str, str]

    @property
    def param_count(self) -> int:
        """Number of scalars over all parameters (trainable and frozen)."""
        return sum(math.prod(p.shape) for p in self.params)

    @property
    def artifact_bytes(self) -> int:
        """Total size of the tier's files."""
        return sum(f.bytes for f in self.files.values())


class ExportIndex(_JsonFile):
    """The exported tiers of one model: tier -> manifest path relative to the index file."""

    format_version: int = FORMAT_VERSION
    model: ModelSpec
    tiers: dict[str, str]
