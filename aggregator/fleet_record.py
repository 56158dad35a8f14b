"""The fleet's system heterogeneity as the aggregator itself sees it, for `tierfl report`: STATE_DIR/fleet.json.

Sampled from the device registry every SAMPLE_S seconds and whenever a query finishes (by the
analytics desk, so while the status server runs): per device its tier, announced samples, training
speed per tier (seconds per sample: announced by its benchmark, or measured from its updates),
training tasks asked and answered, analytics queries asked and answered, and availability: the
fraction of samples, since the device was first seen, in which it was online. Nothing a device computed on its data is here.
The file is rewritten atomically; a restart continues the counts it finds.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from aggregator.registry import DeviceRegistry
from protocol.atomic_file import atomic_write

log = logging.getLogger(__name__)
SAMPLE_S = 5.0
FLEET_FILE = "fleet.json"
MAX_KEPT = 10_000  # devices sampled into the file; past it, rows of devices the registry forgot go


class DeviceRecord(BaseModel):
    """One device's row of fleet.json."""

    model_config = ConfigDict(extra="forbid")

    tier: str | None = None
    samples: int = 0
    seconds_per_sample: dict[str, float] = {}
    tasks_asked: int = 0
    tasks_answered: int = 0
    queries_asked: int = 0
    queries_answered: int = 0
    seen_samples: int = 0  # registry samples since the device was first seen
    online_samples: int = 0  # of those, how many found it online


class FleetFile(BaseModel):
    """fleet.json."""

    model_config = ConfigDict(extra="forbid")

    sampled_at: float = 0.0
    devices: dict[str, DeviceRecord] = {}


class FleetRecord:
    """Keeps STATE_DIR/fleet.json from the registry and the desk's query counts."""

    def __init__(self, registry: DeviceRegistry, folder: Path | None) -> None:
        self.registry = registry
        self.path = folder / FLEET_FILE if folder is not None else None
        self.file = FleetFile()
        if self.path is not None and self.path.exists():
            try:
                self.file = FleetFile.model_validate_json(self.path.read_bytes())
            except ValueError as exc:
                log.warning("%s does not read (%s): starting the fleet record anew", self.path, str(exc)[:200])
        self._last = -math.inf  # the first call samples

    def _row(self, device: str) -> DeviceRecord:
        return self.file.devices.setdefault(device, DeviceRecord())

    def query(self, asked: list[str], answered: list[str]) -> None:
        """Count one query's asked and answering devices."""
        for device in asked:
            self._row(device).queries_asked += 1
        for device in answered:
            self._row(device).queries_answered += 1

    def sample(self, now: float, force: bool = False) -> None:
        """Take the registry in (at most every SAMPLE_S unless `force`) and rewrite the file."""
        if not force and now - self._last < SAMPLE_S:
            return
        self._last = now
        online = {d.device_id for d in self.registry.available()}
        devices = self.registry.devices()[:MAX_KEPT]
        if len(self.file.devices) > MAX_KEPT:  # devices come and go: keep the rows of those the registry holds
            known = {info.device_id for info in devices}
            self.file.devices = {name: row for name, row in self.file.devices.items() if name in known}
        for info in devices:
            row = self._row(info.device_id)
            row.tier = (max(info.holds, key=info.holds.__getitem__) if info.holds else info.requested_tier) or row.tier
            row.samples = info.num_samples
            row.seconds_per_sample = dict(info.seconds_per_sample) or row.seconds_per_sample
            row.tasks_asked, row.tasks_answered = info.tasks_asked, info.tasks_answered
            row.seen_samples += 1
            row.online_samples += info.device_id in online
        self.file.sampled_at = now
        if self.path is not None:
            data = self.file.model_dump_json().encode()
            atomic_write(self.path, lambda f: f.write(data))


def read_fleet(folder: Path) -> FleetFile | None:
    """STATE_DIR/fleet.json, None when absent or unreadable."""
    path = folder / FLEET_FILE
    try:
        return FleetFile.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None


def read_results(folder: Path, results_file: str) -> list[dict[str, object]]:
    """The analytics results in STATE_DIR/analytics.jsonl, oldest first (lines that do not parse skipped)."""
    path = folder / results_file
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out
