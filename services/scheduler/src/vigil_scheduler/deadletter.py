"""Tasks whose work message reached the executors' max deliveries become ``dead``.

The server stops delivering such a message and publishes an advisory, which the
``VIGIL_ADVISORIES`` stream captures durably. For each one: read the work message by its
sequence, mark its task ``dead`` (compare-and-set, with the reason and evidence kept),
confess it, publish ``finished``, then delete the message from the work queue, where it
would otherwise sit forever. Every step is idempotent, so a redelivered advisory is safe.

The evidence: an attempt still ``running`` went without an outcome (its executors kept
losing it), so it joins the history as ``lost`` and its last output lines, read back from
its ``log`` events, become the task's ``tail``; the last checkpoint stays referenced. A
task that was waiting (a retry, a hand-back) already has its last attempt on record.

One exception: a task with ``node_labels`` that no executor ever claimed. The scheduler
releases such a task only while an executor with its labels has a free slot, but that
slot can be taken before the task is pulled, and then executors without the labels hand
it back, each time a delivery, for as long as the labelled one is busy. That is the
fleet's business, not the task's: it goes back to the queue (``requeued``), where it
waits without spending deliveries until a node with its labels is free again. At most
``MAX_REQUEUES`` times: a node that advertises the labels and a free slot and still never
claims the task is a fault worth a dead task and a confession.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from vigil import codec, subjects, topology, transitions
from vigil.consume import PullConsumer, nak_on_error
from vigil.errors import NatsUnavailable
from vigil.jetstream import (
    TaskStore,
    delete_msg,
    log_tail,
    publish,
    publish_confession,
    publish_event,
    retrying,
)
from vigil.messages import Confession, TaskState, WorkItem, utcnow
from vigil_scheduler.dispatch import queue_msg_id

log = structlog.get_logger("vigil.scheduler.deadletter")

_advisory = msgspec.json.Decoder(dict[str, Any])

TAIL_READ_S = 10.0
MAX_REQUEUES = 20


class DeadLetters:
    def __init__(self, nc: NATS, js: JetStreamContext, store: TaskStore, node: str) -> None:
        self._nc = nc
        self._js = js
        self._store = store
        self._node = node

    async def run(self, stop: asyncio.Event) -> None:
        await topology.ensure_consumer(self._js, subjects.STREAM_ADVISORIES,
                                       topology.dead_letter_consumer())
        consumer = PullConsumer(self._nc, subjects.STREAM_ADVISORIES,
                                subjects.CONSUMER_DEAD_LETTERS, capacity=8, max_batch=8)
        await consumer.each(stop, self._settle)

    async def _settle(self, msg: Msg) -> None:
        async with nak_on_error(msg, log, "dead_letter", retry_s=2.0, failed_s=30.0):
            await self.handle(msg)

    async def handle(self, msg: Msg) -> None:
        advisory = _advisory.decode(msg.data)
        seq = int(advisory.get("stream_seq") or 0)
        deliveries = int(advisory.get("deliveries") or 0)
        try:
            raw = await retrying("read work message",
                                 lambda: self._js.get_msg(subjects.STREAM_WORK, seq))
        except NotFoundError:
            await msg.ack()  # acked meanwhile (a late outcome): nothing is stuck
            return
        try:
            work = codec.work_decoder.decode(raw.data or b"")
        except msgspec.DecodeError:
            await self._delete(seq)
            await msg.ack()
            return
        with structlog.contextvars.bound_contextvars(task_id=work.task_id):
            await self._bury(work, seq, deliveries)
            await self._delete(seq)
            await msg.ack()

    async def _bury(self, work: WorkItem, seq: int, deliveries: int) -> None:
        task_id, tenant = work.task_id, work.tenant
        for _ in range(10):
            got = await self._store.get(tenant, task_id)
            if got is None or got[0].terminal:
                return
            state, rev = got
            if state.status == "queued" and state.requeued and work.spec.node_labels:
                # Requeued already, by this notice's earlier delivery that failed after
                # the state's write: finish it (the entry's id makes a second one a no-op).
                await self._queue_entry(state, work)
                return
            tail = await self._tail(state) if state.status == "running" else None
            step = transitions.exhausted(state, utcnow(), deliveries=deliveries,
                                         labels=work.spec.node_labels,
                                         requeue_limit=MAX_REQUEUES, tail=tail)
            if await self._store.cas(step.state, rev) is None:
                continue
            if step.state.status == "queued":
                await self._queue_entry(step.state, work)
                log.warning("task_requeued", requeued=step.state.requeued,
                            deliveries=deliveries, waiting=step.state.waiting)
                return
            dead = step.state
            where = f"; last checkpoint {dead.checkpoint.name}" if dead.checkpoint else ""
            await publish_confession(self._js, Confession(
                id=f"scheduler-max-deliveries-{tenant}.{task_id}-{seq}",
                summary=f"task {task_id} is dead: {dead.error}{where}", severity="error",
                category="max_deliveries", task_id=task_id, tenant=tenant,
                attempt=dead.attempt, source="scheduler", node=self._node,
                component="scheduler", time=dead.updated_at,
                data={"work_seq": seq, "deliveries": deliveries},
            ))
            for event in step.events:
                await publish_event(self._js, tenant, event)
            log.warning("task_dead_max_deliveries", deliveries=deliveries)
            return
        # The state kept changing under us: the notice comes back (the work message stays
        # until the task is buried, or it would be a task nothing can find again).
        raise NatsUnavailable(f"task {task_id} changed 10 times while burying it; retrying")

    async def _queue_entry(self, state: TaskState, work: WorkItem) -> None:
        """The requeued task's entry in the queue. It names no revision: dispatch reads
        the state (which holds ``requeued``, carried by the release's message id)."""
        entry = msgspec.structs.replace(work, revision=0)
        await publish(self._js, subjects.queue(work.spec.pool, state.tenant,
                                               work.spec.priority),
                      codec.encode(entry), queue_msg_id(state))

    async def _tail(self, state: TaskState) -> list[str]:
        """The running attempt's last output lines (its executor, which knew them, is not
        answering); the state's older tail if the events cannot be read in time."""
        try:
            return await asyncio.wait_for(log_tail(self._js, state.tenant, state.id, state.attempt),
                                          TAIL_READ_S)
        except Exception as exc:
            log.warning("tail_unread", error=str(exc) or type(exc).__name__)
            return state.tail

    async def _delete(self, seq: int) -> None:
        # Gone already is fine; no secure erase (see vigil.jetstream.delete_msg).
        await delete_msg(self._nc, subjects.STREAM_WORK, seq)

