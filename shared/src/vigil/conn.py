"""Connecting to NATS: retry until reachable, reconnect forever, log without secrets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.client import Client as NATS

from vigil.errors import NatsUnavailable
from vigil.settings import redact_url

log = structlog.get_logger("vigil.conn")


async def connect(
    url: str,
    name: str,
    *,
    wait_s: float | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    inbox_prefix: str = "_INBOX",
) -> NATS:
    """Connect to ``url`` (comma-separated servers), retrying for up to ``wait_s`` seconds.

    ``wait_s=None`` waits forever (a service started before NATS keeps trying, logging
    every attempt). Once connected, the client reconnects forever on its own.
    """
    servers = [s.strip() for s in url.split(",") if s.strip()]
    shown = redact_url(url)
    loop = asyncio.get_running_loop()
    deadline = None if wait_s is None else loop.time() + wait_s
    delay = 0.1

    async def error_cb(exc: Exception) -> None:
        log.warning("nats_error", error=str(exc) or type(exc).__name__)

    nc = NATS()

    async def disconnected_cb() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("nats_disconnected", url=shown)

    async def reconnected_cb() -> None:
        log.info("nats_reconnected", url=shown)
        if on_reconnect is not None:
            await on_reconnect()

    attempt = 0
    while True:
        attempt += 1
        try:
            # nats-py keeps retrying an unreachable server inside connect() when
            # reconnects are unlimited: bound it by our own deadline.
            left = None if deadline is None else max(0.1, deadline - loop.time())
            await asyncio.wait_for(nc.connect(
                servers=servers,
                name=name,
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py takes seconds
                ping_interval=5,
                max_outstanding_pings=3,
                # Buffer publishes during a short reconnect instead of failing them at once.
                pending_size=64 * 1024 * 1024,
                # Each service replies on its own prefix, and its NATS user may subscribe
                # to that prefix only: no service can read another's replies.
                inbox_prefix=inbox_prefix,
                error_cb=error_cb,
                disconnected_cb=disconnected_cb,
                reconnected_cb=reconnected_cb,
            ), left)
            return nc
        except Exception as exc:  # nats-py raises several unrelated types here
            if isinstance(exc, TimeoutError):
                with contextlib.suppress(Exception):
                    await nc.close()
                nc = NATS()
            if deadline is not None and loop.time() + delay > deadline:
                raise NatsUnavailable(
                    f"cannot reach NATS at {shown} ({str(exc) or type(exc).__name__}); is "
                    "nats-server running, and is VIGIL_NATS_URL right?"
                ) from exc
            if attempt in (1, 5) or attempt % 20 == 0:
                log.warning("nats_unreachable", url=shown, attempt=attempt, error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
