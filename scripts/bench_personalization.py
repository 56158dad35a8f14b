"""Personalization under label skew: the global model against a local fine-tune and personal layers, per device.

Fashion-MNIST (Debian's dataset-fashion-mnist), Dirichlet(0.1) label skew over 20 devices, each
keeping 20% of its shard as its own test split (`tierfl client --test-fraction 0.2`); mlp28,
synchronous FedAvg over all 20 devices. Real processes over a Mosquitto this script starts on a
free port: one `tierfl aggregator`, 20 `tierfl client`. Two runs:

- `fedavg + finetune:K`: FedAvg with `--personalize finetune:K`; each device reports the global
  model's accuracy on its test split and, after K local steps from the same weights, the
  fine-tuned model's;
- `fedper (personal head)`: `--personal-layers fc3.*`: the classifier head never leaves a device;
  each device reports the shared layers with its own head on its test split (and with
  `--personalize finetune:K` also on, the same fine-tune from there).

Per-device accuracies are read off the broker: a subscriber on the fleet's uplink decodes every
update (sender, eval_accuracy, personal_accuracy). A device measures at the start of a round the
version the round was sent with, so the last round (R) reports on version R - 1; the table gives,
across the 20 devices, the mean and the mean of the worst 10% (2 devices) of those accuracies,
plus what each round summary reported. Writes benchmarks/personalization.{json,md}.

    nice -n 19 .venv/bin/python scripts/bench_personalization.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_hostile import _start_mosquitto, _tierfl, stop  # noqa: E402 (a sibling script)

from aggregator.engines.personal import worst_mean  # noqa: E402
from models.data import dirichlet_partition, load_fashion_mnist, save_npz  # noqa: E402
from models.export import export_all  # noqa: E402
from models.spec import ModelSpec  # noqa: E402
from protocol.frame import FrameError, decode_frame  # noqa: E402
from protocol.messages import RoundSummary, Update  # noqa: E402
from protocol.mqtt.link import MqttLink  # noqa: E402
from protocol.mqtt.url import parse as parse_broker  # noqa: E402
from protocol.topics import Topics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "personalization"
HEAD = "fc3.*"  # the zoo MLP's classifier: fc3.weight, fc3.bias
# Everything below this line of the .md is the federated-analytics section (benchmarks/analytics.md), kept as it is
# when this script rewrites the table above it.
ANALYTICS_MARK = "<!-- analytics section: written by the federated-analytics bench, see benchmarks/analytics.md -->"


class Observer:
    """A subscriber on the fleet's uplink and rounds topics: every update's sender and accuracies, every summary."""

    def __init__(self, url: str, fleet: str) -> None:
        topics = Topics(fleet)
        self.updates: list[tuple[str, Update]] = []
        self.summaries: list[RoundSummary] = []
        self.final = threading.Event()
        self.link = MqttLink(parse_broker(url), f"tierfl-{fleet}-bench-observer", [topics.all_up(), topics.rounds],
                             self._on_frame, lambda *_: None)
        self.link.start()

    def _on_frame(self, topic: str, data: bytes) -> None:
        try:
            frame = decode_frame(data)
        except FrameError:
            return
        body = frame.header.body
        if isinstance(body, Update):
            self.updates.append((frame.header.sender, body))
        elif isinstance(body, RoundSummary):
            self.summaries.append(body)
            if body.final:
                self.final.set()

    def stop(self) -> None:
        self.link.stop()


def prepare(folder: Path, args: argparse.Namespace) -> tuple[Path, list[Path], list[int]]:
    """The mlp28 export, and one Dirichlet shard of Fashion-MNIST per device as .npz; (artifacts, shards, sizes)."""
    train = load_fashion_mnist(split="train")
    train = train.subset(np.random.default_rng(args.seed).permutation(len(train))[: args.train_samples])
    parts = dirichlet_partition(train.y, args.devices, args.alpha, args.seed, min_size=args.min_size)
    shards = []
    for i, part in enumerate(parts):
        shards.append(folder / "data" / f"d{i:02d}.npz")
        shards[-1].parent.mkdir(parents=True, exist_ok=True)
        save_npz(shards[-1], train.subset(part))
    artifacts = folder / "artifacts"
    export_all(ModelSpec(arch="mlp", image_size=28), ["a"], artifacts)
    return artifacts, shards, [len(p) for p in parts]


def run(name: str, options: list[str], folder: Path, artifacts: Path, shards: list[Path],
        args: argparse.Namespace) -> dict:
    """One federation with these aggregator `options`; per-device accuracies of the last round and every summary."""
    folder.mkdir(parents=True)
    broker, url = _start_mosquitto(folder)
    fleet = "bench"
    observer = Observer(url, fleet)
    processes = []
    started = time.perf_counter()
    try:
        processes.append(_tierfl(
            ["aggregator", "--broker", url, "--fleet", fleet, "--state-dir", str(folder / "state"),
             "--artifacts", str(artifacts), "--rounds", str(args.rounds), "--min-clients", str(args.devices),
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
             "--round-timeout", str(args.round_timeout), "--seed", str(args.seed), *options],
            folder / "aggregator.log"))
        for i, shard in enumerate(shards):
            processes.append(_tierfl(
                ["client", "--broker", url, "--fleet", fleet, "--device-id", f"d{i:02d}", "--data", str(shard),
                 "--test-fraction", "0.2", "--cache-dir", str(folder / "devices" / f"d{i:02d}")],
                folder / f"d{i:02d}.log"))
        if not observer.final.wait(args.rounds * args.round_timeout + 300):
            raise SystemExit(f"{name}: no final round summary; see {folder / 'aggregator.log'}")
        processes[0].wait(60)
    finally:
        stop(processes)
        observer.stop()
        stop([broker])
    seconds = time.perf_counter() - started
    last = max(update.round for _, update in observer.updates)
    final = {sender: update for sender, update in observer.updates if update.round == last}
    measured = {"global": [u.eval_accuracy for u in final.values() if u.eval_accuracy is not None],
                "finetuned": [u.personal_accuracy for u in final.values() if u.personal_accuracy is not None]}
    summaries = sorted(observer.summaries, key=lambda s: s.round)
    return {
        "name": name, "options": options, "seconds": round(seconds, 1), "rounds": len(summaries),
        "last_round": last, "devices_answered": len(final),
        "per_device": {sender: {"global": u.eval_accuracy, "finetuned": u.personal_accuracy, "test_samples": u.eval_samples}
                       for sender, u in sorted(final.items())},
        **{f"{kind}_mean": float(np.mean(values)) for kind, values in measured.items() if values},
        **{f"{kind}_worst10": worst_mean(values) for kind, values in measured.items() if values},
        "summaries": [{"round": s.round, "accuracy": s.accuracy, "metrics": s.metrics} for s in summaries],
        "rejected": summaries[-1].rejected if summaries else {},
    }


def _cell(result: dict, key: str) -> str:
    return f"{result[key]:.4f}" if key in result else "-"


def reading(results: list[dict]) -> list[str]:
    """What the table says, from its numbers: the fine-tune's gain and its largest loss, FedPer against both."""
    fedavg, fedper = results[0], results[-1]
    drops = sorted((row["finetuned"] - row["global"], device) for device, row in fedavg["per_device"].items()
                   if row["global"] is not None and row["finetuned"] is not None)
    worst_drop, device = drops[0]
    row = fedavg["per_device"][device]
    text = (f"One global model fits these devices badly: FedAvg's worst 10% reach {fedavg['global_worst10']:.3f} on their "
            f"own data (mean {fedavg['global_mean']:.3f}). The fine-tune lifts the mean to {fedavg['finetuned_mean']:.3f} "
            f"and the worst 10% to {fedavg['finetuned_worst10']:.3f}")
    if worst_drop < 0:
        text += (f", but it can also hurt: on {device} it falls from {row['global']:.3f} to {row['finetuned']:.3f} "
                 "(K steps at the round's learning rate on a shard dominated by one class)")
    text += (f". Personal heads (FedPer) do better still: mean {fedper['global_mean']:.3f}, worst 10% "
             f"{fedper['global_worst10']:.3f}, each device's head trained every round on its own classes"
             + (f"; fine-tuning on top changes that to {fedper['finetuned_mean']:.3f} / {fedper['finetuned_worst10']:.3f}."
                if "finetuned_mean" in fedper else "."))
    return [text]


