"""PyTorch classifiers of the shapes users bring, for the bring-your-own-model tests and docs.

Every model takes ``rate``: each hidden channel count C becomes ``scaled_width(C, rate)`` =
max(1, ceil(rate * C)), the leading channels a tier keeps; input channels and the class count stay
whole. ``narrowed`` gives the model a tier at a rate should compute, ``export_onnx`` is the export
recipe the docs give users.

PyTorch never enters the main venv: this file runs in the torch venv (tests/conftest.py's
``torch_python``) as a command line, and the tests compare its files with numpy and onnxruntime.
Everything crosses the process boundary as ONNX, .npy/.npz of numpy arrays, or JSON:

    python tests/torch_models.py export NAME OUT.onnx [--seed S] [--randomize none|bn|norms]
                                        [--recipe default|merged] [--options JSON] [--state STATE.npz]
    python tests/torch_models.py reference NAME --state STATE.npz --x X.npy --rates 1,0.5 --out REF.npz [--states]
    python tests/torch_models.py step NAME --state STATE.npz --x X.npy --y Y.npy --rates 1,0.25 --lr LR --out STEP.npz
    python tests/torch_models.py describe NAME --rates 1,0.5 --out SHAPES.json
    python tests/torch_models.py batch COMMANDS.json     # a JSON list of the command lines above, one process

Every command also takes ``--config JSON`` (constructor arguments over the named model's).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
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


# torch.onnx.export keyword arguments. "default" is the recipe the docs give users. dynamo=False: torch >= 2.9
# defaults to the dynamo exporter, which needs onnxscript and folds BatchNorm; do_constant_folding=False keeps a
# BatchNorm that follows a Conv; keep_initializers_as_inputs=True stops the merging of equal-valued tensors (a fresh
# BN's weight and running_var) (docs/notes/torch-export.md). "merged" is what users get without that last option:
# equal tensors become one initializer plus Identity nodes, and torch's own input and output names.
RECIPES: dict[str, dict[str, object]] = {
    "default": {"dynamo": False, "opset_version": 17, "input_names": ["input"], "output_names": ["logits"],
                "do_constant_folding": False, "keep_initializers_as_inputs": True},
    "merged": {"dynamo": False, "opset_version": 17, "do_constant_folding": False},
}


def export_onnx(model: nn.Module, path: str | Path, sample_shape: tuple[int, ...], batch: int = 4,
                recipe: str = "default", **options: object) -> onnx.ModelProto:
    """Export ``model`` as users are told to: eval, opset 17, static shapes, every BatchNorm kept, IR <= 10.

    With the default recipe the file has one float data input ``input`` [batch, *sample_shape], one
    output ``logits``, and every weight and BN statistic as its own initializer under its PyTorch name,
    also listed as a graph input (the importer drops those). ``options`` override the recipe's
    torch.onnx.export arguments. Returns the saved model.
    """
    model.eval()
    sample = torch.randn(batch, *sample_shape)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and chosen on purpose (see above)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (sample,), str(path), **{**RECIPES[recipe], **options})
    proto = onnx.load(str(path))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
        onnx.save(proto, str(path))
    return proto


# ---- the command line run in the torch venv --------------------------------------------------------------------

# name -> (class, constructor arguments, one sample's shape)
MODELS: dict[str, tuple[type[Scalable], dict[str, object], tuple[int, ...]]] = {
    "preresnet": (PreResNet, {}, (3, 32, 32)),
    "mobilenet": (MobileNetStyle, {}, (3, 32, 32)),
    "mobilenet_mnist": (MobileNetStyle, {"in_channels": 1}, (1, 28, 28)),
    "conv1d": (Conv1dNet, {}, (40, 49)),
    "conv1d_imu": (Conv1dNet, {"in_channels": 6, "num_classes": 6}, (6, 128)),
    "mlp": (MLP, {}, (64,)),
    "mlp_bn": (MLP, {"batch_norm": True, "dropout": 0.2}, (64,)),
    "transformer": (TinyTransformer, {}, (16, 6)),
}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def build(name: str, rate: float = 1.0, seed: int = 0, config: dict[str, object] | None = None,
          randomize: str = "none") -> Scalable:
    """Return the named model at ``rate`` in eval mode, initialized from ``seed``.

    ``randomize`` moves norm layers away from their defaults (a fresh model's equal-valued tensors, e.g. every
    BN weight of ones, share one initializer on a "merged" export): "bn" sets BatchNorm statistics and affine
    parameters at random, "norms" also LayerNorm's affine parameters.
    """
    cls, arguments, _ = MODELS[name]
    torch.manual_seed(seed)
    model = cls(rate, **{**arguments, **(config or {})})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if randomize != "none" and isinstance(module, BATCH_NORMS):
                module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            if (randomize != "none" and isinstance(module, BATCH_NORMS)
                    or randomize == "norms" and isinstance(module, nn.LayerNorm)):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
    return model.eval()


def save_state(model: nn.Module, path: str | Path) -> None:
    """Write the model's state_dict as an .npz of numpy arrays under its PyTorch names."""
    np.savez(path, **{name: t.detach().numpy() for name, t in model.state_dict().items()})


