"""`tierfl relay` (old name: `tierfl edge-aggregator`): aggregate a local group of devices and forward one update upstream."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.relay import FollowTask, RelayEngine
from aggregator.options import add_integrity_arguments
from aggregator.registry import DeviceRegistry
from aggregator.relay_service import RelayService
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.sampling import UniformSampler
from aggregator.strategies.tiering import TIER_POLICIES, make_tier_policy, parse_tier_mix
from protocol.chunking import DEFAULT_MAX_MESSAGE_BYTES
from protocol.mqtt.url import parse as parse_broker
from protocol.signing import DeviceKey, read_public_key
from protocol.trust import AggregatorTrust

log = logging.getLogger(__name__)

EPILOG = """examples:
  # a site gateway: devices on the site's own broker, fleet "site1"; the root aggregator elsewhere
  tierfl relay --parent mqtt://root.example:1883 --parent-fleet lab --id site1 \\
      --broker mqtt://127.0.0.1:1883 --fleet site1 --artifacts /srv/tierfl/artifacts

  # same broker, own topic prefix (fleet) for the group:
  tierfl relay --parent mqtt://10.0.0.1:1883 --parent-fleet lab --id site1 --fleet lab-site1 \\
      --artifacts artifacts/

Devices of the group run `tierfl client --broker LOCAL --fleet LOCAL_FLEET --aggregator-id ID`.
--artifacts must be a copy of the parent's export (tierfl export, or the parent's STATE_DIR/artifacts).
`tierfl edge-aggregator` is the old name of this command and still runs it.
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `tierfl relay` options to `parser`."""
    parser.description = (
        "Run a relay, the middle tier of hierarchical FL: to the parent aggregator it is one device that asks for "
        "tier --tier; each task it gets becomes a local round for its own group of devices (on --broker/--fleet), "
        "whose updates it averages per element and forwards as one update with its contributors' samples per "
        "tier, so the parent computes exactly what flat aggregation over every device would."
    )
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    up = parser.add_argument_group("parent")
    up.add_argument("--parent", required=True, help="mqtt://... of the parent aggregator's broker")
    up.add_argument("--parent-fleet", default="default", help="the parent's fleet name (default: %(default)s)")
    up.add_argument("--parent-id", default="aggregator", help="sender id of the parent aggregator (default: %(default)s)")
    up.add_argument("--id", dest="relay_id", required=True, help="this relay's id: its device id to the parent and its aggregator id to the group")
    up.add_argument("--parent-key", metavar="HEX|FILE",
                    help="the parent aggregator's Ed25519 public key (its `tierfl aggregator --show-key`, the JSON in a "
                         "file or the bare hex): every task and reject from the parent must be signed by it (default: "
                         "pin the key the parent announces first in STATE_DIR/parent/aggregator.pub, trust on first "
                         "use, with a warning)")
    up.add_argument("--show-key", action="store_true",
                    help="print this relay's Ed25519 public key as JSON ({ID: HEX}; the key is STATE_DIR/device.key, "
                         "made on first use) and exit: add it to the parent's --enrolled file")
    up.add_argument("--tier", default="a", help="tier to ask the parent for: the widest of the group's tiers (default: %(default)s)")
    down = parser.add_argument_group("local group")
    down.add_argument("--broker", help="mqtt://... of the group's broker (default: the parent's broker)")
    down.add_argument("--fleet", required=True, help="the group's fleet name (topic prefix); must differ from the parent's on a shared broker")
    down.add_argument("--artifacts", type=Path, required=True, help="a copy of the parent's export folder, served to the group's devices")
    # runs/edge: the default since the command was `tierfl edge-aggregator`; kept so a relay keeps its key and pins
    down.add_argument("--state-dir", type=Path, default=Path("runs/edge"), help="this relay's state directory (default: %(default)s)")
    down.add_argument("--fraction", type=float, default=1.0, help="C: fraction of the group's available devices per task (default: %(default)s)")
    down.add_argument("--tier-policy", choices=TIER_POLICIES, default="fixed", help="tiers of the group's devices, as for `tierfl aggregator` (default: %(default)s)")
    down.add_argument("--tier-mix", help="tier shares of the group, e.g. c-e (default: every exported tier no wider than --tier)")
    down.add_argument("--margin", type=float, default=3.0, help="seconds before the parent's deadline at which the local round closes (default: %(default)s)")
    down.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES, help="chunk size on both brokers (default: %(default)s)")
    down.add_argument("--seed", type=int, default=0, help="seed of the group's sampling and tiers (default: %(default)s)")
    add_integrity_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (or, with --show-key, print the relay's public key)."""
    if args.show_key:
        print(json.dumps({args.relay_id: DeviceKey(args.state_dir).public_hex}))
        return 0
    artifacts = ArtifactStore(args.artifacts)
    if args.tier not in artifacts.tiers:
        raise ValueError(f"--tier {args.tier} is not in {args.artifacts} (have: {', '.join(artifacts.tiers)})")
    if args.fleet == args.parent_fleet and (args.broker or args.parent) == args.parent:
        raise ValueError("--fleet must differ from --parent-fleet when the group shares the parent's broker")
    widest = artifacts.tiers[args.tier].manifest.rate
    local_tiers = [t for t, a in artifacts.tiers.items() if a.manifest.rate <= widest]
    mix = parse_tier_mix(args.tier_mix or "-".join(local_tiers))
    if wider := sorted(set(mix) - set(local_tiers)):
        raise ValueError(f"--tier-mix names tiers {', '.join(wider)} wider than --tier {args.tier} or not exported")
    policy = make_tier_policy(args.tier_policy, mix, artifacts.macs, 1, 60.0, args.seed)
    strategy = FollowTask(tiers=policy, seed=args.seed, sampler=UniformSampler(args.fraction, 1, args.seed))
    config = EngineConfig(fleet=args.fleet, seed=args.seed, outlier_multiple=args.outlier_multiple, max_share=args.max_share)
    engine = RelayEngine(EngineParts(config, strategy, artifacts, StateStore(args.state_dir), DeviceRegistry()),
                         margin_s=args.margin)
    try:
        key: DeviceKey | None = DeviceKey(args.state_dir)
    except ImportError:
        key = None
    parent_key = read_public_key(args.parent_key, "--parent-key") if args.parent_key else None
    if key is None and parent_key is not None:
        raise ValueError("verifying --parent-key needs the cryptography package (pip install 'tierfl[signing]')")
    trust = AggregatorTrust(args.state_dir / "parent", parent_key, option="--parent-key") if key else None
    service = RelayService(engine, parse_broker(args.broker or args.parent), parse_broker(args.parent), args.relay_id,
                           args.parent_fleet, args.parent_id, args.tier, key, parent_trust=trust,
                           max_message_bytes=args.max_message_bytes)
    stop = threading.Event()

    def on_signal(number: int, frame: object) -> None:
        log.info("%s: stopping (telling %s we are offline)", signal.Signals(number).name, args.parent_id)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    service.run(stop)
    log.info("stopped after forwarding %d combined updates to %s", service.forwarded, args.parent_id)
    return 0
