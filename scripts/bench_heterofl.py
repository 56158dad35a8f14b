"""HeteroFL tier mixes: Fashion-MNIST, a zoo model, IID and Dirichlet partitions, same seed.

Does a fleet with weak devices beat training on the weakest tier alone, and come close to a
fleet of tier a devices? Each device trains its tier's leading block of the global weights with
the real ORT training artifacts, and the aggregator's element-wise mean folds the deltas (one
process; the MQTT hop is covered by the integration tests). Tiers go to devices in contiguous
blocks by their share of the mix (`a-e`: the first half a, the rest e).

The model is the 28x28 CNN (`--arch cnn`, the default), which writes
benchmarks/heterofl.{json,md,png}, or a 3x32x32 zoo model (`--arch preresnet`, `mobilenet`):
Fashion-MNIST is then zero-padded to 32x32 and repeated to 3 channels, and the run writes the
HeteroFL section of benchmarks/models.{json,md} (with scripts/bench_models.py's step times) and
benchmarks/models.png.

    .venv/bin/python scripts/bench_heterofl.py
    .venv/bin/python scripts/bench_heterofl.py --arch preresnet
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_models import write_section

from aggregator.evaluate import HeldOutEvaluator
from aggregator.store.artifacts import ArtifactStore
from aggregator.strategies.bn_statistics import BnStatisticsPool, with_statistics
from aggregator.strategies.fedavg import ClientUpdate, ElementwiseMean
from aggregator.strategies.tiering import parse_tier_mix
from edge_client.bn_statistics import measure_bn_statistics
from edge_client.trainer import OrtTrainer
from models.data import FASHION_MNIST_ROOT, Dataset, dirichlet_partition, iid_partition, load_fashion_mnist
from models.export import export_all
from models.manifest import STATISTICS_FILE
from models.slicing import slice_params
from models.spec import ModelSpec
from models.tiers import TIER_RATES

MIXES = ["a", "e", "a-e", "a-b-c-d-e"]
ARCHS = ("cnn", "preresnet", "mobilenet")  # cnn: 1x28x28 images; the others 3x32x32
PARTITIONS = ["iid", "dirichlet"]
Weights = dict[str, np.ndarray]


def assign_tiers(mix: dict[str, float], devices: int) -> list[str]:
    """Tier of each device: contiguous blocks sized by the mix's shares (deterministic, balanced)."""
    bounds = np.round(np.cumsum(list(mix.values())) * devices).astype(int)
    return [list(mix)[int(np.searchsorted(bounds, i, side="right"))] for i in range(devices)]


def partition(train: Dataset, kind: str, args: argparse.Namespace) -> list[Dataset]:
    """The devices' local data, the same for every mix."""
    if kind == "iid":
        parts = iid_partition(len(train), args.devices, args.seed)
    else:
        parts = dirichlet_partition(train.y, args.devices, args.alpha, args.seed)
    return [train.subset(p) for p in parts]


@dataclass(frozen=True)
class Bench:
    """What every federation shares: the export, one trainer per tier, the test set's evaluator, the options."""

    artifacts: ArtifactStore
    trainers: dict[str, OrtTrainer]
    evaluator: HeldOutEvaluator
    args: argparse.Namespace


def tier_weights(weights: Weights, tier: str, statistics: dict[str, Weights], artifacts: ArtifactStore) -> Weights:
    """The tier's slice of the global weights, with the tier's own batch-norm statistics once measured."""
    sliced = slice_params(weights, artifacts.tiers[tier].shapes)
    return with_statistics(sliced, {tier: statistics[tier]}) if tier in statistics else sliced


def train_round(weights: Weights, statistics: dict[str, Weights], round_number: int, tiers: list[str],
                shares: list[Dataset], bench: Bench) -> Weights:
    """Every device trains its tier's slice; the new global is the element-wise mean of the deltas."""
    args, accumulator = bench.args, ElementwiseMean(weights)
    for i, (tier, share) in enumerate(zip(tiers, shares)):
        start = tier_weights(weights, tier, statistics, bench.artifacts)
        bench.trainers[tier].set_weights(start)
        bench.trainers[tier].train(share, args.epochs, args.batch_size, args.lr, seed=args.seed * 1000 + round_number * 100 + i)
        trained = bench.trainers[tier].get_weights()
        accumulator.add(ClientUpdate(f"d{i}", tier, len(share), {n: trained[n] - start[n] for n in start}))
    return accumulator.result()


