"""`tierfl client`: run one device of the fleet."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from pydantic import ValidationError

from edge_client.agent import ClientConfig, DeviceAgent
from edge_client.backends import BACKENDS, resolve_backend
from edge_client.fleet_options import (add_aggregator_arguments, add_cache_argument, add_fleet_arguments,
                                       add_message_size_argument, default_cache_dir)
from models.data import load_dataset, train_test_split
from protocol.mqtt.url import parse as parse_broker
from protocol.signing import DeviceKey, EnrolledKeys, read_public_key

log = logging.getLogger(__name__)

EPILOG = """examples:
  tierfl client --broker mqtt://192.168.1.10:1883 --fleet lab --device-id pi-kitchen --data /data/local.npz
  tierfl client --broker mqtt://127.0.0.1:1883 --device-id laptop-1 --data digits --tier b

The device keeps running across broker or network outages: it tries to reach the broker again
after 1 s, 2 s, 4 s, ... up to --reconnect-max, also when the broker is not up yet at start.
SIGTERM (systemctl stop) takes no new task, lets the one in training finish within --stop-grace
and send its update (else abandons it), publishes the device's offline status and exits 0.
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `tierfl client` options to `parser`."""
    parser.description = (
        "Run a device agent: announce this device to the aggregator, fetch its tier's ONNX training "
        "artifacts (cached by sha256), train each task on local data with ONNX Runtime and publish the "
        "update. Local data never leaves the device; only weight deltas do."
    )
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_fleet_arguments(parser)
    parser.add_argument("--data", help="local data: FILE.npz | digits | fashion-mnist[:train|:test]. FILE.npz holds x, "
                        "N samples of the model's input shape ([N, C, H, W], [N, C, T] or [N, F]; uint8 is scaled to "
                        "0-1, float taken as is, NaN/Inf refused) and y, N integer labels from 0 to classes-1. Checked "
                        "against the model when its first task comes (a task it does not fit is skipped, the reason "
                        "logged): [N, H, W] and flat [N, H*W] also fit a [1, H, W] model, size-1 axes may be missing "
                        "or extra, and a model of flat [F] samples takes any samples of F values, flattened")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="share of local data held out to evaluate received models (default: %(default)s)")
    parser.add_argument("--tier", help="ask for a fixed tier (a-e); default: the aggregator decides")
    parser.add_argument("--bench", type=Path, help="bench.json from `tierfl bench` on this device (same model): "
                        "announces its training speed per tier, so an aggregator with --tier-policy auto gives it "
                        "the widest tier that fits the round deadline from the first round on")
    add_cache_argument(parser)
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="training backend: ort-training (the onnxruntime-training wheel), portable (a step graph "
                             "of standard operators on plain onnxruntime: Raspberry Pi, Python 3.13+), or auto: "
                             "ort-training where its wheel works, portable elsewhere (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for training (default: %(default)s)")
    add_message_size_argument(parser)
    parser.add_argument("--codec", default="float32",
                        help="update encoding: float32 | float16 | int8 | int8-row | int4 | topk:0.1 | topk:0.1+int8; "
                             "lossy codecs carry what they drop into the next round (error feedback) (default: %(default)s)")
    parser.add_argument("--skip-below", type=float, default=0.0,
                        help="selective upload: send 'unchanged' instead of tensors when ||update|| / ||weights|| "
                             "is below this (default: %(default)s, always send)")
    parser.add_argument("--show-key", action="store_true",
                        help="print this device's id and Ed25519 public key (created in the cache dir on first use) "
                             "for the aggregator's --enrolled file, then exit")
    parser.add_argument("--fleet-keys", type=Path, metavar="FILE",
                        help="the fleet's device keys, the aggregator's --enrolled file copied here (JSON: device id -> "
                             "Ed25519 public key from --show-key): in secure aggregation, refuse a key roster in which "
                             "any device's keys are unsigned, signed by another key or of a device not in FILE, so an "
                             "aggregator cannot substitute keys to read this device's shares (default: the roster is "
                             "taken on trust, with a warning)")
    add_aggregator_arguments(parser)
    service = parser.add_argument_group("running unattended")
    service.add_argument("--cache-max-mb", type=float, default=512.0,
                         help="bound of the artifact cache in MB; the least recently used tiers' files go first, "
                              "never those of the current tier (default: %(default)s)")
    service.add_argument("--reconnect-max", type=float, default=60.0, metavar="S",
                         help="longest wait between attempts to reach the broker, in seconds; the waits double from "
                              "1 s with random jitter (default: %(default)s)")
    service.add_argument("--connect-timeout", type=float, metavar="S",
                         help="exit with an error when the broker cannot be reached for S seconds at start "
                              "(default: keep trying)")
    service.add_argument("--stop-grace", type=float, default=10.0, metavar="S",
                         help="on SIGTERM/SIGINT, seconds the task in training may take to finish and send its "
                              "update before it is abandoned (default: %(default)s)")


def read_benchmark(path: Path) -> dict[str, float]:
    """tier -> seconds per training sample, from a `tierfl bench` report."""
    from edge_client.bench import BenchReport  # the bench module builds models: only imported when asked for
    try:
        report = BenchReport.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise ValueError(f"{path} is not a `tierfl bench` report: {exc.errors()[0]['msg']}") from None
    speeds = {t.tier: 1.0 / t.samples_per_second for t in report.tiers if t.samples_per_second > 0}
    log.info("announcing the speed measured by %s on %s: %s", path, report.model.name,
             ", ".join(f"tier {t} {s * 1e3:.3f} ms/sample" for t, s in speeds.items()))
    return speeds


def derived_defaults(args: argparse.Namespace) -> dict[str, object]:
    """Values a start uses for options left unset that follow from other options (`tierfl config show`)."""
    return {"cache_dir": default_cache_dir(args)} if args.device_id else {}


def run(args: argparse.Namespace) -> int:
    """Serve tasks until SIGINT/SIGTERM."""
    cache_dir = default_cache_dir(args)
    if args.show_key:
        print(json.dumps({args.device_id: DeviceKey(cache_dir).public_hex}))
        return 0
    if not (args.broker and args.data):
        raise ValueError("--broker and --data are required (only --show-key runs without them)")
    backend = resolve_backend(args.backend)  # fail now, with the fix spelled out, if a forced backend cannot work
    log.info("training backend: %s", backend)
    data = load_dataset(args.data)
    log.info("local data %s: %d samples of shape %s, labels 0 to %d", args.data, len(data), list(data.sample_shape),
             data.num_classes - 1)
    train, test = train_test_split(data, args.test_fraction, seed=0) if args.test_fraction > 0 else (data, data.subset([]))
    config = ClientConfig(
        broker=parse_broker(args.broker),
        device_id=args.device_id,
        fleet=args.fleet,
        aggregator_id=args.aggregator_id,
        tier=args.tier,
        cache_dir=cache_dir,
        threads=args.threads,
        max_message_bytes=args.max_message_bytes,
        codec=args.codec,
        skip_below=args.skip_below,
        seconds_per_sample=read_benchmark(args.bench) if args.bench else {},
        backend=backend,
        cache_max_mb=args.cache_max_mb,
        reconnect_max_s=args.reconnect_max,
        connect_timeout_s=args.connect_timeout,
        stop_grace_s=args.stop_grace,
        fleet_keys=EnrolledKeys.load(args.fleet_keys).root if args.fleet_keys else None,
        aggregator_key=read_public_key(args.aggregator_key) if args.aggregator_key else None,
    )
    agent = DeviceAgent(config, train, test, data_name=args.data)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        # Set from another thread: Event.set here could deadlock with the main thread's own wait on it.
        threading.Thread(target=stop.set, name="tierfl-stop").start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    agent.run(stop)
    log.info("stopped after %d tasks", agent.tasks_done)
    return 0
