"""Waiting for the scheduler's verdict on a submission we just published.

One core-NATS wildcard subscription (``vigil.events.*.accepted`` and ``.finished``) serves
every waiting request; a waiter registers before it publishes, so the event cannot slip
past. Costs nothing per request beyond a dict entry.
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from vigil import subjects


class Acceptance:
    def __init__(self) -> None:
        self._waiters: dict[str, asyncio.Future[str]] = {}
        self._subs: list[Subscription] = []

    async def start(self, nc: NATS) -> None:
        for kind in ("accepted", "finished"):
            self._subs.append(await nc.subscribe(subjects.event("*", kind), cb=self._on_event))

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    def expect(self, task_id: str) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[task_id] = fut
        return fut

    def forget(self, task_id: str) -> None:
        fut = self._waiters.pop(task_id, None)
        if fut is not None and not fut.done():
            fut.cancel()

    async def _on_event(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) != 4:
            return
        fut = self._waiters.pop(parts[2], None)
        if fut is not None and not fut.done():
            fut.set_result(parts[3])
