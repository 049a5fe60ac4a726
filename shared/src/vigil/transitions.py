"""A task's life as one state machine: pure functions from (state, input) to a :class:`Step`,
the state to write (by compare-and-set, by the caller) and the events it emits.

Every service that moves a task calls these: the scheduler (admission, dispatch, timers,
cancel, redrive, dead letters), the executor (claim, start, hand back, retry, finish) and
the replay rebuild (:data:`STATUS_AFTER`). ``Finished`` events are built here only
(:func:`_finished`), and a task is declared ``dead`` here only (:func:`bury`, reached from
:func:`claim`, :func:`after_failure` and :func:`exhausted`). A transition that does not
apply to the task as it is raises :class:`Refused` and writes nothing.

========== ============================ ============================= ===================
transition from                         to                            events
========== ============================ ============================= ===================
admit      (new)                        queued                        accepted
refuse     (new) queued                 failed                        [rejected,] finished
schedule   queued                       scheduled                     scheduled
requeue    queued, scheduled (unrun)    queued                        -
claim      scheduled                    running (attempt + 1)         -
lose       running (holder gone)        running (attempt + 1)         -
           ... max_lost_attempts lost   dead                          finished
start      running (this attempt)       running                       started
hand back  running (this attempt)       scheduled (attempt not spent) retrying
retry      running (this attempt)       scheduled (attempt spent)     retrying
finish     running (this attempt)       succeeded failed timed_out    finished
                                        cancelled dead
time out   queued, scheduled (unrun)    timed_out                     finished
cancel     queued, scheduled            cancelled                     finished
           running                      running + cancel mark         cancelling
           running/scheduled + mark     cancelled (nothing runs)      finished
fail       queued, scheduled, running   failed (admission gave up)    finished
bury       queued, scheduled, running   dead                          finished
redrive    failed timed_out cancelled   scheduled (fresh budget)      retrying, scheduled
           dead
========== ============================ ============================= ===================

The rules, once:

- A terminal status never changes, except by **redrive** (an operator's fresh budget) and
  by a later submission taking over the id of a task **refused at admission** (it never
  ran: the later one is its retry, see ``TaskState.refused_at_admission``).
- **What an attempt costs**: only the agent's own failures spend ``max_attempts``
  (:func:`spent_attempts`); a lost attempt (its node died) or a hand-back (drain, missing
  image, NATS away) does not. Attempts never go down; each claim is attempt + 1.
- **When a task is dead**: its failures spent a budget of more than one attempt
  (:func:`after_failure`), or ``max_lost_attempts`` attempts lost their executor (a crash
  loop, :func:`claim`), or its work reached the server's max deliveries with no outcome
  (:func:`exhausted`), or its checkpoint can never be restored (the executor gives up).
- **A stale attempt never writes**: every attempt-scoped transition checks that the state
  is still ``running`` as that attempt (:func:`holds`), and a delivery older than the one
  the state records claims nothing (:func:`delivery_verdict`).

``docs/state-machine.md`` draws the same machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec

from vigil.errors import VigilError
from vigil.messages import (
    HISTORY_KEPT,
    Accepted,
    AttemptRecord,
    Cancelling,
    Event,
    Finished,
    LimitName,
    Rejected,
    Retrying,
    RetryPolicy,
    Scheduled,
    Started,
    Status,
    TaskState,
    WorkItem,
)

# Every transition and the statuses it moves a task between: the machine itself.
# ``NEXT`` (which statuses may follow which) is derived from it, and
# ``scripts/gen_state_machine_doc.py`` draws it into ``docs/state-machine.md``.
_ACTIVE = ("queued", "scheduled", "running")
EDGES: tuple[tuple[str, str, str], ...] = (
    ("admit", "new", "queued"),
    ("refuse", "queued", "failed"),
    ("schedule", "queued", "scheduled"),
    ("requeue", "queued", "queued"),
    ("requeue", "scheduled", "queued"),
    ("claim", "scheduled", "running"),
    ("lose", "running", "running"),
    ("start", "running", "running"),
    ("cancel", "running", "running"),
    ("hand back", "running", "scheduled"),
    ("retry", "running", "scheduled"),
    *(("finish", "running", end) for end in ("succeeded", "failed", "timed_out",
                                             "cancelled", "dead")),
    ("time out", "queued", "timed_out"),
    ("time out", "scheduled", "timed_out"),
    ("cancel", "queued", "cancelled"),
    ("cancel", "scheduled", "cancelled"),
    ("finish cancel", "scheduled", "cancelled"),
    ("finish cancel", "running", "cancelled"),
    *(("fail", status, "failed") for status in _ACTIVE),
    *(("bury", status, "dead") for status in _ACTIVE),
    *(("redrive", end, "scheduled") for end in ("failed", "timed_out", "cancelled", "dead")),
)
NEXT: Mapping[str, frozenset[str]] = {
    status: frozenset(to for _, frm, to in EDGES if frm == status)
    for status in ("queued", "scheduled", "running", "succeeded", "failed", "timed_out",
                   "cancelled", "dead")
}
REDRIVABLE: tuple[str, ...] = ("dead", "failed", "timed_out", "cancelled")
# The status each folded event leaves a task in (the replay rebuild's rule; ``finished``
# carries its own).
STATUS_AFTER: Mapping[str, str] = {"accepted": "queued", "scheduled": "scheduled",
                                   "started": "running", "retrying": "scheduled"}

DeathCause = Literal["kept_failing", "crash_loop", "max_deliveries", "unrestorable"]
LOST = "its executor stopped renewing the lease"
DEFAULT_POLICY = RetryPolicy()
Uniform = Callable[[float, float], float]


class Refused(VigilError):
    """The transition does not apply to the task as it is now (finished, another
    attempt's, or a status that may not come next): nothing is written."""


@dataclass(frozen=True)
class Step:
    """What a transition does: the state to write, then the events to publish."""

    state: TaskState
    events: tuple[Event, ...] = field(default=())

    @property
    def finished(self) -> Finished | None:
        return next((e for e in self.events if isinstance(e, Finished)), None)


def _move(state: TaskState, status: Status, now: datetime, **changes: Any) -> TaskState:
    if status not in NEXT[state.status]:
        raise Refused(f"task {state.id} is {state.status}; it cannot become {status}")
    return msgspec.structs.replace(state, status=status, updated_at=now, **changes)


def _finished(state: TaskState, *, duration_s: float | None = None,
              refusal: bool = False) -> Finished:
    """The one place a ``finished`` event is built: from the final state it announces.
    A refusal at admission also names the tenant and submission (no ``accepted`` event
    precedes it in the log)."""
    return Finished(
        task_id=state.id, attempt=state.attempt, time=state.finished_at or state.updated_at,
        status=state.status, exit_code=state.exit_code, error=state.error,
        executor=state.executor, limit=state.limit, peak=state.peak, duration_s=duration_s,
        tenant=state.tenant if refusal else None,
        submit_seq=state.submit_seq if refusal else 0,
    )


def _ended(state: TaskState, status: Status, now: datetime, error: str | None,
           **changes: Any) -> TaskState:
    return _move(state, status, now, error=error, finished_at=now, **changes)


# attempts: what they cost, and who holds the task -------------------------------------------
def spent_attempts(state: TaskState) -> int:
    """Attempts that count against ``max_attempts``: the agent's own failures (``failed``)
    since the task's newest operator redrive. Lost attempts (the node died) and hand-backs
    (drain, a missing image, Podman trouble) are the platform's problem, not the agent's.
    Neither are failures right after restoring a checkpoint the task then rolled back
    from: the checkpoint was at fault, and an older one must get its try however small
    the budget."""
    poisoned = set_aside(state)
    return sum(1 for h in state.history
               if h.outcome == "failed" and h.attempt > state.budget_from
               and (h.restored is None or h.restored not in poisoned))


def set_aside(state: TaskState) -> set[str]:
    """Checkpoints the task rolled back from since its newest operator redrive: the
    failures right after restoring them are refunded (see :func:`spent_attempts`)."""
    return {h.rolled_back_from for h in state.history
            if h.rolled_back_from is not None and h.attempt > state.budget_from}


def lost_attempts(state: TaskState) -> int:
    """Attempts whose executor vanished (``lost``) since the newest operator redrive, in
    total, not only consecutive ones: a task that kills every node it lands on is a crash
    loop even if a drain or a failure comes in between."""
    return sum(1 for h in state.history
               if h.outcome == "lost" and h.attempt > state.budget_from)


def holds(current: TaskState, mine: TaskState) -> bool:
    """Whether ``current`` is still the attempt ``mine`` describes (same attempt,
    executor, work message and delivery): only then may that attempt write."""
    return (current.status == "running" and current.attempt == mine.attempt
            and current.executor == mine.executor and current.work_seq == mine.work_seq
            and current.delivery == mine.delivery)


def _attempt_of(state: TaskState, attempt: int) -> None:
    if state.status != "running" or state.attempt != attempt:
        raise Refused(f"task {state.id} is {state.status} at attempt {state.attempt}; "
                      f"attempt {attempt} may not write it")


def delivery_verdict(state: TaskState, work_seq: int, delivery: int
                     ) -> Literal["claim", "duplicate", "stale"]:
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


# the scheduler's transitions ----------------------------------------------------------------
def admit(state: TaskState) -> Step:
    """A task admitted ``queued`` (admission built the state from the submission)."""
    if state.status != "queued":
        raise Refused(f"task {state.id} is {state.status}, not a new queued task")
    return Step(state, (accepted_event(state),))


def accepted_event(state: TaskState) -> Accepted:
    """The ``accepted`` event of an admitted task (sent again by a resumed admission: its
    id makes a second copy a no-op)."""
    return Accepted(task_id=state.id, time=state.created_at, tenant=state.tenant,
                    submit_seq=state.submit_seq)


def refuse(state: TaskState, error: str, *, limit: str) -> Step:
    """Admission refuses a valid task (a tenant ``limit``): ``failed`` at the moment it
    was submitted."""
    if state.status != "queued" or state.attempt:
        raise Refused(f"task {state.id} is {state.status}; only a new task is refused")
    failed = _move(state, "failed", state.updated_at, error=error,
                   finished_at=state.created_at, rejected_by=limit)
    return Step(failed, refusal_events(failed))


def refusal_events(state: TaskState) -> tuple[Event, ...]:
    """The events of a task refused at admission (again, for a resumed admission: their
    ids make a second copy a no-op)."""
    if not state.refused_at_admission:
        raise Refused(f"task {state.id} was not refused at admission")
    finished = _finished(state, refusal=True)
    if state.rejected_by is None:
        return (finished,)
    return (Rejected(task_id=state.id, time=state.updated_at, reason=state.error or "",
                     limit=state.rejected_by), finished)


def schedule(state: TaskState, now: datetime) -> Step:
    """``queued`` -> ``scheduled``: released to the pool's executors."""
    if state.status != "queued":
        raise Refused(f"task {state.id} is {state.status}, not queued")
    scheduled = _move(state, "scheduled", now, waiting=None)
    return Step(scheduled, (scheduled_event(scheduled),))


def scheduled_event(state: TaskState) -> Scheduled:
    """The ``scheduled`` event of ``state`` (sent again when a release is resumed)."""
    pool = state.spec.pool if state.spec is not None else "default"
    return Scheduled(task_id=state.id, attempt=state.attempt, time=state.updated_at, pool=pool)


def requeue(state: TaskState, now: datetime, waiting: str) -> Step:
    """Back to the queue before any executor claimed it (it needs labels the executors
    that were offered it lack)."""
    if state.status not in ("queued", "scheduled") or state.attempt:
        raise Refused(f"task {state.id} is {state.status} at attempt {state.attempt}; "
                      "only a task that never ran goes back to the queue")
    return Step(_move(state, "queued", now, requeued=state.requeued + 1, waiting=waiting))


def time_out(state: TaskState, now: datetime, error: str) -> Step:
    """Not started within its queue timeout."""
    if state.status not in ("queued", "scheduled") or state.attempt:
        raise Refused(f"task {state.id} is {state.status} at attempt {state.attempt}; "
                      "only a task that never started times out in the queue")
    final = _ended(state, "timed_out", now, error)
    return Step(final, (_finished(final),))


def fail(state: TaskState, now: datetime, error: str) -> Step:
    """A task whose admission was given up on (it must not sit queued forever)."""
    if state.terminal:
        raise Refused(f"task {state.id} is {state.status} already")
    final = _ended(state, "failed", now, error)
    return Step(final, (_finished(final),))


def cancel(state: TaskState, now: datetime, why: str) -> Step:
    """A user's cancel: a task not running ends ``cancelled`` now; a running one is marked,
    and its executor stops the agent and records the end (:func:`finish`)."""
    if state.terminal:
        raise Refused(f"task {state.id} is {state.status} already: too late to cancel")
    if state.status in ("queued", "scheduled"):
        final = _ended(state, "cancelled", now, why, cancel_requested_at=now,
                       cancel_reason=why)
        return Step(final, (_finished(final),))
    if state.cancel_requested_at is not None:
        return Step(state)  # asked already: the first request's reason stands
    marked = msgspec.structs.replace(state, cancel_requested_at=now, cancel_reason=why)
    return Step(marked, (Cancelling(task_id=state.id, attempt=state.attempt, time=now,
                                    reason=why),))


def redrive(state: TaskState, now: datetime, reason: str) -> Step:
    """An operator runs a finished task again with a fresh ``max_attempts`` budget."""
    if state.status not in REDRIVABLE:
        raise Refused(f"task {state.id} is {state.status}; only {', '.join(REDRIVABLE)} "
                      "tasks are redriven")
    if state.spec is None:
        raise Refused(f"task {state.id} has no valid spec (refused at admission); submit a "
                      "corrected task instead")
    again = _move(state, "scheduled", now, executor=None, exit_code=None, error=None,
                  finished_at=None, work_seq=0, delivery=0, redriven=state.redriven + 1,
                  budget_from=state.attempt, cancel_requested_at=None, cancel_reason=None,
                  retry_at=None, limit=None, peak=None)
    return Step(again, redriven_events(again, reason))


def redriven_events(state: TaskState, reason: str) -> tuple[Event, ...]:
    """A redrive's events (again, for a redrive resumed before its work item went out)."""
    return (Retrying(task_id=state.id, attempt=state.attempt, time=state.updated_at,
                     reason=reason), scheduled_event(state))


def exhausted(state: TaskState, now: datetime, *, deliveries: int, labels: Mapping[str, str],
              requeue_limit: int, tail: list[str] | None = None) -> Step:
    """The task's work message (needing node ``labels``) reached the server's max
    deliveries without an outcome. Never claimed and needing labels: the executors
    offered it lacked them, so it goes back to the queue (up to ``requeue_limit`` times).
    Otherwise it is ``dead``; ``tail`` is a running attempt's last output."""
    unclaimed = state.status == "scheduled" and state.attempt == 0 and bool(labels)
    wanted = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    if unclaimed and state.requeued < requeue_limit:
        return requeue(state, now, f"handed back {deliveries} times by executors without "
                       f"the labels {wanted}; queued again until an executor with them has "
                       "a free slot")
    error = (f"its work was delivered {deliveries} times without an outcome (the "
             "executors' max deliveries); it was not retried further")
    if unclaimed:
        error = (f"no executor with its node_labels {dict(labels)} claimed it: its work "
                 f"went back to the queue {state.requeued} times after {deliveries} "
                 "hand-backs each, while such an executor advertised a free slot; check "
                 "that executor's log")
    return bury(state, now, "max_deliveries", error,
                lost="no outcome: its work reached the max deliveries", tail=tail)


def bury(state: TaskState, now: datetime, cause: DeathCause, error: str, *,
         lost: str | None = None, tail: list[str] | None = None) -> Step:
    """The task is ``dead``: kept as evidence, redrivable, confessed by the caller. A
    running attempt whose executor is gone is recorded ``lost`` (with ``lost`` as why)."""
    if state.terminal:
        raise Refused(f"task {state.id} is {state.status} already")
    history = state.history
    if state.status == "running" and lost is not None:
        history = [*history, _lost_record(state, now, lost)]
    dead = _ended(state, "dead", now, error, history=history[-HISTORY_KEPT:],
                  tail=state.tail if tail is None else tail)
    return Step(dead, (_finished(dead),))


# the executor's transitions -----------------------------------------------------------------
def claim_first(work: WorkItem, node: str, now: datetime, work_seq: int = 0) -> TaskState:
    """Attempt 1's state, built from the work item alone: written by compare-and-set on the
    revision of the scheduled state the item carries (``WorkItem.revision``), so it
    applies only to that very state."""
    return TaskState(
        id=work.task_id, tenant=work.tenant, status="running", attempt=1, executor=node,
        created_at=work.submitted_at, updated_at=now, started_at=now, spec=work.spec,
        submit_seq=work.submit_seq, work_seq=work_seq, delivery=1,
        spec_digest=work.spec_digest,
    )


def claim(state: TaskState, *, node: str, now: datetime, work_seq: int, delivery: int,
          max_lost_attempts: int, tail: list[str] | None = None) -> Step:
    """Run the task here as attempt n + 1. A ``running`` task's holder stopped renewing
    its lease: that attempt is ``lost``, and the ``max_lost_attempts``-th loss buries the
    task (a crash loop) instead: check ``step.state.status``. ``tail`` is the lost
    attempt's output, kept as the dead task's evidence."""
    if state.terminal:
        raise Refused(f"task {state.id} is {state.status} already")
    if state.cancel_requested_at is not None:
        raise Refused(f"task {state.id} was cancelled: no new attempt starts")
    verdict = delivery_verdict(state, work_seq, delivery)
    if verdict != "claim":
        raise Refused(f"delivery {delivery} of work {work_seq} is {verdict} for task "
                      f"{state.id} (held by delivery {state.delivery} of {state.work_seq})")
    history = list(state.history)
    if state.status == "running":
        history.append(_lost_record(state, now, LOST))
        lost = msgspec.structs.replace(state, history=history)
        if lost_attempts(lost) >= max_lost_attempts:
            return bury(state, now, "crash_loop", (
                f"crash loop: {lost_attempts(lost)} attempts lost their executor (the last "
                f"on {state.executor}; max_lost_attempts is {max_lost_attempts}); the task "
                "may be killing the nodes it runs on"), lost=LOST, tail=tail)
    running = _move(state, "running", now, attempt=state.attempt + 1, executor=node,
                    started_at=now, exit_code=None, error=None, finished_at=None,
                    history=history[-HISTORY_KEPT:], limit=None, peak=None,
                    work_seq=work_seq, delivery=delivery, retry_at=None)
    return Step(running)


def start(state: TaskState, attempt: int, now: datetime, *, image: str,
          container: str | None, resumed: bool, limits_enforced: bool,
          resources: dict[str, dict[str, Any]]) -> Step:
    """The agent of ``attempt`` is running: the state does not change, the event says how."""
    _attempt_of(state, attempt)
    return Step(state, (Started(task_id=state.id, attempt=attempt, time=now,
                                executor=state.executor or "", image=image,
                                container=container, resumed=resumed,
                                limits_enforced=limits_enforced, resources=resources),))


def hand_back(state: TaskState, attempt: int, now: datetime, *, ran: Ran, reason: str,
              delay_s: float, tail: list[str]) -> Step:
    """Back to ``scheduled`` without spending an attempt (drain, missing image, NATS away).
    An attempt that printed nothing keeps the last run's output as the evidence."""
    _attempt_of(state, attempt)
    record = attempt_record(state, now, "handed_back", reason, ran)
    back = _move(state, "scheduled", now, executor=None,
                 history=[*state.history, record][-HISTORY_KEPT:], tail=tail or state.tail,
                 retry_at=now + timedelta(seconds=delay_s) if delay_s else None)
    return Step(back, (Retrying(task_id=state.id, attempt=attempt, time=now, reason=reason,
                                delay_s=delay_s),))


def retry(state: TaskState, attempt: int, now: datetime, *, ran: Ran, reason: str,
          delay_s: float, exit_code: int | None, error: str | None, tail: list[str],
          rolled_back_from: str | None = None) -> Step:
    """The agent failed and is tried again after ``delay_s`` (the attempt is spent). Its
    exit code and error stay visible until the next attempt starts. ``rolled_back_from``:
    the checkpoint the task gives up on with this retry (the caller moves the task's
    checkpoint back)."""
    _attempt_of(state, attempt)
    record = attempt_record(state, now, "failed", error, ran, rolled_back_from)
    again = _move(state, "scheduled", now, executor=None, exit_code=exit_code, error=error,
                  retry_at=now + timedelta(seconds=delay_s),
                  history=[*state.history, record][-HISTORY_KEPT:], tail=tail)
    return Step(again, (Retrying(task_id=state.id, attempt=attempt, time=now, reason=reason,
                                 delay_s=round(delay_s, 3), exit_code=exit_code, error=error),))


Ending = Literal["succeeded", "failed", "timed_out", "cancelled"]


def finish(state: TaskState, attempt: int, now: datetime, *, outcome: Ending,
           exit_code: int | None, error: str | None, ran: Ran,
           tail: list[str], dead: DeathCause | None = None, limit: LimitName | None = None,
           peak: float | None = None) -> Step:
    """Attempt ``attempt`` ended the task: its ``outcome``, or ``dead`` with ``dead`` as the
    cause (the attempt itself failed). A cancel's error is the reason the cancel gave."""
    _attempt_of(state, attempt)
    if outcome == "cancelled":
        error = state.cancel_reason or error
    record = attempt_record(state, now, outcome, error, ran)
    status: Status = "dead" if dead is not None else outcome
    final = _ended(state, status, now, error, exit_code=exit_code, limit=limit, peak=peak,
                   history=[*state.history, record][-HISTORY_KEPT:], tail=tail)
    duration = (now - (final.started_at or now)).total_seconds()
    return Step(final, (_finished(final, duration_s=duration),))


def finish_cancel(state: TaskState, now: datetime) -> Step:
    """A task cancelled while no attempt ran it (its executor was gone): ``cancelled``,
    nothing runs. A running attempt's executor is recorded ``lost``."""
    if state.cancel_requested_at is None or state.terminal:
        raise Refused(f"task {state.id} is {state.status} and not being cancelled")
    history = list(state.history)
    if state.status == "running":
        history.append(_lost_record(state, now, LOST))
    final = _ended(state, "cancelled", now, state.cancel_reason or "cancelled",
                   history=history[-HISTORY_KEPT:])
    return Step(final, (_finished(final),))


def finished_again(state: TaskState) -> Finished:
    """A finished task's ``finished`` event, built again from its state (an executor that
    died between recording the outcome and publishing it must not leave clients waiting)."""
    if not state.terminal:
        raise Refused(f"task {state.id} is {state.status}, not finished")
    duration = ((state.finished_at - state.started_at).total_seconds()
                if state.finished_at and state.started_at else None)
    return _finished(state, duration_s=duration)


# retries ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """What to do after an agent failure: retry after ``delay_s``, or end the task.

    ``why`` completes a sentence that starts with the failure ("agent exited with code
    3"): for a retry "(attempt 1 of 3); retrying in 2.1s", the ``retrying`` event's
    reason; otherwise why the task ends, appended to its error. ``dead`` when the task
    ends dead (see the module's rules), not ``failed``.
    """

    retry: bool
    why: str
    delay_s: float = 0.0
    dead: DeathCause | None = None


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


def after_failure(policy: RetryPolicy | None, *, exit_code: int | None, failures: int,
                  max_attempts: int, uniform: Uniform = random.uniform) -> Verdict:
    """Decide for an agent failure; ``failures`` counts it and the earlier ones that spent
    the budget (:func:`spent_attempts`). A task that spent a budget of more than one
    attempt kept failing: ``dead``. One attempt allowed and failed is a plain failure."""
    policy = policy or DEFAULT_POLICY
    if exit_code is not None and exit_code in policy.non_retryable_exit_codes:
        return Verdict(False, f"exit code {exit_code} is not retryable")
    if failures >= max_attempts:
        return Verdict(False, f"{failures} of {max_attempts} attempts failed",
                       dead="kept_failing" if max_attempts > 1 else None)
    delay = backoff_delay(policy, failures, uniform)
    return Verdict(True, f"(attempt {failures} of {max_attempts}); retrying in {delay:.1f}s",
                   delay)


@dataclass(frozen=True)
class Ran:
    """What an attempt did with the task's checkpoints, by object name: the one it
    restored its workspace from, the newest it saved, the one it could not restore."""

    restored: str | None = None
    saved: str | None = None
    restore_failed: str | None = None


def attempt_record(state: TaskState, now: datetime, outcome: str, error: str | None,
                   ran: Ran = Ran(), rolled_back_from: str | None = None) -> AttemptRecord:
    """The state's attempt as its history keeps it, however it ended."""
    return AttemptRecord(attempt=state.attempt, executor=state.executor,
                         started_at=state.started_at, ended_at=now, outcome=outcome,
                         error=error, restored=ran.restored, saved=ran.saved,
                         restore_failed=ran.restore_failed, rolled_back_from=rolled_back_from)


def _lost_record(state: TaskState, now: datetime, why: str) -> AttemptRecord:
    return attempt_record(state, now, "lost", why)
