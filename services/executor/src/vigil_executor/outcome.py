"""How an attempt ends, written down: every terminal state, retry and hand-back of a task
this executor runs, with the ``finished`` (or ``retrying``) event that says so.

- **Record** the outcome with compare-and-set on the revision this attempt last wrote, so a
  stale attempt (a frozen or partitioned executor) can never overwrite a newer one; ack
  the work message only after the outcome and every event are durable (:func:`record`).
- **Retry** an agent failure (non-zero exit, OOM kill) while ``max_attempts`` allows and
  the exit code is retryable (see :mod:`vigil_executor.retry`): the task goes back to
  ``scheduled`` (CAS) with the failed attempt in its history, its exit code and error
  still shown and ``retry_at`` set; a ``retrying`` event names the reason; the work
  message is naked with the backoff as its delay. JetStream's redelivery is the timer,
  durable and on any node; the redelivery claims attempt n+1 like any other.
  ``timed_out`` and ``cancelled`` are final, never retried (:func:`verdict`,
  :func:`schedule_retry`).
- **Dead**: the agent kept failing (its budget spent), its checkpoint would not restore
  (RestoreGaveUp), or its attempts kept losing their executors (:func:`dead`).
- The claim's other endings: a task found finished already says so again
  (:func:`finished_again`); one cancelled while its executor was gone is recorded
  cancelled without running (:func:`cancelled_unrun`).
- **Hand back** (drain, Podman trouble, image missing on this node): return the task to
  ``scheduled`` without spending an attempt, and nak the message (drain: without delay,
  once the stopped agent's workspace is snapshotted; a missing image: 5 s growing to
  60 s, by delivery) (:func:`hand_back`).

docs/decisions/0009-retries.md has the rule table: which outcomes count, which retry.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta

import msgspec
import structlog

from vigil.errors import NatsUnavailable
from vigil.jetstream import log_tail
from vigil.messages import (
    HISTORY_KEPT,
    TAIL_LINE_CHARS,
    AttemptRecord,
    Finished,
    Retrying,
    TaskState,
    utcnow,
)
from vigil_executor import checkpoint_rules
from vigil_executor.checkpoint_rules import Rollback
from vigil_executor.claim import (
    HandBack,
    LeaseLost,
    Outcome,
    lost_attempts,
    spent_attempts,
)
from vigil_executor.claim import (
    may_hand_back as may_nak,
)
from vigil_executor.hold import Hold
from vigil_executor.retry import Verdict, after_failure

log = structlog.get_logger("vigil.executor")


async def record(h: Hold, outcome: Outcome) -> float | None:
    """Write the outcome (or the retry) by CAS; the retry's delay, or None when acked."""
    assert h.state is not None and h.work is not None
    await h.sink.drain()  # the timeline is durable before the outcome
    now = utcnow()
    tail = _tail(h)
    status = outcome.status  # the task's; the attempt's stays outcome.status
    if outcome.retryable_cause is not None:
        decided, rollback = verdict(h, outcome, now)
        if decided.retry:
            await schedule_retry(h, outcome, decided, now, tail, rollback)
            return decided.delay_s
        outcome = Outcome(outcome.status, outcome.exit_code,
                          f"{outcome.error}; {decided.why}")
        if decided.dead:
            status = "dead"  # it kept failing: this attempt failed, the task is dead
    if outcome.dead:
        status = "dead"
    succeeded = outcome.status == "succeeded"

    def finish(state: TaskState) -> TaskState:
        # A cancel's reason is in the state the scheduler marked (who, and why).
        error = (state.cancel_reason or outcome.error if outcome.status == "cancelled"
                 else outcome.error)
        record = attempt_record(h, state, now, outcome.status, error)
        ended = msgspec.structs.replace(
            state, status=status, exit_code=outcome.exit_code,
            error=error, finished_at=now, updated_at=now,
            limit=outcome.limit, peak=outcome.peak,
            history=[*state.history, record][-HISTORY_KEPT:],
            # An agent that never started printed nothing: the evidence is still the
            # last run's output.
            tail=tail if h.output is not None else state.tail,
        )
        # A failed task keeps its checkpoints as evidence; a finished one needs them
        # no more.
        return checkpoint_rules.with_history(ended, [], now) if succeeded else ended

    async with h.write_lock:
        leftovers = checkpoint_rules.leftovers(h.state)
        final = await h.cas(finish)
        if final is None:
            raise LeaseLost("a newer attempt owns the task; not recording this outcome")
    if succeeded:
        for name in leftovers:
            h.ctx.checkpoints.delete_later(name)
    h.ctx.metrics.tasks.labels(final.status).inc()
    if final.status == "dead":
        await confess_dead(h, final)
    h.sink.emit(Finished(
        task_id=final.id, attempt=final.attempt, time=now, status=final.status,
        exit_code=final.exit_code, error=final.error, executor=final.executor,
        tenant=final.tenant, limit=final.limit, peak=final.peak,
        duration_s=(now - (final.started_at or now)).total_seconds(),
    ), once=True)
    await h.sink.drain()
    await h.msg.ack()
    log.info("task_finished", status=final.status, exit_code=final.exit_code,
             container=h.container.id[:12] if h.container else None,
             image=h.work.spec.image)
    return None


