"""Replies to refusals at a bounded rate per sender.

A hostile sender can make the aggregator refuse thousands of messages a second; each is still
counted (metrics, ledger) and logged once per sender and reason per interval
(protocol.refusals.RefusalLog, which devices use too), but it gets at most a few Reject messages
back per minute.
"""

from __future__ import annotations

import collections

from protocol.refusals import MAX_TRACKED


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
