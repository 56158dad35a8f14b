"""`tierfl fleet`: many virtual devices in one process, each a real MQTT client of a real broker.

Each virtual device (edge_client.virtual_device) has its own id, signing key, data shard, cache
folder and error-feedback state and speaks the device protocol exactly; what they share is the
process: one network loop thread for all their connections (edge_client.netloop), one ONNX Runtime
training session per tier artifact set (weights loaded per task, used under a lock), and a
bounded pool of workers that runs each device's work in turn. How each device behaves (speed,
availability, dropouts, uplink) comes from a trace or from distributions (edge_client.fleet_trace).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import logging
import resource
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_client.backends import BACKENDS, open_trainer, resolve_backend
from edge_client.fleet_options import add_aggregator_arguments, add_message_size_argument
from edge_client.fleet_trace import (Behaviour, Distributions, behaviours, next_edge, online_at, parse_tier_seconds,
                                     read_trace)
from edge_client.netloop import NetLoop
from edge_client.onnx_guard import OnnxRefused, check_onnx_folder
from edge_client.stages import TaskRefused
from edge_client.trainer import Trainer
from edge_client.virtual_device import VirtualDevice
from models.data import Dataset, load_dataset, train_test_split
from models.manifest import STATISTICS_FILE, TierManifest
from protocol.chunking import DEFAULT_MAX_MESSAGE_BYTES
from protocol.messages import RejectReason
from protocol.mqtt.url import BrokerAddress
from protocol.mqtt.url import parse as parse_broker
from protocol.refusals import RefusalLog
from protocol.signing import read_public_key

log = logging.getLogger(__name__)
STATS_EVERY_S = 10.0


class FleetSettings(BaseModel):
    """What every virtual device of the fleet shares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: BrokerAddress
    fleet: str = "default"
    aggregator_id: str = "aggregator"
    aggregator_key: str | None = None
    cache_root: Path
    cache_max_mb: float = Field(64.0, gt=0)
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=4096)
    codec: str = "float32"
    skip_below: float = Field(0.0, ge=0)
    backend: str = "ort-training"
    threads: int = Field(1, ge=1, le=64)
    workers: int = Field(2, ge=1, le=256)
    send_margin_s: float = Field(2.0, ge=0)
    reconnect_max_s: float = Field(60.0, ge=1)
    connect_rate: float = Field(500.0, gt=0)  # connections opened per second at start
    data: str = "digits"
    seed: int = 0


class SharedTrainers:
    """One trainer per tier artifact set (by manifest sha256), shared by every device and used under its lock."""

    def __init__(self, backend: str, threads: int) -> None:
        self.backend, self.threads = backend, threads
        self._lock = threading.Lock()
        self._checked: dict[str, TierManifest] = {}
        self._trainers: dict[str, tuple[Trainer, threading.Lock]] = {}

    def checked(self, manifest_sha256: str, folder: Path) -> TierManifest:
        """The manifest of a tier folder whose ONNX files passed onnx_guard: checked once per manifest for the whole
        fleet (the files are content-addressed: every device's copy of them is the same bytes); TaskRefused if not."""
        with self._lock:
            manifest = self._checked.get(manifest_sha256)
            if manifest is None:
                try:
                    check_onnx_folder(folder)
                except OnnxRefused as exc:
                    raise TaskRefused(RejectReason.UNKNOWN_ARTIFACT, f"refusing to load {exc}") from None
                manifest = self._checked[manifest_sha256] = TierManifest.load(folder / "manifest.json")
            return manifest

    @contextlib.contextmanager
    def lease(self, manifest_sha256: str, folder: Path, manifest: TierManifest) -> Iterator[Trainer]:
        """The tier's trainer, opened on first use, for one task at a time."""
        with self._lock:
            entry = self._trainers.get(manifest_sha256)
            if entry is None:
                entry = self._trainers[manifest_sha256] = (open_trainer(self.backend, folder, manifest, self.threads),
                                                           threading.Lock())
        trainer, lock = entry
        with lock:
            yield trainer

    def bn_statistics(self, folder: Path, weights: dict[str, np.ndarray], data: Dataset) -> dict[str, np.ndarray]:
        """Batch-norm statistics of `weights` on `data` (edge_client.bn_statistics)."""
        from edge_client.bn_statistics import measure_bn_statistics

        return measure_bn_statistics(folder / STATISTICS_FILE, weights, data, threads=self.threads)


