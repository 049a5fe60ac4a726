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
from datetime import datetime

import msgspec
import structlog

from vigil import transitions
from vigil.errors import NatsUnavailable
from vigil.jetstream import log_tail
from vigil.messages import TAIL_LINE_CHARS, AttemptRecord, TaskState, utcnow
from vigil_executor import checkpoint_rules
from vigil_executor.checkpoint_rules import Rollback
from vigil_executor.claim import HandBack, LeaseLost, Outcome
from vigil_executor.claim import may_hand_back as may_nak
from vigil_executor.hold import Hold

log = structlog.get_logger("vigil.executor")


async def record(h: Hold, outcome: Outcome) -> float | None:
    """Write the outcome (or the retry) by CAS; the retry's delay, or None when acked."""
    assert h.state is not None and h.work is not None
    await h.sink.drain()  # the timeline is durable before the outcome
    now = utcnow()
    tail = _tail(h)
    dead = outcome.dead
    if outcome.retryable_cause is not None:
        decided, rollback = verdict(h, outcome, now)
        if decided.retry:
            await schedule_retry(h, outcome, decided, now, tail, rollback)
            return decided.delay_s
        outcome = Outcome(outcome.status, outcome.exit_code,
                          f"{outcome.error}; {decided.why}")
        dead = dead or decided.dead  # it kept failing: this attempt failed, the task is dead
    succeeded = outcome.status == "succeeded"
    steps: list[transitions.Step] = []

    def finish(state: TaskState) -> TaskState:
        step = transitions.finish(
            state, state.attempt, now, outcome=outcome.status, exit_code=outcome.exit_code,
            error=outcome.error, ran=_ran(h), dead=dead, limit=outcome.limit, peak=outcome.peak,
            # An agent that never started printed nothing: the evidence is still the
            # last run's output.
            tail=tail if h.output is not None else state.tail)
        steps.append(step)
        # A failed task keeps its checkpoints as evidence; a finished one needs them
        # no more.
        return (checkpoint_rules.with_history(step.state, [], now) if succeeded
                else step.state)

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
    for event in steps[-1].events:
        h.sink.emit(event, once=True)
    await h.sink.drain()
    await h.msg.ack()
    log.info("task_finished", status=final.status, exit_code=final.exit_code,
             container=h.container.id[:12] if h.container else None,
             image=h.work.spec.image)
    return None


def _ran(h: Hold) -> transitions.Ran:
    """What this attempt did with the task's checkpoints."""
    return transitions.Ran(restored=h.restored, saved=h.saved, restore_failed=h.restore_failed)


def verdict(h: Hold, outcome: Outcome, now: datetime
            ) -> tuple[transitions.Verdict, Rollback | None]:
    """Retry or not, and whether the retry rolls the task's checkpoint back: this
    failure may be the one that shows the checkpoint is poisoning the task. A rollback
    refunds the failures on that checkpoint, so the older one gets its try whatever
    is left of the budget; it happens only with the retry it is for."""
    assert h.state is not None and h.work is not None
    if h.state.cancel_requested_at is not None:
        return transitions.Verdict(False, "not retried: the task was cancelled"), None
    state = h.state
    spec = state.spec or h.work.spec
    record = transitions.attempt_record(state, now, "failed", outcome.error, _ran(h))
    rollback = checkpoint_rules.rollback(checkpoint_rules.history(state),
                                         [*state.history, record], state.budget_from)
    max_attempts = spec.max_attempts or 1

    def spent(record: AttemptRecord) -> int:
        return transitions.spent_attempts(msgspec.structs.replace(
            state, history=[*state.history, record]))

    if rollback is not None:
        refunded = spent(msgspec.structs.replace(
            record, rolled_back_from=rollback.poisoned.name))
        # The backoff counts retries from 1, even when every failure was refunded.
        rolled = transitions.after_failure(spec.retry, exit_code=outcome.exit_code,
                               failures=max(1, refunded), max_attempts=max_attempts)
        if rolled.retry:
            return transitions.Verdict(True, f"({refunded} of {max_attempts} attempts spent: the "
                           "failures on that checkpoint do not count); retrying in "
                           f"{rolled.delay_s:.1f}s", rolled.delay_s), rollback
    return transitions.after_failure(spec.retry, exit_code=outcome.exit_code,
                                     failures=spent(record), max_attempts=max_attempts), None


