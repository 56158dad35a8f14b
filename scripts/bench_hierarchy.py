"""Flat, aggregator workers and relays at SITES x DEVICES virtual devices (issue 16): benchmarks/hierarchy.{json,md}.

Every layout runs the same devices: SITES `tierfl fleet` processes of DEVICES virtual devices each (the 8x8 MLP on
scikit-learn digits, 64 samples a device), on a private Mosquitto (so its counters are ours), for ROUNDS rounds in
which FRACTION of the devices train:

- flat: one `tierfl aggregator` over all SITES x DEVICES devices, --fraction FRACTION;
- workers: the same with a coordinator (`--workers`) and two aggregator workers (`--worker-of`) sharing the uplink;
- hierarchy: one `tierfl aggregator` over SITES relays (`tierfl relay`, one per site, each over its own fleet of
  DEVICES devices with --fraction FRACTION), the parent selecting every relay.

Measured per layout: round wall time (the aggregator's summaries), the round overhead (round time minus the slowest
device's training and upload, from the fleets' --events), CPU per round after round 1 and peak RSS of the top
aggregator, of the workers or relays, of the broker and of the fleets; messages per round and per second through the
broker ($SYS counters).

    nice -n 19 .venv/bin/python scripts/bench_hierarchy.py --sites 10 --devices 100 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_hostile import _start_mosquitto, stop  # noqa: E402 (a sibling script)

from protocol.signing import AGGREGATOR_KEY_FILE, DeviceKey  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIERFL = [sys.executable, "-m", "tierfl.cli"]


def raise_file_limit() -> None:
    """Let the broker hold thousands of connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_broker(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    """bench_hostile's private Mosquitto, with $SYS counters every second and room for thousands of clients."""
    folder.mkdir(parents=True, exist_ok=True)
    return _start_mosquitto(folder, "sys_interval 1\nmax_queued_messages 100000\n", raise_file_limit)


def sys_counters(url: str) -> dict[str, float]:
    """Mosquitto's retained $SYS counters of messages and bytes received and sent."""
    port = int(url.rsplit(":", 1)[1])
    values: dict[str, float] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sys-{time.monotonic_ns()}")

    def on_message(c: mqtt.Client, u: object, message: mqtt.MQTTMessage) -> None:
        try:
            values[message.topic.removeprefix("$SYS/broker/")] = float(message.payload)
        except ValueError:
            pass

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    for topic in ("messages/received", "messages/sent", "load/bytes/received", "bytes/received", "bytes/sent"):
        client.subscribe(f"$SYS/broker/{topic}")
    client.loop_start()
    time.sleep(1.5)
    client.loop_stop()
    client.disconnect()
    return values


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return cpu, peak


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.5)


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TIERFL_LOG_FORMAT": "text", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*TIERFL, *args], stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            preexec_fn=raise_file_limit)


def events_by_round(paths: list[Path]) -> dict[int, float]:
    """round -> the slowest sent update's simulated training + upload seconds, from the fleets' --events."""
    slowest: dict[int, float] = {}
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") != "train":
                continue
            took = float(event.get("training_s", 0.0)) + float(event.get("upload_s", 0.0))
            slowest[event["round"]] = max(slowest.get(event["round"], 0.0), took)
    return slowest


