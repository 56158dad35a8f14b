"""In-process search for bench_convergence's settings: the same task without processes or a broker.

The data, partition, model and local training of scripts/bench_convergence.py (Fashion-MNIST over 20
devices, Dirichlet 0.3, the 28x28 CNN, 10 devices a round, E=1, B=32, SGD lr 0.05; real ONNX
Runtime training on one thread), but every device trains in this process in turn, updates stay
float32 and the aggregation is the sample-weighted mean followed by the server optimizer of
aggregator.strategies.server_optimizer. About 12 s a round on one core: a 20-round setting
takes 4 minutes where a real federation takes 5 to 10, so a grid of settings fits in one sitting.
The chosen settings are then measured for real by bench_convergence.py.

Each --run is one setting, written as space-separated key=value pairs (all optional):
- opt=fedavg|sgd|momentum|adam|yogi|adagrad, lr= (server lr), beta1=, beta2=, tau=: the server optimizer;
- la=: --logit-adjust;
- agg=weighted|mean|nova: updates weighted by samples, one vote per device, or FedNova (each update divided
  by its local steps, their weighted mean times the weighted mean step count);
- scaffold=1: SCAFFOLD option II with full-precision variates (each step corrected by c - c_i; c moved by
  |S|/N x the mean change of the answering devices' c_i);
- init=pytorch|kaiming: the CNN's initial weights (`tierfl export --init`).
Results accumulate in benchmarks/convergence-sim.json (a setting run again replaces its row) and the
table in benchmarks/convergence-sim.md.

    .venv/bin/python scripts/sim_convergence.py --rounds 20 --run "opt=adam lr=0.03 la=1" --run "opt=fedavg"
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from aggregator.strategies.server_optimizer import ServerOptimizer
from edge_client.backends import open_trainer
from models.data import Dataset, dirichlet_partition, load_fashion_mnist
from models.export import MANIFEST_NAME, export_all
from models.manifest import TierManifest
from models.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"opt": str, "lr": float, "beta1": float, "beta2": float, "tau": float, "la": float, "scaffold": int,
        "agg": str, "init": str}
DEFAULTS = {"opt": "fedavg", "lr": 1.0, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, "la": 0.0, "scaffold": 0,
            "agg": "weighted", "init": "pytorch"}


def parse_setting(text: str) -> dict:
    """A --run string as a full setting (defaults filled in)."""
    setting = dict(DEFAULTS)
    for pair in text.split():
        key, _, value = pair.partition("=")
        if key not in KEYS or not value:
            raise SystemExit(f"--run {text!r}: expected key=value pairs with keys {', '.join(KEYS)}")
        setting[key] = KEYS[key](value)
    return setting


def label(setting: dict) -> str:
    """A setting's row name: what differs from the defaults."""
    return " ".join(f"{k}={v}" for k, v in setting.items() if v != DEFAULTS[k] or k == "opt")


