"""The executor's entry in ``vigil-executors``: pool, labels, slots, images, what runs here.

Refreshed every ``advertise_s``; the bucket's TTL drops a node that stops refreshing (a
dead node), and a draining node says so at once and deletes its entry on the way out.
The image list is read from the runtime every IMAGES_EVERY_S (a Podman API call: not on
every advert). The scheduler reads these for capacity and placement; ``GET
/v1/executors`` shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime

import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from vigil import __version__, codec, subjects
from vigil.messages import ExecutorInfo, utcnow

log = structlog.get_logger("vigil.executor")


IMAGES_EVERY_S = 10.0


class Advertiser:
    def __init__(self, js: JetStreamContext, *, node: str, pool: str, labels: dict[str, str],
                 slots: int, runtime: str, every_s: float,
                 running: Callable[[], list[str]],
                 images: Callable[[], Awaitable[list[str] | None]] | None = None,
                 enforcement: dict[str, str] | None = None) -> None:
        """``running`` returns the tenant of each attempt running here; ``images`` the
        image names this node holds (:meth:`Runtime.images`)."""
        self.js = js
        self.node, self.pool, self.labels, self.slots = node, pool, labels, slots
        self.runtime, self.every_s, self.running = runtime, every_s, running
        self.enforcement = enforcement or {}
        self.draining = False
        self.started_at: datetime = utcnow()
        self._kv: KeyValue | None = None
        self._list_images = images
        self.images: list[str] | None = None  # unknown until first read
        self._images_at = -1e9

    async def refresh_images(self) -> None:
        """Read the node's images again; on failure the last list stands (the runtime
        being away for a moment does not remove them)."""
        if self._list_images is None:
            return
        self._images_at = time.monotonic()
        try:
            self.images = await self._list_images()
        except Exception as exc:
            log.warning("image_list_failed", error=str(exc) or type(exc).__name__)

    def info(self) -> ExecutorInfo:
        tenants = Counter(self.running())
        return ExecutorInfo(
            node=self.node, pool=self.pool, labels=self.labels, slots=self.slots,
            running=sum(tenants.values()), tenants=dict(tenants), draining=self.draining,
            runtime=self.runtime, version=__version__, started_at=self.started_at,
            seen_at=utcnow(), images=self.images, enforcement=self.enforcement,
        )

    async def publish(self) -> None:
        if self._kv is None:
            self._kv = await self.js.key_value(subjects.KV_EXECUTORS)
        await self._kv.put(self.node, codec.encode(self.info()))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if time.monotonic() - self._images_at >= IMAGES_EVERY_S:
                await self.refresh_images()
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
