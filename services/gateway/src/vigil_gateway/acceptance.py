"""Waiting for the scheduler's verdict on a submission we just published.

A request subscribes (core NATS) to its own task's ``accepted`` and ``finished`` event
subjects *before* it publishes, so the verdict cannot slip past, and unsubscribes when it
has one. Only HTTP submissions pay for this: a wildcard subscription over every task's
events made the gateway parse two messages per task submitted by anyone (11% of a core at
500 tasks/s in the benchmark).
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from vigil import subjects

VERDICTS = ("accepted", "finished")


class Verdict:
    """``await verdict.wait(timeout)`` -> "accepted" | "finished" | None (no verdict yet)."""

    def __init__(self, nc: NATS, tenant: str, task_id: str) -> None:
        self._nc = nc
        self._tenant = tenant
        self._task_id = task_id
        self._future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._subs: list[Subscription] = []

    async def __aenter__(self) -> Verdict:
        for kind in VERDICTS:
            self._subs.append(await self._nc.subscribe(
                subjects.event(self._tenant, self._task_id, kind), cb=self._on_event,
                max_msgs=1))
        return self

    async def __aexit__(self, *_: object) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if not self._future.done():
            self._future.cancel()

    async def _on_event(self, msg: Msg) -> None:
        if not self._future.done():
            self._future.set_result(msg.subject.rsplit(".", 1)[-1])

    async def wait(self, timeout: float) -> str | None:
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except TimeoutError:
            return None