def attempt_record(h: Hold, state: TaskState, now: datetime, outcome: str,
                   error: str | None, *, rolled_back_from: str | None = None
                   ) -> AttemptRecord:
    """This attempt as its history records it, however it ended."""
    return AttemptRecord(attempt=state.attempt, executor=state.executor,
                         started_at=state.started_at, ended_at=now, outcome=outcome,
                         error=error, restored=h.restored, saved=h.saved,
                         restore_failed=h.restore_failed,
                         rolled_back_from=rolled_back_from)


def verdict(h: Hold, outcome: Outcome, now: datetime) -> tuple[Verdict, Rollback | None]:
    """Retry or not, and whether the retry rolls the task's checkpoint back: this
    failure may be the one that shows the checkpoint is poisoning the task. A rollback
    refunds the failures on that checkpoint, so the older one gets its try whatever
    is left of the budget; it happens only with the retry it is for."""
    assert h.state is not None and h.work is not None
    if h.state.cancel_requested_at is not None:
        return Verdict(False, "not retried: the task was cancelled"), None
    state = h.state
    spec = state.spec or h.work.spec
    record = attempt_record(h, state, now, "failed", outcome.error)
    rollback = checkpoint_rules.rollback(checkpoint_rules.history(state),
                                         [*state.history, record], state.budget_from)
    max_attempts = spec.max_attempts or 1

    def spent(record: AttemptRecord) -> int:
        return spent_attempts(msgspec.structs.replace(
            state, history=[*state.history, record]))

    if rollback is not None:
        refunded = spent(msgspec.structs.replace(
            record, rolled_back_from=rollback.poisoned.name))
        # The backoff counts retries from 1, even when every failure was refunded.
        rolled = after_failure(spec.retry, exit_code=outcome.exit_code,
                               failures=max(1, refunded), max_attempts=max_attempts)
        if rolled.retry:
            return Verdict(True, f"({refunded} of {max_attempts} attempts spent: the "
                           "failures on that checkpoint do not count); retrying in "
                           f"{rolled.delay_s:.1f}s", rolled.delay_s), rollback
    return after_failure(spec.retry, exit_code=outcome.exit_code, failures=spent(record),
                         max_attempts=max_attempts), None


async def schedule_retry(h: Hold, outcome: Outcome, verdict: Verdict, now: datetime,
                         tail: list[str], rollback: Rollback | None) -> None:
    """Back to ``scheduled`` with the failure on record (and the checkpoint rolled
    back, if ``rollback``); the caller naks the message with the delay once the lease
    has stopped (see Attempt._run)."""
    assert h.state is not None
    retry_at = now + timedelta(seconds=verdict.delay_s)
    poisoned = rollback.poisoned.name if rollback is not None else None

    def again(state: TaskState) -> TaskState:
        record = attempt_record(h, state, now, "failed", outcome.error,
                                rolled_back_from=poisoned)
        # exit_code and error stay visible until the next attempt starts; the
        # checkpoint stays too: the next attempt resumes from it, like any other.
        retried = msgspec.structs.replace(
            state, status="scheduled", executor=None, exit_code=outcome.exit_code,
            error=outcome.error, updated_at=now, retry_at=retry_at,
            history=[*state.history, record][-HISTORY_KEPT:], tail=tail,
        )
        if poisoned is None:
            return retried
        # ... unless it is the one the task rolls back from: its object is kept (no
        # longer restored) as evidence until the task succeeds or the TTL ends it.
        return checkpoint_rules.with_history(
            retried, checkpoint_rules.without(checkpoint_rules.history(state), poisoned),
            now)

    async with h.write_lock:
        written = await h.cas(again)
        if written is None:
            raise LeaseLost("a newer attempt owns the task; not scheduling a retry")
    h.ctx.metrics.retries.inc()
    reason = f"{outcome.retryable_cause} {verdict.why}"
    if rollback is not None:
        reason += f"; {rolled_back_to(rollback)}"
        await confess_rollback(h, rollback, outcome)
    h.sink.emit(Retrying(
        task_id=written.id, attempt=written.attempt, time=now, reason=reason,
        delay_s=round(verdict.delay_s, 3), exit_code=outcome.exit_code, error=outcome.error,
    ), once=True)  # once: one per attempt, so the id <task>:<attempt>:retrying is unique
    await h.sink.drain()


