"""The executor's entry in ``vigil-executors``: pool, labels, slots, what runs here.

Refreshed every ``advertise_s``; the bucket's TTL drops a node that stops refreshing (a
dead node), and a draining node says so at once and deletes its entry on the way out.
The scheduler reads these for capacity and placement; ``GET /v1/executors`` shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from datetime import datetime

import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from vigil import __version__, codec, subjects
from vigil.messages import ExecutorInfo, utcnow

log = structlog.get_logger("vigil.executor")


class Advertiser:
    def __init__(self, js: JetStreamContext, *, node: str, pool: str, labels: dict[str, str],
                 slots: int, runtime: str, every_s: float,
                 running: Callable[[], list[str]]) -> None:
        """``running`` returns the tenant of each attempt running here."""
        self.js = js
        self.node, self.pool, self.labels, self.slots = node, pool, labels, slots
        self.runtime, self.every_s, self.running = runtime, every_s, running
        self.draining = False
        self.started_at: datetime = utcnow()
        self._kv: KeyValue | None = None

    def info(self) -> ExecutorInfo:
        tenants = Counter(self.running())
        return ExecutorInfo(
            node=self.node, pool=self.pool, labels=self.labels, slots=self.slots,
            running=sum(tenants.values()), tenants=dict(tenants), draining=self.draining,
            runtime=self.runtime, version=__version__, started_at=self.started_at,
            seen_at=utcnow(),
        )

    async def publish(self) -> None:
        if self._kv is None:
            self._kv = await self.js.key_value(subjects.KV_EXECUTORS)
        await self._kv.put(self.node, codec.encode(self.info()))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.publish()
            except Exception as exc:  # NATS away: the entry lapses, as it should
                log.warning("advertise_failed", error=str(exc) or type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)

    async def withdraw(self) -> None:
        """Draining: capacity zero at once, then gone."""
        self.draining = True
        with contextlib.suppress(Exception):
            await self.publish()

    async def remove(self) -> None:
        with contextlib.suppress(Exception):
            if self._kv is not None:
                await self._kv.delete(self.node)
