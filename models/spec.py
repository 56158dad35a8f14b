"""What a model is, without building it: the spec and the tensor names every graph shares.

Nothing here imports onnx, so a device that only runs exported graphs (plain onnxruntime) can
read manifests and name its inputs without the model-building stack.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
SCALE_NAME = "scale"  # HeteroFL's scaler: hidden pre-activations times this [1] input (1/rate in training, 1 otherwise)
CLASS_MASK_NAME = "class_mask"  # [classes] added to the logits: 0 keeps a class, a large negative masks it out
MU_NAME = "mu"  # FedProx's proximal weight, a [1] input of proximal training graphs
GLOBAL_SUFFIX = ".global"  # FedProx's w_global: `<param>.global` inputs of proximal training graphs
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # ONNX convention (PyTorch momentum 0.1)
DEFAULT_HIDDEN = {"mlp": (256, 256), "cnn": (32, 64, 128)}


class ModelSpec(BaseModel):
    """What is trained: architecture, input size, widths at rate 1, batch norm, init seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: Literal["mlp", "cnn"]
    image_size: Literal[8, 28] = 8
    num_classes: int = Field(10, ge=2)
    hidden: tuple[int, ...] | None = None
    batch_norm: bool = False
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_hidden(self) -> ModelSpec:
        if self.hidden is not None:
            if not self.hidden or min(self.hidden) < 1:
                raise ValueError(f"hidden widths must be a non-empty tuple of ints >= 1, got {self.hidden}")
            if self.arch == "cnn" and len(self.hidden) < 2:
                raise ValueError("cnn hidden needs conv channels then one fc width, e.g. (32, 64, 128)")
            if self.arch == "cnn" and self.image_size >> (len(self.hidden) - 1) < 1:
                raise ValueError(f"{len(self.hidden) - 1} 2x2 pools do not fit a {self.image_size}px image")
        return self

    @property
    def widths(self) -> tuple[int, ...]:
        """Hidden widths at rate 1 (the default for the arch when `hidden` is None)."""
        return self.hidden if self.hidden is not None else DEFAULT_HIDDEN[self.arch]

    @property
    def name(self) -> str:
        """Short model name such as "mlp8", "cnn28-bn" or "mlp8-h64x64"."""
        name = f"{self.arch}{self.image_size}"
        if self.hidden is not None and self.hidden != DEFAULT_HIDDEN[self.arch]:
            name += "-h" + "x".join(map(str, self.hidden))
        if self.num_classes != 10:
            name += f"-k{self.num_classes}"
        return name + ("-bn" if self.batch_norm else "")