def measure_statistics(weights: Weights, tiers: list[str], shares: list[Dataset], bench: Bench) -> dict[str, Weights]:
    """HeteroFL's static batch norm: each tier's statistics of `weights` pooled over its devices' data (none without BN)."""
    if not bench.artifacts.card.batch_norm:
        return {}
    pools: dict[str, BnStatisticsPool] = {}
    for tier, share in zip(tiers, shares):
        sliced = slice_params(weights, bench.artifacts.tiers[tier].shapes)
        measured = measure_bn_statistics(bench.artifacts.root / tier / STATISTICS_FILE, sliced, share)
        pools.setdefault(tier, BnStatisticsPool()).add(len(share), measured)
    return {tier: pool.result() for tier, pool in pools.items()}


def submodel_accuracies(weights: Weights, statistics: dict[str, Weights], mix: dict[str, float], bench: Bench) -> dict[str, float]:
    """Held-out accuracy of the global weights sliced at each tier of the mix."""
    artifacts = bench.artifacts
    return {tier: bench.evaluator.evaluate(tier_weights(weights, tier, statistics, artifacts),
                                           artifacts.tiers[tier].manifest.rate)[1]
            for tier in mix}


def training_macs(tiers: list[str], shares: list[Dataset], artifacts: ArtifactStore) -> int:
    """Forward multiply-accumulates of one epoch over the fleet (a cost unit to compare mixes)."""
    return sum(artifacts.macs[t] * len(s) for t, s in zip(tiers, shares))