def load_state(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an .npz written by ``save_state`` into the model; returns the model."""
    with np.load(path) as saved:
        model.load_state_dict({name: torch.from_numpy(saved[name]) for name in saved.files})
    return model


def _rates(text: str) -> list[float]:
    """Parse "1,0.5,0.0625"."""
    return [float(r) for r in text.split(",")]


def _loaded(args: argparse.Namespace) -> Scalable:
    """The command's full-width model holding its --state."""
    return load_state(build(args.name, config=args.config), args.state)


def _export(args: argparse.Namespace) -> None:
    model = build(args.name, seed=args.seed, config=args.config, randomize=args.randomize)
    export_onnx(model, args.out, MODELS[args.name][2], args.batch, args.recipe, **args.options)
    if args.state:
        save_state(model, args.state)


def _reference(args: argparse.Namespace) -> None:
    model = _loaded(args)
    x = torch.from_numpy(np.load(args.x))
    with torch.no_grad():
        out = {"full": model(x).numpy()}
        for rate in args.rates:
            narrow = narrowed(model, rate)
            out[f"{rate}/logits"] = narrow(x).numpy()
            out[f"{rate}/training"] = np.array(narrow.training)
            if args.states:
                out |= {f"{rate}/state/{k}": t.numpy() for k, t in narrow.state_dict().items()}
    np.savez(args.out, **out)


def _step(args: argparse.Namespace) -> None:
    """One plain SGD step on the mean cross-entropy per rate, in train mode (BatchNorm on batch statistics).

    Dropout stays off: the exported eval graph has none, so no tier trains with it.
    """
    model = _loaded(args)
    x, y = torch.from_numpy(np.load(args.x)), torch.from_numpy(np.load(args.y))
    out = {}
    for rate in args.rates:
        narrow = narrowed(model, rate).train()
        for module in narrow.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
        loss = F.cross_entropy(narrow(x), y)
        loss.backward()
        torch.optim.SGD(narrow.parameters(), lr=args.lr).step()
        out[f"{rate}/loss"] = np.array(loss.item(), np.float32)
        out |= {f"{rate}/{name}": p.detach().numpy() for name, p in narrow.named_parameters()}
    np.savez(args.out, **out)


def _describe(args: argparse.Namespace) -> None:
    described = {}
    for rate in args.rates:
        model = build(args.name, rate, config=args.config)
        described[str(rate)] = {
            "shapes": {k: list(t.shape) for k, t in model.state_dict().items()},
            "groups": {k: m.groups for k, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))},
            "num_classes": model.config["num_classes"]}
    Path(args.out).write_text(json.dumps(described))


def _batch(args: argparse.Namespace) -> None:
    for command in json.loads(Path(args.commands).read_text()):
        main(command)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torch_models.py", description="\n\n".join(__doc__.split("\n\n")[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], None], summary: str,
                state: bool = True) -> argparse.ArgumentParser:
        """Add a subcommand running `run`; the model commands take NAME and --config, and most --state."""
        sub = commands.add_parser(name, help=summary)
        sub.set_defaults(run=run)
        if name != "batch":
            sub.add_argument("name", choices=sorted(MODELS))
            sub.add_argument("--config", type=json.loads, default={}, help="constructor arguments (JSON object)")
        if state:
            sub.add_argument("--state", required=True, help=".npz written by export --state")
        return sub

    export = command("export", _export, "export a model to ONNX", state=False)
    export.add_argument("out")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--randomize", choices=["none", "bn", "norms"], default="none")
    export.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    export.add_argument("--options", type=json.loads, default={}, help="torch.onnx.export arguments (JSON object)")
    export.add_argument("--batch", type=int, default=4)
    export.add_argument("--state", help="also write the model's state_dict here (.npz)")
    reference = command("reference", _reference, "eval outputs of the narrowed models")
    step = command("step", _step, "one SGD step of the narrowed models in train mode")
    for sub in (reference, step):
        sub.add_argument("--x", required=True, help="input batch (.npy)")
        sub.add_argument("--rates", "--rate", type=_rates, required=True, help="width rates, e.g. 1,0.5")
        sub.add_argument("--out", required=True, help=".npz of arrays keyed RATE/...")
    reference.add_argument("--states", action="store_true", help="also write each narrowed state_dict")
    step.add_argument("--y", required=True, help="int64 labels (.npy)")
    step.add_argument("--lr", type=float, required=True)
    describe = command("describe", _describe, "tensor shapes and conv groups of fresh models per rate", state=False)
    describe.add_argument("--rates", type=_rates, required=True)
    describe.add_argument("--out", required=True, help="JSON file")
    command("batch", _batch, "run a JSON list of command lines in this process", state=False).add_argument("commands")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command line (see the module docstring)."""
    args = _parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
