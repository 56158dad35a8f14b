"""A PyTorch classifier of your own, exported to ONNX the way `tierfl export --model` takes it.

    pip install torch==2.13.0                       # where you export; devices never need PyTorch
    python examples/own_model/model.py runs/own/model.onnx

The model is a small pre-activation ResNet for 3x32x32 images (BatchNorm, residual adds, global
average pooling). Any classifier built from the operators the README lists exports the same way:
one float input, logits out, eval mode, static shapes, BatchNorm kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    """BN-ReLU-Conv twice, plus the input (or a strided 1x1 conv of it when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        skip = self.shortcut(a) if self.shortcut is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + skip


class SmallResNet(nn.Module):
    """Stem, three stages (8, 16, 32 channels), BN-ReLU, global average pool, linear head."""

    def __init__(self, classes: int = 10, widths: tuple[int, int, int] = (8, 16, 32)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Conv2d(3, w1, 3, 1, 1, bias=False)
        self.stages = nn.Sequential(Block(w1, w1, 1), Block(w1, w2, 2), Block(w2, w3, 2))
        self.bn, self.fc = nn.BatchNorm2d(w3), nn.Linear(w3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stages(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def export(path: str) -> None:
    """Write the untrained model to `path` as TierFL takes it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = SmallResNet().eval()                    # eval mode: BatchNorm uses its running statistics
    torch.onnx.export(
        model, (torch.randn(4, 3, 32, 32),), path,  # any batch size: TierFL makes the batch dynamic
        dynamo=False,                               # the TorchScript exporter (torch >= 2.9 defaults to dynamo)
        opset_version=17,
        do_constant_folding=False,                  # keeps every BatchNorm (folding merges one after a Conv)
        keep_initializers_as_inputs=True,           # keeps equal tensors of a fresh model apart
        input_names=["input"], output_names=["logits"],
    )


if __name__ == "__main__":
    export(sys.argv[1] if len(sys.argv) > 1 else "model.onnx")
