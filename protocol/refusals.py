"""Bounded logging of refusals, for both roles: one line per sender and reason per interval, with a count.

A hostile sender can make a process refuse thousands of messages a second; each is still counted,
but only the first of each (sender, reason) in an interval gets a log line, and the next line says
how many were left out.
"""

from __future__ import annotations

import collections

from protocol.messages import RejectReason

MAX_TRACKED = 10_000  # (sender, reason) pairs remembered; the oldest are forgotten first


class RefusalLog:
    """Decides which refusals get a log line: the first of each (sender, reason) per `interval_s`."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._windows: collections.OrderedDict[tuple[str | None, RejectReason], list[float | int]] = collections.OrderedDict()

    def should_log(self, sender: str | None, reason: RejectReason, now: float) -> bool:
        """True for the first refusal of its kind in the interval; the rest are counted for `suppressed`."""
        key = (sender, reason)
        window = self._windows.get(key)
        if window is not None and now - window[0] < self.interval_s:
            window[1] += 1
            return False
        self._windows[key] = [now, window[1] if window else 0]
        self._windows.move_to_end(key)
        while len(self._windows) > MAX_TRACKED:
            self._windows.popitem(last=False)
        return True

    def suppressed(self, sender: str | None, reason: RejectReason) -> int:
        """How many refusals of this kind went unlogged before the one being logged now (and resets the count)."""
        window = self._windows.get((sender, reason))
        if window is None:
            return 0
        count, window[1] = int(window[1]), 0
        return count
