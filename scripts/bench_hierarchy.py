"""Flat against hierarchical federation at SITES x DEVICES virtual devices (issue 16): benchmarks/hierarchy.{json,md}.

Both layouts run the same devices: SITES `tierfl fleet` processes of DEVICES virtual devices each (the 8x8 MLP on
scikit-learn digits, 64 samples a device), on a private Mosquitto (so its counters are ours), for ROUNDS rounds in
which FRACTION of the devices train:

- flat: one `tierfl aggregator` over all SITES x DEVICES devices, --fraction FRACTION;
- hierarchy: one `tierfl aggregator` over SITES relays (`tierfl relay`, one per site, each over its own fleet of
  DEVICES devices with --fraction FRACTION), the parent selecting every relay.

Measured per layout: round wall time (the aggregator's summaries), the round overhead (round time minus the slowest
counted device's training and upload, from the fleets' --events), CPU seconds and peak RSS of the aggregator (and the
relays), of the broker, and of the fleets; messages per second through the broker ($SYS counters).

    nice -n 19 .venv/bin/python scripts/bench_hierarchy.py --sites 10 --devices 100 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
TIERFL = [sys.executable, "-m", "tierfl.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_file_limit() -> None:
    """Let the broker hold thousands of connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_broker(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (folder / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nsys_interval 1\n"
                                           f"max_queued_messages 100000\nuser {os.environ.get('USER', 'root')}\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    process = subprocess.Popen([binary, "-c", str(folder / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, preexec_fn=raise_file_limit)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"mqtt://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the benchmark's Mosquitto did not start")


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


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    """One federation of `sites` x `devices` virtual devices, flat or through relays; its measurements."""
    folder = work / layout
    folder.mkdir(parents=True)
    broker, url = start_broker(folder / "broker")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        central = "central"
        common = ["--broker", url, "--artifacts", str(art)]
        sites_fleets = [central] * sites if layout == "flat" else [f"site{i}" for i in range(sites)]
        senders = ["aggregator"] * sites if layout == "flat" else [f"relay{i}" for i in range(sites)]
        fleets = [start(["fleet", "--broker", url, "--fleet", sites_fleets[i], "--aggregator-id", senders[i], "--devices",
                         str(devices), "--id-prefix", f"s{i}", "--data", "digits", "--samples-per-device", "64", "--seed",
                         str(i), "--cache-root", str(folder / f"cache{i}"), "--events", str(folder / f"events{i}.jsonl"),
                         "--connect-rate", "200"], folder / f"fleet{i}.log") for i in range(sites)]
        processes += fleets
        connected = f"{devices}/{devices} connected"
        wait_until(lambda: all(connected in (folder / f"fleet{i}.log").read_text() for i in range(sites)), 900,
                   "every virtual device connected")
        # The aggregators start once every device is online: they read the retained hellos at once.
        if layout == "flat":
            selected = max(1, round(fraction * sites * devices))
            aggregator = start(["aggregator", *common, "--fleet", central, "--state-dir", str(folder / "agg"),
                                "--min-clients", str(selected), "--fraction", str(fraction), "--rounds",
                                str(rounds), "--round-timeout", str(timeout_s)], folder / "aggregator.log")
            relays: list[subprocess.Popen[bytes]] = []
        else:
            relays = [start(["relay", "--parent", url, "--parent-fleet", central, "--id", f"relay{i}", "--broker", url,
                             "--fleet", f"site{i}", "--artifacts", str(art), "--state-dir", str(folder / f"relay{i}"),
                             "--fraction", str(fraction), "--margin", "3"], folder / f"relay{i}.log")
                      for i in range(sites)]
            everyone = f"announced to aggregator: {devices} devices"
            wait_until(lambda: all(everyone in (folder / f"relay{i}.log").read_text() for i in range(sites)), 600,
                       "every relay announcing its whole group")
            aggregator = start(["aggregator", *common, "--fleet", central, "--state-dir", str(folder / "agg"),
                                "--min-clients", str(sites), "--fraction", "1.0", "--rounds", str(rounds),
                                "--round-timeout", str(timeout_s)], folder / "aggregator.log")
        processes += [aggregator, *relays]
        started = time.time()
        deadline = started + 60 * 30
        peaks: dict[int, tuple[float, int]] = {}
        watched = [broker, aggregator, *relays, *fleets]
        while aggregator.poll() is None and time.time() < deadline:
            for process in watched:
                if process.poll() is None:
                    try:
                        peaks[process.pid] = proc_stats(process.pid)
                    except (FileNotFoundError, ProcessLookupError):
                        pass
            time.sleep(0.5)
        counters = sys_counters(url)
        for process in [broker, *relays, *fleets]:
            try:
                peaks[process.pid] = proc_stats(process.pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        elapsed = time.time() - started
        if aggregator.returncode != 0:
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
    cpu_agg, rss_agg = peaks.get(aggregator.pid, (0.0, 0))
    relay_stats = [peaks.get(r.pid, (0.0, 0)) for r in relays]
    fleet_stats = [peaks.get(f.pid, (0.0, 0)) for f in fleets]
    cpu_broker, rss_broker = peaks.get(broker.pid, (0.0, 0))
    messages = counters.get("messages/received", 0.0) + counters.get("messages/sent", 0.0)
    return {
        "layout": layout, "sites": sites, "devices_per_site": devices, "devices": sites * devices, "rounds": rounds,
        "fraction": fraction, "answered": [s["answered"] for s in history], "selected": [s["selected"] for s in history],
        "round_seconds": seconds, "round_seconds_median": statistics.median(seconds),
        "round_overhead_median": statistics.median(overhead),
        "aggregator_cpu_s": cpu_agg, "aggregator_rss_mb": rss_agg / 1e6,
        "relays_cpu_s": sum(c for c, _ in relay_stats), "relay_rss_mb_max": max((r for _, r in relay_stats), default=0) / 1e6,
        "broker_cpu_s": cpu_broker, "broker_rss_mb": rss_broker / 1e6,
        "fleets_cpu_s": sum(c for c, _ in fleet_stats), "fleet_rss_mb_max": max((r for _, r in fleet_stats), default=0) / 1e6,
        "broker_messages": messages, "broker_bytes": counters.get("bytes/received", 0.0) + counters.get("bytes/sent", 0.0),
        "elapsed_s": elapsed, "messages_per_s": messages / elapsed if elapsed else 0.0,
        "bytes_up_per_round": statistics.median(s["bytes_up"] for s in measured),
        "bytes_down_per_round": statistics.median(s["bytes_down"] for s in measured),
    }


def markdown(results: list[dict[str, object]], command: str) -> str:
    flat, tree = (next(r for r in results if r["layout"] == name) for name in ("flat", "hierarchy"))
    rows = [
        ("round wall time, median of rounds 2+ (s)", "round_seconds_median", "{:.2f}"),
        ("round overhead: wall minus the slowest device's training and upload (s)", "round_overhead_median", "{:.2f}"),
        ("aggregator CPU over the run (s)", "aggregator_cpu_s", "{:.1f}"),
        ("relays' CPU over the run, all together (s)", "relays_cpu_s", "{:.1f}"),
        ("aggregator peak RSS (MB)", "aggregator_rss_mb", "{:.0f}"),
        ("largest relay peak RSS (MB)", "relay_rss_mb_max", "{:.0f}"),
        ("broker CPU (s)", "broker_cpu_s", "{:.1f}"),
        ("broker peak RSS (MB)", "broker_rss_mb", "{:.0f}"),
        ("largest fleet process peak RSS (MB)", "fleet_rss_mb_max", "{:.0f}"),
        ("messages through the broker (in + out)", "broker_messages", "{:.0f}"),
        ("messages per second over the run", "messages_per_s", "{:.0f}"),
        ("bytes up counted by the top aggregator per round", "bytes_up_per_round", "{:.0f}"),
        ("bytes down sent by the top aggregator per round", "bytes_down_per_round", "{:.0f}"),
    ]
    lines = [
        "## Flat against hierarchical (relays)",
        "",
        f"{flat['devices']} virtual devices (`tierfl fleet`, the 8x8 MLP on digits, 64 samples each) in "
        f"{flat['sites']} fleet processes of {flat['devices_per_site']}, {flat['rounds']} rounds, "
        f"{flat['fraction']:.0%} of the devices training each round; on a private Mosquitto 2.0 on this 2-core "
        "machine, every process under `nice -n 19` while other work ran (so times are upper bounds).",
        f"Flat: one aggregator over all devices. Hierarchy: one aggregator over {tree['sites']} relays, each a local "
        f"round over its own fleet of {tree['devices_per_site']} devices.",
        "",
        "| | flat | hierarchy |",
        "|---|---:|---:|",
    ]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(flat[key])} | {fmt.format(tree[key])} |")
    lines += ["", f"Answered per round: flat {flat['answered']}, hierarchy {tree['answered']} (relays; each relay's "
              "update carries its devices' samples per tier).", "", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--devices", type=int, default=100, help="virtual devices per site")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--round-timeout", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "hierarchy")
    parser.add_argument("--layouts", default="flat,hierarchy")
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
    if len(results) == 2:
        args.out.with_suffix(".md").write_text("# Hierarchy: flat against relays\n\n" + markdown(results, command))
    if args.keep:
        print(f"work folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
