"""PyTorch CPU side of scripts/bench_models.py: the zoo archs written in PyTorch at a width rate, one SGD step timed.

Runs in its own virtualenv (`.venv-torch`: torch, numpy); it needs nothing of TierFL but the
stdlib-only child protocol of bench_models.py beside it. Each model matches models/zoo.py layer
for layer, with the same parameter names (state_dict keys equal the ONNX initializer names) and
the widths a tier keeps (max(1, ceil(rate * C)) of every hidden width, input channels and
classes whole). The request names the tier's parameter shapes from its manifest: any difference
in a name or shape fails the run before a step is taken, and the tier's starting weights are
then loaded by name, so the first step's loss equals the ONNX backends'.

    .venv-torch/bin/python scripts/bench_models_torch.py worker|memory REQUEST_JSON
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_models import child_main
from torch import nn
from torch.nn import functional as F

StepFn = Callable[[np.ndarray, np.ndarray], tuple[float, float]]


def scaled_width(width: int, rate: float) -> int:
    """The channels a tier keeps of `width` (as models.tiers.scaled_width)."""
    return max(1, math.ceil(round(rate * width, 9)))


class Positions(nn.Module):
    """Learned positions [length, width], added to every sample's tokens."""

    def __init__(self, length: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(length, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + positions."""
        return x + self.weight


class Mlp(nn.Module):
    """fc-(bn)-relu per hidden width, then the classifier (zoo `mlp`)."""

    def __init__(self, spec: dict, rate: float) -> None:
        super().__init__()
        bn = spec["batch_norm"]
        fan_in = spec["channels"] * spec["image_size"] ** 2
        widths = [scaled_width(w, rate) for w in spec["widths"]]
        for i, width in enumerate(widths, start=1):
            self.add_module(f"fc{i}", nn.Linear(fan_in, width, bias=not bn))
            if bn:
                self.add_module(f"bn{i}", nn.BatchNorm1d(width))
            fan_in = width
        self.add_module(f"fc{len(widths) + 1}", nn.Linear(fan_in, spec["num_classes"]))
        self.depth, self.bn = len(widths), bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes]."""
        x = torch.flatten(x, 1)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"fc{i}")(x)
            x = F.relu(getattr(self, f"bn{i}")(x) if self.bn else x)
        return getattr(self, f"fc{self.depth + 1}")(x)


class Cnn(nn.Module):
    """conv3x3-(bn)-relu-maxpool per conv width, flatten, fc1-relu, fc2 (zoo `cnn`)."""

    def __init__(self, spec: dict, rate: float) -> None:
        super().__init__()
        bn = spec["batch_norm"]
        *convs, hidden = [scaled_width(w, rate) for w in spec["widths"]]
        channels, side = spec["channels"], spec["image_size"]
        for i, width in enumerate(convs, start=1):
            self.add_module(f"conv{i}", nn.Conv2d(channels, width, 3, padding=1, bias=not bn))
            if bn:
                self.add_module(f"bn{i}", nn.BatchNorm2d(width))
            channels, side = width, side // 2
        self.fc1 = nn.Linear(channels * side * side, hidden)
        self.fc2 = nn.Linear(hidden, spec["num_classes"])
        self.depth, self.bn = len(convs), bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes]."""
        for i in range(1, self.depth + 1):
            x = getattr(self, f"conv{i}")(x)
            x = F.max_pool2d(F.relu(getattr(self, f"bn{i}")(x) if self.bn else x), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class PreActBlock(nn.Module):
    """a = relu(bn1(x)); conv2(relu(bn2(conv1(a)))) + x, or + shortcut(a) (a strided 1x1 conv)."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output."""
        a = F.relu(self.bn1(x))
        h = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return h + (self.shortcut(a) if self.shortcut is not None else x)


class PreResNet(nn.Module):
    """3x3 stem, one pre-activation block per stage (stride 2 from stage 2), bn-relu, mean, fc (zoo `preresnet`)."""

    def __init__(self, spec: dict, rate: float) -> None:
        super().__init__()
        full = list(spec["widths"])
        widths = [scaled_width(w, rate) for w in full]
        self.stem = nn.Conv2d(spec["channels"], widths[0], 3, 1, 1, bias=False)
        cin, cin_full = widths[0], full[0]
        for i, (width, width_full) in enumerate(zip(widths, full), start=1):
            stride = 1 if i == 1 else 2
            # The shortcut is decided at rate 1, as the zoo writes it (a tier cuts the same graph).
            self.add_module(f"stage{i}", PreActBlock(cin, width, stride, stride != 1 or cin_full != width_full))
            cin, cin_full = width, width_full
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, spec["num_classes"])
        self.stages = len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes]."""
        x = self.stem(x)
        for i in range(1, self.stages + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.fc(F.relu(self.bn(x)).mean(dim=(2, 3)))


class SqueezeExcite(nn.Module):
    """x * hardsigmoid(expand(relu(reduce(mean of x))))."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x gated per channel."""
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True)))))