async def confess_rollback(h: Hold, rollback: Rollback, outcome: Outcome) -> None:
    """The platform says what it did to the task's workspace, and why."""
    assert h.state is not None
    bad = rollback.poisoned
    tried = ", ".join(str(a) for a in rollback.attempts)
    await h.confess(
        "warning", "checkpoint_rollback",
        f"task {h.state.id}: attempts {tried} failed right after restoring checkpoint "
        f"{bad.name} (attempt {bad.attempt}, {bad.reason}"
        f"{'' if checkpoint_rules.vouched(bad) else ', not vouched for by the agent'}) "
        f"without saving a newer one (last: {outcome.error}); "
        f"{rolled_back_to(rollback)}",
        hint=f"the workspace in {bad.name} likely holds a state the agent cannot start "
        "from (a file cut short?); it is kept in vigil-checkpoints until the task "
        "succeeds or the object expires. Those attempts did not spend max_attempts")


async def finished_again(h: Hold, state: TaskState) -> None:
    """Re-publish a finished task's ``finished`` event (same id: a no-op if it is
    stored): an executor that died between recording the outcome and publishing the
    event must not leave waiting clients waiting forever. A redelivery of the very
    message whose attempt made the task ``dead`` re-sends its ``task_dead``
    confession too (same id: the issues stream's duplicate window and the auditor's
    id keep it one), since that executor may have died before sending it."""
    if state.status == "dead" and state.work_seq == h.msg.metadata.sequence.stream:
        await confess_dead(h, state)
    h.sink.emit(Finished(
        task_id=state.id, attempt=state.attempt, time=state.finished_at or utcnow(),
        status=state.status, exit_code=state.exit_code, error=state.error,
        executor=state.executor, limit=state.limit, peak=state.peak,
        duration_s=((state.finished_at - state.started_at).total_seconds()
                    if state.finished_at and state.started_at else None),
    ), once=True)
    await h.sink.drain()


async def confess_dead(h: Hold, state: TaskState) -> None:
    """The ``task_dead`` confession for ``state``, dead. Its id comes from the task and
    its last attempt (not the time, not a counter), so whoever sends it again for the
    same death sends the same confession, and a death after a redrive (a later
    attempt) is a new one."""
    where = f"; last checkpoint {state.checkpoint.name}" if state.checkpoint else ""
    await h.confess("error", "task_dead", f"task {state.id} is dead: {state.error}{where}",
                    hint="see its history and tail; `vigil replay redrive` runs it "
                    "again with a fresh budget once the cause is fixed",
                    task_id=state.id, tenant=state.tenant, attempt=state.attempt,
                    confession_id=dead_confession_id(state.key, state.attempt))


def dead_confession_id(task_key: str, attempt: int) -> str:
    """The ``task_dead`` confession's id, from the task's key (``<tenant>.<id>``)."""
    return f"executor-{task_key}-a{attempt}-dead"


async def dead(h: Hold, state: TaskState, rev: int, limit: int) -> None:
    """A crash loop: ``state`` (its newest attempt lost) is dead, not run again."""
    now = utcnow()
    error = (
        f"crash loop: {lost_attempts(state)} attempts lost their executor (the last on "
        f"{state.executor}; max_lost_attempts is {limit}); the task may be killing the "
        "nodes it runs on"
    )
    final = msgspec.structs.replace(state, status="dead", error=error, finished_at=now,
                                    updated_at=now, history=state.history[-HISTORY_KEPT:],
                                    tail=await _lost_tail(h, state))
    if await h.ctx.store.cas(final, rev) is None:
        raise HandBack("task state changed while marking it dead", delay_s=1.0)
    h.ctx.metrics.tasks.labels("dead").inc()
    await confess_dead(h, final)
    h.sink.emit(Finished(task_id=state.id, attempt=state.attempt, time=now,
                         executor=state.executor,
                         status="dead", error=error), once=True)
    await h.sink.drain()
    await h.msg.ack()
    log.warning("task_dead", error=error)


