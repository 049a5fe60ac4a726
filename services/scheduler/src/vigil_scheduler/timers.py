"""Durable timers for delayed starts (``not_before``) and queue timeouts.

A timer is a message on ``vigil.timer.<kind>.<tenant>.<task_id>`` (work-queue stream). The
``scheduler-timers`` consumer receives it and, while it is not due, naks it with a delay
of exactly the time left: the server keeps every pending timer and redelivers it when
due, so timers survive scheduler restarts and cost the scheduler no memory. Firing is
idempotent (each acts by compare-and-set on the task's state) and any scheduler may fire
any timer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from structlog.contextvars import bound_contextvars

from vigil import codec, subjects
from vigil.consume import PullConsumer, nak_on_error
from vigil.jetstream import publish
from vigil.messages import utcnow

log = structlog.get_logger("vigil.scheduler")

TimerKind = Literal["start", "queue_timeout"]
# nats-server caps nothing here, but re-checking at least hourly keeps a timer honest
# if a clock jumps.
MAX_NAK_DELAY_S = 3600.0


LATEST = datetime.max.replace(tzinfo=UTC)


def later(start: datetime, seconds: float) -> datetime:
    """``start`` plus ``seconds``, at most the latest time there is: a timer set from a
    spec must never raise OverflowError (the spec's limits keep it far from that, and a
    spec stored before a limit existed must not crash the scheduler either)."""
    try:
        return start + timedelta(seconds=seconds)
    except OverflowError:
        return LATEST if seconds > 0 else datetime.min.replace(tzinfo=UTC)


class Timer(msgspec.Struct, frozen=True, kw_only=True):
    kind: TimerKind
    task_id: str
    due: datetime
    tenant: str = ""  # "" only in timers set before ids were per tenant


_decoder = msgspec.json.Decoder(Timer)


async def set_timer(js: JetStreamContext, kind: TimerKind, tenant: str, task_id: str,
                    due: datetime) -> None:
    await publish(js, subjects.timer(kind, tenant, task_id),
                  codec.encode(Timer(kind=kind, tenant=tenant, task_id=task_id, due=due)),
                  f"{tenant}.{task_id}:timer:{kind}")


class Timers:
    def __init__(self, nc: NATS, on_fire: Callable[[Timer], Awaitable[None]]) -> None:
        self._on_fire = on_fire
        self._consumer = PullConsumer(nc, subjects.STREAM_TIMERS, subjects.CONSUMER_TIMERS,
                                      capacity=64, max_batch=64)
        self._inflight: set[asyncio.Task[None]] = set()

    def reset(self) -> None:
        self._consumer.reset()

    async def run(self, stop: asyncio.Event) -> None:
        await self._consumer.start()
        try:
            async for msg in self._consumer.until(stop):
                task = asyncio.create_task(self._handle(msg))
                self._inflight.add(task)
                task.add_done_callback(self._done)
        finally:
            await self._consumer.stop()
            if self._inflight:
                await asyncio.wait(self._inflight, timeout=10)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._consumer.release(1)

    async def _handle(self, msg: Msg) -> None:
        try:
            timer = _decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("bad_timer", subject=msg.subject, error=str(exc))
            with contextlib.suppress(Exception):
                await msg.term()
            return
        left = (timer.due - utcnow()).total_seconds()
        if left > 0.01:
            with contextlib.suppress(Exception):
                await msg.nak(delay=min(left, MAX_NAK_DELAY_S))
            return
        with bound_contextvars(task_id=timer.task_id, tenant=timer.tenant, timer=timer.kind):
            async with nak_on_error(msg, log, "timer", retry_s=2.0, failed_s=10.0):
                await self._on_fire(timer)
                await msg.ack()
