"""The device loop's inbox: what paho's network thread hands over, bounded in bytes and items.

The network thread puts (checked, decoded downlink frames, and a note of each connect); the device
loop takes them one at a time, in arrival order. One device has one downlink topic, so there is
one FIFO (the aggregator's inbox shares its room among many senders). When the inbox is full the
network thread waits a little for the loop (back-pressure on the broker's TCP stream), then drops
the item; drops are counted for the loop to report. An empty inbox takes any one item, so a frame
larger than the byte bound still gets through alone. `wake` ends the loop's current wait early.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

DEFAULT_MAX_BYTES = 160 << 20  # queued frame bytes: two frames of the largest size the link takes, and some to spare
DEFAULT_MAX_ITEMS = 1024  # queued items
T = TypeVar("T")


class Inbox(Generic[T]):
    """A FIFO between one putting thread and one taking thread, within byte and item budgets."""

    def __init__(self, size: Callable[[T], int], max_bytes: int = DEFAULT_MAX_BYTES,
                 max_items: int = DEFAULT_MAX_ITEMS, wait_s: float = 0.5) -> None:
        """`size(item)`: the bytes an item counts for."""
        self.size = size
        self.max_bytes, self.max_items, self.wait_s = max_bytes, max_items, wait_s
        self._items: collections.deque[tuple[T, int]] = collections.deque()
        self._bytes = 0
        self._dropped = 0
        self._woken = False
        self._closed = False
        self._changed = threading.Condition()

    def put(self, item: T) -> bool:
        """Queue `item`, waiting up to `wait_s` for room; False (dropped) when there was none or the inbox is closed."""
        size = self.size(item)
        with self._changed:
            if self._closed:
                return False
            if not self._changed.wait_for(lambda: self._closed or self._fits(size), timeout=self.wait_s) or self._closed:
                self._dropped += 0 if self._closed else 1
                return False
            self._items.append((item, size))
            self._bytes += size
            self._changed.notify_all()
            return True

    def get(self, timeout: float) -> T | None:
        """The oldest item, waiting up to `timeout` seconds; None when none came or `wake` was called."""
        with self._changed:
            self._changed.wait_for(lambda: bool(self._items) or self._woken, timeout=timeout)
            self._woken = False
            if not self._items:
                return None
            item, size = self._items.popleft()
            self._bytes -= size
            self._changed.notify_all()
            return item

    def wake(self) -> None:
        """End the taking thread's current (or next) wait in `get`."""
        with self._changed:
            self._woken = True
            self._changed.notify_all()

    def close(self) -> None:
        """Take nothing more: later puts are dropped at once, uncounted (the loop has stopped)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def take_dropped(self) -> int:
        """Items dropped for want of room since the last call."""
        with self._changed:
            dropped, self._dropped = self._dropped, 0
        return dropped

    def __len__(self) -> int:
        with self._changed:
            return len(self._items)

    def _fits(self, size: int) -> bool:
        return not self._items or (self._bytes + size <= self.max_bytes and len(self._items) < self.max_items)
