"""Test support: bounded waiting, NATS servers as shipped, and the platform's services run
in-process.

**NATS as shipped.** Every test server runs with the users and permissions ``vigil up``
and ``vigil nats-config`` produce (:func:`vigil.permissions.shipped_users`), and every
service — in-process or a real process — connects as its own least-privilege user
(:func:`as_user`). The test's own harness connects as ``admin`` (unrestricted: it plays the
person who runs NATS, and is no service). At teardown each server's log is scanned and a
``Publish Violation``/``Subscription Violation`` fails the test, naming user and subject
(:func:`assert_no_violations`). A test that needs a server without users says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
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
from vigil.natsserver import NatsServer
from vigil.natsusers import TenantUser
from vigil.permissions import SERVICES, shipped_users
from vigil_auditor.service import Auditor
from vigil_auditor.settings import AuditorSettings
from vigil_executor.service import Executor
from vigil_executor.settings import ExecutorSettings
from vigil_gateway.service import Gateway
from vigil_gateway.settings import GatewaySettings
from vigil_scheduler.service import Scheduler
from vigil_scheduler.settings import SchedulerSettings

T = TypeVar("T")

# Test servers live on loopback in a test's temp dir for its length: fixed passwords do.
TEST_TENANTS = ("acme", "beta", "default", "soak")


def password_for(user: str) -> str:
    return f"pw-{user}-for-tests-only"


def tenant_user(tenant: str) -> TenantUser:
    return TenantUser(name=f"tenant-{tenant}", tenant=tenant,
                      password=password_for(f"tenant-{tenant}"))


def users_for_tests(tenants: tuple[str, ...] = TEST_TENANTS) -> list[Any]:
    """The shipped users (services, operator, admin) and a user per test tenant."""
    passwords = {name: password_for(name) for name in (*SERVICES, "admin")}
    return shipped_users(passwords, [tenant_user(t) for t in tenants])


def shipped_server(store_dir: Any, **kwargs: Any) -> NatsServer:
    """A nats-server configured as ``vigil up`` ships it (see the module docstring)."""
    return NatsServer(store_dir=store_dir, users=users_for_tests(), **kwargs)


def as_user(url: str, user: str) -> str:
    """``url`` (one server, or a comma-separated list) with ``user``'s credentials: how a
    service or tool under test connects as the user it ships with. Services' own names
    (scheduler, executor, ...) and ``admin``/``operator`` are users; so is ``tenant-<t>``."""
    def one(u: str) -> str:
        scheme, _, rest = u.partition("://")
        rest = rest.rpartition("@")[2]  # replace any credentials already there
        return f"{scheme}://{user}:{password_for(user)}@{rest}"
    return ",".join(one(u) for u in url.split(","))


_VIOLATION = re.compile(r'"\$G/user:(?P<user>[^"]*)" - (?P<kind>\w+) Violation - '
                        r'Subject "(?P<subject>[^"]*)"')


def violations(server: NatsServer | Any) -> list[str]:
    """Every permissions violation in ``server``'s log (or the log file at that path), as
    ``user: kind subject``."""
    path = server.log_file if isinstance(server, NatsServer) else server
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    found = [f"{m['user']}: {m['kind'].lower()} {m['subject']}"
             for m in _VIOLATION.finditer(text)]
    found += [line for line in text.splitlines()
              if "Permissions Violation" in line and not _VIOLATION.search(line)]
    return found


def allow_violations(server: NatsServer, *users: str) -> None:
    """A test that makes ``users`` try what they may not (an isolation test) expects their
    violations; anyone else's still fails it."""
    server.__dict__.setdefault("allowed_violators", set()).update(users)


