"""What a model is, without building it: the spec and the tensor names every graph shares.

Nothing here imports onnx, so a device that only runs exported graphs (plain onnxruntime) can
read manifests and name its inputs without the model-building stack.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RUNNING_MEAN, RUNNING_VAR = ".running_mean", ".running_var"  # a BatchNorm layer's statistics: <layer> + suffix
RUNNING_STATISTICS = (RUNNING_MEAN, RUNNING_VAR)
MAX_CLASSES = 100_000  # a device holds batch x classes logits: bounded where a manifest says how many
OPSET = 17  # every graph TierFL writes
IR_VERSION = 10  # onnxruntime 1.19 refuses IR 11+
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
SCALE_NAME = "scale"  # HeteroFL's scaler: hidden pre-activations times this [1] input (1/rate in training, 1 otherwise)
CLASS_MASK_NAME = "class_mask"  # [classes] added to the logits: 0 keeps a class, a large negative masks it out
MU_NAME = "mu"  # FedProx's proximal weight, a [1] input of proximal training graphs
GLOBAL_SUFFIX = ".global"  # FedProx's w_global: `<param>.global` inputs of proximal training graphs
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # ONNX convention (PyTorch momentum 0.1)
DEFAULT_HIDDEN = {
    "mlp": (256, 256),  # fc widths
    "cnn": (32, 64, 128),  # conv channels, then the fc width
    "preresnet": (16, 32, 64),  # one pre-activation block per stage; the stem is as wide as stage 1
    "mobilenet": (16, 32, 64, 128),  # stem, then one depthwise-separable block per width
    "conv1d": (32, 64, 64),  # one conv, batch norm, ReLU, 2x max pool per width
    "transformer": (32, 64),  # token width, then the MLP's hidden width
}
IMAGE_ARCHS = ("mlp", "cnn", "preresnet", "mobilenet")  # samples [channels, image_size, image_size]
SEQUENCE_ARCHS = ("conv1d", "transformer")  # samples [channels, length] (conv1d), [length, channels] (transformer)
# What a spec takes when a field is not given (or None): each arch's input and whether it has batch norm.
ARCH_DEFAULTS: dict[str, dict[str, int | bool]] = {
    "mlp": {"image_size": 8, "channels": 1, "batch_norm": False},
    "cnn": {"image_size": 8, "channels": 1, "batch_norm": False},
    "preresnet": {"image_size": 32, "channels": 3, "batch_norm": True},
    "mobilenet": {"image_size": 32, "channels": 3, "batch_norm": True},
    "conv1d": {"channels": 40, "length": 49, "batch_norm": True},  # 40 MFCC coefficients x 49 frames
    "transformer": {"channels": 16, "length": 16, "batch_norm": False},  # 16 tokens of 16 features
}
_OPTIONAL_BN = ("mlp", "cnn")  # the other archs always (preresnet, mobilenet, conv1d) or never (transformer) have it
_CHOSEN_INIT = ("mlp", "cnn")  # the archs whose init can be chosen; the others take "pytorch"
INITS = {  # ModelSpec.init -> what it draws
    "pytorch": "PyTorch's default for Linear and Conv: weights and biases U(+-1/sqrt(fan_in))",
    "kaiming": "He et al. 2015 for the layers a ReLU follows: their weights U(+-sqrt(6/fan_in)); the output layer "
               "and every bias as pytorch",
}


class ModelSpec(BaseModel):
    """What is trained: architecture, input shape, widths at rate 1, batch norm, init seed.

    Images (mlp, cnn, preresnet, mobilenet) are [channels, image_size, image_size]; a conv1d takes
    [channels, length] (e.g. 40 MFCC coefficients x 49 frames, 6 IMU axes x 128 readings) and a
    transformer [length, channels] (`length` tokens of `channels` features). A field left out (or
    None) takes the arch's default (ARCH_DEFAULTS); one the arch does not take is refused.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: Literal["mlp", "cnn", "preresnet", "mobilenet", "conv1d", "transformer"]
    image_size: Literal[8, 28, 32] | None = None  # images only: the side in pixels
    channels: int | None = Field(None, ge=1, le=4096)  # image channels; a sequence's features per step
    length: int | None = Field(None, ge=1, le=65536)  # sequences only: time steps (conv1d) or tokens (transformer)
    num_classes: int = Field(10, ge=2, le=MAX_CLASSES)
    hidden: tuple[Annotated[int, Field(ge=1, le=1 << 16)], ...] | None = Field(None, max_length=16)
    batch_norm: bool = False
    seed: int = Field(0, ge=0, le=2**63 - 1)
    init: Literal["pytorch", "kaiming"] = "pytorch"  # INITS: how the initial weights are drawn

    @model_validator(mode="before")
    @classmethod
    def _arch_defaults(cls, data: Any) -> Any:
        """Fill the input fields and batch norm the caller left out (or None) with the arch's defaults."""
        if not isinstance(data, dict) or data.get("arch") not in ARCH_DEFAULTS:
            return data  # field validation names what is wrong
        defaults = ARCH_DEFAULTS[data["arch"]]
        return data | {key: value for key, value in defaults.items() if data.get(key) is None}

    @model_validator(mode="after")
    def _check_arch(self) -> ModelSpec:
        arch = self.arch
        if arch in IMAGE_ARCHS and self.length is not None:
            raise ValueError(f"{arch} takes [channels, image_size, image_size] images: length does not apply")
        if arch in SEQUENCE_ARCHS and self.image_size is not None:
            shape = "[channels, length]" if arch == "conv1d" else "[length, channels] (tokens of features)"
            raise ValueError(f"{arch} takes {shape} sequences: image_size does not apply")
        if self.init != "pytorch" and arch not in _CHOSEN_INIT:
            raise ValueError(f"init {self.init!r} is for mlp and cnn; {arch} takes PyTorch's default init")
        if arch not in _OPTIONAL_BN and self.batch_norm != ARCH_DEFAULTS[arch]["batch_norm"]:
            raise ValueError(f"{arch} {'always' if self.batch_norm is False else 'never'} has batch norm"
                             + (" (it normalizes with LayerNorm)" if arch == "transformer" else ""))
        return self

    @model_validator(mode="after")
    def _check_hidden(self) -> ModelSpec:
        if self.hidden is not None:
            if not self.hidden or min(self.hidden) < 1:
                raise ValueError(f"hidden widths must be a non-empty tuple of ints >= 1, got {self.hidden}")
            if self.arch not in _OPTIONAL_BN and min(self.hidden) < 2:
                raise ValueError(f"{self.arch} hidden widths must be >= 2 (a 1-wide layer's batch norm or bias would "
                                 f"be a 1-element tensor, which the export does not train), got {self.hidden}")
            if self.arch == "cnn" and len(self.hidden) < 2:
                raise ValueError("cnn hidden needs conv channels then one fc width, e.g. (32, 64, 128)")
            if self.arch == "cnn" and self.image_size >> (len(self.hidden) - 1) < 1:
                raise ValueError(f"{len(self.hidden) - 1} 2x2 pools do not fit a {self.image_size}px image")
            if self.arch == "mobilenet" and len(self.hidden) < 2:
                raise ValueError("mobilenet hidden needs the stem width then one width per block, e.g. (16, 32, 64)")
            if self.arch == "transformer" and len(self.hidden) != 2:
                raise ValueError("transformer hidden is the token width then the MLP's hidden width, e.g. (32, 64)")
        if self.arch == "conv1d" and self.length >> len(self.widths) < 1:
            raise ValueError(f"{len(self.widths)} 2x max pools do not fit a length of {self.length}")
        return self

    @property
    def widths(self) -> tuple[int, ...]:
        """Hidden widths at rate 1 (the default for the arch when `hidden` is None)."""
        return self.hidden if self.hidden is not None else DEFAULT_HIDDEN[self.arch]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape (without the batch axis): [C, H, W], [C, T] (conv1d) or [T, F] (transformer)."""
        if self.arch == "conv1d":
            return (self.channels, self.length)
        if self.arch == "transformer":
            return (self.length, self.channels)
        return (self.channels, self.image_size, self.image_size)

    @property
    def name(self) -> str:
        """Short model name such as "mlp8", "cnn28-bn", "mlp8-h64x64", "preresnet32" or "conv1d-40x49"."""
        if self.arch in SEQUENCE_ARCHS:
            name = f"{self.arch}-" + "x".join(map(str, self.input_shape))
        else:
            name = f"{self.arch}{self.image_size}"
            if self.channels != ARCH_DEFAULTS[self.arch]["channels"]:
                name += f"-c{self.channels}"
        if self.hidden is not None and self.hidden != DEFAULT_HIDDEN[self.arch]:
            name += "-h" + "x".join(map(str, self.hidden))
        if self.num_classes != 10:
            name += f"-k{self.num_classes}"
        return name + ("-bn" if self.batch_norm and self.arch in _OPTIONAL_BN else "")
