"""FedAvg, FedProx, FedMut, FedBuff and hierarchical FedAvg on a fleet of mixed speeds, same budget.

Fashion-MNIST, Dirichlet(0.1) label skew over 20 devices; a quarter of them are 5x slower. Every
algorithm runs in the aggregator's real engines (RoundEngine, BufferedEngine, RelayEngine under a
root RoundEngine) with real ONNX Runtime training of every task; only the clock is simulated: a
device takes (samples x epochs x its seconds per sample) plus a network hop to answer, and stops
at the deadline with the work it did (partial work) when it is too slow. The same simulated wall
clock budget for everyone; accuracy on the Fashion-MNIST test set after every new version,
against versions and against simulated seconds. Hierarchical FedAvg (two relays of ten
devices each) must match flat FedAvg. Writes benchmarks/algorithms.{json,md,png}.

    .venv/bin/python scripts/bench_algorithms.py
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aggregator.engines.base import EngineConfig, Outgoing
from aggregator.engines.buffered import BufferConfig, BufferedEngine
from aggregator.engines.parts import EngineParts
from aggregator.engines.relay import FollowTask, RelayEngine
from aggregator.engines.rounds import RoundEngine
from aggregator.evaluate import HeldOutEvaluator
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedmut import FedMut
from aggregator.strategies.sampling import UniformSampler
from edge_client.trainer import OrtTrainer
from models.data import FASHION_MNIST_ROOT, Dataset, dirichlet_partition, load_fashion_mnist
from models.export import export_all
from models.spec import ModelSpec
from protocol.messages import RoundSummary, Task, Update, new_id

ALGORITHMS = ["fedavg", "fedprox", "fedmut", "fedbuff", "hierarchical"]
HOP_S = 0.05  # one network hop, device <-> aggregator
TICK_S = 0.1  # the aggregators' loop ticks this often (simulated)
SEND_MARGIN_S = 0.1  # a device stops training this long before its deadline (the agent's send margin)


@dataclass
class Device:
    """A simulated device: its data and how many seconds one training sample takes it."""

    device_id: str
    data: Dataset
    seconds_per_sample: float


@dataclass
class Fleet:
    """What every run shares."""

    artifacts: ArtifactStore
    trainer: OrtTrainer
    evaluator: HeldOutEvaluator
    devices: list[Device]
    args: argparse.Namespace


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    deliver: Callable[[float], None] = field(compare=False)


class Simulation:
    """An event queue on a simulated clock; devices train for real when they get a task."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.now = 0.0
        self._events: list[_Event] = []
        self._seq = itertools.count()
        self.history: list[dict] = []
        self.updates = 0
        self.first_weights: np.ndarray | None = None  # the global model of version 1, flattened

    def at(self, when: float, deliver: Callable[[float], None]) -> None:
        heapq.heappush(self._events, _Event(when, next(self._seq), deliver))

    def run(self, until: float, tick: Callable[[float], None], finished: Callable[[], bool]) -> None:
        """Deliver events in time order, ticking the engines every TICK_S, until the budget or the end."""
        self.at(0.0, tick)
        while self._events and not finished():
            event = heapq.heappop(self._events)
            if event.at > until:
                break
            self.now = event.at
            event.deliver(self.now)
            if event.deliver is tick:
                self.at(self.now + TICK_S, tick)

    def train(self, device: Device, task: Task, weights: Mapping[str, np.ndarray]) -> tuple[Update, dict[str, np.ndarray], float]:
        """Train `task` on the device for real; the update, its delta, and the simulated seconds it took."""
        trainer, args = self.fleet.trainer, self.fleet.args
        budget = max(0.0, task.deadline - self.now - 2 * HOP_S - SEND_MARGIN_S)  # stops in time to send (partial work)
        planned = task.epochs * len(device.data)
        doable = min(planned, max(task.batch_size, int(budget / device.seconds_per_sample)))
        trainer.set_weights(dict(weights))
        seed = args.seed * 1_000_003 + task.round * 1009 + int(device.device_id[1:])
        full, rest = divmod(doable, len(device.data))
        steps, loss = 0, 0.0
        if full:
            stats = trainer.train(device.data, full, task.batch_size, task.learning_rate, seed, proximal_mu=task.proximal_mu)
            steps, loss = steps + stats.steps, stats.loss
        if rest >= task.batch_size or not full:
            part = device.data.subset(np.random.default_rng(seed).permutation(len(device.data))[:max(rest, task.batch_size)])
            stats = trainer.train(part, 1, task.batch_size, task.learning_rate, seed + 1, proximal_mu=task.proximal_mu)
            steps, loss = steps + stats.steps, stats.loss
        trained = trainer.get_weights()
        update = Update(update_id=new_id(), round=task.round, base_version=task.model_version, tier=task.tier,
                        num_samples=len(device.data), steps=steps, train_loss=loss, train_accuracy=0.0,
                        train_seconds=doable * device.seconds_per_sample)
        self.updates += 1
        return update, {n: trained[n] - weights[n] for n in weights}, doable * device.seconds_per_sample + 2 * HOP_S

    def run_task(self, device: Device, task: Task, weights: Mapping[str, np.ndarray],
                 answer: Callable[[float, Update, dict[str, np.ndarray]], None]) -> None:
        """Train `task` on `device` now; `answer(now, update, delta)` is delivered when the device is done."""
        update, delta, seconds = self.train(device, task, weights)
        self.at(self.now + seconds, lambda now: answer(now, update, delta))

    def serve(self, engine: RoundEngine | BufferedEngine, out: list[Outgoing], devices: Mapping[str, Device]) -> None:
        """Deliver what `engine` sent: tasks start training, round summaries are recorded."""
        for message in out:
            body = message.body
            if isinstance(body, RoundSummary):
                if self.first_weights is None:
                    self.first_weights = np.concatenate([engine.weights[n].ravel() for n in sorted(engine.weights)])
                self.history.append({"version": body.version, "seconds": self.now, "accuracy": body.accuracy,
                                     "answered": body.answered, "updates": self.updates, "metrics": body.metrics})
                print(f"  {self.now:7.1f} s  version {body.version:3d}  accuracy {body.accuracy:.4f}  "
                      f"({body.answered} updates)", flush=True)
            elif isinstance(body, Task) and message.device_id in devices and message.tensors is not None:
                self.run_task(devices[message.device_id], body, message.tensors, lambda now, u, t, d=message.device_id:
                              self.serve(engine, engine.on_update(d, new_id(), u, t, 0, now), devices))


