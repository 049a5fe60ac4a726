"""A continuous pull consumer with flow control by capacity.

nats-py's ``fetch(n)`` waits, once the first message of a long poll arrives, for the rest
of the batch until the request expires; for an executor with four free slots and one task
arriving, that is seconds of latency. This consumer keeps pull requests outstanding for
exactly as many messages as the service can take (its *capacity*) and hands each message
over the moment it arrives, like the ``Consume`` API of the Go client.

Credits: ``requested`` counts messages asked for and not yet delivered. Each pull request
asks for ``min(capacity - requested, max_batch)``. When a request ends early (408 expired,
409 …) the server says how many of its messages it will no longer send
(``Nats-Pending-Messages``), and those credits are returned. If neither a message nor an
idle heartbeat arrives for two heartbeats (a lost request, a server restart), all credits
are reset and re-requested.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from vigil.errors import NatsUnavailable

log = structlog.get_logger("vigil.consume")

STATUS = "Status"
PENDING = "Nats-Pending-Messages"


class PullConsumer:
    def __init__(
        self,
        nc: NATS,
        stream: str,
        durable: str,
        *,
        capacity: int,
        max_batch: int = 256,
        expires_s: float = 30.0,
        heartbeat_s: float = 5.0,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._capacity = capacity
        self._requested = 0
        self._max_batch = max_batch
        self._expires_ns = int(expires_s * 1e9)
        self._heartbeat_s = heartbeat_s
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Subscription | None = None
        self._inbox = ""
        self._watchdog: asyncio.Task[None] | None = None
        self._last_seen = 0.0
        self._closed = False
        self._pulls: set[asyncio.Task[None]] = set()
        self.durable = durable

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(
            self._inbox, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        self._last_seen = asyncio.get_running_loop().time()
        self._watchdog = asyncio.create_task(self._watch(), name=f"pull-watchdog-{self.durable}")
        self._pull()

    async def next(self) -> Msg:
        """Wait for the next message. The caller owns it until it acks/naks/terms it."""
        return await self._queue.get()

    async def until(self, stop: asyncio.Event) -> AsyncIterator[Msg]:
        """Messages as they arrive, until ``stop`` is set. A message that arrives just as
        the iteration ends is naked back, not left to wait out its ack wait."""
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                nxt = asyncio.ensure_future(self.next())
                done, _ = await asyncio.wait({nxt, stopped},
                                             return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        late = await nxt
                        with contextlib.suppress(Exception):
                            await late.nak()
                    return
                yield nxt.result()
        finally:
            stopped.cancel()

    async def each(self, stop: asyncio.Event, handle: Callable[[Msg], Awaitable[None]]) -> None:
        """Start, hand each message to ``handle`` in turn until ``stop`` is set, then stop.
        ``handle`` decides each message; its capacity is released when it returns."""
        await self.start()
        try:
            async for msg in self.until(stop):
                try:
                    await handle(msg)
                finally:
                    self.release(1)
        finally:
            await self.stop()

    def release(self, n: int = 1) -> None:
        """The caller finished ``n`` messages and can take ``n`` more."""
        self._capacity += n
        self._pull()

    def reset(self) -> None:
        """Forget outstanding requests (after a reconnect they are gone) and ask again."""
        self._requested = 0
        self._pull()

    async def stop(self) -> None:
        """Stop asking for messages. Buffered, unhandled messages are naked back at once."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        while not self._queue.empty():
            msg = self._queue.get_nowait()
            with contextlib.suppress(Exception):
                await msg.nak()

    # internals ----------------------------------------------------------------------------
    async def _on_msg(self, msg: Msg) -> None:
        self._last_seen = asyncio.get_running_loop().time()
        headers = msg.headers
        status = headers.get(STATUS) if headers else None
        if status is not None and not msg.data:
            if status == "100":  # idle heartbeat / flow control
                if msg.reply:
                    await self._nc.publish(msg.reply, b"")
                return
            pending = headers.get(PENDING) if headers else None
            if pending is not None and pending.isdigit():
                self._requested = max(0, self._requested - int(pending))
            elif status in ("408", "409"):
                # No count given: we cannot tell which credits lapsed; start over.
                self._requested = 0
            if status == "409" and headers:
                log.info("pull_request_ended", status=status, detail=headers.get("Description"))
            self._pull()
            return
        self._requested = max(0, self._requested - 1)
        self._capacity -= 1
        if self._closed:
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        self._queue.put_nowait(msg)

    def _pull(self) -> None:
        if self._closed or self._sub is None:
            return
        want = self._capacity - self._requested
        if want <= 0:
            return
        # With requests already outstanding, wait until a worthwhile batch is free.
        if self._requested > 0 and want < max(1, min(self._max_batch, self._capacity) // 2):
            return
        n = min(want, self._max_batch)
        self._requested += n
        body = json.dumps(
            {
                "batch": n,
                "expires": self._expires_ns,
                "idle_heartbeat": int(self._heartbeat_s * 1e9),
            }
        ).encode()
        task = asyncio.create_task(self._send(body))
        self._pulls.add(task)
        task.add_done_callback(self._pulls.discard)

    async def _send(self, body: bytes) -> None:
        try:
            await self._nc.publish(self._next_subject, body, reply=self._inbox)
        except Exception as exc:
            log.warning("pull_request_failed", error=str(exc))
            self._requested = 0

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(self._heartbeat_s)
            silent = loop.time() - self._last_seen
            if self._requested > 0 and silent > 2 * self._heartbeat_s + 1:
                log.info("pull_requests_lost", silent_s=round(silent, 1), requested=self._requested)
                self._last_seen = loop.time()
                self.reset()
            elif self._requested == 0:
                self._pull()


async def keep_lease(msg: Msg, every_s: float) -> None:
    """Send in-progress acks for ``msg`` every ``every_s`` seconds until cancelled: a
    handler that may outlive the consumer's ack wait keeps its message (cancel it before
    a nak with a delay, which a later in-progress ack would undo)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await msg.in_progress()
        except Exception as exc:  # disconnected: the next beat may get through
            log.debug("lease_beat_failed", error=repr(exc))


@contextlib.asynccontextmanager
async def nak_on_error(msg: Msg, logger: Any, what: str, *, retry_s: float,
                       failed_s: float) -> AsyncIterator[None]:
    """The decision for a handler that raised: NATS out of reach naks ``msg`` after
    ``retry_s`` (logged ``<what>_retry``), any other error after ``failed_s`` (logged
    ``<what>_failed`` with its traceback). The error does not propagate."""
    try:
        yield
    except NatsUnavailable as exc:
        logger.warning(f"{what}_retry", error=str(exc))
        with contextlib.suppress(Exception):
            await msg.nak(delay=retry_s)
    except Exception:
        logger.exception(f"{what}_failed")
        with contextlib.suppress(Exception):
            await msg.nak(delay=failed_s)
