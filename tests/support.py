"""Test support: bounded waiting, and the platform's services run in-process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from vigil import subjects
from vigil.conn import connect
from vigil.jetstream import TaskStore
from vigil.messages import TaskState
from vigil_auditor.service import Auditor
from vigil_auditor.settings import AuditorSettings
from vigil_executor.service import Executor
from vigil_executor.settings import ExecutorSettings
from vigil_gateway.service import Gateway
from vigil_gateway.settings import GatewaySettings
from vigil_scheduler.service import Scheduler
from vigil_scheduler.settings import SchedulerSettings

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, timeout: float = 15.0, what: str = "condition"
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def eventually_sync(probe: Callable[[], T | None], *, timeout: float = 15.0,
                    what: str = "condition") -> T:
    """:func:`eventually` for code outside an event loop (a CLI run as a subprocess)."""
    return asyncio.run(eventually(_awaitable(probe), timeout=timeout, what=what))


def _awaitable(probe: Callable[[], T | None]) -> Callable[[], Awaitable[T | None]]:
    async def run() -> T | None:
        return probe()
    return run


class EventLog:
    """Every event on ``vigil.events.>`` seen by a core subscription, in arrival order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        self.events.append((msg.subject, json.loads(msg.data)))
        self._changed.set()

    def of(self, task_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        prefix = f"{subjects.EVENTS}.{task_id}."
        return [e for s, e in self.events
                if s.startswith(prefix) and (kind is None or s.endswith("." + kind))]

    async def wait_for(self, task_id: str, kind: str, count: int = 1,
                       timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.of(task_id, kind)
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [e.get("kind") for s, e in self.events if task_id in s]
                raise AssertionError(f"no {kind} event for {task_id} after {timeout}s; "
                                     f"saw {kinds}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


# Node ids the executors of this pytest session ran as. An executor removes the containers
# its node id left behind, and so does the podman fixture at the end of the session: an
# executor whose node id is unique to this session can never touch another run's
# containers (tests run side by side on one host while we work).
USED_NODES: set[str] = set()
_node_seq = itertools.count(1)


def session_node_id() -> str:
    """A node id no other test session on this host uses: ``vm-<pid>-<n>``."""
    return f"vm-{os.getpid()}-{next(_node_seq)}"


@dataclass
class Platform:
    """The four services running in this test's event loop against one nats-server."""

    url: str
    nc: NATS
    store: TaskStore
    events: EventLog
    services: list[Any] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def js(self) -> Any:
        return self.nc.jetstream()

    async def add(self, service: Any) -> Any:
        task = asyncio.create_task(service.run())
        self.services.append(service)
        self.tasks.append(task)
        ready = asyncio.create_task(service.ready.wait())
        done, _ = await asyncio.wait({ready, task}, timeout=30,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            ready.cancel()
            task.result()  # raises the service's start-up error
            raise AssertionError(f"{type(service).__name__} stopped during start")
        assert ready in done, f"{type(service).__name__} not ready after 30s"
        return service

    async def scheduler(self, **overrides: Any) -> Scheduler:
        return await self.add(Scheduler(SchedulerSettings(nats_url=self.url, **overrides)))

    async def executor(self, runtime_impl: Any = None, **overrides: Any) -> Executor:
        conf = {"nats_url": self.url, "runtime": "process", "unsafe_runtime": True,
                "heartbeat_s": 1.0, "ack_wait_s": 5.0, **overrides}
        conf.setdefault("node_id", session_node_id())
        USED_NODES.add(conf["node_id"])
        return await self.add(Executor(ExecutorSettings(**conf), runtime=runtime_impl))

    async def auditor(self, **overrides: Any) -> Auditor:
        return await self.add(Auditor(AuditorSettings(nats_url=self.url, **overrides)))

    async def gateway(self, **overrides: Any) -> Gateway:
        conf = {"nats_url": self.url, "http_port": 0, "auth": "none", **overrides}
        return await self.add(Gateway(GatewaySettings(**conf)))

    async def publish_spec(self, spec: dict[str, Any] | bytes, tenant: str = "acme",
                           msg_id: str | None = None) -> Any:
        data = spec if isinstance(spec, bytes) else json.dumps(spec).encode()
        headers = {subjects.MSG_ID: msg_id} if msg_id else None
        return await self.js.publish(subjects.submit(tenant), data, headers=headers)

    async def state(self, task_id: str) -> TaskState | None:
        got = await self.store.get(task_id)
        return got[0] if got else None

    async def final_state(self, task_id: str, timeout: float = 30.0) -> TaskState:
        async def probe() -> TaskState | None:
            s = await self.state(task_id)
            return s if s is not None and s.terminal else None

        return await eventually(probe, timeout=timeout, what=f"task {task_id} to finish")

    async def confessions(self, category: str | None = None) -> list[dict[str, Any]]:
        """Every confession stored on vigil.issues.> (optionally of one category)."""
        from vigil.jetstream import read_stored

        stored = await read_stored(self.js, subjects.STREAM_ISSUES, f"{subjects.ISSUES}.>",
                                   idle_s=0.5)
        found = [json.loads(data) for data in stored]
        return [c for c in found if category is None or c.get("category") == category]

    async def stop(self) -> None:
        for service in reversed(self.services):
            await service.shutdown()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=30)
        for task in self.tasks:
            if not task.done():
                task.cancel()


async def start_platform(url: str) -> Platform:
    nc = await connect(url, "pytest", wait_s=10)
    js = nc.jetstream()
    from vigil import topology

    await topology.ensure_topology(js)
    store = await TaskStore.open(js)
    events = EventLog()
    await nc.subscribe(f"{subjects.EVENTS}.>", cb=events.on_msg)
    return Platform(url=url, nc=nc, store=store, events=events)


async def stored_events(js: Any, task_id: str) -> list[dict[str, Any]]:
    """Every event of ``task_id`` as stored in VIGIL_EVENTS (not as seen live: a core
    subscription misses what is published while the test's connection is down)."""
    from vigil.jetstream import read_stored

    stored = await read_stored(js, subjects.STREAM_EVENTS, subjects.task_events(task_id))
    return [json.loads(data) for data in stored]


class ServiceProcess:
    """A real Vigil service process, to kill -9, SIGTERM, SIGSTOP for real."""

    service = "executor"
    ready_line = "executor_started"

    def __init__(self, workdir: Any, nats_url: str, node_id: str, **settings: Any) -> None:
        import os
        import sys

        self.node_id = node_id
        USED_NODES.add(node_id)
        self.log_path = workdir / f"{self.service}-{node_id}.log"
        self.env = {**os.environ, "VIGIL_NATS_URL": nats_url, "VIGIL_NODE_ID": node_id,
                    "VIGIL_LOG_FORMAT": "json", "VIGIL_HTTP_PORT": "0"}
        for key, value in settings.items():
            self.env[f"VIGIL_{key.upper()}"] = str(value)
        self.argv = [sys.executable, "-m", f"vigil_{self.service}"]
        self.process: Any = None

    def start(self) -> ExecutorProcess:
        import subprocess

        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[self._offset:]

    async def ready(self, timeout: float = 30.0) -> ExecutorProcess:
        async def started() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.service} {self.node_id} exited:\n{self.log_text()}")
            return self.ready_line in self.log_text()

        await eventually(started, timeout=timeout,
                         what=f"{self.service} {self.node_id} to start")
        return self

    def signal(self, sig: int) -> None:
        import os

        os.kill(self.process.pid, sig)

    async def exited(self, timeout: float = 60.0) -> int:
        async def done() -> bool:
            return self.process.poll() is not None

        await eventually(done, timeout=timeout, what=f"executor {self.node_id} to exit")
        return int(self.process.returncode)

    def kill(self) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            self.process.wait()


async def advertise(js: Any, node: str, pool: str = "default", slots: int = 4,
                    labels: dict[str, str] | None = None) -> None:
    """Put an executor entry in vigil-executors, as a test's stand-in executor would."""
    from vigil import codec
    from vigil.messages import ExecutorInfo, utcnow

    kv = await js.key_value(subjects.KV_EXECUTORS)
    now = utcnow()
    await kv.put(node, codec.encode(ExecutorInfo(node=node, pool=pool, slots=slots,
                                                 labels=labels or {}, started_at=now,
                                                 seen_at=now)))


class ExecutorProcess(ServiceProcess):
    """A real ``vigil-executor`` process."""


class SchedulerProcess(ServiceProcess):
    """A real ``vigil-scheduler`` process."""

    service = "scheduler"
    ready_line = "scheduler_started"


class AuditorProcess(ServiceProcess):
    """A real ``vigil-auditor`` process."""

    service = "auditor"
    ready_line = "auditor_started"


class GatewayProcess(ServiceProcess):
    """A real ``vigil-gateway`` process on a port of its own choosing (``url`` once ready)."""

    service = "gateway"
    ready_line = "gateway_started"

    def __init__(self, workdir: Any, nats_url: str, node_id: str, **settings: Any) -> None:
        super().__init__(workdir, nats_url, node_id, **{"auth": "none", **settings})

    @property
    def url(self) -> str:
        """The gateway's base URL, from its start-up log line."""
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == self.ready_line:
                    return str(entry["url"])
        raise AssertionError(f"gateway {self.node_id} has not logged its URL yet")


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def run_vigil(home: Any, url: str, token: str, *argv: str, timeout: float = 60.0,
                    **env: str) -> CliResult:
    """Run the ``vigil`` command line against gateway ``url`` as the holder of ``token``,
    in a home of its own (no stray config file or client.json is read)."""
    import sys
    from pathlib import Path

    environ = {"PATH": "/usr/bin:/bin", "HOME": str(home),
               "XDG_CONFIG_HOME": str(Path(home) / ".config"),
               "VIGIL_GATEWAY_URL": url, "VIGIL_TOKEN": token, **env}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "vigil"), *argv, env=environ, cwd=home,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())