def _registry(devices: list[Device]) -> DeviceRegistry:
    registry = DeviceRegistry(offline_after_s=float("inf"))
    for d in devices:
        registry.hello(d.device_id, len(d.data), 0, None, "ort-training", 0.0)
    return registry


def _engine_config(args: argparse.Namespace, rounds: int) -> EngineConfig:
    return EngineConfig(rounds=rounds, round_timeout_s=args.round_timeout, evaluate_on_devices=False, seed=args.seed)


def _strategy(algorithm: str, args: argparse.Namespace) -> FedAvg:
    options = dict(fraction=args.fraction, min_clients=2, epochs=args.epochs, batch_size=args.batch_size,
                   learning_rate=args.lr, seed=args.seed)
    if algorithm == "fedprox":
        return FedAvg(proximal_mu=args.mu, **options)
    if algorithm == "fedmut":
        return FedMut(alpha=args.fedmut_alpha, bias=args.fedmut_bias, bias_rounds=args.rounds, **options)
    if algorithm == "fedbuff":
        return FedAvg(**{**options, "fraction": 1.0, "min_clients": 1})
    return FedAvg(**options)


def run_flat(algorithm: str, fleet: Fleet, state: Path) -> Simulation:
    """One synchronous or buffered federation of every device under one aggregator."""
    args, sim = fleet.args, Simulation(fleet)
    devices = {d.device_id: d for d in fleet.devices}
    strategy = _strategy(algorithm, args)
    if algorithm == "fedbuff":
        buffer = BufferConfig(buffer_size=args.buffer_size, max_staleness=args.max_staleness, concurrency=args.concurrency)
        engine: RoundEngine | BufferedEngine = BufferedEngine(EngineParts(_engine_config(args, 10_000), strategy, fleet.artifacts,
                                                         StateStore(state), _registry(fleet.devices), fleet.evaluator), buffer)
    else:
        engine = RoundEngine(EngineParts(_engine_config(args, args.rounds), strategy, fleet.artifacts,
                                         StateStore(state), _registry(fleet.devices), fleet.evaluator))
    sim.run(args.budget, lambda now: sim.serve(engine, engine.tick(now), devices), lambda: engine.finished)
    return sim


