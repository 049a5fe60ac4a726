"""What one attempt holds of its task on this node, shared by the modules it is made of.

A :class:`Hold` is the attempt's working record: its work message and item, the task's
state as this attempt last wrote it and that write's revision (every write is a
compare-and-set on it, :meth:`Hold.cas`, so a stale attempt is fenced off), what it set
up here (control directory, container, workspace volume, egress proxy, secrets, a
persistent environment, the agent's output), what it did with checkpoints (for its
AttemptRecord), and the executor's own confessions about it (:meth:`Hold.confess`).
The concept modules (claim, lease, restore, checkpointing, agentrun, outcome) read and
write these fields; :mod:`vigil_executor.attempt` decides in which order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from nats.aio.msg import Msg

from vigil import transitions
from vigil.messages import SUMMARY_CHARS, Confession, ConfessionEvent, TaskState, WorkItem, utcnow
from vigil_executor.agentio import AgentOutput, clip
from vigil_executor.context import AttemptContext
from vigil_executor.egress import EgressProxy
from vigil_executor.environment import EnvironmentRun
from vigil_executor.runtime import Container
from vigil_executor.secrets import NO_SECRETS
from vigil_executor.sink import EventSink

log = structlog.get_logger("vigil.executor")


class Hold:
    def __init__(self, ctx: AttemptContext, msg: Msg) -> None:
        self.ctx = ctx
        self.msg = msg
        self.work: WorkItem | None = None
        self.state: TaskState | None = None
        self.revision = 0
        self.container: Container | None = None
        self.volume: str | None = None  # the attempt's workspace volume, once it may exist
        self.sink = EventSink(ctx.js)
        self.output: AgentOutput | None = None
        self.control: Path | None = None
        self.egress: EgressProxy | None = None  # the attempt's proxy, if its task has egress
        self.secrets = NO_SECRETS  # what the agent was given (vigil_executor.secrets)
        self.env: EnvironmentRun | None = None  # its task's persistent environment, if any
        self.stopping: str | None = None  # reason, when the executor drains
        self.stop_requested = asyncio.Event()
        self.cancel_requested = asyncio.Event()  # the scheduler marked the task cancelled
        self.write_lock = asyncio.Lock()  # one state write (and checkpoint) at a time
        # What this attempt did with checkpoints, for its AttemptRecord (by object name).
        self.restored: str | None = None
        self.restore_failed: str | None = None
        self.saved: str | None = None
        self.background: set[asyncio.Task[None]] = set()

    def stop(self, reason: str) -> None:
        """Ask this attempt to hand its task back (executor draining)."""
        self.stopping = reason
        self.stop_requested.set()

    def cancel(self) -> None:
        """The task was cancelled: stop the agent (grace, then kill), record ``cancelled``."""
        if not self.cancel_requested.is_set():
            log.info("cancel_received")
            self.cancel_requested.set()

    async def cas(self, change: Callable[[TaskState], TaskState]) -> TaskState | None:
        """Write ``change(state)`` by compare-and-set; None when fenced off.

        Besides this attempt, only the scheduler writes a running task: it marks a cancel
        request. That moves the revision without taking the task away, so a failed CAS
        is retried on the fresh state while it is still this attempt's (same attempt,
        executor, work message and delivery); anything else is a newer attempt's task.
        """
        assert self.state is not None
        for _ in range(5):
            updated = self.secrets.masker.state(change(self.state))
            rev = await self.ctx.store.cas(updated, self.revision)
            if rev is not None:
                self.state, self.revision = updated, rev
                return updated
            got = await self.ctx.store.get_state(self.state)
            if got is None or not transitions.holds(got[0], self.state):
                return None
            self.state, self.revision = got
            if got[0].cancel_requested_at is not None:
                self.cancel()
        return None

    async def confess(self, severity: str, category: str, summary: str, *,
                      hint: str | None = None, task_id: str | None = None,
                      tenant: str | None = None, attempt: int | None = None,
                      confession_id: str | None = None) -> None:
        """The executor's confession about this attempt's task (or, before the task is
        claimed, about its work item), on the task's timeline too once it is claimed."""
        state, work = self.state, self.work
        task_id = task_id or (state.id if state else work.task_id if work else None)
        tenant = tenant or (state.tenant if state else work.tenant if work else None)
        attempt = attempt if attempt is not None else (state.attempt if state else None)
        # Ids are per tenant: the confession's id names the tenant too, or two tenants'
        # tasks of one id would share confession ids (and the auditor count one of them).
        cid = confession_id or f"executor-{tenant}.{task_id}-a{attempt}-{category}"
        # The image is part of the auditor's fingerprint (one incident per image's problem).
        image = work.spec.image if work is not None else None
        # A runtime's error can be long, and hold what the agent printed.
        summary = clip(self.secrets.masker.mask(summary), SUMMARY_CHARS)
        confession = Confession(
            id=cid, summary=summary, severity=severity, category=category,  # type: ignore[arg-type]
            hint=hint, task_id=task_id, tenant=tenant or (work.tenant if work else None),
            attempt=attempt, source="executor", node=self.ctx.settings.node_id,
            component="executor", time=utcnow(), data={"image": image} if image else {},
        )
        await self.ctx.publish_confession(confession)
        if task_id is not None and state is not None:
            self.sink.emit(ConfessionEvent(
                task_id=task_id, attempt=state.attempt, time=utcnow(), confession_id=cid,
                summary=summary, severity=severity, source="executor",
            ))

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        """A background task of this attempt's, cancelled when the attempt ends."""
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task
