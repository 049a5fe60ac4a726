"""Pipelined, bounded publishing of one attempt's events.

Events are published without awaiting each ack (JetStream stores them in the order they
were sent on our one connection); ``drain()`` waits for every ack before the outcome is
recorded, so a task is never acked while its timeline is still in flight. Past
``MAX_PENDING`` un-acked events the producer waits: backpressure reaches the agent's
stdout instead of growing memory.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable

from nats.js import JetStreamContext

from vigil.jetstream import event_kind, publish_event
from vigil.messages import Event, Log

MAX_PENDING = 512


class EventSink:
    def __init__(self, js: JetStreamContext, tenant: str = "") -> None:
        self._js = js
        self.tenant = tenant  # whose task: events go to vigil.events.<tenant>.<task>.<kind>
        self._pending: set[asyncio.Task[object]] = set()
        self._counters: defaultdict[str, int] = defaultdict(int)
        self._events: dict[asyncio.Task[object], tuple[Event, int | None]] = {}
        self._failed: list[tuple[Event, int | None]] = []
        self._room = asyncio.Event()
        self._room.set()
        # Set once the attempt's secrets are known: every event passes through it.
        self.mask: Callable[[Event], Event] | None = None

    def emit(self, event: Event, *, once: bool = False) -> None:
        """Publish in the background. ``once`` events (started, finished) carry no counter."""
        if self.mask is not None:
            event = self.mask(event)
        kind = event_kind(event)
        n: int | None
        if once:
            n = None
        elif isinstance(event, Log):
            n = event.first
        else:
            n = self._counters[kind]
            self._counters[kind] += 1
        task: asyncio.Task[object] = asyncio.create_task(
            publish_event(self._js, self.tenant, event, n))
        self._events[task] = (event, n)
        self._pending.add(task)
        task.add_done_callback(self._done)
        if len(self._pending) >= MAX_PENDING:
            self._room.clear()

    def _done(self, task: asyncio.Task[object]) -> None:
        self._pending.discard(task)
        event = self._events.pop(task, None)
        if not task.cancelled() and task.exception() is not None and event is not None:
            self._failed.append(event)
        if len(self._pending) < MAX_PENDING // 2:
            self._room.set()

    async def room(self) -> None:
        """Wait until the number of un-acked events is below the bound."""
        await self._room.wait()

    async def drain(self) -> None:
        """Wait for every pending publish. A publish that failed (NATS away longer than its
        retry deadline) is tried once more, in order: the ids make it idempotent, and one
        lost log batch should not cost a finished task its outcome. Raises if that fails.
        """
        while self._pending:
            await asyncio.wait(set(self._pending))
        failed, self._failed = self._failed, []
        for event, n in failed:
            await publish_event(self._js, self.tenant, event, n)

    def cancel(self) -> None:
        for task in self._pending:
            task.cancel()
        self._failed.clear()