def run_hierarchical(fleet: Fleet, state: Path) -> Simulation:
    """Two relays of half the devices each under a root FedAvg aggregator (every device, every round)."""
    args, sim = fleet.args, Simulation(fleet)
    halves = [fleet.devices[: len(fleet.devices) // 2], fleet.devices[len(fleet.devices) // 2:]]
    relays: dict[str, tuple[RelayEngine, dict[str, Device]]] = {}
    for i, group in enumerate(halves):
        follow = FollowTask(seed=args.seed, sampler=UniformSampler(1.0, 1, args.seed))
        relay = RelayEngine(EngineParts(EngineConfig(fleet=f"relay{i}", seed=args.seed), follow, fleet.artifacts,
                                        StateStore(state / f"relay{i}"), _registry(group)), margin_s=2 * HOP_S)
        relays[f"r{i}"] = (relay, {d.device_id: d for d in group})
    registry = DeviceRegistry(offline_after_s=float("inf"))
    for name, (_, group) in relays.items():
        registry.hello(name, sum(len(d.data) for d in group.values()), 0, "a", "relay", 0.0)
    # The root's deadline covers the extra hop and the relays' margin, so devices get flat FedAvg's training time.
    config = _engine_config(args, args.rounds).model_copy(update={"round_timeout_s": args.round_timeout + 3 * HOP_S})
    root = RoundEngine(EngineParts(config, _strategy("fedavg", args), fleet.artifacts, StateStore(state / "root"),
                                   registry, fleet.evaluator))

    def forward(relay_name: str, relay: RelayEngine, out: list[Outgoing]) -> None:
        """Serve a relay's local tasks; when its round closes, its combined update goes up after one hop."""
        group = relays[relay_name][1]
        for message in out:
            if isinstance(message.body, Task) and message.tensors is not None:
                sim.run_task(group[message.device_id], message.body, message.tensors, lambda now, u, t, d=message.device_id:
                             forward(relay_name, relay, relay.on_update(d, new_id(), u, t, 0, now)))
        if combined := relay.take_combined():
            update, tensors = combined
            sim.at(sim.now + HOP_S, lambda now: serve_root(root.on_update(relay_name, new_id(), update, tensors, 0, now)))

    def serve_root(out: list[Outgoing]) -> None:
        for message in out:
            if isinstance(message.body, Task) and message.device_id in relays and message.tensors is not None:
                relay = relays[message.device_id][0]
                task, weights = message.body, message.tensors
                sim.at(sim.now + HOP_S, lambda now, r=relay, n=message.device_id, t=task, w=weights:
                       forward(n, r, r.start(t, w, now)))
        sim.serve(root, [m for m in out if isinstance(m.body, RoundSummary)], {})

    def tick(now: float) -> None:
        serve_root(root.tick(now))
        for name, (relay, _) in relays.items():
            forward(name, relay, relay.tick(now))

    sim.run(args.budget, tick, lambda: root.finished)
    return sim


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated subset of %(default)s")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--slow-share", type=float, default=0.25, help="share of devices that are 5x slower")
    parser.add_argument("--slowdown", type=float, default=5.0)
    parser.add_argument("--ms-per-sample", type=float, default=1.0, help="a fast device's training time per sample (simulated)")
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration of the label skew")
    parser.add_argument("--train-samples", type=int, default=12_000, help="Fashion-MNIST training samples spread over the devices")
    parser.add_argument("--test-samples", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the synchronous algorithms (at most; the budget may end them)")
    parser.add_argument("--budget", type=float, default=0.0, help="simulated seconds for every algorithm (default: rounds x (round timeout + 4 hops))")
    parser.add_argument("--round-timeout", type=float, default=3.0, help="synchronous deadline per round (simulated seconds)")
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx")
    parser.add_argument("--fedmut-alpha", type=float, default=1.0)
    parser.add_argument("--fedmut-bias", type=float, default=0.5)
    parser.add_argument("--buffer-size", type=int, default=10, help="FedBuff K")
    parser.add_argument("--max-staleness", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--target", type=float, default=0.6, help="accuracy whose first simulated time is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args(argv)
    args.budget = args.budget or args.rounds * (args.round_timeout + 4 * HOP_S)  # every synchronous round fits
    return args


def make_fleet(args: argparse.Namespace, folder: Path) -> Fleet:
    """The devices (non-IID shares, speeds), the exported model with the FedProx term, one trainer, the test set."""
    if not Path(FASHION_MNIST_ROOT).is_dir():
        sys.exit(f"Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (expected at {FASHION_MNIST_ROOT})")
    rng = np.random.default_rng(args.seed)
    train = load_fashion_mnist(split="train")
    train = train.subset(rng.permutation(len(train))[: args.train_samples])
    test = load_fashion_mnist(split="test")
    test = test.subset(rng.permutation(len(test))[: args.test_samples])
    shares = dirichlet_partition(train.y, args.devices, args.alpha, args.seed)
    slow = set(rng.permutation(args.devices)[: round(args.slow_share * args.devices)].tolist())
    devices = [Device(f"d{i:02d}", train.subset(idx), args.ms_per_sample / 1000 * (args.slowdown if i in slow else 1.0))
               for i, idx in enumerate(shares)]
    export_all(ModelSpec(arch=args.arch, image_size=28), ["a"], folder, proximal=True)
    artifacts = ArtifactStore(folder)
    return Fleet(artifacts, OrtTrainer(folder / "a", artifacts.tiers["a"].manifest), HeldOutEvaluator(test, artifacts),
                 devices, args)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    results, first_weights = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        fleet = make_fleet(args, Path(tmp) / "artifacts")
        for algorithm in args.algorithms.split(","):
            print(f"{algorithm}:", flush=True)
            t0 = time.perf_counter()
            state = Path(tmp) / algorithm
            sim = run_hierarchical(fleet, state) if algorithm == "hierarchical" else run_flat(algorithm, fleet, state)
            first_weights[algorithm] = sim.first_weights
            results.append({"algorithm": algorithm, "history": sim.history, "updates": sim.updates,
                            "final_accuracy": sim.history[-1]["accuracy"] if sim.history else None,
                            "best_accuracy": max((h["accuracy"] for h in sim.history), default=None),
                            "versions": len(sim.history), "compute_seconds": time.perf_counter() - t0})
    if first_weights.get("fedavg") is not None and first_weights.get("hierarchical") is not None:
        difference = float(np.abs(first_weights["fedavg"] - first_weights["hierarchical"]).max())
        results.append({"algorithm": "hierarchical-vs-flat", "version_1_max_weight_difference": difference})
    write_report(args, fleet, results, time.perf_counter() - started)


def accuracy_at(history: list[dict], seconds: float) -> float | None:
    """Accuracy of the newest version committed by `seconds` of simulated time."""
    done = [h["accuracy"] for h in history if h["seconds"] <= seconds]
    return done[-1] if done else None


def command_line(args: argparse.Namespace) -> str:
    return ".venv/bin/python scripts/bench_algorithms.py" + (f" --algorithms {args.algorithms}" if args.algorithms != ",".join(ALGORITHMS) else "")


def write_report(args: argparse.Namespace, fleet: Fleet, results: list[dict], seconds: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    slow = sum(d.seconds_per_sample > args.ms_per_sample / 1000 for d in fleet.devices)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "algorithms.json").write_text(json.dumps({"settings": settings, "slow_devices": slow,
                                                          "results": results, "seconds": seconds}, indent=1))
    checkpoints = [args.budget / 4, args.budget / 2, args.budget]
    flat = next((r for r in results if r["algorithm"] == "fedavg"), None)
    tree = next((r for r in results if r["algorithm"] == "hierarchical"), None)
    lines = [
        "# Algorithms on a fleet of mixed speeds",
        "",
        f"Fashion-MNIST ({args.train_samples} training samples over {args.devices} devices, Dirichlet {args.alpha}; "
        f"{args.test_samples} test samples), {fleet.artifacts.card.name}, E={args.epochs}, B={args.batch_size}, lr {args.lr}. "
        f"{slow} of {args.devices} devices are {args.slowdown:g}x slower ({args.ms_per_sample:g} vs "
        f"{args.ms_per_sample * args.slowdown:g} ms per sample, simulated); synchronous rounds have a {args.round_timeout:g} s "
        f"deadline, at which slow devices send the work they did. Same simulated budget for all: {args.budget:g} s. "
        f"Real engines and real ONNX Runtime training; only the clock is simulated (a {HOP_S * 1000:g} ms hop per message).",
        "",
        f"Reproduce: `{command_line(args)}` ({seconds / 60:.1f} min on this machine).",
        "",
        "| algorithm | versions | updates trained | " + " | ".join(f"acc @ {c:g} s" for c in checkpoints)
        + f" | s to {args.target:g} | best |",
        "|---|---|---|" + "---|" * len(checkpoints) + "---|---|",
    ]
    comparison = next((r for r in results if r["algorithm"] == "hierarchical-vs-flat"), None)
    results = [r for r in results if r is not comparison]
    for r in results:
        cells = [accuracy_at(r["history"], c) for c in checkpoints]
        reached = next((h["seconds"] for h in r["history"] if h["accuracy"] >= args.target), None)
        lines.append(f"| {r['algorithm']} | {r['versions']} | {r['updates']} | "
                     + " | ".join(f"{c:.4f}" if c is not None else "-" for c in cells)
                     + f" | {f'{reached:.1f}' if reached is not None else 'never'} | {r['best_accuracy']:.4f} |")
    if flat and tree:
        gaps = [abs(a["accuracy"] - b["accuracy"]) for a, b in zip(flat["history"], tree["history"])]
        lines += ["", f"Hierarchical vs flat FedAvg: the global weights of version 1 differ by at most "
                      f"{comparison['version_1_max_weight_difference']:.2e} (float32 rounding: the relays sum in another "
                      f"order); version by version the accuracy differs by at most {max(gaps):.4f} over {len(gaps)} "
                      f"versions, as rounding differences grow through training. Final: flat {flat['final_accuracy']:.4f}, "
                      f"hierarchical {tree['final_accuracy']:.4f}."]
    lines += ["", "FedBuff applies a version every K updates without waiting for the slow devices, so it gets "
              "ahead early; with this label skew each buffer is a few fast devices' classes, and its accuracy "
              "swings from version to version where the synchronous rounds average all 20 devices.",
              "", "![accuracy](algorithms.png)", ""]
    (args.out / "algorithms.md").write_text("\n".join(lines))
    plot(args, results)
    print("\n".join(lines))


def plot(args: argparse.Namespace, results: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_version, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        versions = [h["version"] for h in r["history"]]
        seconds = [h["seconds"] for h in r["history"]]
        accuracy = [h["accuracy"] for h in r["history"]]
        style = "--" if r["algorithm"] == "hierarchical" else "-"
        by_version.plot(versions, accuracy, style, label=r["algorithm"])
        by_time.plot(seconds, accuracy, style, label=r["algorithm"])
    by_version.set(xlabel="model version (round, or applied buffer)", ylabel="test accuracy", title="accuracy per version")
    by_time.set(xlabel="simulated seconds", ylabel="test accuracy", title="accuracy against wall clock")
    for ax in (by_version, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "algorithms.png", dpi=110)


if __name__ == "__main__":
    main()