def simulate(setting: dict, shards: list[Dataset], test: Dataset, tier: Path, args: argparse.Namespace) -> list[float]:
    """Accuracy on `test` after each round of one setting."""
    manifest = TierManifest.load(tier / MANIFEST_NAME)
    trainer = open_trainer("ort-training", tier, manifest, threads=1)
    weights = trainer.get_weights()
    optimizer = None if setting["opt"] == "fedavg" else ServerOptimizer(
        setting["opt"], setting["lr"], setting["beta1"], setting["beta2"], setting["tau"])
    state: dict[str, np.ndarray] = {}
    touched = {name: np.ones(value.shape, bool) for name, value in weights.items()}
    rng = np.random.default_rng(args.seed)
    control = {name: np.zeros_like(value) for name, value in weights.items()}  # SCAFFOLD's c
    variates = [dict(control) for _ in shards]  # each device's c_i
    history = []
    for round_number in range(1, args.rounds + 1):
        started = time.monotonic()
        total = {name: np.zeros_like(value) for name, value in weights.items()}
        steps_total = 0.0
        control_change = {name: np.zeros_like(value) for name, value in weights.items()}
        samples = 0
        chosen = rng.choice(len(shards), args.per_round, replace=False)
        for device in chosen:
            trainer.set_weights(weights)
            correction = {n: control[n] - variates[device][n] for n in weights} if setting["scaffold"] else None
            stats = trainer.train(shards[device], args.epochs, args.batch_size, args.lr,
                                  seed=int(round_number * 1000 + device), logit_adjust=setting["la"], correction=correction)
            trained, n = trainer.get_weights(), len(shards[device])
            vote = 1 if setting["agg"] == "mean" else n
            per_step = 1.0 / stats.steps if setting["agg"] == "nova" else 1.0
            steps_total += n * stats.steps  # FedNova's weighted mean step count, times samples
            for name in weights:
                total[name] += vote * per_step * (trained[name] - weights[name])
                if setting["scaffold"]:  # option II: c_i+ = c_i - c + (x - y) / (K lr)
                    new = (variates[device][name] - control[name]
                           + (weights[name] - trained[name]) / (stats.steps * args.lr))
                    control_change[name] += (new - variates[device][name]) / len(chosen)
                    variates[device][name] = new
            samples += vote
        if setting["agg"] == "nova":
            total = {name: value * (steps_total / samples) for name, value in total.items()}
        control = {n: control[n] + len(chosen) / len(shards) * control_change[n] for n in control}
        mean = {name: weights[name] + total[name] / samples for name in weights}
        weights, state = (mean, state) if optimizer is None else optimizer.step(weights, mean, touched, state)
        trainer.set_weights(weights)
        history.append(round(trainer.evaluate(test).accuracy, 4))
        print(f"{label(setting)}: round {round_number} accuracy {history[-1]:.4f} "
              f"({time.monotonic() - started:.1f} s)", flush=True)
    return history


def markdown(rows: list[dict], command: str) -> str:
    """The table of every setting run so far, best first (fewest rounds to 0.80, then accuracy after 20)."""
    def first(history: list[float], target: float) -> int | None:
        return next((i + 1 for i, a in enumerate(history) if a >= target), None)

    rows = sorted(rows, key=lambda r: (first(r["history"], 0.80) or 10**6, -(r["history"][19:20] or [0])[0]))
    lines = ["# Settings search, in process: CNN on Fashion-MNIST, 20 devices (Dirichlet 0.3), 10 per round", "",
             f"Reproduce: `{command}` per row (`--run` the row's setting). `scripts/sim_convergence.py`: the task of "
             "[convergence.md](convergence.md) with every device trained in one process (real ONNX Runtime "
             "training), float32 updates and no broker; it only chooses settings, which bench_convergence.py then "
             "measures for real. One seed per row: rows within a round or two of each other are not told apart.", "",
             "| setting | rounds to 0.80 | rounds to 0.85 | acc @ 8 | acc @ 10 | acc @ 20 | accuracy by round |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r["history"]
        at = [f"{h[i - 1]:.4f}" if len(h) >= i else "-" for i in (8, 10, 20)]
        lines.append(f"| `{r['setting']}` (seed {r['seed']}) | {first(h, 0.80) or '-'} | {first(h, 0.85) or '-'} | "
                     + " | ".join(at) + " | " + " ".join(f"{a:.2f}" for a in h) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run each --run setting and fold it into benchmarks/convergence-sim.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="one setting: key=value ... (see above)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="the draw of devices each round (the partition is seed 0)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "convergence-sim")
    args = parser.parse_args()
    settings = [parse_setting(text) for text in args.run]
    train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    shards = [train.subset(part) for part in dirichlet_partition(train.y, args.devices, args.alpha, 0)]
    results = args.out.with_suffix(".json")
    with tempfile.TemporaryDirectory(prefix="sim-convergence-") as scratch:
        for setting in settings:
            exported = Path(scratch) / setting["init"]
            if not exported.exists():
                export_all(ModelSpec(arch="cnn", image_size=28, seed=0, init=setting["init"]), ["a"], exported)
            history = simulate(setting, shards, test, exported / "a", args)
            rows = json.loads(results.read_text())["rows"] if results.exists() else []
            row = {"setting": label(setting), "seed": args.seed, "rounds": args.rounds, "history": history}
            rows = [r for r in rows if (r["setting"], r["seed"]) != (row["setting"], row["seed"])] + [row]
            results.write_text(json.dumps({"rows": rows}, indent=1))
            command = f".venv/bin/python scripts/sim_convergence.py --rounds {args.rounds} --seed {args.seed} --run ..."
            args.out.with_suffix(".md").write_text(markdown(rows, command))


if __name__ == "__main__":
    main()
