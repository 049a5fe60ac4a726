"""When a failed attempt is tried again, and after how long: pure functions.

Only the agent's own failures (a non-zero exit, an out-of-memory kill) spend the task's
``max_attempts``; a task that spends a budget of more than one attempt is ``dead`` (it
kept failing), one that fails its only attempt or a non-retryable exit is ``failed``.
See docs/decisions/0009-retries.md for the whole rule table. The timer
is not here: the executor naks the work message with the delay and JetStream redelivers
it (durably, on any node) when the delay is over.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from vigil.messages import RetryPolicy

DEFAULT_POLICY = RetryPolicy()

# A node without the task's image hands it back, growing the wait with each delivery:
# another node may have the image, and a registry outage should not be hammered.
IMAGE_MISSING_DELAY_S = 5.0
IMAGE_MISSING_MAX_DELAY_S = 60.0

Uniform = Callable[[float, float], float]


def backoff_delay(policy: RetryPolicy, n: int, uniform: Uniform = random.uniform) -> float:
    """Seconds before the ``n``-th retry (1-based):
    ``min(backoff_max_s, backoff_s * 2**(n-1)) * (1 + uniform(-jitter, +jitter))``.

    Jitter spreads the retries of a burst of failures (a bad deploy failing a thousand
    tasks at once) so that they do not all come back in the same second.
    """
    if n < 1:
        raise ValueError(f"retries are numbered from 1, not {n}")
    # 2.0 ** ... stays a float: no huge integers for a large n, and the cap applies.
    base = min(policy.backoff_max_s, policy.backoff_s * 2.0 ** min(n - 1, 1_000))
    spread = uniform(-policy.jitter, policy.jitter) if policy.jitter else 0.0
    return max(0.0, base * (1.0 + spread))


@dataclass(frozen=True)
class Verdict:
    """What to do after an agent failure: retry after ``delay_s``, or end the task.

    ``why`` completes a sentence that starts with the failure ("agent exited with code
    3"): for a retry "(attempt 1 of 3); retrying in 2.1s", the ``retrying`` event's
    reason; otherwise why the task ends, appended to its error. ``dead`` when the
    failures spent a budget of several attempts: the task kept failing, and DESIGN.md
    calls such a task ``dead`` (evidence kept, a confession, redrivable), not ``failed``.
    """

    retry: bool
    why: str
    delay_s: float = 0.0
    dead: bool = False


def after_failure(policy: RetryPolicy | None, *, exit_code: int | None, failures: int,
                  max_attempts: int, uniform: Uniform = random.uniform) -> Verdict:
    """Decide for an agent failure; ``failures`` counts it and the earlier ones that spent
    the budget (see :func:`vigil_executor.claim.spent_attempts`)."""
    policy = policy or DEFAULT_POLICY
    if exit_code is not None and exit_code in policy.non_retryable_exit_codes:
        return Verdict(False, f"exit code {exit_code} is not retryable")
    if failures >= max_attempts:
        # One attempt allowed and failed is a plain failure: the task did not "keep
        # failing", it failed once, as it was told it may.
        return Verdict(False, f"{failures} of {max_attempts} attempts failed",
                       dead=max_attempts > 1)
    delay = backoff_delay(policy, failures, uniform)
    return Verdict(True, f"(attempt {failures} of {max_attempts}); retrying in {delay:.1f}s",
                   delay)


def image_missing_delay(delivery: int) -> float:
    """Hand-back delay for a node missing the image: 5 s, 10 s, 20 s, 40 s, then 60 s,
    by the work message's delivery count (which the server keeps, not this node)."""
    doublings = min(max(delivery, 1) - 1, 16)
    return min(IMAGE_MISSING_MAX_DELAY_S, IMAGE_MISSING_DELAY_S * 2.0 ** doublings)
