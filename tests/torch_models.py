"""PyTorch classifiers of the shapes users bring, for the bring-your-own-model tests and docs.

Every model takes ``rate``: each hidden channel count C becomes ``scaled_width(C, rate)`` =
max(1, ceil(rate * C)), the leading channels a tier keeps; input channels and the class count stay
whole. ``narrowed`` gives the model a tier at a rate should compute, ``export_onnx`` is the export
recipe the docs give users.
PyTorch is a test-only dependency: nothing outside tests/ imports this module.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn
from torch.nn import functional as F

from models.tiers import scaled_width

# ORT 1.19.2 refuses files of IR version 11 and newer.
MAX_IR_VERSION = 10


class Scalable(nn.Module):
    """A model built at a width rate; keeps its constructor arguments so it can be rebuilt narrower."""

    def __init__(self, rate: float, **config: object) -> None:
        super().__init__()
        self.rate = rate
        self.config = config

    def width(self, channels: int) -> int:
        """Return the hidden channel count this model keeps of ``channels``."""
        return scaled_width(channels, self.rate)


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-Conv twice plus a shortcut (1x1 strided conv if shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return conv2(relu(bn2(conv1(a)))) + shortcut(a or x), a = relu(bn1(x))."""
        a = F.relu(self.bn1(x))
        skip = self.shortcut(a) if self.shortcut is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + skip


class PreResNet(Scalable):
    """HeteroFL's CIFAR-style pre-activation ResNet, one block per stage, for [N, C, H, W] images."""

    def __init__(self, rate: float = 1.0, in_channels: int = 3, num_classes: int = 10,
                 widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__(rate, in_channels=in_channels, num_classes=num_classes, widths=widths)
        w = [self.width(c) for c in widths]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        strides = [1] + [2] * (len(w) - 1)
        self.blocks = nn.Sequential(*(PreActBlock(cin, cout, s) for cin, cout, s in zip([w[0]] + w[:-1], w, strides)))
        self.bn = nn.BatchNorm2d(w[-1])
        self.fc = nn.Linear(w[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits [N, classes]."""
        x = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: global average pool, 1x1 conv, ReLU, 1x1 conv, HardSigmoid, rescale."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return x scaled per channel by its gate."""
        gate = F.hardsigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate


def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 conv, BN, ReLU6, pointwise 1x1 conv, BN."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


class MobileNetStyle(Scalable):
    """MobileNet-like: HardSwish stem, depthwise-separable blocks, one squeeze-excitation, linear head."""

    def __init__(self, rate: float = 1.0, in_channels: int = 3, num_classes: int = 10,
                 widths: tuple[int, int, int] = (16, 32, 64), se_hidden: int = 16) -> None:
        super().__init__(rate, in_channels=in_channels, num_classes=num_classes, widths=widths, se_hidden=se_hidden)
        w0, w1, w2 = (self.width(c) for c in widths)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.Hardswish())
        self.block1 = separable(w0, w1, 1)
        self.block2 = separable(w1, w2, 2)
        self.se = SqueezeExcite(w2, self.width(se_hidden))
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits [N, classes]."""
        x = F.relu6(self.block1(self.stem(x)))
        x = F.hardswish(self.se(self.block2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Conv1dNet(Scalable):
    """1-D CNN for time series [N, C, T]: (Conv1d, BN, ReLU, MaxPool1d) twice, mean over T, Linear."""

    def __init__(self, rate: float = 1.0, in_channels: int = 40, num_classes: int = 12,
                 widths: tuple[int, int] = (32, 64)) -> None:
        super().__init__(rate, in_channels=in_channels, num_classes=num_classes, widths=widths)
        w0, w1 = (self.width(c) for c in widths)
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, w0, 3, padding=1), nn.BatchNorm1d(w0), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(w0, w1, 3, padding=1), nn.BatchNorm1d(w1), nn.ReLU(), nn.MaxPool1d(2))
        self.fc = nn.Linear(w1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits [N, classes]."""
        return self.fc(self.features(x).mean(dim=2))


class MLP(Scalable):
    """Tabular MLP on [N, F]: (Linear, optional BatchNorm1d, ReLU, optional Dropout) per hidden layer, then Linear."""

    def __init__(self, rate: float = 1.0, in_features: int = 64, num_classes: int = 10,
                 hidden: tuple[int, ...] = (128, 64), batch_norm: bool = False, dropout: float = 0.0) -> None:
        super().__init__(rate, in_features=in_features, num_classes=num_classes, hidden=hidden,
                         batch_norm=batch_norm, dropout=dropout)
        layers: list[nn.Module] = []
        cin = in_features
        for h in hidden:
            cout = self.width(h)
            layers += [nn.Linear(cin, cout)] + ([nn.BatchNorm1d(cout)] if batch_norm else []) + [nn.ReLU()]
            layers += [nn.Dropout(dropout)] if dropout else []
            cin = cout
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits [N, classes]."""
        return self.fc(self.body(x))


class TinyTransformer(Scalable):
    """One single-head pre-norm transformer layer over [N, T, F]: Linear embedding, attention, GELU MLP, mean, head.

    The attention scale is 1/sqrt(dim) of the full width at every rate: a tier cut from the full
    model's graph keeps that constant, so the narrowed model must too.
    """

    def __init__(self, rate: float = 1.0, in_features: int = 6, num_classes: int = 5,
                 dim: int = 32, mlp: int = 64) -> None:
        super().__init__(rate, in_features=in_features, num_classes=num_classes, dim=dim, mlp=mlp)
        d, m = self.width(dim), self.width(mlp)
        self.scale = dim ** -0.5
        self.embed = nn.Linear(in_features, d)
        self.norm1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, m), nn.GELU(), nn.Linear(m, d))
        self.fc = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits [N, classes]."""
        x = self.embed(x)
        h = self.norm1(x)
        attn = torch.softmax(torch.matmul(self.q(h), self.k(h).transpose(1, 2)) * self.scale, dim=-1)
        x = x + self.out(torch.matmul(attn, self.v(h)))
        x = x + self.mlp(self.norm2(x))
        return self.fc(x.mean(dim=1))


def narrowed(model_full: Scalable, rate: float) -> Scalable:
    """Return the model of the same class at ``rate`` holding the leading block of every full tensor."""
    small = type(model_full)(rate, **model_full.config)
    full_state = model_full.state_dict()
    state = {name: full_state[name][tuple(slice(0, n) for n in t.shape)].clone()
             for name, t in small.state_dict().items()}
    small.load_state_dict(state)
    return small.train(model_full.training)


def export_onnx(model: nn.Module, path: str | Path, sample_shape: tuple[int, ...], batch: int = 4) -> onnx.ModelProto:
    """Export ``model`` as users are told to: eval, opset 17, static shapes, every BatchNorm kept, IR <= 10.

    The file has one float data input ``input`` [batch, *sample_shape], one output ``logits``, and every
    weight and BN statistic as its own initializer under its PyTorch name, also listed as a graph input
    (the importer drops those); returns the saved model.
    """
    model.eval()
    sample = torch.randn(batch, *sample_shape)
    # dynamo=False: torch >= 2.9 defaults to the dynamo exporter, which needs onnxscript and folds BatchNorm;
    # do_constant_folding=False keeps a BatchNorm that follows a Conv; keep_initializers_as_inputs=True stops
    # the merging of equal-valued tensors (a fresh BN's weight and running_var) (docs/notes/torch-export.md)
    torch.onnx.export(model, (sample,), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], do_constant_folding=False,
                      keep_initializers_as_inputs=True)
    proto = onnx.load(str(path))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
        onnx.save(proto, str(path))
    return proto
