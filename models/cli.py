"""`tierfl export`: write per-tier ONNX Runtime training artifacts for one model (a user's ONNX file or a zoo model)."""

from __future__ import annotations

import argparse
import logging
import re
import textwrap
import time
from pathlib import Path

from pydantic import ValidationError

from models.export import export_all, export_model
from models.export_check import ExportCheckFailed
from models.manifest import ModelCard, TierManifest
from models.onnx_import import UnsupportedModel, import_forward
from models.ort_training import TrainingBackendUnavailable
from models.spec import ARCH_DEFAULTS, INITS
from models.tiers import TIER_RATES, tier_rate
from models.zoo import ModelSpec

log = logging.getLogger(__name__)

DESCRIPTION = textwrap.fill(
    "Export the ONNX Runtime training artifacts of one model for each device tier: your own classifier "
    "(--model, an ONNX file as torch.onnx.export writes it) or a zoo model (--arch). The width analysis finds "
    "the channels that must be cut together; a tier keeps the leading channels of each "
    "(HeteroFL width rates " + ", ".join(f"{t}={r:g}" for t, r in TIER_RATES.items()) + "). "
    "Each tier folder holds training/eval/optimizer models, a checkpoint with the tier's slice of "
    "the seeded global weights, an inference model and a manifest with sha256 of every file.",
    width=88,
)
EPILOG = """examples:
  tierfl export --model my_model.onnx --tiers a,b,c,d,e --out runs/artifacts/my_model
  tierfl export --arch cnn --image-size 8 --batch-norm --tiers a,c,e --out runs/artifacts/cnn8-bn
  tierfl export --arch preresnet --tiers a,b,c,d,e --out runs/artifacts/preresnet32
  tierfl export --arch conv1d --channels 6 --length 128 --out runs/artifacts/imu

The export is deterministic: the same options and seed give byte-identical files."""


def _int_list(text: str) -> tuple[int, ...]:
    """Parse "256,256" into (256, 256)."""
    try:
        widths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be integers >= 1, got {text!r}")
    return widths


def _tier_list(text: str) -> list[str]:
    """Parse "a,b,c" into known tier letters."""
    tiers = [part.strip() for part in text.split(",") if part.strip()]
    try:
        for tier in tiers:
            tier_rate(tier)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not tiers:
        raise argparse.ArgumentTypeError("no tiers given")
    return tiers


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `tierfl export` options to `parser`."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default=None, metavar="FILE.onnx",
                        help="your own classifier as an ONNX forward graph: one float input, one logits output, "
                             "weights as initializers, exported in eval mode (see the README's \"Your own model\"); "
                             "replaces --arch/--image-size/--channels/--length/--batch-norm/--hidden/--seed/--init")
    parser.add_argument("--name", default=None, help="the model's name in reports (default: the --model file's stem)")
    parser.add_argument("--arch", choices=list(ARCH_DEFAULTS), default="mlp",
                        help="zoo model family, with one sample's shape: mlp, cnn: 1x8x8 images (1xSxS, S = "
                             "--image-size); preresnet (HeteroFL's CIFAR PreResNet), mobilenet (depthwise-separable, "
                             "ReLU6, squeeze-excitation): 3x32x32 images; conv1d: 40x49 time series, channels x length "
                             "(MFCC frames, IMU windows); transformer: 16x16, tokens x features (default: mlp)")
    parser.add_argument("--image-size", type=int, choices=[8, 28, 32], default=None,
                        help="image side in pixels: 8 for sklearn digits, 28 for Fashion-MNIST, 32 for CIFAR "
                             "(default: 8 for mlp and cnn, 32 for preresnet and mobilenet)")
    parser.add_argument("--channels", type=int, default=None,
                        help="image channels, or a sequence's features per step (MFCC coefficients, IMU axes); "
                             "default: the arch's (see --arch)")
    parser.add_argument("--length", type=int, default=None,
                        help="conv1d time steps or transformer tokens (default: 49 for conv1d, 16 for transformer)")
    parser.add_argument("--batch-norm", action="store_true",
                        help="add BatchNorm after each hidden layer of an mlp or cnn (preresnet, mobilenet and conv1d "
                             "always have it)")
    parser.add_argument("--hidden", type=_int_list, default=None,
                        help="widths at rate 1; mlp default 256,256; cnn: conv channels then fc width, default "
                             "32,64,128; preresnet: stages, default 16,32,64; mobilenet: stem then blocks, default "
                             "16,32,64,128; conv1d: conv channels, default 32,64,64; transformer: token width then "
                             "MLP width, default 32,64")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global initial weights (default: 0)")
    parser.add_argument("--init", choices=list(INITS), default="pytorch",
                        help="how mlp and cnn draw their initial weights: " + "; ".join(f"{k}: {v}" for k, v in INITS.items())
                             + " (default: %(default)s; kaiming reached 0.80 on Fashion-MNIST in fewer rounds: "
                             "benchmarks/convergence.md)")
    parser.add_argument("--tiers", type=_tier_list, default=list(TIER_RATES),
                        help="comma-separated tiers to export (default: " + ",".join(TIER_RATES) + ")")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="on-device optimizer (default: sgd)")
    parser.add_argument("--proximal", action="store_true",
                        help="FedProx: add mu/2 ||w - w_global||^2 to the training loss, mu and w_global set each round")
    parser.add_argument("--scaler", choices=["on", "off"], default="off",
                        help="HeteroFL scaler: hidden activations x 1/rate while training (default: off; a "
                             "batch norm training on batch statistics cancels it)")
    parser.add_argument("--out", default="runs/artifacts", help="output folder (default: runs/artifacts)")


