"""Accuracy and bytes per update codec: Fashion-MNIST, 20 devices, Dirichlet(0.3), same seed.

Runs the device's real path in one process for speed (ORT training, error feedback, the frame
encoder and decoder, the aggregator's streaming accumulator); the MQTT hop is covered by the
integration tests. Writes benchmarks/codecs.{json,md,png}.

    .venv/bin/python scripts/bench_codecs.py --rounds 20
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from aggregator.evaluate import HeldOutEvaluator
from aggregator.store.artifacts import ArtifactStore
from aggregator.strategies.fedavg import ClientUpdate, ElementwiseMean
from edge_client.compression import ErrorFeedback
from edge_client.trainer import OrtTrainer
from models.data import dirichlet_partition, load_fashion_mnist
from models.export import export_all
from models.spec import ModelSpec
from protocol.frame import decode_frame, encode_frame
from protocol.messages import Update, new_id

CODECS = ["float32", "float16", "int8", "int8-row", "int4", "topk:0.1", "topk:0.1+int8"]


def simulate(codec: str, args: argparse.Namespace, artifacts: ArtifactStore, shares, test) -> dict:
    """One federation of tier a with `codec`; returns accuracy and bytes per round."""
    trainer = OrtTrainer(artifacts.root / "a", artifacts.tiers["a"].manifest)
    evaluator = HeldOutEvaluator(test, artifacts)
    weights = artifacts.global_weights()
    with tempfile.TemporaryDirectory() as residuals:
        feedback = [ErrorFeedback(Path(residuals) / str(i), "a") for i in range(len(shares))]
        history = []
        for round_number in range(1, args.rounds + 1):
            started, bytes_up = time.perf_counter(), 0
            accumulator = ElementwiseMean(weights)
            for i, share in enumerate(shares):
                trainer.set_weights(weights)
                trainer.train(share, args.epochs, args.batch_size, args.lr, seed=args.seed * 1000 + round_number * 100 + i)
                trained = trainer.get_weights()
                intended = feedback[i].compensate({n: trained[n] - weights[n] for n in weights})
                body = Update(update_id=new_id(), round=round_number, base_version=round_number - 1, tier="a",
                              num_samples=len(share), steps=1, train_loss=0.0, train_accuracy=0.0, train_seconds=0.0)
                frame = encode_frame("bench", f"d{i}", body, intended, codec)
                bytes_up += len(frame)
                sent = decode_frame(frame).tensors
                feedback[i].remember(intended, sent)
                accumulator.add(ClientUpdate(f"d{i}", "a", len(share), sent))
            weights = accumulator.result()
            loss, accuracy = evaluator.evaluate(weights)
            history.append({"round": round_number, "accuracy": accuracy, "loss": loss, "bytes_up": bytes_up,
                            "seconds": time.perf_counter() - started})
            print(f"{codec:>14} round {round_number:2d}: accuracy {accuracy:.4f}, {bytes_up / 1e6:.2f} MB up", flush=True)
    return {"codec": codec, "rounds": history, "final_accuracy": history[-1]["accuracy"],
            "bytes_up_per_round": history[-1]["bytes_up"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--train-samples", type=int, default=20000, help="subset of the 60k training images")
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args()

    train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    train = train.subset(np.random.default_rng(args.seed).permutation(len(train))[: args.train_samples])
    shares = [train.subset(p) for p in dirichlet_partition(train.y, args.devices, args.alpha, args.seed)]
    spec = ModelSpec(arch="mlp", image_size=28, seed=args.seed)
    with tempfile.TemporaryDirectory() as folder:
        export_all(spec, ["a"], folder)
        artifacts = ArtifactStore(Path(folder))
        results = [simulate(c, args, artifacts, shares, test) for c in args.codecs.split(",")]
    write_report(args, spec, results)


def write_report(args: argparse.Namespace, spec: ModelSpec, results: list[dict]) -> None:
    """benchmarks/codecs.json, .md (with ratios to float32) and .png."""
    args.out.mkdir(parents=True, exist_ok=True)
    base = next((r for r in results if r["codec"] == "float32"), results[0])
    command = "python scripts/bench_codecs.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "codecs"))
    (args.out / "codecs.json").write_text(json.dumps({"model": spec.name, "command": command, "results": results}, indent=1))
    lines = [
        f"# Update codecs: {spec.name} on Fashion-MNIST, {args.devices} devices, Dirichlet {args.alpha}, {args.rounds} rounds",
        "", f"Reproduce: `{command}`", "",
        "| codec | final accuracy | vs float32 (points) | bytes up per round | float32 / codec bytes |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['codec']} | {r['final_accuracy']:.4f} | {100 * (r['final_accuracy'] - base['final_accuracy']):+.2f} "
                     f"| {r['bytes_up_per_round']:,} | {base['bytes_up_per_round'] / r['bytes_up_per_round']:.1f}x |")
    (args.out / "codecs.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot([h["round"] for h in r["rounds"]], [h["accuracy"] for h in r["rounds"]], label=r["codec"])
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "codecs.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