class SeparableBlock(nn.Module):
    """Depthwise 3x3 (stride), bn, relu6, squeeze-excitation, pointwise 1x1, bn, relu6."""

    def __init__(self, cin: int, cout: int, stride: int, se_hidden: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.se = SqueezeExcite(cin, se_hidden)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output."""
        h = self.se(F.relu6(self.bn1(self.depthwise(x))))
        return F.relu6(self.bn2(self.pointwise(h)))


class Stem(nn.Module):
    """Stride-2 3x3 conv, bn, relu6."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's output."""
        return F.relu6(self.bn(self.conv(x)))


class MobileNet(nn.Module):
    """Stem, depthwise-separable blocks with squeeze-excitation (stride 2 from block 2), mean, fc (zoo `mobilenet`)."""

    def __init__(self, spec: dict, rate: float) -> None:
        super().__init__()
        stem_full, *full = spec["widths"]
        self.stem = Stem(spec["channels"], scaled_width(stem_full, rate))
        cin_full = stem_full
        for i, width_full in enumerate(full, start=1):
            se_hidden = scaled_width(max(2, cin_full // 4), rate)  # the zoo's hidden width at rate 1, then cut
            block = SeparableBlock(scaled_width(cin_full, rate), scaled_width(width_full, rate), 1 if i == 1 else 2,
                                   se_hidden)
            self.add_module(f"block{i}", block)
            cin_full = width_full
        self.fc = nn.Linear(scaled_width(cin_full, rate), spec["num_classes"])
        self.blocks = len(full)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes]."""
        x = self.stem(x)
        for i in range(1, self.blocks + 1):
            x = getattr(self, f"block{i}")(x)
        return self.fc(x.mean(dim=(2, 3)))


class Conv1d(nn.Module):
    """(conv k=3, bn, relu, 2x max pool) per width over [channels, length], mean over time, fc (zoo `conv1d`)."""

    def __init__(self, spec: dict, rate: float) -> None:
        super().__init__()
        cin = spec["channels"]
        widths = [scaled_width(w, rate) for w in spec["widths"]]
        for i, width in enumerate(widths, start=1):
            self.add_module(f"conv{i}", nn.Conv1d(cin, width, 3, padding=1, bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm1d(width))
            cin = width
        self.fc = nn.Linear(cin, spec["num_classes"])
        self.depth = len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes]."""
        for i in range(1, self.depth + 1):
            x = F.max_pool1d(F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x))), 2)
        return self.fc(x.mean(dim=2))


class Attention(nn.Module):
    """Single-head attention, scaled by 1/sqrt of the rate-1 width (a constant every tier keeps)."""

    def __init__(self, width: int, full_width: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        self.scale = 1.0 / math.sqrt(full_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention's output projection."""
        scores = self.q(x) @ self.k(x).transpose(1, 2) * self.scale
        return self.out(torch.softmax(scores, dim=-1) @ self.v(x))


class TokenMlp(nn.Module):
    """fc1, exact GELU, fc2."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output."""
        return self.fc2(F.gelu(self.fc1(x)))


class Transformer(nn.Module):
    """Embedding plus positions, one pre-norm single-head layer, LayerNorm, mean over tokens, fc (zoo `transformer`)."""

    def __init__(self, spec: dict, rate: float) -> None:
        super().__init__()
        full, mlp_full = spec["widths"]
        width = scaled_width(full, rate)
        self.embed = nn.Linear(spec["channels"], width)
        self.pos = Positions(spec["length"], width)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, full)
        self.mlp = TokenMlp(width, scaled_width(mlp_full, rate))
        self.fc = nn.Linear(width, spec["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes]."""
        x = self.pos(self.embed(x))
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.fc(self.norm(x).mean(dim=1))


ARCHS = {"mlp": Mlp, "cnn": Cnn, "preresnet": PreResNet, "mobilenet": MobileNet, "conv1d": Conv1d,
         "transformer": Transformer}


def build(spec: dict, rate: float, expected: dict[str, list[int]]) -> nn.Module:
    """The arch at `rate`; ValueError unless its parameters and buffers are exactly the manifest's names and shapes."""
    model = ARCHS[spec["arch"]](spec, rate)
    shapes = {name: list(t.shape) for name, t in model.state_dict().items() if not name.endswith("num_batches_tracked")}
    ours, theirs = sum(math.prod(s) for s in shapes.values()), sum(math.prod(s) for s in expected.values())
    if shapes != expected or ours != theirs:
        differ = sorted(n for n in set(shapes) | set(expected) if shapes.get(n) != expected.get(n))
        raise ValueError(f"PyTorch {spec['arch']} at rate {rate:g} has {ours:,} parameters, the manifest {theirs:,}; "
                         "differing: " + "; ".join(f"{n}: torch {shapes.get(n)} vs manifest {expected.get(n)}"
                                                   for n in differ[:8]))
    return model


def open_step(request: dict) -> StepFn:
    """The request's model at its tier's starting weights, in train mode, with one timed SGD step per call."""
    torch.set_num_threads(request["threads"])
    torch.set_num_interop_threads(1)
    model = build(request["spec"], request["rate"], request["shapes"])
    with np.load(Path(request["weights"]), allow_pickle=False) as saved:
        weights = {name: torch.from_numpy(saved[name]) for name in saved.files}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not n.endswith("num_batches_tracked") for n in missing):
        raise ValueError(f"weights do not load: missing {missing}, unexpected {unexpected}")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=request["lr"])

    def step(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        optimizer.step()
        value = float(loss)
        return time.perf_counter() - started, value

    return step


def runtime() -> str:
    """PyTorch's version (imported with this module)."""
    return torch.__version__


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1], sys.argv[2], open_step, runtime))
