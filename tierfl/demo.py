"""`tierfl demo`: a whole federation on this machine, as separate OS processes over a real broker.

Digits are split into a held-out set (for the aggregator) and a non-IID Dirichlet share per
device; the aggregator and every device run as their own `tierfl` processes; this process only
watches the retained `rounds` topic to draw the progress bar, then writes summary.json and a plot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import queue
import shutil
import subprocess
import sys
import time
from pathlib import Path

from aggregator.downlink import DOWNLINK_MODES
from models.data import dirichlet_partition, fit_split, load_digits, save_npz, train_test_split
from models.export import export_all
from models.spec import ModelSpec
from protocol.frame import FrameError, decode_frame
from protocol.messages import RoundSummary
from protocol.mqtt.embedded_broker import EmbeddedBroker
from protocol.mqtt.link import MqttLink
from protocol.mqtt.url import BrokerAddress
from protocol.mqtt.url import parse as parse_broker
from protocol.topics import Topics

log = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `tierfl demo` options to `parser`."""
    parser.description = (
        "Run a demo federation on this machine: an MQTT broker (embedded unless --broker), the "
        "aggregator and N devices as separate processes, each device on its own non-IID share of "
        "scikit-learn digits and with its own tier (HeteroFL width), FedAvg for R rounds. Shows a progress bar with accuracy and bytes on "
        "the wire; writes OUT/summary.json, OUT/accuracy.png and per-process logs in OUT/logs."
    )
    parser.add_argument("--broker", help="mqtt://host:port of a running broker (default: an embedded one)")
    parser.add_argument("--fleet", default="demo", help="fleet name on the broker (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="number of devices (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=20, help="FedAvg rounds (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet non-IID concentration (default: %(default)s)")
    parser.add_argument("--fraction", type=float, default=1.0, help="C: fraction of devices per round (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="E: local epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="B: local batch size (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.1, help="local learning rate (default: %(default)s)")
    parser.add_argument("--arch", choices=["mlp", "cnn"], default="cnn", help="model (default: %(default)s)")
    parser.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True,
                        help="batch norm after each hidden layer (default: on)")
    parser.add_argument("--bn-statistics", choices=["devices", "averaged"], default="devices",
                        help="with --batch-norm: statistics measured on the devices after each round (static BN), "
                             "or the running averages of training (default: %(default)s)")
    parser.add_argument("--tiers", default="a,b,c", help="device tiers, given to the devices in turn: device-0 gets the "
                        "first, device-1 the second, ... (default: %(default)s)")
    parser.add_argument("--codec", default="int8", help="update codec of the devices, e.g. float32 or topk:0.1+int8 "
                        "(default: %(default)s)")
    parser.add_argument("--downlink", choices=DOWNLINK_MODES, default="int8-delta",
                        help="encoding of the weights sent to devices: float32, float16 or int8-delta "
                             "(default: %(default)s)")
    parser.add_argument("--round-timeout", type=float, default=30.0, help="seconds per round at most (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of split, partition and sampling (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: %(default)s)")


def prepare(out: Path, clients: int, alpha: float, spec: ModelSpec, tiers: list[str]) -> None:
    """Write the model's artifacts, then the held-out set and one non-IID share per device shaped for its card, under
    `out`."""
    for sub in ("state", "data", "devices", "logs", "artifacts"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "data").mkdir(parents=True)
    (out / "logs").mkdir()
    card = export_all(spec, tiers, out / "artifacts").model
    train, held_out = train_test_split(load_digits(), 0.2, spec.seed)
    train, held_out = fit_split(train, held_out, card.input_shape, card.num_classes, "digits")
    save_npz(out / "data" / "held-out.npz", held_out)
    for i, part in enumerate(dirichlet_partition(train.y, clients, alpha, spec.seed)):
        save_npz(out / "data" / f"device-{i}.npz", train.subset(part))


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log_file:
        return subprocess.Popen([sys.executable, "-m", "tierfl.cli", "--log-format", "text", *args],  # logs for people
                                stdout=log_file, stderr=subprocess.STDOUT)


def _watch_rounds(broker: BrokerAddress, fleet: str, summaries: queue.Queue[RoundSummary]) -> MqttLink:
    topics = Topics(fleet)

    def on_frame(topic: str, data: bytes) -> None:
        with contextlib.suppress(FrameError):
            body = decode_frame(data).body
            if isinstance(body, RoundSummary):
                summaries.put(body)

    link = MqttLink(broker, f"tierfl-{fleet}-demo-watch-{time.time_ns()}", [topics.rounds], on_frame, lambda *_: None)
    link.start()
    link.clear_retained(topics.rounds)  # forget a previous run's last summary
    return link


def run(args: argparse.Namespace) -> int:
    """Run the federation, show progress, write summary.json and accuracy.png; 0 on success."""
    from tqdm import tqdm

    started = time.time()
    out: Path = args.out
    fleet = args.fleet
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    spec = ModelSpec(arch=args.arch, image_size=8, batch_norm=args.batch_norm, seed=args.seed)
    prepare(out, args.clients, args.alpha, spec, tiers)
    summaries: queue.Queue[RoundSummary] = queue.Queue()
    history: list[RoundSummary] = []
    processes: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        url = args.broker or stack.enter_context(EmbeddedBroker()).url
        broker = parse_broker(url)
        watcher = _watch_rounds(broker, fleet, summaries)
        stack.callback(watcher.stop)
        common = ["--broker", url, "--fleet", fleet]
        aggregator = _spawn(
            ["aggregator", *common, "--state-dir", str(out / "state"), "--artifacts", str(out / "artifacts"),
             "--rounds", str(args.rounds), "--min-clients", str(args.clients), "--fraction", str(args.fraction),
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
             "--round-timeout", str(args.round_timeout), "--seed", str(args.seed),
             "--eval-data", str(out / "data" / "held-out.npz"), "--downlink", args.downlink,
             "--bn-statistics", args.bn_statistics],
            out / "logs" / "aggregator.log",
        )
        processes.append(aggregator)
        for i in range(args.clients):
            processes.append(_spawn(
                ["client", *common, "--device-id", f"device-{i}", "--data", str(out / "data" / f"device-{i}.npz"),
                 "--cache-dir", str(out / "devices" / f"device-{i}"), "--codec", args.codec,
                 "--tier", tiers[i % len(tiers)]],
                out / "logs" / f"device-{i}.log",
            ))
        stack.callback(_stop_all, processes)
        print(f"demo: {args.clients} devices of tiers {'/'.join(tiers)}, {args.rounds} rounds of FedAvg on digits "
              f"(Dirichlet alpha={args.alpha}) over {url}; logs in {out / 'logs'}", file=sys.stderr)
        with tqdm(total=args.rounds, desc="rounds", unit="round", file=sys.stderr, dynamic_ncols=True) as bar:
            while aggregator.poll() is None or not summaries.empty():
                try:
                    summary = summaries.get(timeout=0.5)
                except queue.Empty:
                    continue
                history.append(summary)
                bar.update(1)
                by_tier = " ".join(f"{t}:{a:.2f}" for t, a in sorted(summary.accuracy_by_tier.items()))
                bar.set_postfix_str(
                    f"acc {summary.accuracy or 0:.3f} ({by_tier})  answered {summary.answered}/{summary.selected}  "
                    f"up {summary.bytes_up / 1e6:.2f} MB  down {summary.bytes_down / 1e6:.2f} MB"
                )
                if summary.final:
                    break
    if not history:
        print(f"demo: no round finished; see {out / 'logs' / 'aggregator.log'}", file=sys.stderr)
        return 1
    report = write_report(out, args, history, time.time() - started, url)
    by_tier = ", ".join(f"tier {t} {a:.4f}" for t, a in sorted(report["final_accuracy_by_tier"].items()))
    print(f"demo: final accuracy {report['final_accuracy']:.4f} ({by_tier}) after {len(history)} rounds in "
          f"{report['seconds']:.0f} s; {report['bytes_up'] / 1e6:.1f} MB up, {report['bytes_down'] / 1e6:.1f} MB down; "
          f"wrote {out / 'summary.json'} and {out / 'accuracy.png'}", file=sys.stderr)
    return 0


def _stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def write_report(out: Path, args: argparse.Namespace, history: list[RoundSummary], seconds: float, broker: str) -> dict:
    """Write summary.json and accuracy.png; return the summary."""
    rounds = [
        {"round": s.round, "accuracy": s.accuracy, "accuracy_by_tier": s.accuracy_by_tier, "loss": s.loss,
         "clients_answered": s.answered,
         "clients_selected": s.selected, "bytes_up": s.bytes_up, "bytes_down": s.bytes_down, "seconds": s.seconds}
        for s in history
    ]
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "broker": broker,
        "rounds": rounds,
        "final_accuracy": history[-1].accuracy,
        "final_accuracy_by_tier": history[-1].accuracy_by_tier,
        "bytes_up": sum(s.bytes_up for s in history),
        "bytes_down": sum(s.bytes_down for s in history),
        "seconds": seconds,
        "rejected": history[-1].rejected,
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    plot(out / "accuracy.png", history)
    return report


def plot(path: Path, history: list[RoundSummary]) -> None:
    """Held-out accuracy per round, with bytes per round on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    rounds = [s.round for s in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rounds, [s.accuracy or 0 for s in history], marker="o", color="tab:blue", label="held-out accuracy (global)")
    narrower = sorted({t for s in history for t in s.accuracy_by_tier} - {"a"})
    for tier, color in zip(narrower, ["tab:green", "tab:red", "tab:purple", "tab:brown"]):
        ax.plot(rounds, [s.accuracy_by_tier.get(tier, float("nan")) for s in history], linestyle="--", color=color,
                label=f"tier {tier} submodel")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.bar(rounds, [s.bytes_up / 1e6 for s in history], alpha=0.25, color="tab:orange", label="MB up")
    twin.set_ylabel("MB uploaded per round")
    fig.legend(loc="lower right", bbox_to_anchor=(0.88, 0.15))
    ax.set_title("TierFL demo: FedAvg over device tiers on digits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
