"""Robust aggregation under attack: Fashion-MNIST, the 28x28 MLP, 20% of the devices malicious.

Every device trains with the real ORT training artifacts; the attackers (a seeded 20% of the
devices, the same in every run) then send their honest delta multiplied by -10 (sign flip) or
+10 (scaled). The aggregator combines the round with plain FedAvg or a defence from
aggregator.strategies.robust (adaptive norm clipping at the median norm, coordinate-wise median, trimmed
mean); each defence also runs without attack. Does every defence stay within 2 points of clean
FedAvg while plain FedAvg degrades? One process; the MQTT hop is covered by the integration
tests. Writes benchmarks/robust.{json,md,png}.

    .venv/bin/python scripts/bench_robust.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_heterofl import load_data, partition  # noqa: E402  (the same seeded subsets and partitions)

from aggregator.evaluate import HeldOutEvaluator  # noqa: E402
from aggregator.store.artifacts import ArtifactStore  # noqa: E402
from aggregator.strategies.fedavg import AccumulatorFactory, ClientUpdate  # noqa: E402
from aggregator.strategies.robust import robust_accumulator  # noqa: E402
from edge_client.trainer import OrtTrainer  # noqa: E402
from models.data import FASHION_MNIST_ROOT, Dataset  # noqa: E402
from models.export import export_all  # noqa: E402
from models.spec import ModelSpec  # noqa: E402

ATTACKS = {"clean": 1.0, "sign-flip": -10.0, "scale": 10.0}  # factor on the attackers' deltas
DEFENCES = ["fedavg", "clip", "median", "trimmed-mean"]
Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Bench:
    """What every federation shares: the export, one trainer, the evaluator, the devices and attackers."""

    artifacts: ArtifactStore
    trainer: OrtTrainer
    evaluator: HeldOutEvaluator
    shares: list[Dataset]
    attackers: frozenset[int]
    args: argparse.Namespace


def defence_factory(defence: str, trim_fraction: float) -> AccumulatorFactory:
    """The accumulator of a defence: `fedavg` is the sample-weighted mean, clipping is adaptive."""
    if defence == "trimmed-mean":
        return robust_accumulator(defence, trim_fraction=trim_fraction)
    return robust_accumulator("none" if defence == "fedavg" else defence)


def train_round(weights: Weights, round_number: int, factor: float, accumulate: AccumulatorFactory,
                bench: Bench) -> tuple[Weights, float]:
    """Every device trains, attackers scale their delta by `factor`; the new weights and the aggregation seconds."""
    args, accumulator, aggregating = bench.args, accumulate(weights), 0.0
    for i, share in enumerate(bench.shares):
        bench.trainer.set_weights(weights)
        bench.trainer.train(share, args.epochs, args.batch_size, args.lr, seed=args.seed * 1000 + round_number * 100 + i)
        trained = bench.trainer.get_weights()
        scale = np.float32(factor if i in bench.attackers else 1.0)
        update = ClientUpdate(f"d{i}", "a", len(share), {n: (trained[n] - weights[n]) * scale for n in weights})
        started = time.perf_counter()
        accumulator.add(update)
        aggregating += time.perf_counter() - started
    started = time.perf_counter()
    weights = accumulator.result()
    return weights, aggregating + time.perf_counter() - started


def simulate(defence: str, attack: str, bench: Bench) -> dict:
    """One federation of `defence` under `attack`; accuracy per round."""
    accumulate = defence_factory(defence, bench.args.trim_fraction)
    weights, history = bench.artifacts.global_weights(), []
    for round_number in range(1, bench.args.rounds + 1):
        started = time.perf_counter()
        weights, aggregating = train_round(weights, round_number, ATTACKS[attack], accumulate, bench)
        loss, accuracy = bench.evaluator.evaluate(weights)
        history.append({"round": round_number, "accuracy": accuracy, "loss": loss, "aggregate_seconds": aggregating,
                        "seconds": time.perf_counter() - started})
        print(f"{attack:>9} {defence:>12} round {round_number:2d}: accuracy {accuracy:.4f}", flush=True)
    return {"defence": defence, "attack": attack, "rounds": history, "final_accuracy": history[-1]["accuracy"],
            "aggregate_ms": 1000 * float(np.mean([h["aggregate_seconds"] for h in history]))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--attacker-fraction", type=float, default=0.2, help="share of the devices that attack")
    parser.add_argument("--partition", choices=["iid", "dirichlet"], default="iid")
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration with --partition dirichlet")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--train-samples", type=int, default=20000, help="seeded subset of the 60k training images")
    parser.add_argument("--test-samples", type=int, default=10000, help="seeded subset of the 10k test images")
    parser.add_argument("--trim-fraction", type=float, default=0.2, help="beta of the trimmed mean")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="clean, sign-flip (x-10), scale (x10)")
    parser.add_argument("--defences", default=",".join(DEFENCES), help="fedavg, clip, median, trimmed-mean")
    parser.add_argument("--tolerance", type=float, default=2.0, help="points below clean FedAvg a defence may lose")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path(FASHION_MNIST_ROOT), help="Fashion-MNIST folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args(argv)
    for option, known in (("attacks", ATTACKS), ("defences", DEFENCES)):
        if unknown := set(getattr(args, option).split(",")) - set(known):
            parser.error(f"unknown {option} {sorted(unknown)}; expected {', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = ModelSpec(arch="mlp", image_size=28, seed=args.seed)
    train, test = load_data(args, spec.input_shape)
    shares = partition(train, args.partition, args)
    count = round(args.attacker_fraction * args.devices)
    attackers = frozenset(int(i) for i in np.random.default_rng(args.seed).choice(args.devices, count, replace=False))
    started, results = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as folder:
        export_all(spec, ["a"], folder)
        artifacts = ArtifactStore(Path(folder))
        trainer = OrtTrainer(Path(folder) / "a", artifacts.tiers["a"].manifest)
        bench = Bench(artifacts, trainer, HeldOutEvaluator(test, artifacts), shares, attackers, args)
        for attack in args.attacks.split(","):
            results += [simulate(d, attack, bench) for d in args.defences.split(",")]
    write_report(args, spec, sorted(attackers), results, time.perf_counter() - started)


def final(results: list[dict], defence: str, attack: str) -> float | None:
    """Final accuracy of one run, None if it was not run."""
    return next((r["final_accuracy"] for r in results if r["defence"] == defence and r["attack"] == attack), None)


def claims(results: list[dict], tolerance: float) -> list[dict]:
    """Per attack and defence: within `tolerance` points of clean FedAvg, while plain FedAvg falls further?"""
    reference, out = final(results, "fedavg", "clean"), []
    if reference is None:
        return out
    for attack in (a for a in dict.fromkeys(r["attack"] for r in results) if a != "clean"):
        undefended = final(results, "fedavg", attack)
        fedavg_drop = None if undefended is None else 100 * (reference - undefended)
        for r in (r for r in results if r["attack"] == attack and r["defence"] != "fedavg"):
            drop = 100 * (reference - r["final_accuracy"])
            out.append({"attack": attack, "defence": r["defence"], "points_below_clean_fedavg": drop,
                        "fedavg_points_below": fedavg_drop, "within_tolerance": drop <= tolerance,
                        "fedavg_degrades": fedavg_drop is not None and fedavg_drop > tolerance})
    return out


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run."""
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "data"))
    return f".venv/bin/python scripts/bench_robust.py {options}"