async def _lost_tail(h: Hold, state: TaskState) -> list[str]:
    """The lost attempt's last output lines, from its ``log`` events: the executor that
    knew them is gone. Bounded well inside this delivery's lease; the state's older
    tail if they cannot be read in time."""
    try:
        return await asyncio.wait_for(
            log_tail(h.ctx.js, state.tenant, state.id, state.attempt),
            h.ctx.settings.ack_wait_s / 2)
    except Exception as exc:
        log.warning("tail_unread", error=str(exc) or type(exc).__name__)
        return state.tail


async def cancelled_unrun(h: Hold, state: TaskState, rev: int) -> None:
    """Cancelled while its executor was gone: recorded ``cancelled``, nothing run."""
    now = utcnow()
    error = state.cancel_reason or "cancelled"
    history = list(state.history)
    if state.status == "running":
        history.append(AttemptRecord(
            attempt=state.attempt, executor=state.executor, started_at=state.started_at,
            ended_at=now, outcome="lost", error="its executor stopped renewing the lease",
        ))
    final = msgspec.structs.replace(state, status="cancelled", error=error, finished_at=now,
                                    updated_at=now, history=history[-HISTORY_KEPT:])
    if await h.ctx.store.cas(final, rev) is None:
        raise HandBack("task state changed while recording its cancel", delay_s=1.0)
    h.ctx.metrics.tasks.labels("cancelled").inc()
    h.sink.emit(Finished(task_id=state.id, attempt=state.attempt, time=now,
                         executor=state.executor,
                         status="cancelled", error=error), once=True)
    await h.sink.drain()
    await h.msg.ack()
    log.info("task_cancelled_unrun")


async def hand_back(h: Hold, exc: HandBack) -> None:
    """Return the task to ``scheduled`` (not spending an attempt) and nak the message."""
    h.ctx.metrics.handed_back.labels(exc.kind or exc.reason.split(":")[0][:40]).inc()
    state = h.state
    if state is not None and state.status == "running":
        now = utcnow()
        tail = _tail(h)

        def back(s: TaskState) -> TaskState:
            record = attempt_record(h, s, now, "handed_back", exc.reason)
            return msgspec.structs.replace(
                s, status="scheduled", executor=None, updated_at=now,
                # An attempt that printed nothing (its agent never ran: the image is
                # missing, the checkpoint would not restore) keeps the last run's
                # output as the evidence, for whoever ends the task later.
                history=[*s.history, record][-HISTORY_KEPT:], tail=tail or s.tail,
                retry_at=now + timedelta(seconds=exc.delay_s) if exc.delay_s else None,
            )

        try:
            async with h.write_lock:
                written = await h.cas(back)
        except NatsUnavailable:
            return  # the lease will lapse instead; the server redelivers then
        if written is None:
            # Someone else holds the task now: a nak from us would redeliver the
            # message under the new holder's feet. Leave it alone.
            log.info("hand_back_fenced", reason=exc.reason)
            return
        h.sink.emit(Retrying(
            task_id=state.id, attempt=state.attempt, time=now,
            reason=exc.reason, delay_s=exc.delay_s,
        ), once=True)
        with contextlib.suppress(NatsUnavailable):
            await h.sink.drain()
    with contextlib.suppress(Exception):
        await h.msg.nak(delay=exc.delay_s or None)
    log.info("task_handed_back", reason=exc.reason, delay_s=exc.delay_s)


async def may_hand_back(h: Hold) -> bool:
    """Whether this delivery may still nak its message (see claim.may_hand_back).
    False when the state cannot be read either: the ack wait redelivers then."""
    assert h.work is not None
    meta = h.msg.metadata
    try:
        got = await asyncio.wait_for(h.ctx.store.get(h.work.tenant, h.work.task_id),
                                     h.ctx.settings.heartbeat_s)
    except Exception:
        return False
    return may_nak(got[0] if got else None, meta.sequence.stream, meta.num_delivered)


def rolled_back_to(rollback: Rollback) -> str:
    to = rollback.to
    where = (f"checkpoint {to.name} (attempt {to.attempt}, {to.reason})" if to is not None
             else "an empty workspace (no older checkpoint is kept)")
    return (f"rolled back from checkpoint {rollback.poisoned.name}: the next attempt "
            f"restores {where}")


def _tail(h: Hold) -> list[str]:
    # Evidence, not a log: short lines, so the state stays well under the KV's limit.
    return [line[:TAIL_LINE_CHARS] for line in h.output.tail] if h.output else []
