"""Per-token rate limiting: a token bucket per caller, refilled continuously.

A caller may burst up to ``burst`` requests, then ``rate`` per second. Over the limit the
answer is 429 with ``Retry-After`` (whole seconds, rounded up) saying when one request
will be allowed again. Buckets are keyed by token digest (or client address when auth is
off); the table is bounded, dropping the longest-idle callers first (a dropped caller
simply starts with a full bucket again).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

MAX_CALLERS = 10_000


@dataclass
class Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, rate: float, burst: int, max_callers: int = MAX_CALLERS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_callers = max_callers
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, caller: str, now: float) -> float:
        """Spend one request of ``caller``: 0.0 if allowed, else seconds until it would be."""
        if not self.enabled:
            return 0.0
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = Bucket(tokens=float(self.burst), at=now)
            self._buckets[caller] = bucket
            if len(self._buckets) > self.max_callers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(caller)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


def retry_after(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))
