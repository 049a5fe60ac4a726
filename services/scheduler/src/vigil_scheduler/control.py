"""Cancel and redrive requests (``vigil.control.<verb>.<tenant>``), handled one at a time.

The scheduler owns these because it owns the life of a task outside its attempts:

- **cancel** a ``queued``/``scheduled`` task: it ends ``cancelled`` at once (compare-and-set,
  so an executor claiming it concurrently either wins and gets the running case, or sees
  a finished task and drops its work item). A ``running`` task gets a cancel mark in its
  state and a core-NATS nudge to its executor, which stops the container (grace period,
  then kill) and records ``cancelled``; if that executor is gone, the next claim of the
  redelivered work item finishes the cancel without running anything.
- **redrive** a finished task (``dead``, ``failed``, ``timed_out``, ``cancelled``): back to
  ``scheduled`` with a fresh attempt budget and a new work item. ``expect_revision`` makes
  a repeated request a no-op; a crash between the state write and the work item is
  finished by the redelivered request (the item's message id deduplicates).

Every request ends acked or terminated; one the scheduler cannot act on is confessed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from structlog.contextvars import bound_contextvars

from vigil import codec, subjects, transitions
from vigil.consume import PullConsumer
from vigil.errors import NatsUnavailable
from vigil.jetstream import TaskStore, publish, publish_event
from vigil.messages import CancelRequest, Confession, RedriveRequest, TaskState, WorkItem, utcnow

log = structlog.get_logger("vigil.scheduler")

RETRY_DELAY_S = 1.0
# A cancel may overtake its task's admission (a raw publisher, right after submitting):
# wait this many deliveries for the task to appear before calling the request unknown.
UNKNOWN_TASK_DELIVERIES = 10

_cancel_decoder = msgspec.json.Decoder(CancelRequest)
_redrive_decoder = msgspec.json.Decoder(RedriveRequest)

Confess = Callable[[Confession], Awaitable[None]]


class Control:
    def __init__(self, nc: NATS, js: JetStreamContext, store: TaskStore, confess: Confess,
                 count: Callable[[str], None]) -> None:
        self.nc, self.js, self.store = nc, js, store
        self._confess = confess
        self._count = count
        self._consumer = PullConsumer(nc, subjects.STREAM_CONTROL, subjects.CONSUMER_CONTROL,
                                      capacity=1, max_batch=1)

    async def run(self, stop: asyncio.Event) -> None:
        await self._consumer.each(stop, self._handle)

    def reset(self) -> None:
        self._consumer.reset()

    async def _handle(self, msg: Msg) -> None:
        verb = subjects.token(msg.subject, 2)
        tenant = subjects.token(msg.subject, 3) or ""
        with bound_contextvars(control_seq=msg.metadata.sequence.stream, verb=verb,
                               tenant=tenant):
            try:
                if verb == "cancel":
                    outcome = await self._cancel(msg, _cancel_decoder.decode(msg.data), tenant)
                elif verb == "redrive":
                    outcome = await self._redrive(msg, _redrive_decoder.decode(msg.data),
                                                  tenant)
                else:
                    outcome = await self._refuse(msg, f"unknown control verb {verb!r}")
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                outcome = await self._refuse(msg, f"invalid {verb} request: {exc}")
            except NatsUnavailable as exc:
                log.warning("control_retry", error=str(exc))
                with contextlib.suppress(Exception):
                    await msg.nak(delay=RETRY_DELAY_S * 2)
                outcome = "retried"
            except Exception as exc:
                log.exception("control_crashed")
                outcome = await self._refuse(msg, f"scheduler failed on this request: {exc!r}")
        self._count(f"{verb}:{outcome}")

    async def _refuse(self, msg: Msg, why: str, task_id: str | None = None) -> str:
        """Terminate a request nobody can act on, and say so where operators look."""
        seq = msg.metadata.sequence.stream
        log.warning("control_refused", error=why, task_id=task_id)
        with contextlib.suppress(Exception):
            await self._confess(Confession(
                id=f"scheduler-control-{seq}", summary=f"control request refused: {why}",
                severity="warning", category="invalid_control", task_id=task_id,
                tenant=subjects.token(msg.subject, 3),
                hint="check the task id and tenant; see `vigil replay timeline`",
                data={"control_seq": seq, "subject": msg.subject},
            ))
        with contextlib.suppress(Exception):
            await msg.term()
        return "refused"

    async def _find(self, msg: Msg, task_id: str, tenant: str
                    ) -> tuple[TaskState, int] | str:
        # Ids are per tenant: the request's subject names the tenant, so another
        # tenant's task of the same id is never even read.
        got = await self.store.get(tenant, task_id)
        if got is None:
            if msg.metadata.num_delivered < UNKNOWN_TASK_DELIVERIES:
                await msg.nak(delay=RETRY_DELAY_S)
                return "waiting"
            return await self._refuse(msg, f"no task {task_id!r} for tenant {tenant!r}",
                                      task_id)
        return got

    # cancel -------------------------------------------------------------------------------------
    async def _cancel(self, msg: Msg, req: CancelRequest, tenant: str) -> str:
        with bound_contextvars(task_id=req.task_id):
            why = f"cancelled by {req.requested_by or 'a user'}"
            if req.reason:
                why += f": {req.reason}"
            for _ in range(10):
                found = await self._find(msg, req.task_id, tenant)
                if isinstance(found, str):
                    return found
                state, rev = found
                if state.terminal:
                    await msg.ack()
                    log.info("cancel_too_late", status=state.status)
                    return "too_late"
                step = transitions.cancel(state, utcnow(), why)
                if step.state.terminal:
                    if await self.store.cas(step.state, rev) is None:
                        continue  # an executor claimed it meanwhile: the running case
                    # Numbered by redrive: a redriven task ends again at the same attempt,
                    # and the same message id would be dropped as the earlier finish.
                    for event in step.events:
                        await publish_event(self.js, state.tenant, event,
                                            f"cancel{state.redriven}" if state.redriven
                                            else None)
                    await msg.ack()
                    log.info("task_cancelled", was=state.status)
                    return "cancelled"
                if step.events:  # marked now (not by an earlier request)
                    if await self.store.cas(step.state, rev) is None:
                        continue
                    for event in step.events:
                        await publish_event(self.js, state.tenant, event)
                # Best effort and fast; the executor's heartbeat reads the mark anyway.
                await self.nc.publish(subjects.cancel_notice(state.tenant, state.id), b"")
                await msg.ack()
                log.info("task_cancelling", executor=state.executor)
                return "cancelling"
            await msg.nak(delay=RETRY_DELAY_S)
            return "contended"

    # redrive -------------------------------------------------------------------------------------
    async def _redrive(self, msg: Msg, req: RedriveRequest, tenant: str) -> str:
        with bound_contextvars(task_id=req.task_id):
            for _ in range(10):
                found = await self._find(msg, req.task_id, tenant)
                if isinstance(found, str):
                    return found
                state, rev = found
                if _redriven_unclaimed(state):
                    # Redriven already (by this request's earlier delivery, which may have
                    # died before the work item, or by another): send the work item again;
                    # its message id makes that a no-op if it went out.
                    await self._publish_redrive(state, req)
                    await msg.ack()
                    log.info("redrive_resumed", revision=rev)
                    return "resumed"
                if req.expect_revision and rev != req.expect_revision:
                    await msg.ack()
                    log.info("redrive_stale", revision=rev, expected=req.expect_revision)
                    return "stale"
                if state.status not in transitions.REDRIVABLE:
                    await msg.ack()
                    log.info("redrive_not_finished", status=state.status)
                    return "not_finished"
                try:
                    step = transitions.redrive(state, utcnow(), _redrive_reason(req))
                except transitions.Refused as exc:
                    return await self._refuse(msg, str(exc), state.id)
                again = step.state
                if await self.store.cas(again, rev) is None:
                    continue
                await self._publish_redrive(again, req)
                await msg.ack()
                log.info("task_redriven", was=state.status, redriven=again.redriven)
                return "redriven"
            await msg.nak(delay=RETRY_DELAY_S)
            return "contended"

    async def _publish_redrive(self, state: TaskState, req: RedriveRequest) -> None:
        assert state.spec is not None
        # Events before the work item (one connection, in order): the timeline shows the
        # redrive before the new attempt's `started`.
        n = f"redrive{state.redriven}"  # not the same event as a hand-back's `retrying`
        for event in transitions.redriven_events(state, _redrive_reason(req)):
            await publish_event(self.js, state.tenant, event, n)
        # revision=0: the claim must read the state (attempt count, budget), not build
        # attempt 1 from the work item.
        work = WorkItem(task_id=state.id, tenant=state.tenant, spec=state.spec,
                        spec_digest=state.spec_digest,
                        submitted_at=state.created_at, submit_seq=state.submit_seq)
        await publish(self.js, subjects.work(state.spec.pool), codec.encode(work),
                      f"{state.key}:work:redrive:{state.redriven}")


def _redriven_unclaimed(state: TaskState) -> bool:
    return state.status == "scheduled" and state.redriven > 0 and state.work_seq == 0


def _redrive_reason(req: RedriveRequest) -> str:
    who = req.requested_by or "an operator"
    return f"redriven by {who}" + (f": {req.reason}" if req.reason else "")