def assert_no_violations(*servers: NatsServer) -> None:
    found = [v for s in servers for v in violations(s)
             if v.split(":", 1)[0] not in s.__dict__.get("allowed_violators", set())]
    if found:
        unique = list(dict.fromkeys(found))
        raise AssertionError(
            f"{len(found)} NATS permission violations (a service reached beyond the "
            "permissions it ships with; see vigil.permissions):\n  " + "\n  ".join(unique[:20]))


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
        self.tenants: dict[str, str] = {}  # task id -> the tenant its events came under
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        self.events.append((msg.subject, json.loads(msg.data)))
        parts = subjects.event_parts(msg.subject)
        if parts is not None:
            self.tenants.setdefault(parts[1], parts[0])
        self._changed.set()

    def of(self, task_id: str, kind: str | None = None,
           tenant: str | None = None) -> list[dict[str, Any]]:
        """Events of task ``task_id`` (of any tenant, unless ``tenant`` is given)."""
        found = []
        for s, e in self.events:
            parts = subjects.event_parts(s)
            if parts is None or parts[1] != task_id:
                continue
            if (tenant is None or parts[0] == tenant) and (kind is None or parts[2] == kind):
                found.append(e)
        return found

    async def wait_for(self, task_id: str, kind: str, count: int = 1,
                       timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.of(task_id, kind)
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [e.get("kind") for e in self.of(task_id)]
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
    tenant_of: dict[str, str] = field(default_factory=dict)  # task id -> tenant, as sent
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

    def url_for(self, user: str) -> str:
        return as_user(self.url, user)

    async def scheduler(self, **overrides: Any) -> Scheduler:
        conf = {"nats_url": self.url_for("scheduler"), **overrides}
        return await self.add(Scheduler(SchedulerSettings(**conf)))

    async def executor(self, runtime_impl: Any = None, **overrides: Any) -> Executor:
        conf = {"nats_url": self.url_for("executor"), "runtime": "process",
                "unsafe_runtime": True,
                "heartbeat_s": 1.0, "ack_wait_s": 5.0, **overrides}
        conf.setdefault("node_id", session_node_id())
        USED_NODES.add(conf["node_id"])
        return await self.add(Executor(ExecutorSettings(**conf), runtime=runtime_impl))

    async def auditor(self, **overrides: Any) -> Auditor:
        conf = {"nats_url": self.url_for("auditor"), **overrides}
        return await self.add(Auditor(AuditorSettings(**conf)))

    async def gateway(self, **overrides: Any) -> Gateway:
        conf = {"nats_url": self.url_for("gateway"), "http_port": 0, "auth": "none",
                **overrides}
        return await self.add(Gateway(GatewaySettings(**conf)))

    async def publish_spec(self, spec: dict[str, Any] | bytes, tenant: str = "acme",
                           msg_id: str | None = None) -> Any:
        data = spec if isinstance(spec, bytes) else json.dumps(spec).encode()
        headers = {subjects.MSG_ID: msg_id} if msg_id else None
        ack = await self.js.publish(subjects.submit(tenant), data, headers=headers)
        if isinstance(spec, dict) and isinstance(spec.get("id"), str):
            self.tenant_of[spec["id"]] = tenant
        if msg_id:
            self.tenant_of.setdefault(msg_id, tenant)
        self.tenant_of.setdefault(f"s{ack.seq}", tenant)
        return ack

    async def _tenant(self, task_id: str) -> str | None:
        """Whose task ``task_id`` is, as far as this test has seen (ids are per tenant)."""
        found = self.tenant_of.get(task_id) or self.events.tenants.get(task_id)
        if found is None:
            from vigil.jetstream import tenants_of

            tenants = await tenants_of(self.js, task_id)
            if len(tenants) > 1:
                raise AssertionError(f"task id {task_id!r} exists in tenants {tenants}; "
                                     "name the tenant")
            found = tenants[0] if tenants else None
        return found

    async def state(self, task_id: str, tenant: str | None = None) -> TaskState | None:
        tenant = tenant or await self._tenant(task_id)
        if tenant is None:
            return None
        got = await self.store.get(tenant, task_id)
        return got[0] if got else None

    async def final_state(self, task_id: str, timeout: float = 30.0,
                          tenant: str | None = None) -> TaskState:
        async def probe() -> TaskState | None:
            s = await self.state(task_id, tenant)
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
    """The harness: connected as ``admin`` to the server at ``url`` (plain, no user)."""
    nc = await connect(as_user(url, "admin"), "pytest", wait_s=10)
    js = nc.jetstream()
    from vigil import topology

    await topology.ensure_topology(js)
    store = await TaskStore.open(js)
    events = EventLog()
    await nc.subscribe(f"{subjects.EVENTS}.>", cb=events.on_msg)
    return Platform(url=url, nc=nc, store=store, events=events)


async def stored_events(js: Any, task_id: str, tenant: str = "*") -> list[dict[str, Any]]:
    """Every event of ``task_id`` (of ``tenant``; by default of any tenant: tests use
    unique ids) as stored in VIGIL_EVENTS and VIGIL_OUTPUT, by time (not as seen live: a
    core subscription misses what is published while the test's connection is down)."""
    from vigil.jetstream import read_stored

    events = [json.loads(data)
              for stream in (subjects.STREAM_EVENTS, subjects.STREAM_OUTPUT)
              for data in await read_stored(js, stream, subjects.task_events(tenant, task_id))]
    return sorted(events, key=lambda e: str(e.get("time", "")))  # (stable: each in order)


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
        self.env = {**os.environ, "VIGIL_NATS_URL": as_user(nats_url, self.service),
                    "VIGIL_NODE_ID": node_id,
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


def podman_argv() -> list[str]:
    """The podman CLI of the rootless Podman the tests use: as user vigil when run as root,
    with its home and runtime directory (as the podman fixture's API service runs)."""
    import subprocess
    from pathlib import Path

    if os.geteuid() != 0:
        return ["podman"]
    user = "vigil"
    uid = int(subprocess.run(["id", "-u", user], capture_output=True, text=True,
                             check=True).stdout)
    runtime = f"/run/user/{uid}" if Path(f"/run/user/{uid}").is_dir() else \
        f"/tmp/vigil-runtime-{uid}"
    return ["runuser", "-u", user, "--", "env", f"HOME=/home/{user}",
            f"XDG_RUNTIME_DIR={runtime}", "podman"]


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