class _Weights(dict[str, np.ndarray]):
    """A weights dict that can be weakly referenced (FleetRuntime.intern)."""

    __slots__ = ("__weakref__",)


class FleetRuntime:
    """What the virtual devices share: settings, the network loop, the workers, the trainers, counters, events."""

    def __init__(self, settings: FleetSettings, events: IO[str] | None = None) -> None:
        self.settings = settings
        self.loop = NetLoop()
        self.workers = ThreadPoolExecutor(settings.workers, thread_name_prefix="tierfl-fleet-worker")
        self.trainers = SharedTrainers(settings.backend, settings.threads)
        self.started = time.monotonic()
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._refusal_log = RefusalLog()
        self._events = events
        self._interned: weakref.WeakValueDictionary[bytes, _Weights] = weakref.WeakValueDictionary()

    def intern(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One shared copy of equal weights (a version's tier weights, held by every device that trained it): the
        fleet's memory grows with the versions held, not with the devices. Callers never change the arrays."""
        digest = hashlib.blake2b(digest_size=20)
        for name in sorted(weights):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(weights[name]).data)
        key = digest.digest()
        with self._lock:
            held = self._interned.get(key)
            if held is None:
                held = self._interned[key] = _Weights(weights)
            return held

    def count(self, what: str, n: int = 1) -> None:
        """Add to one of the fleet's counters."""
        with self._lock:
            self._counts[what] += n

    def counts(self) -> dict[str, int]:
        """A copy of the counters."""
        with self._lock:
            return dict(self._counts)

    def refuse(self, device: str, reason: RejectReason, detail: str, sender: str | None) -> None:
        """Count a device's refusal; log it unless one of the same reason was logged within the interval."""
        with self._lock:
            self._counts[f"refused:{reason.value}"] += 1
            logged = self._refusal_log.should_log(sender, reason, time.monotonic())
            more = self._refusal_log.suppressed(sender, reason) if logged else 0
        if logged:
            log.warning("%s refused a message: %s: %s%s", device, reason.value, detail,
                        f" (and {more} more like it, of any device, unlogged since the last such line)" if more else "")

    def record(self, **event: object) -> None:
        """One line of the --events file (a task's update sent, or a dropout)."""
        if self._events is not None:
            line = json.dumps(event)
            with self._lock:
                self._events.write(line + "\n")

    def online_now(self, behaviour: Behaviour) -> bool:
        """Whether the device's availability windows have it online now."""
        return online_at(behaviour.online, time.monotonic() - self.started)


def shards(data: Dataset, count: int, per_device: int, test_fraction: float, seed: int) -> Iterator[tuple[Dataset, Dataset]]:
    """`count` (train, test) shards of `per_device` samples: disjoint while the data holds enough, else each device's
    samples are drawn without replacement from the whole set (shards overlap)."""
    rng = np.random.default_rng(seed)
    disjoint = count * per_device <= len(data)
    order = rng.permutation(len(data))
    for index in range(count):
        if disjoint:
            picked = order[index * per_device:(index + 1) * per_device]
        else:
            picked = np.random.default_rng([seed, index]).choice(len(data), size=min(per_device, len(data)), replace=False)
        shard = data.subset(np.sort(picked))
        yield train_test_split(shard, test_fraction, seed=index) if test_fraction > 0 else (shard, shard.subset([]))


class Fleet:
    """The virtual devices of one process, started and stopped together."""

    def __init__(self, settings: FleetSettings, devices: list[Behaviour], data: Dataset, per_device: int,
                 test_fraction: float = 0.2, events: IO[str] | None = None) -> None:
        from edge_client.agent import device_key

        self.runtime = FleetRuntime(settings, events)
        with ThreadPoolExecutor(16) as pool:  # a new key is written with two fsyncs: in parallel
            keys = list(pool.map(lambda behaviour: device_key(settings.cache_root / behaviour.id), devices))
        self.devices = [VirtualDevice(self.runtime, behaviour, train, test, key) for behaviour, key, (train, test)
                        in zip(devices, keys, shards(data, len(devices), per_device, test_fraction, settings.seed))]

    def start(self) -> None:
        """Start the network loop and connect the devices online now, `connect_rate` a second; schedule the rest."""
        runtime = self.runtime
        runtime.started = time.monotonic()
        runtime.loop.start()
        spacing = 1.0 / runtime.settings.connect_rate
        for index, device in enumerate(self.devices):
            runtime.loop.call_later(index * spacing, lambda device=device: self._follow_windows(device))

    def _follow_windows(self, device: VirtualDevice) -> None:
        """On the loop: be online or offline as the device's windows say now, and come back at the next edge."""
        windows = device.behaviour.online
        now = time.monotonic() - self.runtime.started
        if online_at(windows, now):
            if not device.wants_online:
                device.go_online()
        elif device.wants_online:
            device.go_offline()
        if windows is not None and (edge := next_edge(windows, now)) is not None:
            self.runtime.loop.call_later(edge - now, lambda: self._follow_windows(device))

    def connected(self) -> int:
        """Devices connected to the broker now."""
        return sum(device.link.connected for device in self.devices)

    def stop(self) -> None:
        """Every device leaves in order (offline status, clean disconnect); then the loop and the workers stop."""
        done = threading.Event()

        def leave_all() -> None:
            for device in self.devices:
                if device.wants_online:
                    device.go_offline()
            done.set()

        self.runtime.loop.call_soon(leave_all)
        done.wait(30.0)
        until = time.monotonic() + 5.0 + len(self.devices) / 500  # the offline statuses and DISCONNECTs go out
        while self.connected() and time.monotonic() < until:
            time.sleep(0.1)
        self.runtime.loop.stop()
        self.runtime.workers.shutdown(wait=False, cancel_futures=True)

    def summary(self) -> str:
        """One log line of the fleet's counters."""
        counts = self.runtime.counts()
        refused = sum(n for what, n in counts.items() if what.startswith("refused:"))
        return (f"fleet: {self.connected()}/{len(self.devices)} connected; tasks {counts.get('tasks_taken', 0)}, updates "
                f"sent {counts.get('updates_sent', 0)}, dropouts {counts.get('dropouts', 0)}, lost "
                f"{counts.get('updates_lost', 0)}, refused {refused}; network loop busy "
                f"{self.runtime.loop.busy_s:.1f} s")


EPILOG = """examples:
  tierfl fleet --broker mqtt://127.0.0.1:1883 --fleet big --devices 1000 --data digits --samples-per-device 64
  tierfl fleet --broker mqtt://127.0.0.1:1883 --fleet big --trace fleet.jsonl --bench bench.json --events events.jsonl

Start the aggregator of the same fleet with the same model (`tierfl aggregator --fleet big --arch mlp --image-size 8
--fraction 0.1 ...`). Each device is a real MQTT connection: the broker must take --devices connections (Mosquitto:
max_connections, and its open-files limit, `ulimit -n`). The fleet raises its own open-files limit as far as allowed.

Trace file (--trace): JSON {"devices": [DEVICE, ...]} or JSON lines of DEVICE, each field optional:
  {"id": "pi-0001", "tier": "b", "speed_factor": 2.5, "seconds_per_sample": {"a": 0.004},
   "uplink_kbps": 2000, "latency_ms": 80, "online": [[0, 600], [900, 1e9]],
   "dropouts": [{"round": 2, "after": 0.5, "away_s": 30}], "dropout_probability": 0.05}
What a device's trace leaves out is drawn from the options below (seeded by --seed and the device's index).
A task is trained for real at once on the device's shard; its update is sent when a device of that speed would
have finished (samples x epochs x seconds per sample, at the latest --send-margin before the deadline) plus
latency and bytes over bandwidth. A dropout closes the connection without DISCONNECT (the broker publishes the
device's will) and the update is never sent.
SIGTERM/SIGINT: every device publishes its offline status and disconnects; exit 0.
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `tierfl fleet` options to `parser`."""
    parser.description = ("Run many virtual devices in one process against a real broker: each a real MQTT client with "
                          "its own id, key, data shard, cache folder and error-feedback state, speaking the device "
                          "protocol exactly, training every task for real on a shared ONNX Runtime session per tier, "
                          "with speed, availability, dropouts and uplink from a trace or from distributions.")
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--broker", required=True, help="mqtt://[user:pass@]host[:port] of the fleet's broker")
    parser.add_argument("--fleet", default="default", help="fleet name, the topic namespace (default: %(default)s)")
    add_aggregator_arguments(parser)
    add_message_size_argument(parser)
    devices = parser.add_argument_group("devices")
    devices.add_argument("--devices", type=int, help="how many virtual devices (default: as many as the trace "
                         "describes; required without --trace)")
    devices.add_argument("--trace", type=Path, help="JSON or JSON lines describing each device (format below)")
    devices.add_argument("--id-prefix", default="v", help="device ids PREFIX-00001, ... for devices the trace does "
                         "not name (default: %(default)s)")
    devices.add_argument("--data", default="digits", help="the data the shards are cut from: digits | "
                         "fashion-mnist[:train|:test] | FILE.npz, as `tierfl client --data` (default: %(default)s)")
    devices.add_argument("--samples-per-device", type=int, default=64,
                         help="samples in each device's shard, disjoint while the data holds enough, else drawn "
                              "from all of it per device (default: %(default)s)")
    devices.add_argument("--test-fraction", type=float, default=0.2,
                         help="share of each shard held out to evaluate received models (default: %(default)s)")
    devices.add_argument("--tiers", default="", help="fixed tiers the devices ask for, drawn with equal shares, e.g. "
                         "a,b,c (default: the aggregator decides)")
    devices.add_argument("--cache-root", type=Path, help="one cache folder per device under it: artifacts, key, pinned "
                         "aggregator key, residuals (default: ~/.cache/tierfl/FLEET/fleet)")
    devices.add_argument("--cache-max-mb", type=float, default=64.0, help="each device's cache bound (default: %(default)s)")
    devices.add_argument("--codec", default="float32", help="update encoding, as `tierfl client --codec` (default: "
                         "%(default)s)")
    devices.add_argument("--skip-below", type=float, default=0.0, help="selective upload, as `tierfl client` "
                         "(default: %(default)s)")
    sim = parser.add_argument_group("behaviour (for what the trace leaves out)")
    sim.add_argument("--bench", type=Path, help="bench.json of `tierfl bench` (same model): seconds per sample per tier "
                     "at speed factor 1")
    sim.add_argument("--seconds-per-sample", default="", metavar="a=S,b=S",
                     help="seconds per training sample per tier at speed factor 1 (overrides --bench; default: none, "
                          "an update goes as soon as it is trained)")
    sim.add_argument("--speed-spread", type=float, default=0.0,
                     help="sigma of each device's log-normal speed factor, median 1 (default: %(default)s: all alike)")
    sim.add_argument("--uplink-kbps", type=float, default=0.0, help="median upload bandwidth, kbit/s (default: "
                     "unlimited)")
    sim.add_argument("--latency-ms", type=float, default=0.0, help="median one-way latency (default: %(default)s)")
    sim.add_argument("--network-spread", type=float, default=0.0, help="sigma of each device's log-normal bandwidth "
                     "and latency factor (default: %(default)s)")
    sim.add_argument("--dropout", type=float, default=0.0, help="chance that a device drops out during a task "
                         "(default: %(default)s)")
    sim.add_argument("--away", type=float, default=30.0, metavar="S", help="seconds a dropped-out device stays away "
                     "(default: %(default)s)")
    sim.add_argument("--mean-online", type=float, default=0.0, metavar="S",
                     help="churn: mean online period in seconds (exponential; with --mean-offline; default: always "
                          "online)")
    sim.add_argument("--mean-offline", type=float, default=0.0, metavar="S", help="churn: mean offline period")
    sim.add_argument("--seed", type=int, default=0, help="seeds the shards and the draws (default: %(default)s)")
    run = parser.add_argument_group("running")
    run.add_argument("--workers", type=int, default=2, help="worker threads for all devices' training, checks and "
                     "encoding (default: %(default)s)")
    run.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per session (default: %(default)s)")
    run.add_argument("--backend", choices=BACKENDS, default="auto", help="training backend, as `tierfl client` "
                     "(default: %(default)s)")
    run.add_argument("--send-margin", type=float, default=2.0, metavar="S", help="a slow device sends at the latest "
                     "this long before the task's deadline, as `tierfl client` stops training then (default: %(default)s)")
    run.add_argument("--connect-rate", type=float, default=500.0, help="connections opened per second at start "
                     "(default: %(default)s)")
    run.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until SIGTERM/SIGINT)")
    run.add_argument("--events", type=Path, help="write one JSON line per update sent or dropout (device, round, "
                     "tier, simulated training and upload seconds, bytes, time)")


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's open-files limit toward `wanted` (as far as the hard limit allows); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def settings_from(args: argparse.Namespace) -> tuple[FleetSettings, list[Behaviour]]:
    """The fleet's settings and its devices' behaviours, from the parsed options; ValueError on bad input."""
    trace = read_trace(args.trace) if args.trace else None
    count = args.devices if args.devices is not None else (len(trace.devices) if trace else None)
    if count is None or count < 1:
        raise ValueError("--devices N (at least 1) is required without --trace")
    speeds = parse_tier_seconds(args.seconds_per_sample)
    if not speeds and args.bench:
        from edge_client.cli import read_benchmark

        speeds = read_benchmark(args.bench)
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    spread = Distributions(id_prefix=args.id_prefix, tiers=tiers, seconds_per_sample=speeds, speed_spread=args.speed_spread,
                           uplink_kbps=args.uplink_kbps, latency_ms=args.latency_ms, network_spread=args.network_spread,
                           dropout_probability=args.dropout, away_s=args.away, mean_online_s=args.mean_online,
                           mean_offline_s=args.mean_offline, seed=args.seed)
    settings = FleetSettings(
        broker=parse_broker(args.broker), fleet=args.fleet, aggregator_id=args.aggregator_id,
        aggregator_key=read_public_key(args.aggregator_key) if args.aggregator_key else None,
        cache_root=args.cache_root or Path.home() / ".cache" / "tierfl" / args.fleet / "fleet",
        cache_max_mb=args.cache_max_mb, max_message_bytes=args.max_message_bytes, codec=args.codec,
        skip_below=args.skip_below, backend=resolve_backend(args.backend), threads=args.threads, workers=args.workers,
        send_margin_s=args.send_margin, connect_rate=args.connect_rate, data=args.data, seed=args.seed)
    return settings, behaviours(count, trace, spread)


