"""Timer arithmetic (pure logic): a sum never raises, whatever a stored spec holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from vigil_scheduler.timers import LATEST, later

pytestmark = pytest.mark.unit


def test_timer_sums_saturate_instead_of_overflowing() -> None:
    end = datetime(9999, 12, 31, tzinfo=UTC)
    assert later(end, 30 * 86_400) == LATEST
    assert later(end, 1e300) == LATEST
    start = datetime(2026, 12, 1, tzinfo=UTC)
    assert later(start, 60) == start + timedelta(seconds=60)
