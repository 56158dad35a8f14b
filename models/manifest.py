"""On-disk description of exported training artifacts: one manifest per tier plus an index.

An export is made from one full-width forward graph (`model.onnx` beside `index.json`, holding the
initial global weights). Its width analysis (models.widths) names the channel groups that are cut
together; a tier keeps the leading ceil(rate x size) channels of every cut group, so each tier's
parameter is the leading block of the global parameter of the same name.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from models.spec import MAX_CLASSES, ModelSpec
from protocol.atomic_file import atomic_write

MAX_RANK = 8  # axes of a parameter
MAX_ELEMENTS = 1 << 26  # of one axis (as protocol.messages bounds a tensor)
MAX_PARAMS = 4096  # parameters of a model (as protocol.messages.MAX_TENSORS)
Name = Annotated[str, Field(min_length=1, max_length=220)]  # a parameter's (<= 200) or a group's name, a file's
Tier = Annotated[str, Field(pattern=r"^[a-z]$")]
FORMAT_VERSION = 2  # 2: any ONNX classifier (ModelCard, width groups, model.onnx); 1 held a zoo ModelSpec
INDEX_NAME = "index.json"  # an export's index, in its folder
MANIFEST_NAME = "manifest.json"  # a tier's manifest, in the tier's folder
GLOBAL_MODEL_FILE = "model.onnx"  # beside index.json: the full-width forward graph with the initial global weights
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
    bytes: int = Field(ge=0, le=1 << 40)


class ParamInfo(BaseModel):
    """One model parameter at the tier's width, and which width group cuts each of its axes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Name
    shape: Annotated[list[Annotated[int, Field(ge=1, le=MAX_ELEMENTS)]], Field(max_length=MAX_RANK)]
    trainable: bool
    cuts: Annotated[list[Name | None], Field(max_length=MAX_RANK)] = []  # per axis: the width group cutting it, None: whole


class WidthGroup(BaseModel):
    """Channels that must be cut together (a layer's outputs, its BatchNorm, its consumers' inputs, ...)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(ge=1, le=MAX_ELEMENTS)  # channels at rate 1
    pinned: str | None = Field(None, max_length=1000)  # why the group stays whole (names the node), None: cut


class ModelCard(BaseModel):
    """What was exported, told without building it: name, one sample's shape, classes, batch norm, origin."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,79}$")
    input_shape: Annotated[list[Annotated[int, Field(ge=1, le=MAX_ELEMENTS)]],
                           Field(min_length=1, max_length=3)]  # one sample: [C, H, W], [C, T] or [F]
    num_classes: int = Field(ge=2, le=MAX_CLASSES)
    batch_norm: bool = False  # has BatchNormalization layers (running statistics)
    recipe: ModelSpec | None = None  # the zoo recipe it was built from; None for a user's ONNX file
    source_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # sha256 of the user's ONNX file


class TierManifest(_JsonFile):
    """Everything a device needs to know about one tier's artifacts."""

    format_version: Literal[2] = FORMAT_VERSION
    model: ModelCard
    tier: Tier
    rate: float = Field(gt=0, le=1)
    macs: int = Field(0, ge=0, le=10**15)  # multiply-accumulates of one sample's forward pass at this tier
    optimizer: Literal["sgd", "adamw"]
    input_name: Name
    input_shape: Annotated[list[Annotated[int, Field(ge=1, le=MAX_ELEMENTS)] | Literal["N"]], Field(max_length=4)]
    scaler: bool = False  # training/eval graphs take a `scale` [1] input: 1/rate to train, 1 to evaluate
    class_mask: bool = False  # training/eval graphs take a `class_mask` [classes] input added to the logits
    proximal: bool = False  # training/eval graphs take FedProx's `mu` [1] and `<param>.global` inputs
    output_name: Name
    params: Annotated[list[ParamInfo], Field(max_length=MAX_PARAMS)]
    files: Annotated[dict[Name, FileEntry], Field(max_length=16)]
    libraries: Annotated[dict[Name, Name], Field(max_length=16)]

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

    format_version: Literal[2] = FORMAT_VERSION
    model: ModelCard
    tiers: Annotated[dict[Tier, Name], Field(max_length=8)]
    global_model: FileEntry  # GLOBAL_MODEL_FILE: the rate-1 forward graph and the initial global weights
    groups: Annotated[dict[Name, WidthGroup], Field(max_length=MAX_PARAMS * MAX_RANK)] = {}  # width group -> size, cut or not
