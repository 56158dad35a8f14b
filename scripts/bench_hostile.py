"""Honest rounds under attack: round time and aggregator memory while one attacker floods the fleet.

Real processes over a Mosquitto this script starts on a free port: the aggregator (the digits
MLP, FedAvg, held-out evaluation), 3 honest devices with chunked uploads, and one attacker
(scripts/hostile_publisher.py) sending one class of hostile input again and again for the whole
run. Per attack: the median honest round time against the run without attack (same run order,
one after the other), the aggregator's peak RSS (VmHWM), the broker's, what the ledger refused and
the final accuracy. `ATTACK:SAMPLING` runs the attack against `--sampling SAMPLING` (floods of
invented devices against `availability`, which benches devices that miss their tasks). Writes
benchmarks/hostile.{json,md}.

    .venv/bin/python scripts/bench_hostile.py --rounds 30 --round-timeout 10
"""

from __future__ import annotations

import argparse
import getpass
import json
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ["none", "zero-dim", "huge-ints", "sparse-bomb", "chunks", "floods", "floods:availability", "downlink", "poison"]
HONEST = ("d0", "d1", "d2")


def _peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a live process (VmHWM), in MB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _start_mosquitto(folder: Path, conf_lines: str = "",
                     preexec_fn: Callable[[], None] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A Mosquitto of our own on a free port (`conf_lines` added to its configuration, `preexec_fn` run in it before
    it starts); returns the process and its URL once it accepts connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n{conf_lines}")
    process = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=preexec_fn)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"mqtt://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise SystemExit("mosquitto did not start")


def _tierfl(args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    """`tierfl ARGS` with its output in `log`; `env` adds to (or replaces) its few environment variables."""
    env = {"PATH": "/usr/bin:/bin", "TIERFL_LOG_FORMAT": "text", "PYTHONPATH": str(ROOT), **env}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "tierfl.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """Terminate every process still running, wait up to 30 s for each, kill what is left."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(name: str, rounds: int, round_timeout: float, folder: Path) -> dict:
    """One federation of `rounds` rounds with attack `name` (ATTACK[:SAMPLING]) running throughout; its measurements."""
    attack, _, sampling = name.partition(":")
    folder.mkdir(parents=True)
    broker, url = _start_mosquitto(folder)
    fleet = "bench"
    state = folder / "state"
    min_clients = 4 if attack == "poison" else 3
    processes: list[subprocess.Popen[bytes]] = []
    try:
        if attack == "poison":
            processes.append(subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "hostile_publisher.py"), "--broker", url, "--fleet", fleet,
                 "--case", "poison", "--for", "600"], stdout=open(folder / "attack.log", "wb"),
                stderr=subprocess.STDOUT, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}))
        aggregator = _tierfl(["aggregator", "--broker", url, "--fleet", fleet, "--state-dir", str(state),
                              "--eval-data", "digits", "--min-clients", str(min_clients), "--rounds", str(rounds),
                              "--round-timeout", str(round_timeout), "--sampling", sampling or "uniform"],
                             folder / "aggregator.log")
        processes += [_tierfl(["client", "--broker", url, "--fleet", fleet, "--device-id", name, "--data", "digits",
                               "--cache-dir", str(folder / name), "--max-message-bytes", "65536"],
                              folder / f"{name}.log") for name in HONEST]
        if attack not in ("none", "poison"):
            while not (state / "state.json").exists() or json.loads((state / "state.json").read_text())["version"] < 1:
                if aggregator.poll() is not None:
                    break
                time.sleep(0.1)
            processes.append(subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "hostile_publisher.py"), "--broker", url, "--fleet", fleet,
                 "--case", attack, "--victims", ",".join(HONEST), "--repeat-for", "600"],
                stdout=open(folder / "attack.log", "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}))
        peak = broker_peak = 0.0
        started = time.monotonic()
        while aggregator.poll() is None and time.monotonic() - started < 900:
            peak = max(peak, _peak_rss_mb(aggregator.pid))
            broker_peak = max(broker_peak, _peak_rss_mb(broker.pid))
            time.sleep(0.2)
        wall = time.monotonic() - started
        exit_code = aggregator.wait(10)
    finally:
        stop(processes)
        stop([broker])
    record = json.loads((state / "state.json").read_text())
    history = record["history"][1:]  # round 1 waits for every device to fetch its artifacts
    db = sqlite3.connect(state / "ledger.sqlite")
    refused = dict(db.execute("SELECT reason, COUNT(*) FROM received WHERE accepted = 0 GROUP BY 1").fetchall())
    db.close()
    return {
        "attack": name, "exit_code": exit_code, "rounds": record["round"], "version": record["version"],
        "median_round_s": statistics.median(h["seconds"] for h in history), "wall_s": wall,
        "aggregator_peak_rss_mb": peak, "broker_peak_rss_mb": broker_peak,
        "final_accuracy": record["history"][-1]["accuracy"], "refused": refused,
        "traceback": "Traceback" in (folder / "aggregator.log").read_text(),
    }


def main() -> None:
    """Run every attack and write the JSON and the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--round-timeout", type=float, default=10.0, help="seconds a round waits for its devices")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "hostile")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for attack in args.attacks.split(","):
            result = run(attack, args.rounds, args.round_timeout, Path(scratch) / attack.replace(":", "-"))
            results.append(result)
            print(json.dumps(result), flush=True)
    base = next((r["median_round_s"] for r in results if r["attack"] == "none"), None)
    command = f".venv/bin/python scripts/bench_hostile.py --rounds {args.rounds} --round-timeout {args.round_timeout:g}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    lines = [
        "# Honest rounds under attack", "",
        f"`{command}` (2-core VM, nothing else running). Aggregator, 3 honest devices (digits MLP, chunked uploads "
        "of 64 kB) and one attacker sending one class of hostile input for the whole run, over a Mosquitto of the "
        "script's own. Round time: median over rounds 2.., against the run without attack.", "",
        "| attack | rounds committed | median honest round | vs no attack | aggregator peak RSS | broker peak RSS | "
        "final accuracy | refused (top reasons) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        top = ", ".join(f"{k} {v}" for k, v in sorted(r["refused"].items(), key=lambda kv: -kv[1])[:3]) or "-"
        ratio = f"{r['median_round_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['attack']} | {r['version']}/{r['rounds']} | {r['median_round_s'] * 1e3:.0f} ms | {ratio} | "
                     f"{r['aggregator_peak_rss_mb']:.0f} MB | {r['broker_peak_rss_mb']:.0f} MB | "
                     f"{r['final_accuracy']:.3f} | {top} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
