"""Device registry: who has announced itself, with which tier and data, and who is online.

The service loop owns it and is its only writer. Which ids it holds is also kept in a small
lock-guarded set (`knows`), so paho's network thread can ask whether a sender is known (to give
it reassembly and inbox room) without reading the loop's live dict.

When full (`max_devices`, for unenrolled fleets where anyone may announce devices), a new device
evicts the longest-unseen device that never trained and is not waiting on a task it was given;
with none such, the new device is refused (RegistryFull).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field


@dataclass
class DeviceInfo:
    """What the aggregator knows about one device."""

    device_id: str
    num_samples: int
    num_test_samples: int
    requested_tier: str | None
    backend: str
    online: bool
    last_seen: float
    holds: dict[str, int] = field(default_factory=dict)  # tier -> model version whose weights the device holds
    seconds_per_sample: dict[str, float] = field(default_factory=dict)  # tier -> training speed, announced or measured
    # Participation record, for client sampling (aggregator.strategies.sampling):
    tasks_asked: int = 0
    tasks_answered: int = 0
    missed_in_a_row: int = 0
    last_asked_round: int = 0
    last_loss: float | None = None  # training loss of the device's last update
    session: str | None = None  # Hello.session of the running agent: its Status messages must carry it
    hello_sent_at: float | None = None  # when its registered hello was sent (an older one is a replay)
    status_sent_at: float | None = None  # when the last status applied was sent (one not newer is a replay)
    awaiting_task: bool = False  # given a task it has neither answered nor missed yet: never evicted meanwhile


class RegistryFull(ValueError):
    """A new device cannot be registered: the registry holds its maximum and none of them may be evicted."""


class DeviceRegistry:
    """Devices by id, updated from hello, status and every message they send."""

    def __init__(self, max_devices: int = 10_000) -> None:
        self.max_devices = max_devices  # beyond it, a new device evicts the longest-unseen one that never trained
        self._devices: dict[str, DeviceInfo] = {}
        self._ids: set[str] = set()  # the keys of _devices, for other threads (`knows`)
        self._ids_lock = threading.Lock()
        self.online_count = 0  # devices whose last word was online: kept as they change, read in O(1)
        self._moved: set[str] = set()  # devices awaiting an answer whose hello announced other holdings (take_moved)

    def __contains__(self, device_id: str) -> bool:
        return device_id in self._devices

    def knows(self, device_id: str) -> bool:
        """Whether the device is registered; safe to call from any thread."""
        with self._ids_lock:
            return device_id in self._ids

    def get(self, device_id: str) -> DeviceInfo | None:
        """The device's record, or None if it never said hello."""
        return self._devices.get(device_id)

    def hello(
        self, device_id: str, num_samples: int, num_test_samples: int, tier: str | None, backend: str, now: float,
        holds: Mapping[str, int] | None = None, seconds_per_sample: Mapping[str, float] | None = None,
        session: str | None = None, sent_at: float | None = None,
    ) -> DeviceInfo:
        """Register or refresh a device from its hello; RegistryFull when a new one finds no room."""
        if device_id not in self._devices and len(self._devices) >= self.max_devices:
            self._evict_one()
        info = DeviceInfo(device_id, num_samples, num_test_samples, tier, backend, online=True, last_seen=now,
                          holds=dict(holds or {}), seconds_per_sample=dict(seconds_per_sample or {}),
                          session=session, hello_sent_at=sent_at)
        old = self._devices.get(device_id)
        self.online_count += 1 - int(old is not None and old.online)
        if old and old.awaiting_task and old.holds != info.holds:
            self._moved.add(device_id)
        if old:  # a reconnect keeps the participation record
            info.tasks_asked, info.tasks_answered, info.missed_in_a_row = old.tasks_asked, old.tasks_answered, old.missed_in_a_row
            info.last_asked_round, info.last_loss = old.last_asked_round, old.last_loss
            info.awaiting_task, info.status_sent_at = old.awaiting_task, old.status_sent_at
        else:
            with self._ids_lock:
                self._ids.add(device_id)
        self._devices[device_id] = info
        return info

    def take_moved(self) -> set[str]:
        """The devices that, while awaiting the answer to a task, said hello holding other versions than before
        (since the last call); the set is emptied."""
        moved, self._moved = self._moved, set()
        return moved

    def _evict_one(self) -> None:
        """Make room: forget the longest-unseen device that never trained and awaits no task; RegistryFull if none."""
        idle = [d for d in self._devices.values() if d.tasks_answered == 0 and not d.awaiting_task]
        if not idle:
            raise RegistryFull(f"the registry holds {self.max_devices} devices, each of which has trained or awaits "
                               "the answer to a task (raise --max-devices)")
        evicted = min(idle, key=lambda d: d.last_seen).device_id
        self.online_count -= int(self._devices[evicted].online)
        del self._devices[evicted]
        with self._ids_lock:
            self._ids.discard(evicted)

    def __len__(self) -> int:
        return len(self._devices)

    def asked(self, device_id: str, round_number: int) -> None:
        """Note that the device was given a task in `round_number`."""
        if info := self._devices.get(device_id):
            info.tasks_asked += 1
            info.last_asked_round = round_number
            info.awaiting_task = True

    def answered(self, device_id: str, train_loss: float | None) -> None:
        """Note that the device answered its task, with this training loss."""
        if info := self._devices.get(device_id):
            info.tasks_answered += 1
            info.missed_in_a_row = 0
            info.awaiting_task = False
            if train_loss is not None and train_loss == train_loss:  # NaN is no ranking
                info.last_loss = train_loss

    def missed(self, device_id: str) -> None:
        """Note that the device let its task's deadline pass without an answer."""
        if info := self._devices.get(device_id):
            info.missed_in_a_row += 1
            info.awaiting_task = False

    def seen(self, device_id: str, now: float) -> None:
        """Note that the device just sent something."""
        if info := self._devices.get(device_id):
            self.online_count += int(not info.online)
            info.online, info.last_seen = True, now

    def holds(self, device_id: str, tier: str, version: int) -> None:
        """Note that the device holds the weights of `version` for `tier` (it just trained on them)."""
        if info := self._devices.get(device_id):
            info.holds[tier] = version

    def measured_speed(self, device_id: str, tier: str, seconds_per_sample: float) -> None:
        """Record how fast the device just trained `tier` (seconds per training sample)."""
        if (info := self._devices.get(device_id)) and seconds_per_sample > 0:
            info.seconds_per_sample[tier] = seconds_per_sample

    def set_online(self, device_id: str, online: bool, now: float, sent_at: float | None = None) -> None:
        """Apply a retained status message (offline is the device's last will), sent at `sent_at`."""
        if info := self._devices.get(device_id):
            self.online_count += int(online) - int(info.online)
            info.online = online
            if sent_at is not None:
                info.status_sent_at = sent_at
            if online:
                info.last_seen = now

    def iter_devices(self) -> Iterator[DeviceInfo]:
        """Every device that announced itself, in no order (no sort, no copy: do not change the registry meanwhile)."""
        return iter(self._devices.values())

    def devices(self) -> list[DeviceInfo]:
        """Every device that announced itself, sorted by id."""
        return sorted(self._devices.values(), key=lambda d: d.device_id)

    def available(self) -> list[DeviceInfo]:
        """Online devices, sorted by id (so seeded sampling is reproducible).

        Online is the device's last word: its retained hello, until the broker publishes its last will. A device
        that stays connected but silent (never drawn, or between tasks) stays available however long that lasts;
        one that stops answering its tasks is benched by the sampling strategy instead."""
        return sorted((d for d in self._devices.values() if d.online), key=lambda d: d.device_id)