def run_layout(layout: str, work: Path, art: Path, sites: int, devices: int, rounds: int, fraction: float,
               timeout_s: float) -> dict[str, object]:
    """One federation of `sites` x `devices` virtual devices (flat, flat with two aggregator workers, or through
    relays); its measurements. CPU and messages are counted from the first round's commit to the last's."""
    folder = work / layout
    folder.mkdir(parents=True)
    broker, url = start_broker(folder / "broker")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        central = "central"
        common = ["--broker", url, "--artifacts", str(art)]
        tree = layout == "hierarchy"
        sites_fleets = [f"site{i}" for i in range(sites)] if tree else [central] * sites
        senders = [f"relay{i}" for i in range(sites)] if tree else ["aggregator"] * sites
        fleets = [start(["fleet", "--broker", url, "--fleet", sites_fleets[i], "--aggregator-id", senders[i], "--devices",
                         str(devices), "--id-prefix", f"s{i}", "--data", "digits", "--samples-per-device", "64", "--seed",
                         str(i), "--cache-root", str(folder / f"cache{i}"), "--events", str(folder / f"events{i}.jsonl"),
                         "--connect-rate", "200"], folder / f"fleet{i}.log") for i in range(sites)]
        processes += fleets
        connected = f"{devices}/{devices} connected"
        wait_until(lambda: all(connected in (folder / f"fleet{i}.log").read_text() for i in range(sites)), 900,
                   "every virtual device connected")
        # The aggregators start once every device is online: they read the retained hellos at once.
        top = ["aggregator", *common, "--fleet", central, "--state-dir", str(folder / "agg"), "--rounds", str(rounds),
               "--round-timeout", str(timeout_s)]
        selected = max(1, round(fraction * sites * devices))
        helpers: list[subprocess.Popen[bytes]] = []
        if layout == "flat":
            aggregator = start([*top, "--min-clients", str(selected), "--fraction", str(fraction)], folder / "aggregator.log")
        elif layout == "workers":
            keys = {name: DeviceKey(folder / name, AGGREGATOR_KEY_FILE).public_hex for name in ("agg", "w1", "w2")}
            (folder / "workers.json").write_text(json.dumps({"w1": keys["w1"], "w2": keys["w2"]}))
            helpers = [start(["aggregator", *common, "--fleet", central, "--state-dir", str(folder / w), "--id", w,
                              "--worker-of", "aggregator", "--coordinator-key", keys["agg"]], folder / f"{w}.log")
                       for w in ("w1", "w2")]
            wait_until(lambda: all("connected to" in (folder / f"{w}.log").read_text() for w in ("w1", "w2")), 300,
                       "both workers connected")
            aggregator = start([*top, "--min-clients", str(selected), "--fraction", str(fraction), "--workers",
                                str(folder / "workers.json")], folder / "aggregator.log")
        else:
            helpers = [start(["relay", "--parent", url, "--parent-fleet", central, "--id", f"relay{i}", "--broker", url,
                              "--fleet", f"site{i}", "--artifacts", str(art), "--state-dir", str(folder / f"relay{i}"),
                              "--fraction", str(fraction), "--margin", "3"], folder / f"relay{i}.log")
                       for i in range(sites)]
            everyone = f"announced to aggregator: {devices} devices"
            wait_until(lambda: all(everyone in (folder / f"relay{i}.log").read_text() for i in range(sites)), 600,
                       "every relay announcing its whole group")
            aggregator = start([*top, "--min-clients", str(sites), "--fraction", "1.0"], folder / "aggregator.log")
        processes += [aggregator, *helpers]
        deadline = time.time() + 60 * 30
        stats: dict[int, tuple[float, int]] = {}
        baseline: dict[int, float] | None = None
        base_counters: dict[str, float] = {}
        base_at = 0.0
        watched = [broker, aggregator, *helpers, *fleets]

        def sample() -> None:
            for process in watched:
                try:
                    stats[process.pid] = proc_stats(process.pid)
                except (FileNotFoundError, ProcessLookupError):
                    pass

        while aggregator.poll() is None and time.time() < deadline:
            sample()
            if baseline is None and "round 1 committed" in (folder / "aggregator.log").read_text():
                baseline = {pid: cpu for pid, (cpu, _) in stats.items()}
                base_at, base_counters = time.time(), sys_counters(url)
            time.sleep(0.2)
        sample()
        counters = sys_counters(url)
        ended = time.time()
        if aggregator.returncode != 0 or baseline is None:
            raise RuntimeError(f"{layout}: the aggregator exited {aggregator.returncode}: "
                               f"{(folder / 'aggregator.log').read_text()[-2000:]}")
    finally:
        stop(processes)
        stop([broker])
    history = json.loads((folder / "agg" / "state.json").read_text())["history"]
    slowest = events_by_round([folder / f"events{i}.jsonl" for i in range(sites)])
    measured = [s for s in history if s["round"] >= 2]  # round 1 includes every device fetching its tier's files
    seconds = [s["seconds"] for s in measured]
    overhead = [s["seconds"] - slowest.get(s["round"], 0.0) for s in measured]
    later = len(measured)

    def cpu(process: subprocess.Popen[bytes]) -> float:  # CPU seconds per round after round 1
        return (stats.get(process.pid, (0.0, 0))[0] - baseline.get(process.pid, 0.0)) / later

    def rss(process: subprocess.Popen[bytes]) -> float:
        return stats.get(process.pid, (0.0, 0))[1] / 1e6

    def delta(key: str) -> float:
        return counters.get(key, 0.0) - base_counters.get(key, 0.0)

    messages = delta("messages/received") + delta("messages/sent")
    return {
        "layout": layout, "sites": sites, "devices_per_site": devices, "devices": sites * devices, "rounds": rounds,
        "fraction": fraction, "answered": [s["answered"] for s in history], "selected": [s["selected"] for s in history],
        "updates_per_round": selected, "round_seconds": seconds, "round_seconds_median": statistics.median(seconds),
        "round_overhead_median": statistics.median(overhead),
        "aggregator_cpu_per_round_s": cpu(aggregator), "aggregator_cpu_per_update_ms": cpu(aggregator) / selected * 1e3,
        "aggregator_rss_mb": rss(aggregator),
        "helpers": len(helpers), "helpers_cpu_per_round_s": sum(cpu(h) for h in helpers),
        "helper_rss_mb_max": max((rss(h) for h in helpers), default=0.0),
        "broker_cpu_per_round_s": cpu(broker), "broker_rss_mb": rss(broker),
        "fleets_cpu_per_round_s": sum(cpu(f) for f in fleets), "fleet_rss_mb_max": max(rss(f) for f in fleets),
        "broker_messages_per_round": messages / later, "broker_bytes_per_round": (delta("bytes/received") + delta("bytes/sent")) / later,
        "messages_per_s": messages / (ended - base_at),
        "bytes_up_per_round": statistics.median(s["bytes_up"] for s in measured),
        "bytes_down_per_round": statistics.median(s["bytes_down"] for s in measured),
    }


