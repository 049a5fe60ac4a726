"""The rules of claiming a task, as pure functions: who may run it, and what counts.

Kept apart from the attempt's I/O so that each rule is unit-tested on its own (see
docs/decisions/0007 for why deliveries are judged at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from vigil.messages import TaskState, WorkItem


class HandBack(Exception):
    """Give the task back to the queue without spending an attempt."""

    def __init__(self, reason: str, delay_s: float = 0.0, *, kind: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s
        self.kind = kind  # a short, bounded label for metrics (the reason may name an image)


class LeaseLost(Exception):
    """Another attempt owns the task now; this one must record nothing."""


@dataclass
class Outcome:
    status: str
    exit_code: int | None
    error: str | None
    # Set for the agent's own failures (non-zero exit, OOM kill), which may be retried:
    # the short cause the ``retrying`` event names, e.g. "agent exited with code 3".
    retryable_cause: str | None = None


def first_running_state(work: WorkItem, node: str, now: datetime, work_seq: int = 0
                        ) -> TaskState:
    """The state of attempt 1, built from the work item alone (see WorkItem.revision)."""
    return TaskState(
        id=work.task_id, tenant=work.tenant, status="running", attempt=1, executor=node,
        created_at=work.submitted_at, updated_at=now, started_at=now, spec=work.spec,
        submit_seq=work.submit_seq, work_seq=work_seq, delivery=1,
    )


def judge_delivery(state: TaskState, work_seq: int, delivery: int) -> str:
    """What a delivery of work message ``work_seq`` may do to a non-terminal task.

    - ``claim``: the task is free (scheduled), or its holder lost the lease: the server
      redelivered *this* message, so this delivery is newer than the holder's;
    - ``duplicate``: another work message for the same task (a re-published item): ack it
      away, the task is held by its own message;
    - ``stale``: an older delivery of the held message, arriving late (it sat in a frozen
      executor's buffer): touch nothing, not even the message, whose lease is the holder's.
    """
    if state.work_seq and work_seq != state.work_seq:
        return "duplicate"
    if delivery <= state.delivery:
        return "stale"
    return "claim"


def may_hand_back(state: TaskState | None, work_seq: int, delivery: int) -> bool:
    """Whether delivery ``delivery`` of work message ``work_seq`` may still nak it.

    JetStream takes a nak from any delivery, even one whose lease lapsed long ago (ADR 7):
    a nak from an attempt that lost the task redelivers the message under its new holder's
    feet. So only the newest delivery the task's state knows of may nak: False once a
    newer delivery of the same message claimed the task. A state that is gone, or held by
    another message (this one is a duplicate), leaves the nak harmless.
    """
    if state is None or state.work_seq != work_seq:
        return True
    return delivery >= state.delivery


def spent_attempts(state: TaskState) -> int:
    """Attempts that count against ``max_attempts``: the agent's own failures (``failed``)
    since the task's newest operator redrive. Lost attempts (the node died), hand-backs
    (drain, a missing image, Podman trouble) are the platform's problem, not the agent's."""
    return sum(1 for h in state.history
               if h.outcome == "failed" and h.attempt > state.budget_from)


def lost_attempts(state: TaskState) -> int:
    """Attempts whose executor vanished (``lost``) since the newest operator redrive, in
    total, not only consecutive ones: a task that kills every node it lands on is a crash
    loop even if a drain or a failure comes in between. Bounded by the executor's
    ``max_lost_attempts``."""
    return sum(1 for h in state.history
               if h.outcome == "lost" and h.attempt > state.budget_from)