def _summary(manifest: TierManifest) -> str:
    """One table row per tier: tier, rate, parameters, multiply-accumulates per sample, artifact bytes."""
    return (f"{manifest.tier:<4} {manifest.rate:<7g} {manifest.param_count:>12,d} {manifest.macs:>14,d} "
            f"{manifest.artifact_bytes:>14,d}")


def _card_name(args: argparse.Namespace) -> str:
    """The model's name: --name, else the file's stem with characters a name may not hold replaced."""
    raw = args.name or Path(args.model).stem
    name = re.sub(r"[^A-Za-z0-9._+-]", "-", raw).lstrip("._+-")[:80]
    return name or "model"


def _export_file(args: argparse.Namespace) -> tuple[str, list[str]] | None:
    """Import and export --model; returns (name, exported tiers) or None after logging why it cannot."""
    try:
        imported = import_forward(args.model)
        card = ModelCard(name=_card_name(args), input_shape=imported.input_shape, num_classes=imported.num_classes,
                         batch_norm=any(n.op_type == "BatchNormalization" for n in imported.forward.graph.node),
                         source_sha256=imported.source_sha256)
        for note in imported.notes:
            print(f"note: {note}")
        index = export_model(imported.forward, card, args.tiers, args.out, args.optimizer,
                             scaler=args.scaler == "on", proximal=args.proximal)
    except (UnsupportedModel, ValidationError, ExportCheckFailed, NotImplementedError) as exc:
        log.error("%s cannot be exported: %s", args.model, exc)
        return None
    return card.name, list(index.tiers)


def run(args: argparse.Namespace) -> int:
    """Run `tierfl export`; returns the process exit code."""
    started = time.perf_counter()
    try:
        if args.model is not None:
            if not Path(args.model).is_file():
                log.error("--model %s: no such file", args.model)
                return 2
            exported = _export_file(args)
            if exported is None:
                return 2
            name, tiers = exported
        else:
            try:
                spec = ModelSpec(arch=args.arch, image_size=args.image_size, channels=args.channels,
                                 length=args.length, hidden=args.hidden, batch_norm=args.batch_norm or None,
                                 seed=args.seed, init=args.init)
            except ValidationError as exc:
                log.error("invalid model options: %s", exc)
                return 2
            name, tiers = spec.name, list(export_all(spec, args.tiers, args.out, args.optimizer,
                                                     scaler=args.scaler == "on", proximal=args.proximal).tiers)
    except TrainingBackendUnavailable as exc:
        log.error("%s", exc)
        return 1
    print(f"{'tier':<4} {'rate':<7} {'parameters':>12} {'MACs/sample':>14} {'artifact bytes':>14}")
    for tier in tiers:
        print(_summary(TierManifest.load(Path(args.out) / tier / "manifest.json")))
    print(f"exported {name} tiers {','.join(tiers)} to {args.out}/index.json in {time.perf_counter() - started:.2f}s")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _parser = argparse.ArgumentParser(prog="tierfl export")
    configure_parser(_parser)
    raise SystemExit(run(_parser.parse_args()))
