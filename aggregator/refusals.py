"""Bounded reactions to refusals: log lines once per sender and reason per interval, replies at a rate per sender.

A hostile sender can make the aggregator refuse thousands of messages a second; each is still
counted (metrics, ledger), but it writes one log line per (sender, reason) per interval, the next
one saying how many were left out, and gets at most a few Reject messages back per minute.
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


class RateLimiter:
    """At most `limit` events per key in any `period_s` (a token bucket refilled continuously)."""

    def __init__(self, limit: int, period_s: float) -> None:
        self.limit, self.period_s = limit, period_s
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()  # key -> tokens, at

    def allow(self, key: str, now: float) -> bool:
        """Take one token for `key` if it has one."""
        tokens, at = self._buckets.get(key, (float(self.limit), now))
        tokens = min(float(self.limit), tokens + (now - at) * self.limit / self.period_s)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)
        return allowed