def run(args: argparse.Namespace) -> int:
    """Run the fleet until SIGINT/SIGTERM or --duration."""
    settings, devices = settings_from(args)
    if args.samples_per_device < 2:
        raise ValueError("--samples-per-device must be at least 2")
    limit = raise_open_files_limit(len(devices) + 256)
    if limit < len(devices) + 64:
        raise ValueError(f"{len(devices)} devices need as many open files, but this process may open only {limit} "
                         "(raise `ulimit -n`)")
    logging.getLogger("protocol.mqtt.link").setLevel(max(logging.WARNING, logging.getLogger().level))
    if settings.aggregator_key is None:  # said once here, not once per device
        logging.getLogger("protocol.trust").setLevel(max(logging.ERROR, logging.getLogger().level))
        log.warning("no --aggregator-key: every device pins the key the aggregator announces first (trust on first "
                    "use), in its cache folder")
    data = load_dataset(args.data)
    events = open(args.events, "a", buffering=1) if args.events else None
    try:
        fleet = Fleet(settings, devices, data, args.samples_per_device, args.test_fraction, events)
        log.info("%d virtual devices (%s), %d samples each, %d workers; connecting to %s:%d", len(devices),
                 args.trace or "drawn from the options", args.samples_per_device, settings.workers,
                 settings.broker.host, settings.broker.port)
        stop = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            threading.Thread(target=stop.set, name="tierfl-stop").start()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        fleet.start()
        ends = time.monotonic() + args.duration if args.duration else None
        while not stop.wait(min(STATS_EVERY_S, max(0.0, ends - time.monotonic())) if ends else STATS_EVERY_S):
            log.info("%s", fleet.summary())
            if ends is not None and time.monotonic() >= ends:
                break
        fleet.stop()
        log.info("%s", fleet.summary())
    finally:
        if events is not None:
            events.close()
    return 0
