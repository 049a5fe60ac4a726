"""Claiming a task, and the lease it is held by.

**Claim**: compare-and-set the task to ``running`` as attempt n+1
(:func:`vigil.transitions.claim`, which states the rules). A task whose previous attempt
is still ``running`` lost its executor (the server redelivered it after the ack wait):
that attempt is recorded as ``lost``. Lost attempts do not spend ``max_attempts`` (the
node failed, not the agent); after ``max_lost_attempts`` of them (an executor setting)
the task is ``dead``: a crash loop, or a task that kills nodes.

The lease's arithmetic (:class:`LeaseClock`) and the delivery rules are pure and
unit-tested on their own (see docs/decisions/0007 for why deliveries are judged at all).
The claim reads and writes the task's state and settles the messages it has no use for;
what else a delivery comes to (a task finished already, cancelled, dead of a crash loop,
a poison message) it returns as a decision for :mod:`vigil_executor.attempt` to carry out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import structlog
from nats.aio.msg import Msg

from vigil import transitions
from vigil.errors import VigilError
from vigil.jetstream import TaskStore
from vigil.messages import LimitName, TaskState, WorkItem, utcnow
from vigil_executor.retry import IMAGE_MISSING_MAX_DELAY_S
from vigil_executor.settings import ExecutorSettings

log = structlog.get_logger("vigil.executor")

# A redelivery this close to its retry_at runs now: server timers and clocks are not exact.
EARLY_TOLERANCE_S = 0.25


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
    status: transitions.Ending
    exit_code: int | None
    error: str | None
    # Set for the agent's own failures (non-zero exit, OOM kill), which may be retried:
    # the short cause the ``retrying`` event names, e.g. "agent exited with code 3".
    retryable_cause: str | None = None
    # The attempt failed and the task is ``dead`` with it, and why (its checkpoint would
    # not restore, delivery after delivery: ``unrestorable``): final, not retried.
    dead: transitions.DeathCause | None = None
    # A resource limit the agent crossed (it was stopped for it), and the peak measured.
    limit: LimitName | None = None
    peak: float | None = None


class RestoreGaveUp(VigilError):
    """The task's checkpoint would not restore on this delivery, nor on the ones before:
    the task is dead rather than started from an empty workspace (ADR 8)."""

    retryable = False


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


class LeaseClock:
    """When to renew a task's lease and when to give it up: arithmetic on a monotonic
    clock, kept apart from the heartbeat's I/O (:class:`vigil_executor.lease.Lease`; ADR 7).

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


def retry_not_due(state: TaskState, now: datetime) -> float:
    """Seconds until a ``scheduled`` task's ``retry_at`` (0 when due or unset). Capped by
    the longest delay the policy can ask for, so a node whose clock runs behind the one
    that set it cannot hold the task back for long."""
    if state.status != "scheduled" or state.retry_at is None:
        return 0.0
    left = (state.retry_at - now).total_seconds()
    if left <= EARLY_TOLERANCE_S:
        return 0.0
    policy = (state.spec.retry if state.spec else None) or transitions.DEFAULT_POLICY
    return min(left, max(policy.backoff_max_s, IMAGE_MISSING_MAX_DELAY_S))


# The claim -------------------------------------------------------------------------------

Confess = Callable[..., Awaitable[None]]
"""``Hold.confess``: (severity, category, summary, *, hint, task_id, tenant, attempt,
confession_id)."""


@dataclass(frozen=True)
class Claimed:
    """The task is this attempt's: ``state`` (running) was written at ``revision``."""

    state: TaskState
    revision: int


@dataclass(frozen=True)
class Poison:
    """The work message can never run (its task is unknown): terminate it, confess."""

    why: str


@dataclass(frozen=True)
class Terminal:
    """The task ended already: say so again (its ``finished`` event), ack the message."""

    state: TaskState


@dataclass(frozen=True)
class CancelUnrun:
    """Cancelled while its executor was gone: finish the cancel, run nothing."""

    state: TaskState
    revision: int


@dataclass(frozen=True)
class CrashLoop:
    """Its attempts kept losing their executors: claiming it once more buries it
    (:func:`vigil.transitions.claim`); ``state`` is as read, at ``revision``."""

    state: TaskState
    revision: int


Claim = Claimed | Poison | Terminal | CancelUnrun | CrashLoop | None
"""What a delivery came to; None when there is nothing more to do (the message was
acked or naked, or is not this delivery's to touch)."""


async def claim(store: TaskStore, conf: ExecutorSettings, msg: Msg, work: WorkItem,
                confess: Confess) -> Claim:
    """Move the task to ``running`` as attempt n+1, or say what else to do."""
    fresh = await claim_fresh(store, conf.node_id, msg, work)
    if fresh is not None:
        return fresh
    for _ in range(10):
        got = await store.get(work.tenant, work.task_id)
        if got is None:
            return Poison(f"work item for unknown task {work.task_id}")
        state, rev = got
        meta = msg.metadata
        if state.terminal:
            log.info("duplicate_delivery", status=state.status)
            return Terminal(state)
        verdict = transitions.delivery_verdict(state, meta.sequence.stream, meta.num_delivered)
        if verdict == "duplicate":
            log.info("duplicate_work_item", held_by=state.work_seq)
            await msg.ack()
            return None
        if verdict == "stale":
            log.warning("stale_delivery", delivery=meta.num_delivered, held=state.delivery,
                        holder=state.executor)
            return None
        if state.cancel_requested_at is not None:
            return CancelUnrun(state, rev)
        now = utcnow()
        if early := retry_not_due(state, now):
            # Redelivered before its backoff was over (the executor that set it died
            # before its nak arrived, and the ack wait was shorter): wait out the rest.
            log.info("retry_not_due", retry_at=str(state.retry_at), wait_s=round(early, 3))
            await msg.nak(delay=early)
            return None
        step = transitions.claim(state, node=conf.node_id, now=now,
                                 work_seq=meta.sequence.stream, delivery=meta.num_delivered,
                                 max_lost_attempts=conf.max_lost_attempts)
        if step.state.status == "dead":
            return CrashLoop(state, rev)
        if state.status == "running":
            # The previous attempt's executor stopped renewing its lease: it is gone.
            await confess(
                "warning", "lost_heartbeat",
                f"attempt {state.attempt} of task {state.id} lost its executor "
                f"{state.executor}; running attempt {state.attempt + 1} here",
                task_id=state.id, tenant=state.tenant, attempt=state.attempt,
                confession_id=f"{state.key}-a{state.attempt}-lost",
            )
        new_rev = await store.cas(step.state, rev)
        if new_rev is not None:
            return Claimed(step.state, new_rev)
    raise HandBack("could not claim the task: its state kept changing", delay_s=1.0)


async def claim_fresh(store: TaskStore, node: str, msg: Msg, work: WorkItem
                      ) -> Claimed | None:
    """The common case in one round trip: a first delivery of a task nobody touched
    since it was scheduled. CAS on the revision the work item carries; on any
    mismatch the caller reads the state and decides."""
    if work.revision <= 0 or msg.metadata.num_delivered != 1:
        return None
    running = transitions.claim_first(work, node, utcnow(), msg.metadata.sequence.stream)
    rev = await store.cas(running, work.revision)
    if rev is None:
        return None
    return Claimed(running, rev)
