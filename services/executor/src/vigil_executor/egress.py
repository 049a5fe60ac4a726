"""Egress by allow-list: a task's one way out, through a proxy this executor runs for it.

The container has no network device (``nsmode: none``), only its own loopback. When its
task has ``egress`` rules, the executor serves an HTTP(S) proxy for that attempt alone on
a unix socket in the attempt's control directory (mounted read-only into the container at
``/run/vigil``): the socket is the task's identity, so the proxy needs no credentials.
Inside, ``vigil-relay`` (a small static program, ``services/executor/relay``) listens on
``127.0.0.1:3128``, relays each connection to the socket and runs the agent in its
place; ``HTTPS_PROXY``/``HTTP_PROXY`` point at it.

The proxy takes ``CONNECT host:port`` (then relays bytes blindly: no TLS interception)
and absolute-form plain HTTP (forwarded with ``Connection: close``). It checks the rules
before anything else, resolves names itself, refuses when ANY address of the name is not
public (unless the operator allowed its range), and connects to the address it vetted:
nothing is resolved twice, so DNS rebinding cannot slip past. Every connection becomes
one ``egress`` event (capped per attempt) and a metric; a refused host is confessed once
per task with a hint naming what would allow it. See docs/decisions/0013.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from vigil.egress import PROXY_ENV, Rule, parse_rules
from vigil.errors import VigilError
from vigil.messages import Confession, EgressEvent, Event, WorkItem, utcnow
from vigil_executor.egress_rules import (
    MAX_HEAD,
    BadRequest,
    IPAddress,
    IPNetwork,
    Refusal,
    Request,
    answer,
    judge,
    parse_cidrs,
    parse_head,
    vet,
)
from vigil_executor.metrics import Metrics
from vigil_executor.runtime import CONTROL_PATH, RELAY_PATH
from vigil_executor.settings import ExecutorSettings

log = structlog.get_logger("vigil.executor.egress")

SOCKET_NAME = "egress.sock"
PROXY_PORT = 3128
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
NO_PROXY = "localhost,127.0.0.1,::1"
HEAD_TIMEOUT_S = 10.0  # for the agent to send its request head
# Connections waiting for one of the attempt's slots: above the relay's 256 at once.
BACKLOG = 1024
CHUNK = 256 * 1024
CLOSE_WAIT_S = 5.0  # for the connections cut at close to record their events
LINGER_S = 2.0  # after an answer, for the agent to read it and close
ACCEPT_BACKOFF_S = 0.1  # after a failed accept (no descriptor left), before the next


class EgressUnavailable(VigilError):
    """This node cannot give a task egress (its relay is missing): the node's problem,
    not the task's; the task is handed back, no attempt spent."""

    retryable = True

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message, retryable=True)
        self.hint = hint


Confess = Callable[..., Awaitable[None]]
"""``Attempt._confess``: (severity, category, summary, *, hint, confession_id)."""


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The host's addresses, by this host's resolver (files, then DNS), in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    found = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    return list(dict.fromkeys(found))


def proxy_env(socket_path: str) -> dict[str, str]:
    """The agent's environment when its task has egress (vigil.egress.PROXY_ENV)."""
    env = {name: NO_PROXY if name.lower() == "no_proxy" else PROXY_URL for name in PROXY_ENV}
    return {**env, "VIGIL_EGRESS_SOCKET": socket_path}


@dataclass(frozen=True)
class EgressMount:
    """What the container needs for egress: the relay (a host file, mounted at
    RELAY_PATH) and the proxy's socket as the container sees it."""

    relay: str
    socket: str = f"{CONTROL_PATH}/{SOCKET_NAME}"

    def command(self, command: Sequence[str]) -> list[str]:
        return [RELAY_PATH, self.socket, "--", *command]


@dataclass
class _Connection:
    """One connection's account, filled in as it goes."""

    started: float
    request: Request | None = None
    address: str | None = None
    bytes_out: int = 0
    bytes_in: int = 0


