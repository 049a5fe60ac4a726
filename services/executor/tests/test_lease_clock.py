"""Unit tests: when the heartbeat renews a lease and when it gives the lease up."""

from __future__ import annotations

import pytest

from vigil_executor.claim import LeaseClock

pytestmark = pytest.mark.unit

ACK_WAIT, BEAT = 3.0, 1.0  # the tightest pair the settings allow: heartbeat = ack wait / 3


def test_renewals_keep_a_fixed_cadence() -> None:
    clock = LeaseClock(ACK_WAIT, BEAT, start=0.0)
    assert clock.wake_at() == 1.0
    clock.advance(1.0)
    clock.renewed(1.0)
    assert clock.due == 2.0 and clock.deadline == 3.5 and clock.wake_at() == 2.0
    # A renewal that took most of a heartbeat does not push the next one back.
    clock.advance(2.0)
    clock.renewed(2.0)
    assert clock.due == 3.0


def test_one_failed_renewal_does_not_lose_the_lease() -> None:
    clock = LeaseClock(ACK_WAIT, BEAT, start=0.0)
    clock.advance(1.0)
    clock.renewed(1.0)  # confirmed
    clock.advance(2.0)  # this one fails, after waiting as long as it may
    assert clock.renewal_timeout(2.0) == BEAT
    # The next is due at 3.0, before the give-up point (1.0 + 3.0 - 0.5): no late tick.
    assert clock.wake_at() == 3.0 and not clock.expired(3.0) and not clock.late(3.0)
    clock.advance(3.0)
    assert clock.renewal_timeout(3.0) == 0.5  # never waits past the give-up point
    clock.renewed(3.0)
    assert clock.deadline == 5.5


def test_two_failed_renewals_give_the_lease_up_before_the_server_does() -> None:
    clock = LeaseClock(ACK_WAIT, BEAT, start=0.0)
    clock.advance(1.0)
    clock.renewed(1.0)
    clock.advance(2.0)
    clock.advance(3.0)  # both fail
    # Given up half a heartbeat before the server's ack wait runs out (at 1.0 + 3.0 at
    # the earliest: it received the renewal after we sent it).
    assert clock.wake_at() == 3.5 and clock.expired(3.5) and not clock.expired(3.49)


def test_a_late_tick_is_noticed_and_the_cadence_restarts() -> None:
    clock = LeaseClock(30.0, 5.0, start=0.0)
    assert not clock.late(9.9)  # within a heartbeat of its due time (5.0)
    assert clock.late(10.1)  # a whole tick missed: the process was asleep
    assert not clock.expired(10.1)  # but the lease is still ours until 27.5
    clock.advance(10.1)
    assert clock.due == pytest.approx(15.1)
    assert clock.expired(27.5)


@pytest.mark.parametrize(("ack_wait", "beat"), [(3.0, 1.0), (30.0, 5.0), (2.0, 0.5)])
def test_any_allowed_pair_survives_one_failure(ack_wait: float, beat: float) -> None:
    """Whatever the settings allow (heartbeat <= ack wait / 3), the renewal after a failed
    one comes at least half a heartbeat before the give-up point."""
    clock = LeaseClock(ack_wait, beat, start=0.0)
    clock.advance(beat)
    clock.renewed(beat)
    clock.advance(2 * beat)  # fails
    retry_at = clock.wake_at()
    assert retry_at == 3 * beat and clock.deadline - retry_at >= beat / 2
