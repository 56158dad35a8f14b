"""MQTT topic scheme: everything of one fleet lives under `tierfl/v1/{fleet}/`.

    up/{device}      device -> aggregator: fetch, update          (QoS 1)
    down/{device}    aggregator -> device: task, blob, reject     (QoS 1)
    status/{device}  retained: the device's hello while online, Status(offline) as its last will
    rounds           aggregator -> observers: one summary per committed round (retained)
    workers/{worker}/up      aggregator worker -> coordinator: claims, partial sums, forwarded frames (QoS 1)
    workers/{worker}/down    coordinator -> aggregator worker: grants, flush requests (QoS 1)
    workers/{worker}/status  retained: the worker's Status, offline as its last will
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "tierfl/v1"
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_id(value: str, what: str) -> str:
    """Return `value` if it is a valid fleet or device id, else raise ValueError naming `what`."""
    if not _ID.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ . -")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names of one fleet."""

    fleet: str

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet")

    @property
    def base(self) -> str:
        return f"{PREFIX}/{self.fleet}"

    def up(self, device: str) -> str:
        return f"{self.base}/up/{check_id(device, 'device id')}"

    def down(self, device: str) -> str:
        return f"{self.base}/down/{check_id(device, 'device id')}"

    def status(self, device: str) -> str:
        return f"{self.base}/status/{check_id(device, 'device id')}"

    @property
    def rounds(self) -> str:
        return f"{self.base}/rounds"

    def all_up(self, share_group: str | None = None) -> str:
        """Wildcard for every device's uplink; with a share group, a shared subscription."""
        topic = f"{self.base}/up/+"
        return f"$share/{share_group}/{topic}" if share_group else topic

    def worker(self, worker: str, direction: str) -> str:
        """An aggregator worker's topic: "up" (to its coordinator), "down" (from it) or "status" (its liveness)."""
        if direction not in ("up", "down", "status"):
            raise ValueError(f"no worker topic {direction!r}")
        return f"{self.base}/workers/{check_id(worker, 'worker id')}/{direction}"

    def all_workers(self, direction: str) -> str:
        """Wildcard for every worker's `direction` topic."""
        return f"{self.base}/workers/+/{direction}"

    def worker_of(self, topic: str) -> tuple[str, str] | None:
        """(worker id, direction) of a worker topic of this fleet, or None."""
        parts = topic.split("/")
        if len(parts) != 6 or "/".join(parts[:3]) != self.base or parts[3] != "workers" or parts[5] not in ("up", "down", "status"):
            return None
        return (parts[4], parts[5]) if _ID.fullmatch(parts[4]) else None

    @property
    def all_status(self) -> str:
        return f"{self.base}/status/+"

    def device_of(self, topic: str) -> str | None:
        """The device id at the end of an up/down/status topic of this fleet, or None."""
        parts = topic.split("/")
        if len(parts) != 5 or "/".join(parts[:3]) != self.base or parts[3] not in ("up", "down", "status"):
            return None
        return parts[4] if _ID.fullmatch(parts[4]) else None
