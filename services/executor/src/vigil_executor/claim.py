"""The rules of claiming a task, as pure functions: who may run it, and what counts.

Kept apart from the attempt's I/O so that each rule is unit-tested on its own (see
docs/decisions/0007 for why deliveries are judged at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from vigil.errors import VigilError
from vigil.messages import LimitName, TaskState, WorkItem
from vigil_executor.checkpoint_rules import set_aside


class HandBack(VigilError):
    """Give the task back to the queue without spending an attempt: a passing trouble
    (retryable) of the node's or the platform's, never the task's."""

    retryable = True

    def __init__(self, reason: str, delay_s: float = 0.0, *, kind: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s
        self.kind = kind  # a short, bounded label for metrics (the reason may name an image)


class LeaseLost(VigilError):
    """Another attempt owns the task now; this one must record nothing (and retrying it
    here cannot help: the task is that attempt's)."""

    retryable = False


@dataclass
class Outcome:
    status: str
    exit_code: int | None
    error: str | None
    # Set for the agent's own failures (non-zero exit, OOM kill), which may be retried:
    # the short cause the ``retrying`` event names, e.g. "agent exited with code 3".
    retryable_cause: str | None = None
    # The attempt failed and the task is ``dead`` with it (its checkpoint would not
    # restore, delivery after delivery): final, not retried.
    dead: bool = False
    # A resource limit the agent crossed (it was stopped for it), and the peak measured.
    limit: LimitName | None = None
    peak: float | None = None


class RestoreGaveUp(VigilError):
    """The task's checkpoint would not restore on this delivery, nor on the ones before:
    the task is dead rather than started from an empty workspace (ADR 8)."""

    retryable = False


def first_running_state(work: WorkItem, node: str, now: datetime, work_seq: int = 0
                        ) -> TaskState:
    """The state of attempt 1, built from the work item alone (see WorkItem.revision)."""
    return TaskState(
        id=work.task_id, tenant=work.tenant, status="running", attempt=1, executor=node,
        created_at=work.submitted_at, updated_at=now, started_at=now, spec=work.spec,
        submit_seq=work.submit_seq, work_seq=work_seq, delivery=1,
        spec_digest=work.spec_digest,
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
    (drain, a missing image, Podman trouble) are the platform's problem, not the agent's.
    Neither are failures right after restoring a checkpoint the task then rolled back
    from: the checkpoint was at fault, and an older one must get its try however small
    the budget (checkpoint_rules.rollback)."""
    poisoned = set_aside(state)
    return sum(1 for h in state.history
               if h.outcome == "failed" and h.attempt > state.budget_from
               and (h.restored is None or h.restored not in poisoned))


def lost_attempts(state: TaskState) -> int:
    """Attempts whose executor vanished (``lost``) since the newest operator redrive, in
    total, not only consecutive ones: a task that kills every node it lands on is a crash
    loop even if a drain or a failure comes in between. Bounded by the executor's
    ``max_lost_attempts``."""
    return sum(1 for h in state.history
               if h.outcome == "lost" and h.attempt > state.budget_from)


class LeaseClock:
    """When to renew a task's lease and when to give it up: arithmetic on a monotonic
    clock, kept apart from the heartbeat's I/O (``Attempt._heartbeat``; ADR 7).

    - Renewals are due every ``heartbeat_s`` on a fixed cadence: a slow or failed renewal
      does not push the next one back. A tick more than a whole heartbeat late means the
      process was asleep (SIGSTOP, a stalled host): the caller reads the task's state
      before renewing anything.
    - The lease counts from the moment the newest renewal the server confirmed was *sent*
      (the server's timer started when it received it, a little later), or from the
      delivery. It is given up at ``ack_wait - heartbeat / 2`` without a newer one, so the
      agent is stopped before the server can hand the task to another node.
    - With ``heartbeat <= ack_wait / 3`` (the settings' rule) one failed renewal does not
      lose the lease: the next one is due two heartbeats after the last good one, half a
      heartbeat before the give-up point. Two in a row do.
    """

    def __init__(self, ack_wait_s: float, heartbeat_s: float, start: float) -> None:
        self.ack_wait_s = ack_wait_s
        self.heartbeat_s = heartbeat_s
        self.give_up_s = ack_wait_s - heartbeat_s / 2
        self.renewed_at = start
        self.due = start + heartbeat_s

    @property
    def deadline(self) -> float:
        """When the lease is given up unless a renewal is confirmed before."""
        return self.renewed_at + self.give_up_s

    def wake_at(self) -> float:
        return min(self.due, self.deadline)

    def lapsed(self, now: float) -> float:
        return now - self.renewed_at

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def late(self, now: float) -> bool:
        return now - self.due > self.heartbeat_s

    def is_due(self, now: float) -> bool:
        return now >= self.due

    def advance(self, now: float) -> None:
        """This tick's renewal is under way: the next is due a heartbeat after this one
        was (after now, when this tick was late)."""
        self.due = now + self.heartbeat_s if self.late(now) else self.due + self.heartbeat_s

    def renewal_timeout(self, now: float) -> float:
        """How long a renewal started ``now`` may wait for the server's confirmation: a
        heartbeat, and never past the give-up point."""
        return max(0.001, min(self.heartbeat_s, self.deadline - now))

    def renewed(self, sent_at: float) -> None:
        self.renewed_at = max(self.renewed_at, sent_at)
