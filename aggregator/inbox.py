"""The service's inbox: what paho's network thread hands over, bounded in bytes and items, fair across topics.

One topic is one sender (`up/ID`, `status/ID`), so a device flooding its own topics fills only its
own share, and the service loop takes one item from each waiting topic in turn: an honest device's
update waits behind at most one item of each other busy topic, never behind a flood's backlog.
When the whole inbox is full the network thread waits a little for the service loop
(back-pressure on the broker's TCP stream), then drops. Every drop is counted per topic and
reported to the service loop, which counts it as `rate_limited`.

Admission (`admit`, the service's: topics of devices it knows): a topic that is not admitted when
it starts queueing is a guest. Many guest topics, each within its own share, can fill the whole
inbox (invented senders, one small frame each); then an admitted topic's item does not wait
behind them or get dropped: the newest guest items give way to it, newest topic first, each
counted as a drop of its topic. Guests never displace anything, so they compete only among
themselves (a new device's first hello is a guest).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from protocol.frame import FrameError

DEFAULT_MAX_BYTES = 256 << 20  # queued frame bytes, all senders
DEFAULT_MAX_TOPIC_BYTES = 80 << 20  # queued frame bytes of one topic: a whole update and some to spare
DEFAULT_MAX_ITEMS = 100_000  # queued messages, all senders (a refusal costs about 200 bytes)
DEFAULT_MAX_TOPIC_ITEMS = 10_000  # queued messages of one topic
Item = tuple[str, bytes | FrameError]


class Inbox:
    """Per-topic FIFOs of (topic, frame bytes or FrameError), served round-robin, within byte and count budgets."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_topic_bytes: int = DEFAULT_MAX_TOPIC_BYTES,
                 max_items: int = DEFAULT_MAX_ITEMS, wait_s: float = 0.5,
                 max_topic_items: int = DEFAULT_MAX_TOPIC_ITEMS, admit: Callable[[str], bool] | None = None) -> None:
        """`admit(topic)` (called on the putting thread, outside the inbox's lock): whether the topic may displace
        guests' items when the inbox is full; None admits every topic (nothing is displaced)."""
        self.max_bytes, self.max_topic_bytes, self.max_items, self.wait_s = max_bytes, max_topic_bytes, max_items, wait_s
        self.max_topic_items = max_topic_items
        self.admit = admit
        self._queues: collections.OrderedDict[str, collections.deque[bytes | FrameError]] = collections.OrderedDict()
        self._guests: collections.OrderedDict[str, None] = collections.OrderedDict()  # queued unadmitted topics, by arrival
        self._items = 0
        self._bytes = 0
        self._topic_bytes: collections.Counter[str] = collections.Counter()
        self._dropped: collections.Counter[str] = collections.Counter()
        self._changed = threading.Condition()

    def put(self, topic: str, item: bytes | FrameError) -> None:
        """Queue one item (network thread); drop it if its topic's share is used up or the inbox stays full."""
        size = _size(item)
        admitted = self.admit is None or self.admit(topic)
        with self._changed:
            queue = self._queues.get(topic)
            if self._topic_bytes[topic] + size > self.max_topic_bytes or (queue and len(queue) >= self.max_topic_items):
                self._dropped[topic] += 1
                return
            if admitted:
                self._guests.pop(topic, None)  # admitted now: its queued items are no longer a guest's
                while not self._fits(size) and self._guests:
                    self._drop_newest_guest_item()
            if not self._changed.wait_for(lambda: self._fits(size), timeout=self.wait_s):
                self._dropped[topic] += 1
                return
            if topic not in self._queues:  # a topic not yet waiting joins the end of the rotation
                self._queues[topic] = collections.deque()
                if not admitted:
                    self._guests[topic] = None
            self._queues[topic].append(item)
            self._items += 1
            self._bytes += size
            self._topic_bytes[topic] += size
            self._changed.notify_all()

    def get(self, timeout: float) -> Item | None:
        """The oldest item of the next waiting topic in turn, waiting up to `timeout` seconds (service loop)."""
        with self._changed:
            if not self._changed.wait_for(lambda: bool(self._items), timeout=timeout):
                return None
            topic, queue = next(iter(self._queues.items()))
            item = queue.popleft()
            if queue:
                self._queues.move_to_end(topic)  # the others go first
            else:
                del self._queues[topic]
                self._guests.pop(topic, None)
            self._forget(topic, item)
            self._changed.notify_all()
            return topic, item

    def take_dropped(self) -> dict[str, int]:
        """Items dropped per topic since the last call."""
        with self._changed:
            dropped, self._dropped = dict(self._dropped), collections.Counter()
        return dropped

    def __len__(self) -> int:
        with self._changed:
            return self._items

    def _fits(self, size: int) -> bool:
        return self._bytes + size <= self.max_bytes and self._items < self.max_items

    def _drop_newest_guest_item(self) -> None:
        """Drop the newest item of the guest topic that joined last (the lock is held)."""
        topic = next(reversed(self._guests))
        queue = self._queues[topic]
        item = queue.pop()
        if not queue:
            del self._queues[topic]
            del self._guests[topic]
        self._forget(topic, item)
        self._dropped[topic] += 1

    def _forget(self, topic: str, item: bytes | FrameError) -> None:
        """Take an item that left the queues off the counters (the lock is held)."""
        size = _size(item)
        self._items -= 1
        self._bytes -= size
        self._topic_bytes[topic] -= size
        if not self._topic_bytes[topic]:
            del self._topic_bytes[topic]


def _size(item: bytes | FrameError) -> int:
    return len(item) if isinstance(item, (bytes, bytearray)) else 256
