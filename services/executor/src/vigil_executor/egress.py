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

This module is the node's side and each proxy's listening; what happens on one
connection is :mod:`vigil_executor.egress_connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from vigil.egress import PROXY_ENV, Rule, parse_rules
from vigil.errors import VigilError
from vigil.messages import Confession, Event, WorkItem, utcnow
from vigil_executor.egress_connection import Confess, Connections
from vigil_executor.egress_rules import IPNetwork, parse_cidrs
from vigil_executor.metrics import Metrics
from vigil_executor.runtime import CONTROL_PATH, RELAY_PATH
from vigil_executor.settings import ExecutorSettings

log = structlog.get_logger("vigil.executor.egress")

SOCKET_NAME = "egress.sock"
PROXY_PORT = 3128
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
NO_PROXY = "localhost,127.0.0.1,::1"
# Connections waiting for one of the attempt's slots: above the relay's 256 at once.
BACKLOG = 1024
CLOSE_WAIT_S = 5.0  # for the connections cut at close to record their events
ACCEPT_BACKOFF_S = 0.1  # after a failed accept (no descriptor left), before the next


class EgressUnavailable(VigilError):
    """This node cannot give a task egress (its relay is missing): the node's problem,
    not the task's; the task is handed back, no attempt spent."""

    retryable = True

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message, retryable=True)
        self.hint = hint


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
        self._rules = rules
        self._conf = node.settings
        self._metrics = node.metrics
        self._connections = Connections(work, attempt, rules, node.allowed, node.settings,
                                        node.metrics, emit=emit, confess=confess)
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._path: Path | None = None
        self._open: set[asyncio.Task[Any]] = set()
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
        background = self._connections.background
        if background:  # confessions still being published
            await asyncio.wait(set(background), timeout=CLOSE_WAIT_S)

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
            task = asyncio.create_task(self._connections.serve(conn))
            self._open.add(task)
            task.add_done_callback(self._open.discard)
            task.add_done_callback(lambda _: slots.release())