async def schedule_retry(h: Hold, outcome: Outcome, verdict: transitions.Verdict,
                         now: datetime, tail: list[str], rollback: Rollback | None) -> None:
    """Back to ``scheduled`` with the failure on record (and the checkpoint rolled
    back, if ``rollback``); the caller naks the message with the delay once the lease
    has stopped (see Attempt._run)."""
    assert h.state is not None
    poisoned = rollback.poisoned.name if rollback is not None else None
    reason = f"{outcome.retryable_cause} {verdict.why}"
    if rollback is not None:
        reason += f"; {rolled_back_to(rollback)}"
    steps: list[transitions.Step] = []

    def again(state: TaskState) -> TaskState:
        # The checkpoint stays: the next attempt resumes from it, like any other ...
        step = transitions.retry(state, state.attempt, now, ran=_ran(h), reason=reason,
                                 delay_s=verdict.delay_s, exit_code=outcome.exit_code,
                                 error=outcome.error, tail=tail, rolled_back_from=poisoned)
        steps.append(step)
        if poisoned is None:
            return step.state
        # ... unless it is the one the task rolls back from: its object is kept (no
        # longer restored) as evidence until the task succeeds or the TTL ends it.
        return checkpoint_rules.with_history(
            step.state, checkpoint_rules.without(checkpoint_rules.history(state), poisoned),
            now)

    async with h.write_lock:
        written = await h.cas(again)
        if written is None:
            raise LeaseLost("a newer attempt owns the task; not scheduling a retry")
    h.ctx.metrics.retries.inc()
    if rollback is not None:
        await confess_rollback(h, rollback, outcome)
    # once: one per attempt, so the id <task>:<attempt>:retrying is unique
    for event in steps[-1].events:
        h.sink.emit(event, once=True)
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
    h.sink.emit(transitions.finished_again(state), once=True)
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


async def dead(h: Hold, state: TaskState, rev: int) -> None:
    """A crash loop: claiming ``state`` once more (its attempt lost like the ones before)
    buries it instead of running it (:func:`vigil.transitions.claim`)."""
    meta = h.msg.metadata
    step = transitions.claim(state, node=h.ctx.settings.node_id, now=utcnow(),
                             work_seq=meta.sequence.stream, delivery=meta.num_delivered,
                             max_lost_attempts=h.ctx.settings.max_lost_attempts,
                             tail=await _lost_tail(h, state))
    if await h.ctx.store.cas(step.state, rev) is None:
        raise HandBack("task state changed while marking it dead", delay_s=1.0)
    h.ctx.metrics.tasks.labels(step.state.status).inc()
    await confess_dead(h, step.state)
    for event in step.events:
        h.sink.emit(event, once=True)
    await h.sink.drain()
    await h.msg.ack()
    log.warning("task_dead", error=step.state.error)


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
    step = transitions.finish_cancel(state, utcnow())
    if await h.ctx.store.cas(step.state, rev) is None:
        raise HandBack("task state changed while recording its cancel", delay_s=1.0)
    h.ctx.metrics.tasks.labels("cancelled").inc()
    for event in step.events:
        h.sink.emit(event, once=True)
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

        steps: list[transitions.Step] = []

        def back(s: TaskState) -> TaskState:
            # An attempt that printed nothing (its agent never ran: the image is missing,
            # the checkpoint would not restore) keeps the last run's output as the
            # evidence, for whoever ends the task later.
            step = transitions.hand_back(s, s.attempt, now, ran=_ran(h), reason=exc.reason,
                                         delay_s=exc.delay_s, tail=tail)
            steps.append(step)
            return step.state

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
        for event in steps[-1].events:
            h.sink.emit(event, once=True)
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