def simulate(mix_text: str, kind: str, shares: list[Dataset], bench: Bench) -> dict:
    """One federation of `mix_text` on partition `kind`; accuracies per round."""
    mix = parse_tier_mix(mix_text)
    tiers = assign_tiers(mix, len(shares))
    model_tier = max(set(tiers), key=TIER_RATES.__getitem__)  # the widest trained block is what a device deploys
    weights, statistics, history = bench.artifacts.global_weights(), {}, []
    for round_number in range(1, bench.args.rounds + 1):
        started = time.perf_counter()
        weights = train_round(weights, statistics, round_number, tiers, shares, bench)
        statistics = measure_statistics(weights, tiers, shares, bench)
        accuracies = submodel_accuracies(weights, statistics, mix, bench)
        history.append({"round": round_number, "accuracy": accuracies[model_tier], "tiers": accuracies,
                        "seconds": time.perf_counter() - started})
        print(f"{kind:>9} {mix_text:>9} round {round_number:2d}: model ({model_tier}) {accuracies[model_tier]:.4f}, "
              + ", ".join(f"{t} {a:.4f}" for t, a in accuracies.items()), flush=True)
    return {"partition": kind, "mix": mix_text, "devices_per_tier": {t: tiers.count(t) for t in mix},
            "model_tier": model_tier, "training_macs": training_macs(tiers, shares, bench.artifacts), "rounds": history,
            "final_accuracy": history[-1]["accuracy"], "final_tiers": history[-1]["tiers"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the non-IID partition")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--train-samples", type=int, default=20000, help="seeded subset of the 60k training images")
    parser.add_argument("--test-samples", type=int, default=10000, help="seeded subset of the 10k test images")
    parser.add_argument("--arch", choices=ARCHS, default="cnn",
                        help="the zoo model; the 3x32x32 ones get Fashion-MNIST padded to 32x32 in 3 channels")
    parser.add_argument("--batch-norm", action="store_true",
                        help="CNN with batch norm: static BN (per-tier statistics measured each round; "
                        "preresnet and mobilenet always have it)")
    parser.add_argument("--scaler", action="store_true", help="export with HeteroFL's scaler (off by default)")
    parser.add_argument("--mixes", default=",".join(MIXES), help="HeteroFL tier mixes, e.g. a,e,a2-e8")
    parser.add_argument("--partitions", default=",".join(PARTITIONS), help="iid and/or dirichlet")
    parser.add_argument("--tolerance", type=float, default=3.0, help="points from 'a' the claim allows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path(FASHION_MNIST_ROOT), help="Fashion-MNIST folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args(argv)
    unknown = set(args.partitions.split(",")) - set(PARTITIONS)
    if unknown:
        parser.error(f"unknown partition(s) {sorted(unknown)}; expected {', '.join(PARTITIONS)}")
    if args.batch_norm and args.arch != "cnn":
        parser.error(f"--batch-norm is the cnn's option: {args.arch} always has batch norm")
    return args


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The zoo model trained: the 28x28 CNN, or a 3x32x32 arch at its defaults."""
    if args.arch == "cnn":
        return ModelSpec(arch="cnn", image_size=28, batch_norm=args.batch_norm, seed=args.seed)
    return ModelSpec(arch=args.arch, seed=args.seed)


def fit_images(data: Dataset, shape: tuple[int, ...]) -> Dataset:
    """[N, 1, 28, 28] images for a [C, S, S] model (S >= 28): zero-padded around to S x S, repeated to C channels."""
    channels, side = shape[0], shape[-1]
    before = (side - data.x.shape[-1]) // 2
    after = side - data.x.shape[-1] - before
    padded = np.pad(data.x, ((0, 0), (0, 0), (before, after), (before, after)))
    return Dataset(np.ascontiguousarray(np.repeat(padded, channels, axis=1)), data.y)


def load_data(args: argparse.Namespace, shape: tuple[int, ...]) -> tuple[Dataset, Dataset]:
    """Seeded train and test subsets fitted to the model's input `shape`; a missing dataset ends the run with the
    install hint."""
    try:
        train, test = load_fashion_mnist(args.data, split="train"), load_fashion_mnist(args.data, split="test")
    except FileNotFoundError as exc:
        sys.exit(f"error: {exc}")
    rng = np.random.default_rng(args.seed)
    train = train.subset(rng.permutation(len(train))[: args.train_samples])
    test = test.subset(np.sort(rng.permutation(len(test))[: args.test_samples]))
    return fit_images(train, shape), fit_images(test, shape)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = model_spec(args)
    train, test = load_data(args, spec.input_shape)
    load_start = load_average()
    mixes = args.mixes.split(",")
    tiers = sorted({t for m in mixes for t in parse_tier_mix(m)}, key=list(TIER_RATES).index)
    started, results = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as folder:
        export_all(spec, tiers, folder, scaler=args.scaler)
        artifacts = ArtifactStore(Path(folder))
        trainers = {t: OrtTrainer(artifacts.root / t, artifacts.tiers[t].manifest) for t in tiers}
        bench = Bench(artifacts, trainers, HeldOutEvaluator(test, artifacts), args)
        for kind in args.partitions.split(","):
            shares = partition(train, kind, args)
            results += [simulate(m, kind, shares, bench) for m in mixes]
    write_report(args, spec, results, time.perf_counter() - started, f"{load_start}, at end {load_average()}")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def claims(results: list[dict], tolerance: float) -> list[dict]:
    """Per partition: does each mix with weak devices beat 'e' alone and come within `tolerance` points of 'a'?"""
    out = []
    for kind in dict.fromkeys(r["partition"] for r in results):
        final = {r["mix"]: r["final_accuracy"] for r in results if r["partition"] == kind}
        if "a" not in final or "e" not in final:
            continue
        for mix in (m for m in final if m not in ("a", "e")):
            gap = 100 * (final["a"] - final[mix])
            out.append({"partition": kind, "mix": mix, "beats_e": final[mix] > final["e"], "points_below_a": gap,
                        "held": final[mix] > final["e"] and gap <= tolerance})
    return out


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run."""
    options = []
    for key, value in vars(args).items():
        if key not in ("out", "data") and value is not False:
            flag = "--" + key.replace("_", "-")
            options.append(flag if value is True else f"{flag} {value}")
    return "python scripts/bench_heterofl.py " + " ".join(options)


def write_report(args: argparse.Namespace, spec: ModelSpec, results: list[dict], seconds: float, load: str) -> None:
    """benchmarks/heterofl.{json,md,png} for the cnn; the HeteroFL section of models.{json,md} and models.png else."""
    args.out.mkdir(parents=True, exist_ok=True)
    verdicts = claims(results, args.tolerance)
    report = {"model": spec.model_dump(), "config": vars(args),
              "command": command_line(args), "seconds": seconds, "load_average": load,
              "test_samples": args.test_samples, "claims": verdicts, "results": results}
    lines = markdown(args, spec, results, verdicts, seconds, load)
    if args.arch == "cnn":
        (args.out / "heterofl.json").write_text(json.dumps(report, indent=1, default=str))
        (args.out / "heterofl.md").write_text("\n".join(lines) + "\n")
        plot(args, results, args.out / "heterofl.png")
    else:
        write_section(args.out, "heterofl", json.loads(json.dumps(report, default=str)) | {"markdown": lines})
        plot(args, results, args.out / "models.png")
    print("\n".join(lines))


def markdown(args: argparse.Namespace, spec: ModelSpec, results: list[dict], verdicts: list[dict], seconds: float,
             load: str) -> list[str]:
    """The table (mix x partition) and one line per claim."""
    if args.arch == "cnn":
        title, data = f"# HeteroFL tier mixes: {spec.name} on Fashion-MNIST", "Fashion-MNIST"
    else:  # a section of models.md
        title = f"## HeteroFL tier mixes: {spec.name} on Fashion-MNIST (32x32, 3 channels)"
        data = ("Fashion-MNIST zero-padded from 28x28 to 32x32 and repeated to 3 channels (no CIFAR download is "
                "possible here)")
    lines = [
        f"{title}, {args.devices} devices, {args.rounds} rounds",
        "", f"Reproduce: `{command_line(args)}` ({seconds / 60:.0f} min on a shared 2-core machine; load average "
        f"(1, 5, 15 min) at start {load})", "",
        f"{data}: {args.train_samples} training images, {args.epochs} local epoch(s) of batch {args.batch_size} at lr {args.lr} "
        f"per round; accuracy after the last round on {args.test_samples} held-out test images. Non-IID is "
        f"Dirichlet({args.alpha}), the same partition for every mix. The model accuracy is the widest trained "
        "width of the mix (the model its strongest device deploys: rate 1 with tier a, the e block for 'e' "
        "alone); a tier column is the global weights sliced at that tier's rate. Training compute is the "
        "fleet's forward multiply-accumulates relative to 'a' alone.",
        "", "| partition | mix | devices per tier | model accuracy | vs a (points) | training compute "
        + "".join(f"| {t} ({TIER_RATES[t]:g}) " for t in TIER_RATES) + "|",
        "|---" * (6 + len(TIER_RATES)) + "|",
    ]
    for r in results:
        base = next((b for b in results if b["partition"] == r["partition"] and b["mix"] == "a"), r)
        devices = " ".join(f"{t}:{n}" for t, n in r["devices_per_tier"].items() if n)
        tiers = "".join(f"| {r['final_tiers'][t]:.4f} " if t in r["final_tiers"] else "| - " for t in TIER_RATES)
        lines.append(f"| {r['partition']} | {r['mix']} | {devices} | {r['final_accuracy']:.4f} ({r['model_tier']}) "
                     f"| {100 * (r['final_accuracy'] - base['final_accuracy']):+.2f} "
                     f"| {r['training_macs'] / base['training_macs']:.2f} {tiers}|")
    lines += ["", f"Claim (a mix with weak devices beats 'e' alone and is within {args.tolerance:g} points of 'a' alone):", ""]
    for v in verdicts:
        lines.append(f"- {v['partition']}, {v['mix']}: {'held' if v['held'] else 'did not hold'} "
                     f"({'beats' if v['beats_e'] else 'does not beat'} e; {v['points_below_a']:.2f} points below a)")
    return lines


def plot(args: argparse.Namespace, results: list[dict], path: Path) -> None:
    """Model accuracy per round of each mix, one panel per partition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["partition"] for r in results))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for r in (r for r in results if r["partition"] == kind):
            ax.plot([h["round"] for h in r["rounds"]], [h["accuracy"] for h in r["rounds"]], marker=".", label=r["mix"])
        ax.set_title(kind if kind == "iid" else f"Dirichlet({args.alpha})")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(title="mix")
    axes[0][0].set_ylabel("held-out accuracy (widest trained width)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
