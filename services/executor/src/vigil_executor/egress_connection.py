"""The connections of one attempt's egress proxy: each one judged, connected, relayed and
recorded.

A connection's request head is read and checked against the task's rules before
anything else; an allowed host is resolved here, every address vetted (none may be
private unless the operator allowed its range), and the first vetted one that answers is
connected to: nothing is resolved twice, so DNS rebinding cannot slip past. ``CONNECT``
is answered and then relayed blindly (no TLS interception); absolute-form plain HTTP is
forwarded with ``Connection: close``. Every connection becomes one ``egress`` event
(capped per attempt) and a metric; a refused host is confessed once per task with a hint
naming what would allow it. Listening and accepting are
:class:`vigil_executor.egress.EgressProxy`'s; see docs/decisions/0013.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from vigil.egress import Rule
from vigil.messages import EgressEvent, Event, WorkItem, utcnow
from vigil_executor.egress_rules import (
    MAX_HEAD,
    BadRequest,
    IPAddress,
    IPNetwork,
    Refusal,
    Request,
    answer,
    judge,
    parse_head,
    vet,
)
from vigil_executor.metrics import Metrics
from vigil_executor.settings import ExecutorSettings

log = structlog.get_logger("vigil.executor.egress")

HEAD_TIMEOUT_S = 10.0  # for the agent to send its request head
CHUNK = 256 * 1024
LINGER_S = 2.0  # after an answer, for the agent to read it and close

Confess = Callable[..., Awaitable[None]]
"""``Hold.confess``: (severity, category, summary, *, hint, confession_id)."""


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The host's addresses, by this host's resolver (files, then DNS), in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    found = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    return list(dict.fromkeys(found))


def _why(exc: OSError | TimeoutError) -> str:
    """An OS error in a few words (asyncio's connect errors put the address in the text)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    return os.strerror(exc.errno) if exc.errno else str(exc)


@dataclass
class _Connection:
    """One connection's account, filled in as it goes."""

    started: float
    request: Request | None = None
    address: str | None = None
    bytes_out: int = 0
    bytes_in: int = 0


class Connections:
    """One attempt's connections through its proxy: :meth:`serve` each accepted one."""

    def __init__(self, work: WorkItem, attempt: int, rules: list[Rule],
                 allowed: tuple[IPNetwork, ...], conf: ExecutorSettings, metrics: Metrics, *,
                 emit: Callable[[Event], None], confess: Confess) -> None:
        self._work = work
        self._attempt = attempt
        self._rules = rules
        self._allowed = allowed
        self._conf = conf
        self._metrics = metrics
        self._emit = emit
        self._confess = confess
        # Confessions still being published: the proxy's close waits for them.
        self.background: set[asyncio.Task[None]] = set()
        self._confessed: set[str] = set()
        self._events = 0
        self._dropped = 0

    async def serve(self, sock: socket.socket) -> None:
        conn = _Connection(started=time.monotonic())
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_HEAD)
        except BaseException:
            sock.close()
            raise
        try:
            await self._handle(reader, writer, conn)
        except asyncio.CancelledError:
            if conn.address is not None:  # cut while relaying: the attempt ended
                self._record(conn, allowed=True)
        except Exception as exc:  # a bug of ours must not take the proxy down
            log.exception("egress_connection_failed", error=repr(exc))
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: _Connection) -> None:
        io = (reader, writer, conn)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            conn.request = request = parse_head(head[:-4])
        except (asyncio.IncompleteReadError, TimeoutError):
            return await self._fail(*io, 400, "invalid",
                                    f"no complete request head within {HEAD_TIMEOUT_S:g}s")
        except asyncio.LimitOverrunError:
            return await self._fail(*io, 431, "invalid",
                                    f"the request head is longer than {MAX_HEAD} bytes")
        except BadRequest as exc:
            return await self._fail(*io, exc.status, "invalid", exc.reason)
        refusal = judge(self._rules, request)
        if refusal is not None:
            return await self._refuse(reader, writer, conn, refusal)
        upstream = await self._connect(reader, writer, conn, request)
        if upstream is None:
            return None
        up_reader, up_writer = upstream
        try:
            if request.tunnel:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                up_writer.write(request.upstream)
            await self._relay(reader, writer, up_reader, up_writer, conn)
        finally:
            up_writer.close()
        self._record(conn, allowed=True)
        return None

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       conn: _Connection, request: Request
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Resolve, vet every address, connect to the first vetted one that answers; or
        answer the agent (403, 502, 504) and return None."""
        deadline = time.monotonic() + self._conf.egress_connect_timeout_s
        try:
            addresses = await asyncio.wait_for(resolve(request.host, request.port),
                                               self._conf.egress_connect_timeout_s)
        except (OSError, TimeoutError) as exc:
            await self._fail(reader, writer, conn, 502, "failed",
                             f"{request.target}: cannot resolve {request.host} ({_why(exc)})")
            return None
        refusal = vet(request, addresses, self._allowed)
        if refusal is not None:
            log.info("egress_private_address", host=request.host,
                     addresses=[str(a) for a in addresses])
            await self._refuse(reader, writer, conn, refusal)
            return None
        errors: list[str] = []
        for address in addresses:
            left = deadline - time.monotonic()
            if left <= 0:
                errors.append("timed out")
                break
            try:
                opened = await asyncio.wait_for(
                    asyncio.open_connection(str(address), request.port, limit=CHUNK), left)
            except (OSError, TimeoutError) as exc:
                errors.append(f"{address}: {_why(exc)}")
                continue
            conn.address = str(address)
            return opened
        status = 504 if errors and errors[-1].endswith("timed out") else 502
        await self._fail(reader, writer, conn, status, "failed",
                         f"{request.target}: cannot connect ({'; '.join(errors) or 'no address'})")
        return None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter,
                     conn: _Connection) -> None:
        """Both directions until both ended (a half-close is passed on) or one broke."""
        counted = self._metrics.egress_bytes

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, out: bool) -> None:
            # Counted as relayed: a tunnel may stay open as long as the agent runs.
            metric = counted.labels("out" if out else "in")
            while data := await src.read(CHUNK):
                dst.write(data)
                if out:
                    conn.bytes_out += len(data)
                else:
                    conn.bytes_in += len(data)
                metric.inc(len(data))
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()

        pumps = {asyncio.create_task(pump(reader, up_writer, True)),
                 asyncio.create_task(pump(up_reader, writer, False))}
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if (exc := task.exception()) is not None and not isinstance(exc, OSError):
                    raise exc
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.wait(pumps)

    # outcomes ---------------------------------------------------------------------------
    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: _Connection, refusal: Refusal) -> None:
        self._record(conn, allowed=False, reason=refusal.reason, outcome="refused")
        request = conn.request
        assert request is not None
        key = f"{request.host}-{request.port}"
        if key not in self._confessed:
            self._confessed.add(key)
            self._confess_refused(request, refusal, key)
        await self._answer(reader, writer, 403, refusal.reason)

    def _confess_refused(self, request: Request, refusal: Refusal, key: str) -> None:
        work = self._work
        self._spawn(self._confess(
            "warning", "egress_refused",
            f"task {work.task_id} was refused egress to {request.target}: {refusal.reason}",
            hint=refusal.hint,
            # Once per task and host: the id has no attempt (the auditor keeps one).
            confession_id=f"executor-{work.tenant}.{work.task_id}-egress-{key}"))

    async def _fail(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    conn: _Connection, status: int, outcome: str, reason: str) -> None:
        self._record(conn, allowed=False, reason=reason, outcome=outcome)
        await self._answer(reader, writer, status, reason)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      status: int, reason: str) -> None:
        """Answer and end the connection. What the agent sent and we did not read (the
        head of a refused request, a TLS hello sent early) is read and dropped first, for
        a little while: closing a socket with unread data resets the connection, and the
        agent would see a reset instead of the answer."""
        with contextlib.suppress(OSError, TimeoutError):
            writer.write(answer(status, reason))
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(LINGER_S):
                left = MAX_HEAD * 4
                while left > 0 and (data := await reader.read(left)):
                    left -= len(data)

    def _record(self, conn: _Connection, *, allowed: bool, reason: str | None = None,
                outcome: str = "allowed") -> None:
        """The connection's metrics and its one event (within the attempt's cap)."""
        metrics = self._metrics
        metrics.egress_connections.labels(outcome).inc()
        request = conn.request
        if self._events >= self._conf.egress_max_events:
            self._dropped += 1
            metrics.egress_events_dropped.inc()
            if self._dropped == 1:
                self._say_capped()
            return
        self._events += 1
        self._emit(EgressEvent(
            task_id=self._work.task_id, attempt=self._attempt, time=utcnow(),
            host=request.host if request else "", port=request.port if request else 0,
            allowed=allowed, reason=reason, address=conn.address, bytes_out=conn.bytes_out,
            bytes_in=conn.bytes_in, duration_s=round(time.monotonic() - conn.started, 6)))

    def _say_capped(self) -> None:
        limit = self._conf.egress_max_events
        log.warning("egress_events_capped", limit=limit)
        work = self._work
        self._spawn(self._confess(
            "warning", "egress_events_capped",
            f"task {work.task_id} opened more than {limit} connections through its egress "
            "proxy; the rest are not recorded as events",
            hint="they are still counted (vigil_executor_egress_connections_total, "
            "vigil_executor_egress_events_dropped_total); an agent that connects this "
            "often may be looping. VIGIL_EGRESS_MAX_EVENTS sets the cap",
            confession_id=f"executor-{work.tenant}.{work.task_id}-a{self._attempt}-"
            "egress-capped"))

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as exc:  # a lost confession must not end the connection
                log.warning("egress_confession_failed", error=str(exc) or type(exc).__name__)

        task = asyncio.create_task(run())
        self.background.add(task)
        task.add_done_callback(self.background.discard)