class EgressNode:
    """A node's egress: its settings, its copy of the relay; opens one proxy per attempt."""

    def __init__(self, settings: ExecutorSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.allowed: tuple[IPNetwork, ...] = parse_cidrs(settings.egress_allow_cidrs)
        self.relay: Path | None = None
        self._why_not = "the executor has not prepared its relay yet"

    async def prepare(self, state_dir: Path, publish: Callable[[Confession], Awaitable[None]]
                      ) -> None:
        """Copy the relay into the state directory, whose control directories the
        containers mount already: the one path Podman must see on the host (the
        executor may run in a container of its own), readable by the agents' uids, and
        not changed under running agents by an upgrade. A missing relay is said once
        here; tasks with egress are then handed back (see :meth:`open`)."""
        source = Path(self.settings.egress_relay)
        target = state_dir / "relay" / "vigil-relay"
        try:
            self.relay = await asyncio.to_thread(_install, source, target)
            log.info("egress_relay_ready", relay=str(self.relay), source=str(source))
            return
        except OSError as exc:
            self._why_not = (f"its egress relay {source} cannot be used "
                             f"({exc.strerror or exc})")
        node = self.settings.node_id
        log.warning("egress_relay_missing", error=self._why_not)
        with contextlib.suppress(Exception):
            await publish(Confession(
                id=f"executor-{node}-egress-relay-{utcnow():%Y%m%d}",
                summary=f"node {node} cannot give tasks egress: {self._why_not}",
                severity="error", category="egress_unavailable", hint=RELAY_HINT,
                source="executor", node=node, component="executor", time=utcnow()))

    async def open(self, work: WorkItem, attempt: int, control: Path, *, runtime: str,
                   emit: Callable[[Event], None], confess: Confess) -> EgressProxy | None:
        """The attempt's proxy, listening in ``control``; None when its task has no
        egress. Raises EgressUnavailable when this node cannot give it egress."""
        rules = work.spec.egress.allow if work.spec.egress is not None else []
        if not rules:
            return None
        if runtime != "podman":
            # The unsafe runtimes run agents on the host itself: its whole network.
            log.warning("egress_not_enforced", runtime=runtime)
            return None
        relay = self.relay
        if relay is None or not await asyncio.to_thread(os.access, relay, os.X_OK):
            raise EgressUnavailable(
                f"node {self.settings.node_id} cannot give the task egress: "
                f"{self._why_not if relay is None else f'its relay {relay} is gone'}",
                RELAY_HINT)
        proxy = EgressProxy(work, attempt, parse_rules(rules), self, emit=emit,
                            confess=confess, mount=EgressMount(relay=str(relay)))
        try:
            await proxy.start(control)
        except OSError as exc:  # the control directory is gone, or full: the node's fault
            raise EgressUnavailable(
                f"node {self.settings.node_id} cannot listen for the task's egress in "
                f"{control}: {exc.strerror or exc}",
                "check the executor's state directory (VIGIL_STATE_DIR): its disk, its "
                "owner, and that no one else removes it") from exc
        return proxy


RELAY_HINT = ("build and install it with scripts/setup-host.sh (a static vigil-relay at "
              "VIGIL_EGRESS_RELAY, /usr/local/libexec/vigil/vigil-relay by default), then "
              "restart the executor; tasks with egress are handed back meanwhile")


def _why(exc: OSError | TimeoutError) -> str:
    """An OS error in a few words (asyncio's connect errors put the address in the text)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _install(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` (0755, atomically); OSError when it cannot be used."""
    st = source.stat()
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        raise OSError(0, "not an executable file")
    target.parent.mkdir(mode=0o755, exist_ok=True)
    os.chmod(target.parent, 0o755)  # noqa: S103 - the agents' uids run the relay from it
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    os.chmod(tmp, 0o755)  # noqa: S103 - read and run by the agents' uids, written by us
    tmp.replace(target)
    return target


class EgressProxy:
    """One attempt's proxy (see the module doc). ``start`` listens, ``close`` ends it
    and every connection through it; both are the attempt's to call."""

    def __init__(self, work: WorkItem, attempt: int, rules: list[Rule], node: EgressNode, *,
                 emit: Callable[[Event], None], confess: Confess, mount: EgressMount
                 ) -> None:
        self.mount = mount
        self._work = work
        self._attempt = attempt
        self._rules = rules
        self._node = node
        self._conf = node.settings
        self._metrics = node.metrics
        self._emit = emit
        self._confess = confess
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._path: Path | None = None
        self._open: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._confessed: set[str] = set()
        self._events = 0
        self._dropped = 0
        self._closed = False

    async def start(self, directory: Path) -> None:
        """Listen on ``directory``/egress.sock, connectable by any uid (mode 0666): the
        agent's uid on the host is not ours (rootless Podman maps it into the user's
        subordinate ids). The directory is the attempt's own, mounted into its
        container alone; see docs/decisions/0013 for who else could connect."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        path = directory / SOCKET_NAME
        # A unix socket's path is at most 107 bytes; node, tenant and task ids can make
        # the control directory's longer. Bound through the directory's descriptor.
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sock.bind(f"/proc/self/fd/{fd}/{SOCKET_NAME}")
            os.chmod(path, 0o666)  # noqa: S103 - see the docstring
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        finally:
            os.close(fd)
        self._sock, self._path = sock, path
        self._acceptor = asyncio.create_task(self._accept(sock))
        log.info("egress_proxy_started", rules=[r.text for r in self._rules])

    async def close(self) -> None:
        """Stop listening and cut every connection (each records its event). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._acceptor is not None:
            self._acceptor.cancel()
            await asyncio.wait({self._acceptor})
        if self._sock is not None:
            self._sock.close()  # connections still in the backlog are refused
        for task in self._open:
            task.cancel()
        if self._open:
            await asyncio.wait(set(self._open), timeout=CLOSE_WAIT_S)
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
        if self._background:  # confessions still being published
            await asyncio.wait(set(self._background), timeout=CLOSE_WAIT_S)

    async def _accept(self, sock: socket.socket) -> None:
        """Take connections while fewer than ``egress_max_connections`` are open. More
        wait in the kernel's backlog, and past it their connect fails: a flood of
        connections costs the executor no descriptor and no memory of its own."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self._conf.egress_max_connections)
        while True:
            await slots.acquire()
            try:
                conn, _ = await loop.sock_accept(sock)
            except Exception as exc:  # out of descriptors, say: the node's trouble
                # Never end the loop: the agent's connections would wait in the backlog
                # for ever. Try again shortly.
                slots.release()
                log.warning("egress_accept_failed", error=repr(exc))
                await asyncio.sleep(ACCEPT_BACKOFF_S)
                continue
            task = asyncio.create_task(self._serve(conn))
            self._open.add(task)
            task.add_done_callback(self._open.discard)
            task.add_done_callback(lambda _: slots.release())

    # one connection ---------------------------------------------------------------------
    async def _serve(self, sock: socket.socket) -> None:
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
        refusal = vet(request, addresses, self._node.allowed)
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
        self._background.add(task)
        task.add_done_callback(self._background.discard)