def write(results: list[dict], args: argparse.Namespace, sizes: list[int], command: str, minutes: float) -> None:
    """benchmarks/personalization.json and .md."""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps({"command": command, "minutes": round(minutes, 2), "config": vars(args),
                                                    "shard_sizes": sizes, "results": results}, indent=1, default=str))
    lines = [
        "# Personalization under label skew", "",
        f"Fashion-MNIST ({args.train_samples} training images over {args.devices} devices, Dirichlet {args.alpha:g}, "
        f"at least {args.min_size} per device: shards of {min(sizes)} to {max(sizes)} images), each device keeping 20% "
        f"of its shard as its own test split. mlp28, FedAvg over all {args.devices} devices, {args.rounds} rounds, "
        f"E={args.epochs}, B={args.batch_size}, lr {args.lr:g}; fine-tune K={args.finetune} steps (B, lr the same) "
        f"from the round's starting weights. Real processes (one aggregator, {args.devices} devices, ONNX Runtime "
        "training) over a Mosquitto of the script's own; the per-device accuracies are read off the broker (every "
        f"update of the last round, which measures version {args.rounds - 1}). Worst 10%: the mean of the "
        f"{max(1, math.ceil(0.1 * args.devices))} lowest devices.", "",
        f"Reproduce: `{command}` ({minutes:.1f} min on this 2-core machine, under nice -n 19 beside other work).", "",
        "| run | aggregator options | global model: mean | worst 10% | personalized: mean | worst 10% | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['name']} | `{' '.join(r['options'])}` | {_cell(r, 'global_mean')} | {_cell(r, 'global_worst10')} "
                     f"| {_cell(r, 'finetuned_mean')} | {_cell(r, 'finetuned_worst10')} | {r['seconds']:.0f} s |")
    lines += ["", *reading(results)]
    lines += [
        "", "In the FedPer runs the \"global model\" columns are what each device measures of the model it receives "
        "with its own head in place (the shared layers are global, the head is the device's); their "
        "\"personalized\" columns are the fine-tune from there.", "",
        "Per device (last round):", "",
        "| device | test samples | " + " | ".join(f"{r['name']}: global | {r['name']}: personalized" for r in results) + " |",
        "|---|---|" + "---|---|" * len(results),
    ]
    for device in sorted(results[0]["per_device"]):
        cells = []
        for r in results:
            row = r["per_device"].get(device, {})
            cells += [f"{row['global']:.3f}" if row.get("global") is not None else "-",
                      f"{row['finetuned']:.3f}" if row.get("finetuned") is not None else "-"]
        samples = results[0]["per_device"][device]["test_samples"]
        lines.append(f"| {device} | {samples} | " + " | ".join(cells) + " |")
    analytics = ("\n\nThe analytics section (label histogram answers against the true counts, without and with noise) is "
                 "in [analytics.md](analytics.md).\n")
    previous = OUT.with_suffix(".md").read_text() if OUT.with_suffix(".md").exists() else ""
    if ANALYTICS_MARK in previous:  # what the analytics bench wrote below the mark stays
        analytics = previous.split(ANALYTICS_MARK, 1)[1]
    lines += ["", "## Federated analytics", "", ANALYTICS_MARK]
    OUT.with_suffix(".md").write_text("\n".join(lines) + analytics)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Run the federations and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration of the label skew")
    parser.add_argument("--train-samples", type=int, default=12000, help="Fashion-MNIST training images shared out")
    parser.add_argument("--min-size", type=int, default=50, help="fewest images a device holds")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--finetune", type=int, default=20, help="K of --personalize finetune:K")
    parser.add_argument("--round-timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite benchmarks/personalization.md from the .json of the last run, running nothing")
    args = parser.parse_args(argv)
    if args.markdown_only:
        saved = json.loads(OUT.with_suffix(".json").read_text())
        write(saved["results"], argparse.Namespace(**saved["config"]), saved["shard_sizes"], saved["command"],
              saved["minutes"])
        return
    runs = {
        "fedavg + finetune": ["--personalize", f"finetune:{args.finetune}"],
        "fedper (personal head)": ["--personal-layers", HEAD, "--personalize", f"finetune:{args.finetune}"],
    }
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        artifacts, shards, sizes = prepare(Path(scratch), args)
        for index, (name, options) in enumerate(runs.items()):
            result = run(name, options, Path(scratch) / f"run{index}", artifacts, shards, args)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k not in ("per_device", "summaries")}), flush=True)
    defaults = parser.parse_args([])
    changed = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != getattr(defaults, k)
               and k != "markdown_only"]
    command = " ".join(["nice -n 19 .venv/bin/python scripts/bench_personalization.py", *changed])
    write(results, args, sizes, command, (time.perf_counter() - started) / 60)


if __name__ == "__main__":
    main()