def write_report(args: argparse.Namespace, spec: ModelSpec, attackers: list[int], results: list[dict], seconds: float) -> None:
    """benchmarks/robust.json, .md and .png."""
    args.out.mkdir(parents=True, exist_ok=True)
    verdicts = claims(results, args.tolerance)
    report = {"model": spec.model_dump(), "config": vars(args), "command": command_line(args), "seconds": seconds,
              "attackers": attackers, "claims": verdicts, "results": results}
    (args.out / "robust.json").write_text(json.dumps(report, indent=1, default=str))
    lines = markdown(args, spec, attackers, results, verdicts, seconds)
    (args.out / "robust.md").write_text("\n".join(lines) + "\n")
    plot(args, results)
    print("\n".join(lines))


def markdown(args: argparse.Namespace, spec: ModelSpec, attackers: list[int], results: list[dict],
             verdicts: list[dict], seconds: float) -> list[str]:
    """The table (defence x attack) and one line per claim."""
    attacks = list(dict.fromkeys(r["attack"] for r in results))
    reference = final(results, "fedavg", "clean")
    data = "IID" if args.partition == "iid" else f"Dirichlet({args.alpha})"
    lines = [
        f"# Robust aggregation: {spec.name} on Fashion-MNIST, {args.devices} devices ({len(attackers)} attackers), "
        f"{args.rounds} rounds", "", f"Reproduce: `{command_line(args)}` ({seconds / 60:.1f} min on a shared 2-core machine)",
        "", f"{args.train_samples} training images split {data}, {args.epochs} local epoch(s) of batch {args.batch_size} "
        f"at lr {args.lr}; accuracy after the last round on {args.test_samples} held-out test images. Attackers "
        f"(devices {', '.join(map(str, attackers))}) train honestly and send their delta x-10 (sign-flip) or x10 "
        "(scale). Defences: fedavg = sample-weighted mean (none); clip = every delta clipped to the median norm of "
        f"the round, then the weighted mean; median = coordinate-wise median; trimmed-mean = coordinate-wise mean "
        f"without the {args.trim_fraction:g} lowest and highest fraction. In brackets: points vs clean FedAvg. "
        "Aggregation: milliseconds per round to add the updates and compute the result.",
        "", "| defence | " + " | ".join(attacks) + " | aggregation ms/round |", "|---" * (len(attacks) + 2) + "|",
    ]
    for defence in dict.fromkeys(r["defence"] for r in results):
        runs = {r["attack"]: r for r in results if r["defence"] == defence}
        cells = [f"{runs[a]['final_accuracy']:.4f} ({100 * (runs[a]['final_accuracy'] - reference):+.2f})"
                 if a in runs and reference is not None else "-" for a in attacks]
        aggregate = max(r["aggregate_ms"] for r in runs.values())
        lines.append(f"| {defence} | " + " | ".join(cells) + f" | {aggregate:.1f} |")
    lines += ["", f"Target: under attack a defence stays within {args.tolerance:g} points of clean FedAvg, "
              "where plain FedAvg under the same attack falls further:", ""]
    for v in verdicts:
        fedavg = "not run" if v["fedavg_points_below"] is None else f"{v['fedavg_points_below']:.2f} points below"
        lines.append(f"- {v['attack']}, {v['defence']}: {'met' if v['within_tolerance'] and v['fedavg_degrades'] else 'not met'} "
                     f"({v['points_below_clean_fedavg']:.2f} points below clean FedAvg; plain FedAvg {fedavg})")
    return lines


def plot(args: argparse.Namespace, results: list[dict]) -> None:
    """Final accuracy of every defence under every attack, against the line the target allows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r["attack"] for r in results))
    defences = list(dict.fromkeys(r["defence"] for r in results))
    width, slots = 0.8 / len(attacks), np.arange(len(defences))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for j, attack in enumerate(attacks):
        heights = [final(results, d, attack) or 0.0 for d in defences]
        bars = ax.bar(slots + (j - (len(attacks) - 1) / 2) * width, heights, width, label=attack)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    reference = final(results, "fedavg", "clean")
    if reference is not None:
        ax.axhline(reference - args.tolerance / 100, color="k", ls="--", lw=1,
                   label=f"clean FedAvg - {args.tolerance:g} points")
    ax.set_xticks(slots, defences)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel(f"held-out accuracy after {args.rounds} rounds")
    fig.legend(loc="upper center", ncol=len(attacks) + 1, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(args.out / "robust.png", dpi=110)


if __name__ == "__main__":
    main()
