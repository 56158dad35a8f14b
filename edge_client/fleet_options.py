"""How a device reaches its fleet: the options `tierfl client` and `tierfl bench --broker` share.

A light module on purpose (no MQTT client, no ONNX Runtime): `tierfl bench` keeps its parent
process small, because its children's peak memory starts at the parent's.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from protocol.chunking import DEFAULT_MAX_MESSAGE_BYTES
from protocol.mqtt.url import BrokerAddress
from protocol.mqtt.url import parse as parse_broker
from protocol.signing import read_public_key

BROKER_HELP = ("mqtt://[user:pass@]host[:port] of the fleet's broker, or mqtts://...[?ca=FILE] for TLS "
               "(see tierfl broker-config)")


def add_fleet_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, broker_help: str = "") -> None:
    """--broker, --device-id and --fleet: where the device connects and who it is."""
    parser.add_argument("--broker", help=BROKER_HELP + broker_help)
    parser.add_argument("--device-id", default=socket.gethostname().split(".")[0],
                        help="unique id of this device: letters, digits, _ . - (default: the host name)")
    parser.add_argument("--fleet", default="default", help="fleet name, the topic namespace (default: %(default)s)")


def add_cache_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--cache-dir: the device's artifact cache, which also holds its key and the pinned aggregator key."""
    parser.add_argument("--cache-dir", type=Path, help="the device's folder: artifact cache, keys, error-feedback "
                        "residuals and its own personal layers (--personal-layers of the aggregator), kept across restarts "
                        "(default: ~/.cache/tierfl/FLEET/DEVICE)")


def add_message_size_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--max-message-bytes: the chunk size of large frames."""
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="frames larger than this travel in chunks, reassembled and checked against the frame's "
                             "sha256 (default: %(default)s)")


def add_aggregator_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--aggregator-id and --aggregator-key: whose frames the device acts on."""
    parser.add_argument("--aggregator-id", default="aggregator",
                        help="accept tasks only from this sender (default: %(default)s)")
    parser.add_argument("--aggregator-key", metavar="HEX|FILE",
                        help="the aggregator's Ed25519 public key (`tierfl aggregator --show-key`: its JSON in a file, "
                             "or the bare hex): every task, blob, reject and secure-aggregation message must be signed "
                             "by it (default: pin the key the aggregator announces first in the cache dir, "
                             "aggregator.pub, trust on first use, with a warning)")


def default_cache_dir(args: argparse.Namespace) -> Path:
    """--cache-dir, or ~/.cache/tierfl/FLEET/DEVICE."""
    return args.cache_dir or Path.home() / ".cache" / "tierfl" / args.fleet / args.device_id


class FleetAccess(BaseModel):
    """The checked options of `add_fleet_arguments` and the rest: everything needed to reach the fleet as this device."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    broker: BrokerAddress
    device_id: str
    fleet: str
    aggregator_id: str
    aggregator_key: str | None  # 64 hex digits, or None: the key pinned in the cache dir (trust on first use)
    cache_dir: Path
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=4096)

    @classmethod
    def from_args(cls, args: argparse.Namespace, broker: str) -> FleetAccess:
        """The access the parsed options describe, at `broker` (a URL); ValueError on a bad URL or key."""
        return cls(broker=parse_broker(broker), device_id=args.device_id, fleet=args.fleet,
                   aggregator_id=args.aggregator_id,
                   aggregator_key=read_public_key(args.aggregator_key) if args.aggregator_key else None,
                   cache_dir=default_cache_dir(args), max_message_bytes=args.max_message_bytes)
