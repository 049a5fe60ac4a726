"""Unit tests: backoff with jitter, the retry verdict, and which attempts spend the budget."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from vigil.messages import AttemptRecord, RetryPolicy, TaskState
from vigil.transitions import after_failure, backoff_delay, lost_attempts, spent_attempts
from vigil_executor.claim import may_hand_back
from vigil_executor.retry import image_missing_delay

pytestmark = pytest.mark.unit

NOW = datetime(2024, 1, 1, tzinfo=UTC)


def low(a: float, b: float) -> float:
    return a


def high(a: float, b: float) -> float:
    return b


def mid(a: float, b: float) -> float:
    return (a + b) / 2


def test_backoff_doubles_and_is_capped() -> None:
    policy = RetryPolicy(backoff_s=1.5, backoff_max_s=10, jitter=0)
    assert [backoff_delay(policy, n) for n in range(1, 6)] == [1.5, 3.0, 6.0, 10.0, 10.0]
    assert backoff_delay(policy, 100) == 10.0  # no overflow, the cap holds


def test_jitter_spreads_by_the_fraction_either_way() -> None:
    policy = RetryPolicy(backoff_s=2, backoff_max_s=300, jitter=0.25)
    assert backoff_delay(policy, 1, low) == pytest.approx(1.5)
    assert backoff_delay(policy, 1, mid) == pytest.approx(2.0)
    assert backoff_delay(policy, 1, high) == pytest.approx(2.5)
    assert backoff_delay(policy, 3, high) == pytest.approx(10.0)  # 2 * 2**2 * 1.25
    # The jitter applies after the cap: capped retries still do not come back in lockstep.
    capped = RetryPolicy(backoff_s=10, backoff_max_s=20, jitter=0.5)
    assert backoff_delay(capped, 5, low) == pytest.approx(10.0)
    assert backoff_delay(capped, 5, high) == pytest.approx(30.0)


def test_jitter_is_asked_for_the_policy_range() -> None:
    asked: list[tuple[float, float]] = []

    def uniform(a: float, b: float) -> float:
        asked.append((a, b))
        return 0.0

    assert backoff_delay(RetryPolicy(jitter=0.2), 2, uniform) == 2.0
    assert asked == [(-0.2, 0.2)]


def test_backoff_defaults_and_zero() -> None:
    assert backoff_delay(RetryPolicy(), 1, mid) == 1.0
    assert backoff_delay(RetryPolicy(backoff_s=0), 7, high) == 0.0
    with pytest.raises(ValueError, match="from 1"):
        backoff_delay(RetryPolicy(), 0)


def test_real_random_stays_within_bounds() -> None:
    policy = RetryPolicy(backoff_s=1, jitter=0.2)
    delays = [backoff_delay(policy, 2) for _ in range(200)]
    assert all(1.6 <= d <= 2.4 for d in delays)
    assert len(set(delays)) > 1


def test_verdict_retries_while_attempts_are_left() -> None:
    policy = RetryPolicy(backoff_s=2, jitter=0)
    first = after_failure(policy, exit_code=3, failures=1, max_attempts=3)
    assert first.retry and first.delay_s == 2.0
    assert first.why == "(attempt 1 of 3); retrying in 2.0s"
    second = after_failure(policy, exit_code=3, failures=2, max_attempts=3)
    assert second.retry and second.delay_s == 4.0
    last = after_failure(policy, exit_code=3, failures=3, max_attempts=3)
    assert not last.retry and last.why == "3 of 3 attempts failed"
    assert last.dead  # it kept failing: dead, with its evidence


def test_a_single_attempt_or_a_non_retryable_exit_fails_rather_than_dies() -> None:
    policy = RetryPolicy(non_retryable_exit_codes=[2])
    only = after_failure(policy, exit_code=1, failures=1, max_attempts=1)
    assert not only.retry and not only.dead and only.why == "1 of 1 attempts failed"
    usage = after_failure(policy, exit_code=2, failures=3, max_attempts=3)
    assert not usage.retry and not usage.dead


def test_non_retryable_exit_code_ends_at_once() -> None:
    policy = RetryPolicy(non_retryable_exit_codes=[2, 64])
    verdict = after_failure(policy, exit_code=2, failures=1, max_attempts=5)
    assert not verdict.retry and not verdict.dead
    assert verdict.why == "exit code 2 is not retryable"
    assert after_failure(policy, exit_code=3, failures=1, max_attempts=5, uniform=mid).retry


def test_no_policy_means_the_default_policy() -> None:
    verdict = after_failure(None, exit_code=1, failures=1, max_attempts=3, uniform=mid)
    assert verdict.retry and verdict.delay_s == RetryPolicy().backoff_s


def test_image_missing_delay_grows_by_delivery_and_is_capped() -> None:
    assert [image_missing_delay(d) for d in (1, 2, 3, 4, 5, 6, 50)] == [
        5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    assert image_missing_delay(0) == 5.0


def state_with(outcomes: list[str], budget_from: int = 0) -> TaskState:
    history = [AttemptRecord(attempt=i + 1, outcome=o) for i, o in enumerate(outcomes)]
    return TaskState(id="t", tenant="acme", status="scheduled", created_at=NOW, updated_at=NOW,
                     attempt=len(outcomes), history=history, budget_from=budget_from)


def test_only_agent_failures_spend_the_budget() -> None:
    state = state_with(["lost", "handed_back", "failed", "lost", "failed", "handed_back"])
    assert spent_attempts(state) == 2
    assert lost_attempts(state) == 2


def test_a_redrive_resets_both_counts() -> None:
    state = state_with(["failed", "lost", "failed", "dead", "lost", "failed"], budget_from=4)
    assert spent_attempts(state) == 1
    assert lost_attempts(state) == 1


def test_only_the_newest_delivery_may_hand_the_message_back() -> None:
    held = TaskState(id="t", tenant="acme", status="running", created_at=NOW, updated_at=NOW,
                     work_seq=5, delivery=2)
    assert may_hand_back(held, 5, 2)  # the holder itself
    assert may_hand_back(held, 5, 3)  # newer than the state knows (it never claimed)
    assert not may_hand_back(held, 5, 1)  # a newer delivery holds it: a nak would steal it
    assert may_hand_back(held, 9, 1)  # another message for the task: a duplicate
    assert may_hand_back(None, 5, 1)
