"""How long a node missing the task's image waits before handing it back again.

Whether a failed attempt is tried again, after how long, and when a task that keeps
failing is ``dead`` are the task state machine's rules (:func:`vigil.transitions.after_failure`,
:func:`vigil.transitions.backoff_delay`); docs/decisions/0009-retries.md has the table. The
timer is not here either: the executor naks the work message with the delay and JetStream
redelivers it (durably, on any node) when the delay is over.
"""

from __future__ import annotations

# A node without the task's image hands it back, growing the wait with each delivery:
# another node may have the image, and a registry outage should not be hammered.
IMAGE_MISSING_DELAY_S = 5.0
IMAGE_MISSING_MAX_DELAY_S = 60.0


def image_missing_delay(delivery: int) -> float:
    """Hand-back delay for a node missing the image: 5 s, 10 s, 20 s, 40 s, then 60 s,
    by the work message's delivery count (which the server keeps, not this node)."""
    doublings = min(max(delivery, 1) - 1, 16)
    return min(IMAGE_MISSING_MAX_DELAY_S, IMAGE_MISSING_DELAY_S * 2.0 ** doublings)
