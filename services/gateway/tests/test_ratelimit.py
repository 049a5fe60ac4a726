"""Unit tests of the per-token rate limiter (a token bucket)."""

from __future__ import annotations

import pytest

from vigil_gateway.ratelimit import RateLimiter, retry_after

pytestmark = pytest.mark.unit


def test_burst_then_rate_then_refill() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("a", 0.0)
    assert wait == pytest.approx(0.5)
    assert retry_after(wait) == "1"
    assert limiter.take("a", 0.5) == 0.0  # one token came back after 1/rate seconds
    assert limiter.take("b", 0.5) == 0.0  # callers are separate


def test_disabled_and_bounded() -> None:
    assert RateLimiter(rate=0, burst=1).take("a", 0.0) == 0.0
    limiter = RateLimiter(rate=1.0, burst=1, max_callers=2)
    limiter.take("a", 0.0)
    limiter.take("b", 0.0)
    limiter.take("c", 0.0)  # evicts the idlest caller, "a", which starts afresh
    assert limiter.take("a", 0.0) == 0.0
