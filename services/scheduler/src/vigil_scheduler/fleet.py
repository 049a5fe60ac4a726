"""The live executors, followed from ``vigil-executors``: capacity and placement.

An entry whose node stopped refreshing it is dropped after the bucket's TTL, measured
here on receipt (clocks of other nodes are not trusted): the KV's own expiry sends no
delete marker to watchers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Mapping

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from vigil import subjects, topology
from vigil.messages import ExecutorInfo
from vigil_scheduler.images import holds

log = structlog.get_logger("vigil.scheduler")

_decoder = msgspec.json.Decoder(ExecutorInfo)


class Fleet:
    def __init__(self, js: JetStreamContext, ttl_s: float = topology.EXECUTORS.ttl_s,
                 settle_s: float = 6.0) -> None:
        self.js = js
        self.ttl_s = ttl_s
        self.settle_s = settle_s
        self._nodes: dict[str, tuple[ExecutorInfo, float]] = {}
        self.started = time.monotonic()
        self.changed = asyncio.Event()

    async def start(self) -> None:
        self._sub = await self.js.subscribe(
            f"$KV.{subjects.KV_EXECUTORS}.>", stream=f"KV_{subjects.KV_EXECUTORS}",
            ordered_consumer=True, cb=self._on_msg,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                                  inactive_threshold=60.0),
        )

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        node = msg.subject.rsplit(".", 1)[-1]
        op = msg.headers.get("KV-Operation") if msg.headers else None
        if op in ("DEL", "PURGE"):
            self._nodes.pop(node, None)
        else:
            try:
                self._nodes[node] = (_decoder.decode(msg.data), time.monotonic())
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("bad_executor_entry", node=node, error=str(exc))
        self.changed.set()

    def live(self) -> list[ExecutorInfo]:
        cutoff = time.monotonic() - self.ttl_s
        for node in [n for n, (_, seen) in self._nodes.items() if seen < cutoff]:
            del self._nodes[node]
        return [info for info, _ in self._nodes.values()]

    def slots(self, pool: str) -> int:
        return sum(e.slots for e in self.live() if e.pool == pool and not e.draining)

    def running_by_tenant(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for e in self.live():
            total.update(e.tenants)
        return total

    def running(self, pool: str) -> int:
        return sum(e.running for e in self.live() if e.pool == pool)

    def serves(self, pool: str, labels: Mapping[str, str], *, image: str | None = None,
               free: bool = False) -> bool:
        """Whether any live executor could run a task of ``pool`` needing ``labels`` and
        ``image`` (with ``free``: could run it now, by its last advert)."""
        return any(e.pool == pool and not e.draining
                   and all(e.labels.get(k) == v for k, v in labels.items())
                   and (image is None or holds(e.images, image))
                   and (not free or e.free > 0)
                   for e in self.live())

    def unservable(self, pool: str, labels: Mapping[str, str], image: str | None) -> str | None:
        """Why no live executor could run such a task (None if one could)."""
        if self.serves(pool, labels, image=image):
            return None
        need = f" with labels {dict(labels)}" if labels else ""
        if image is None or not self.serves(pool, labels):
            return f"no live executor serves pool {pool!r}{need}"
        return f"no live executor of pool {pool!r}{need} has image {image!r}"

    @property
    def settled(self) -> bool:
        """Long enough since start that a missing executor is really missing (executors
        advertise every few seconds)."""
        return time.monotonic() - self.started > self.settle_s
