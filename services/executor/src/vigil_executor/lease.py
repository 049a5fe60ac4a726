"""An attempt's lease on its task: the heartbeat that keeps it, the check that this
attempt still holds the task, and what is said when the lease is lost.

The lease is the work message's ack wait, renewed by in-progress acks (ADR 7). While it
is kept, the task is this attempt's; once it cannot be, the agent must stop before the
server hands the task to another node, and the attempt records nothing. The timing is
:class:`~vigil_executor.claim.LeaseClock`'s; this is its I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from vigil.errors import NatsUnavailable
from vigil.messages import TaskState
from vigil_executor.claim import LeaseClock, LeaseLost
from vigil_executor.hold import Hold

log = structlog.get_logger("vigil.executor")


class Lease:
    """Made when the work message arrives (the lease counts from the delivery);
    :meth:`start` once the task is claimed, :meth:`end` before the message is settled."""

    def __init__(self, h: Hold) -> None:
        self._h = h
        self._ok = time.monotonic()  # when the newest confirmed renewal was sent
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def task(self) -> asyncio.Task[None]:
        """The heartbeat: it ends (raising LeaseLost) only when the lease is gone."""
        assert self._task is not None
        return self._task

    def start(self) -> None:
        self._task = asyncio.create_task(self._heartbeat())

    async def end(self) -> None:
        """Stop renewing. Bounded: a heartbeat stuck in a flush does not hold us up."""
        lease = self.task
        self._done.set()
        lease.cancel()
        await asyncio.wait({lease}, timeout=self._h.ctx.settings.heartbeat_s + 10)
        if lease.done() and not lease.cancelled():
            with contextlib.suppress(LeaseLost, Exception):
                lease.result()

    async def _heartbeat(self) -> None:
        """Keep the lease, or end (raising LeaseLost) when it is gone.

        Each tick sends an in-progress ack and then a PING/PONG round trip: nats-py buffers
        publishes while disconnected, so only the flush proves the server got the renewal.
        The same tick reads the task's state: if it moved to another attempt, a newer
        attempt owns the task (this executor was frozen or partitioned past the ack wait).

        The timing is :class:`~vigil_executor.claim.LeaseClock`'s: renewals on a fixed
        cadence, the lease given up at ``ack_wait - heartbeat / 2`` after the last
        confirmed renewal was sent, so one failed renewal does not lose it and the agent
        is stopped before the server hands the task to another node, not after. A tick
        that comes late (the process was frozen by SIGSTOP, the host stalled) reads the
        state before renewing: a late in-progress ack must not renew a lease that another
        attempt holds now.
        """
        h = self._h
        conf = h.ctx.settings
        assert h.state is not None
        task_id, attempt = h.state.id, h.state.attempt
        clock = LeaseClock(conf.ack_wait_s, conf.heartbeat_s, self._ok)
        failure: str | None = None  # why the newest renewal failed, until one succeeds
        while not self._done.is_set():
            # Not asyncio.sleep + cancel: on Python 3.11 a cancel that lands while a
            # wait_for (inside flush, or ours) completes is swallowed, and a cancelled
            # heartbeat would renew forever, holding the attempt and its slot. The event
            # ends the loop whatever happens to the cancel.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(),
                                       max(0.0, clock.wake_at() - time.monotonic()))
            if self._done.is_set():
                return
            now = time.monotonic()
            if clock.late(now) and not clock.expired(now):
                # A tick was missed: we were asleep. Who holds the task now?
                log.warning("lease_late", lapsed_s=round(clock.lapsed(now), 1))
                await self._still_holder(task_id, attempt)
                now = time.monotonic()
            if clock.expired(now):
                # No time left to ask anyone: the agent must stop before the server can
                # hand the task to another node.
                lapsed = clock.lapsed(now)
                if failure is not None:
                    raise LeaseLost(f"could not renew the lease for {lapsed:.1f}s (ack "
                                    f"wait {conf.ack_wait_s:g}s; {failure})")
                raise LeaseLost(f"no renewal for {lapsed:.1f}s (the process was frozen "
                                f"or stalled; ack wait {conf.ack_wait_s:g}s)")
            if not clock.is_due(now):
                continue  # the timer fired a hair early
            clock.advance(now)
            sent = time.monotonic()
            try:
                await h.msg.in_progress()
                # nats-py annotates the timeout as int; any positive number works.
                await h.ctx.nc.flush(timeout=clock.renewal_timeout(sent))  # type: ignore[arg-type]
            except Exception as exc:  # any failure to renew counts
                failure = str(exc) or type(exc).__name__
                log.warning("lease_renewal_failed", error=failure,
                            lapsed_s=round(clock.lapsed(time.monotonic()), 1))
                continue
            clock.renewed(sent)
            self._ok = sent
            failure = None
            current = await self._still_holder(task_id, attempt)
            if current is not None and current.cancel_requested_at is not None:
                # The core-NATS nudge is best effort; the state is the truth.
                h.cancel()

    async def _still_holder(self, task_id: str, attempt: int) -> TaskState | None:
        """The task's state, raising LeaseLost if another attempt holds it now; None when
        it cannot be read within a heartbeat (the lease timing decides then)."""
        h = self._h
        try:
            assert h.work is not None
            got = await asyncio.wait_for(h.ctx.store.get(h.work.tenant, task_id),
                                         h.ctx.settings.heartbeat_s)
        except (TimeoutError, NatsUnavailable):
            return None
        current = got[0] if got else None
        if current is None or current.attempt != attempt:
            raise LeaseLost(
                f"task is now {current.status if current else 'gone'} with attempt "
                f"{current.attempt if current else '?'}"
                f"{f' on {current.executor}' if current and current.executor else ''}; "
                f"this attempt ({attempt}) lost it")
        return current

    async def confess_lost(self, reason: str) -> None:
        """The platform says what the agent cannot: its node lost the task under it.
        Bounded, since NATS itself may be what cut us off, and the container must go."""
        h = self._h
        state = h.state
        if state is None:
            return
        node = h.ctx.settings.node_id
        with contextlib.suppress(Exception):
            await asyncio.wait_for(h.confess(
                "warning", "lease_lost",
                f"executor {node} lost its lease on task {state.id} (attempt "
                f"{state.attempt}): {reason}; it stopped the agent and recorded nothing",
                hint="the node was frozen, overloaded or cut off from NATS for about the ack "
                "wait; the task runs again (or already runs) on another attempt",
            ), h.ctx.settings.heartbeat_s)