def markdown(results: list[dict[str, object]], command: str) -> str:
    by = {r["layout"]: r for r in results}
    layouts = [name for name in ("flat", "workers", "hierarchy") if name in by]
    first = by[layouts[0]]
    rows = [
        ("round wall time, median of rounds 2+ (s)", "round_seconds_median", "{:.2f}"),
        ("round overhead: wall minus the slowest device's training and upload (s)", "round_overhead_median", "{:.2f}"),
        ("top aggregator CPU per round (s)", "aggregator_cpu_per_round_s", "{:.2f}"),
        ("top aggregator CPU per trained update (ms)", "aggregator_cpu_per_update_ms", "{:.1f}"),
        ("workers' or relays' CPU per round, all together (s)", "helpers_cpu_per_round_s", "{:.2f}"),
        ("top aggregator peak RSS (MB)", "aggregator_rss_mb", "{:.0f}"),
        ("largest worker or relay peak RSS (MB)", "helper_rss_mb_max", "{:.0f}"),
        ("broker CPU per round (s)", "broker_cpu_per_round_s", "{:.2f}"),
        ("broker peak RSS (MB)", "broker_rss_mb", "{:.0f}"),
        ("largest fleet process peak RSS (MB)", "fleet_rss_mb_max", "{:.0f}"),
        ("messages through the broker per round (in + out)", "broker_messages_per_round", "{:.0f}"),
        ("messages per second, rounds 2+", "messages_per_s", "{:.0f}"),
        ("bytes the top aggregator counted up per round", "bytes_up_per_round", "{:,.0f}"),
        ("bytes the top aggregator sent down per round", "bytes_down_per_round", "{:,.0f}"),
    ]
    names = {"flat": "flat", "workers": "flat, 2 workers", "hierarchy": f"{by.get('hierarchy', first)['sites']} relays"}
    lines = [
        "## Flat, aggregator workers and relays",
        "",
        f"{first['devices']} virtual devices (`tierfl fleet`: real MQTT clients training the 8x8 MLP on digits, 64 "
        f"samples each) in {first['sites']} fleet processes of {first['devices_per_site']}, {first['rounds']} rounds, "
        f"{first['fraction']:.0%} of the devices ({first['updates_per_round']}) training each round, on a private "
        "Mosquitto 2.0 on this 2-core machine; every process under `nice -n 19` while other work ran, so times are "
        "upper bounds. Flat: one aggregator over every device. Flat, 2 workers: a coordinator (`--workers`) and two "
        "aggregator workers sharing the uplink. Relays: one aggregator over one relay per site (`tierfl relay`), each a "
        "local round over its own fleet. CPU per round and messages are counted after round 1 (which includes every "
        "selected device fetching its tier's files).",
        "",
        "| | " + " | ".join(names[n] for n in layouts) + " |",
        "|---|" + "---:|" * len(layouts),
    ]
    for label, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt.format(by[n][key]) for n in layouts) + " |")
    lines += ["", "Answered per round: " + "; ".join(f"{names[n]} {by[n]['answered']}" for n in layouts)
              + " (a relay's update carries its devices' samples per tier).", "", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--devices", type=int, default=100, help="virtual devices per site")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--round-timeout", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "hierarchy")
    parser.add_argument("--layouts", default="flat,workers,hierarchy")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, states) and print it")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-hierarchy-"))
    art = work / "art"
    subprocess.run([*TIERFL, "export", "--arch", "mlp", "--image-size", "8", "--tiers", "a", "--out", str(art)],
                   check=True, cwd=ROOT, capture_output=True)
    results = []
    for layout in args.layouts.split(","):
        result = run_layout(layout, work, art, args.sites, args.devices, args.rounds, args.fraction, args.round_timeout)
        print(json.dumps(result), flush=True)
        results.append(result)
    command = " ".join(["nice -n 19 .venv/bin/python scripts/bench_hierarchy.py", *sys.argv[1:]])
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("# Past one aggregator: workers and relays\n\n" + markdown(results, command))
    if args.keep:
        print(f"work folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
