"""`tierfl aggregator --workers FILE` (a coordinator) and `--worker-of ID` (one of its aggregator workers).

One coordinator owns the rounds, the state, the ledger and every message to devices; N worker
processes share the devices' uplink through an MQTT 5 shared subscription, check and fold the updates
into partial sums, and the coordinator adds those into the round's version (aggregator.engines.coordinated
says what counts, and what happens when a worker dies mid-round).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import threading
from pathlib import Path

from aggregator.engines.base import EngineConfig
from aggregator.engines.worker import WorkerEngine
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.worker_service import WorkerService
from protocol.mqtt.url import parse as parse_broker
from protocol.signing import DeviceKey, EnrolledKeys, PublicKeyHex, SignatureCheck, read_public_key

log = logging.getLogger(__name__)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a coordinator of aggregator workers, and of a worker."""
    group = parser.add_argument_group(
        "aggregator workers (past one process)",
        "Several worker processes share the devices' uplink through an MQTT 5 shared subscription (Mosquitto 2 "
        "or any broker with MQTT 5 shared subscriptions), check and fold the updates into partial sums; one "
        "coordinator, started with --workers, owns the rounds, the state and every message to devices, grants "
        "each update before a worker folds it and adds the workers' partial sums into the round's version. A "
        "worker that dies mid-round loses the updates it held: the coordinator voids them and sends the round's "
        "task again to every selected device not yet counted nor held by a live worker (deadline a full "
        "--round-timeout away); nothing is counted twice. Synchronous FedAvg/FedProx rounds only.")
    group.add_argument("--workers", type=Path, metavar="FILE",
                       help="run as the coordinator of the aggregator workers in FILE, JSON of worker id -> Ed25519 "
                            "public key (each from `tierfl aggregator --show-key --state-dir WORKER_STATE`); frames "
                            "from any other worker, or not signed by its key, are refused")
    group.add_argument("--worker-of", metavar="COORDINATOR_ID",
                       help="run as an aggregator worker of the coordinator whose --id is COORDINATOR_ID, with this "
                            "process's own --id, --state-dir (its key) and the coordinator's --fleet, --broker, "
                            "--artifacts and --enrolled; needs --coordinator-key")
    group.add_argument("--coordinator-key", metavar="HEX|FILE",
                       help="a worker takes grants only when signed by this key: the coordinator's public key, as "
                            "`tierfl aggregator --show-key --state-dir COORDINATOR_STATE` prints it (the JSON in a "
                            "file, or the bare hex)")
    group.add_argument("--flush-wait", type=float, default=10.0, metavar="S",
                       help="coordinator: seconds past a round's deadline the workers get to send their partial sums; "
                            "updates still unsent then are not counted (default: %(default)s)")


def check_worker_options(args: argparse.Namespace) -> None:
    """ValueError when the worker options do not combine with the others."""
    if args.workers and args.worker_of:
        raise ValueError("--workers (a coordinator) and --worker-of (a worker) exclude each other")
    if args.worker_of and not args.coordinator_key:
        raise ValueError("--worker-of needs --coordinator-key: the coordinator's public key (tierfl aggregator "
                         "--show-key --state-dir COORDINATOR_STATE)")
    if args.workers and (args.strategy in ("fedbuff", "fedmut") or args.secure_aggregation or args.robust != "none"):
        raise ValueError("--workers runs synchronous rounds of the element-wise mean: not with --strategy fedbuff or "
                         "fedmut, --secure-aggregation or --robust")
    if args.workers and getattr(args, "personal_layers", None):
        raise ValueError("--workers with --personal-layers: the workers check updates against the whole tier, "
                         "personal layers included")
    if not 0 < args.flush_wait < math.inf:  # NaN too: no deadline would ever pass
        raise ValueError(f"--flush-wait must be positive and finite, got {args.flush_wait}")


def load_workers(path: Path) -> dict[str, PublicKeyHex]:
    """The worker id -> public key file of a coordinator."""
    workers = EnrolledKeys.load(path).root
    if not workers:
        raise ValueError(f"{path} names no worker")
    return dict(workers)


def serve_worker(args: argparse.Namespace, key: DeviceKey, artifacts: ArtifactStore) -> int:
    """Serve as an aggregator worker until SIGINT/SIGTERM; 0."""
    config = EngineConfig(fleet=args.fleet, seed=args.seed)
    engine = WorkerEngine(config, artifacts, DeviceRegistry(max_devices=args.max_devices))
    coordinator_key = read_public_key(args.coordinator_key, "--coordinator-key")
    if not args.broker:
        raise ValueError("--worker-of needs --broker: the coordinator's broker")
    service = WorkerService(engine, parse_broker(args.broker), args.aggregator_id, args.worker_of, coordinator_key, key,
                            max_message_bytes=args.max_message_bytes,
                            signatures=SignatureCheck(EnrolledKeys.load(args.enrolled).root) if args.enrolled else None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("aggregator worker %s of %s (session %s): sharing the uplink of fleet %s", args.aggregator_id,
             args.worker_of, engine.session[:8], args.fleet)
    with contextlib.suppress(KeyboardInterrupt):
        service.run(stop)
    return 0
