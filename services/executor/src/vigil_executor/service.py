"""The executor: pulls work for its pool with a bounded number of slots and runs each task
as an :class:`~vigil_executor.attempt.Attempt` in a rootless Podman container.

Shutdown (SIGTERM = the node is going away): stop pulling, hand buffered messages back,
ask every running attempt to stop its agent and hand its task back (state back to
``scheduled``, message naked without delay) so another node starts it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from vigil import subjects, topology
from vigil.consume import PullConsumer
from vigil.environments import EnvironmentStore
from vigil.errors import RuntimeUnavailable, SettingsError
from vigil.jetstream import TaskStore, publish_confession
from vigil.lifecycle import Late, Lifecycle
from vigil.messages import Confession, utcnow
from vigil.secrets import Keyring, SecretStore
from vigil_executor.attempt import Attempt
from vigil_executor.checkpoint import CheckpointStore
from vigil_executor.context import AttemptContext
from vigil_executor.egress import EgressNode
from vigil_executor.images import ImageLoader
from vigil_executor.isolation import Isolation
from vigil_executor.isolation import prepare as prepare_isolation
from vigil_executor.metrics import Metrics
from vigil_executor.podman import PodmanRuntime
from vigil_executor.process import NullRuntime, ProcessRuntime
from vigil_executor.registry import Advertiser
from vigil_executor.runtime import Runtime
from vigil_executor.sandbox import workspace_volume
from vigil_executor.secrets import Secrets
from vigil_executor.settings import ExecutorSettings
from vigil_executor.watchdog import node_enforcement

log = structlog.get_logger("vigil.executor")

# How long a drain that ran out of time waits to remove its attempts' containers and
# volumes (two Podman calls each, normally milliseconds).
CLEANUP_WAIT_S = 30.0


def make_runtime(conf: ExecutorSettings) -> Runtime:
    if conf.runtime == "podman":
        return PodmanRuntime(conf.podman_url, max_line=conf.max_line_bytes,
                             max_archive_bytes=conf.checkpoint_max_bytes)
    if not conf.unsafe_runtime:
        raise SettingsError(
            f"VIGIL_RUNTIME={conf.runtime} runs agents without any sandbox; it exists for "
            "benchmarks and tests only. Set VIGIL_UNSAFE_RUNTIME=1 to accept that, or use "
            "VIGIL_RUNTIME=podman."
        )
    if conf.runtime == "process":
        root = Path(conf.workspace_root) if conf.workspace_root else None
        return ProcessRuntime(root, max_line=conf.max_line_bytes)
    return NullRuntime()


class Executor:
    store = Late[TaskStore]()

    def __init__(self, settings: ExecutorSettings, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.metrics.slots.set(settings.slots)
        self.runtime: Runtime = runtime or make_runtime(settings)
        self.isolation: Isolation | None = None  # Podman's only: set at start
        self.egress = EgressNode(settings, self.metrics)
        self._life = Lifecycle("executor", settings, self.metrics.registry, detail=self._detail)
        self._stop = self._life.stopping
        self.ready = self._life.ready
        self._consumer: PullConsumer | None = None
        self._attempts: dict[asyncio.Task[None], Attempt] = {}
        self._advertiser: Advertiser | None = None
        self._naks: set[asyncio.Task[None]] = set()
        self._locks: list[int] = []  # fds holding the node id's and state directory's flocks
        self.checkpoints: CheckpointStore
        self.snapshots: CheckpointStore  # persistent environments' workspace snapshots
        self.environments: EnvironmentStore
        self.images: ImageLoader
        self.secrets = Secrets(settings, Keyring.load(settings.secrets_key_file,
                                                      settings.secrets_key))

    @property
    def js(self) -> JetStreamContext:
        return self._life.conn.js

    @property
    def nc(self) -> NATS:
        return self._life.conn.nc

    @property
    def http_port(self) -> int:
        return self._life.http_port

    # lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        s, life = self.settings, self._life
        async with life:
            life.on_close(self.runtime.close, after_nats=True)
            life.on_close(self.secrets.close, after_nats=True)
            life.on_close(self._unlock, after_nats=True)
            await self._open_runtime()
            if self._stop.is_set():
                return
            js = (await life.connect(f"vigil-executor-{s.node_id}")).js
            await topology.ensure_executor_consumer(js, s.pool, s.ack_wait_s)
            self.store = await TaskStore.open(js)
            self.checkpoints = CheckpointStore(js, s.checkpoint_max_bytes)
            await self.checkpoints.open()
            self.snapshots = CheckpointStore(js, s.checkpoint_max_bytes,
                                             subjects.OBJ_ENVIRONMENTS, "environment snapshot")
            await self.snapshots.open()
            self.environments = await EnvironmentStore.open(js)
            self.images = ImageLoader(js, self.runtime, s.image_max_bytes)
            self._prepare_state_dir()
            if isinstance(self.runtime, PodmanRuntime):
                self.isolation = self.runtime.isolation = prepare_isolation(
                    s, self.runtime.info, self.runtime.socket, self.state_dir)
            if self.runtime.name == "podman":
                await self.egress.prepare(self.state_dir, self.publish_confession)
            self.secrets.prepare(SecretStore(js))  # also clears an earlier life's files
            await self._remove_orphans()
            if self.runtime.name != "podman":
                log.warning("unsafe_runtime", runtime=self.runtime.name,
                            note="agents run WITHOUT a sandbox; benchmarks and tests only")
            if not self.runtime.limits_enforced:
                await self._confess_limits()
            consumer = self._consumer = PullConsumer(
                self.nc, subjects.STREAM_WORK, subjects.consumer_executor(s.pool),
                capacity=s.slots, max_batch=s.slots, heartbeat_s=min(5.0, s.heartbeat_s),
            )
            await consumer.start()
            life.on_reconnect(consumer.reset)
            await self.nc.subscribe(f"{subjects.CANCEL}.*.*", cb=self._on_cancel_notice)
            self._advertiser = Advertiser(
                js, node=s.node_id, pool=s.pool, labels=s.label_map, slots=s.slots,
                runtime=self.runtime.name, every_s=s.advertise_s, running=self._tenants,
                images=self.images.advertised,
                enforcement=node_enforcement(cgroups=self.runtime.limits_enforced,
                                             safe_runtime=self.runtime.name == "podman"))
            await self._advertiser.refresh_images()
            await self._advertiser.publish()
            advertising = asyncio.create_task(self._advertiser.run(self._stop))
            keyring = self.secrets.keyring
            life.started(node=s.node_id, pool=s.pool, slots=s.slots, runtime=self.runtime.name,
                         http_port=life.http_port, ack_wait_s=s.ack_wait_s,
                         heartbeat_s=s.heartbeat_s,
                         secrets_key=keyring.current_id if keyring else None)
            await self._loop(consumer)
            await self._advertiser.withdraw()
            await self._drain()
            await asyncio.wait({advertising}, timeout=5)
            await self._advertiser.remove()

    async def shutdown(self) -> None:
        await self._life.shutdown()

    def _tenants(self) -> list[str]:
        return [a.work.tenant for a in self._attempts.values() if a.work is not None]

    async def _on_cancel_notice(self, msg: Msg) -> None:
        """The scheduler marked a task cancelled: stop it now if it runs here (the
        heartbeat's state check catches a notice this node missed)."""
        tenant, task_id = subjects.token(msg.subject, 2), subjects.token(msg.subject, 3)
        for attempt in self._attempts.values():
            work = attempt.work
            if work is not None and (work.tenant, work.task_id) == (tenant, task_id):
                attempt.cancel()

    async def _open_runtime(self) -> None:
        delay = 0.2
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            try:
                await self.runtime.open()
                return
            except RuntimeUnavailable as exc:
                if attempt in (1, 5) or attempt % 20 == 0:
                    log.warning("runtime_unavailable", error=str(exc), attempt=attempt)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 5.0)

    # node-local state --------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        s = self.settings
        return Path(s.state_dir or f"/tmp/vigil-executor-{s.node_id}")  # noqa: S108

    def _prepare_state_dir(self) -> None:
        """Agents read their control directory through a read-only bind mount as an
        unprivileged uid: world-readable, writable only by us. The default lives in /tmp
        under a predictable name, so an existing one must be ours and not a symlink."""
        self._lock_node_id()
        control = self.state_dir / "control"
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        for d in (self.state_dir, control):
            _private_dir(d, 0o755, "set VIGIL_STATE_DIR")
        self._lock_state_dir()
        for leftover in control.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    def _lock_node_id(self) -> None:
        """One live executor per node id on this host, whatever its state directory.

        At start an executor removes the containers an earlier life of its node id left,
        found by the node id's label in Podman, not by anything in its state directory: a
        second live executor with the same node id (even with its own VIGIL_STATE_DIR)
        would remove the first one's running agents as orphans. So the lock is a file
        named after the node id in one place per user (the executors of a user share its
        rootless Podman). The flock dies with the process, so a restart after kill -9
        takes it over."""
        node = self.settings.node_id
        path = node_lock_dir() / f"executor-{node}.lock"
        self._locks.append(_flock(path, lambda: SettingsError(
            f"another executor with node id {node} is running on this host; give each "
            "executor its own VIGIL_NODE_ID: two with one node id remove each other's "
            "agents")))

    def _lock_state_dir(self) -> None:
        """One live executor per state directory.

        At start an executor clears the control directories an earlier life left. A second
        live executor with the same state directory (set to one path for two node ids)
        would clear the first one's *live* control directories, and its agents then fail
        to start ("error mounting /tmp/vigil-executor-<node>/control/<task>-a<n> to rootfs
        at /run/vigil: no such file or directory" - the flaky "could not start the
        container" of side-by-side test runs)."""
        self._locks.append(_flock(self.state_dir / "executor.lock", lambda: SettingsError(
            f"another executor is running with the state directory {self.state_dir}; give "
            "each executor its own VIGIL_STATE_DIR (or leave it unset: the default is one "
            "per node id)")))

    def control_dir(self, tenant: str, task_id: str, attempt: int) -> Path:
        d = self.state_dir / "control" / f"{tenant}.{task_id}-a{attempt}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(mode=0o755)
        os.chmod(d, 0o755)  # noqa: S103 - read by the agent's uid, written only by us
        return d

    def remove_control_dir(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    async def _remove_orphans(self) -> None:
        """Containers left by an earlier life of this node (killed, crashed, rebooted).

        Their tasks are not ours any more: NATS redelivers each after the ack wait, and the
        next attempt resumes from the last checkpoint. Stop them so that two copies of an
        agent never run, and say that the node was lost.
        """
        node = self.settings.node_id
        try:
            leftovers = await self.runtime.find_containers(node)
        except RuntimeUnavailable as exc:
            log.warning("orphan_scan_failed", error=str(exc))
            return
        for c in leftovers:
            await self.runtime.remove_container(c.id)
            # Named, for volumes an older executor made without labels.
            with contextlib.suppress(Exception):
                await self.runtime.remove_volume(
                    workspace_volume(node, c.tenant, c.task_id, c.attempt))
            log.warning("orphan_removed", container=c.id[:12], task_id=c.task_id,
                        attempt=c.attempt, state=c.state)
            await self.publish_confession(Confession(
                id=f"executor-{node}-orphan-{c.id[:12]}",
                summary=f"node {node} restarted and found attempt {c.attempt} of task "
                f"{c.task_id} still in a container ({c.state}); removed it",
                severity="warning", category="node_lost", task_id=c.task_id or None,
                tenant=c.tenant or None, attempt=c.attempt,
                detail="the executor on this node died without handing its tasks back "
                "(killed, crashed or rebooted); NATS redelivers them after the ack wait and "
                "they resume from their last checkpoint",
                source="executor", node=node, component="executor", time=utcnow(),
            ))
        # Volumes whose container is gone already: the earlier life died between
        # removing the one and the other, or before it created the container. Nothing
        # of a task is lost with them: a workspace lives on in its checkpoint.
        try:
            volumes = await self.runtime.find_volumes(node)
        except RuntimeUnavailable as exc:
            log.warning("orphan_scan_failed", error=str(exc))
            return
        for name in volumes:
            await self.runtime.remove_volume(name)
            log.warning("orphan_volume_removed", volume=name)

    async def _confess_limits(self) -> None:
        note = self.runtime.limits_note
        log.warning("resource_limits_not_enforced", note=note)
        await self.publish_confession(Confession(
            id=f"executor-{self.settings.node_id}-limits-{utcnow():%Y%m%d}",
            summary=f"resource limits are not enforceable on node {self.settings.node_id}",
            severity="warning", category="limits_unenforced", detail=note,
            hint="run executors on hosts with cgroup v2 and delegated memory/pids/cpu "
            "controllers for real limits",
            source="executor", node=self.settings.node_id, component="executor",
            time=utcnow(),
        ))

    async def _loop(self, consumer: PullConsumer) -> None:
        async for msg in consumer.until(self._stop):
            self._spawn(msg)

    def _spawn(self, msg: Msg) -> None:
        if len(self._attempts) >= self.settings.slots:
            # More deliveries than slots (pull requests outlived a reconnect): never run
            # more agents than configured; hand the extra straight back.
            log.warning("over_capacity_nak", running=len(self._attempts))
            task = asyncio.create_task(msg.nak())
            self._naks.add(task)
            task.add_done_callback(self._naks.discard)
            return
        attempt = Attempt(self._attempt_context(), msg)
        task = asyncio.create_task(attempt.run())
        self._attempts[task] = attempt
        self.metrics.running.set(len(self._attempts))
        task.add_done_callback(self._done)

    def _attempt_context(self) -> AttemptContext:
        """What an attempt may use of this executor (see vigil_executor.context)."""
        return AttemptContext(
            settings=self.settings, metrics=self.metrics, nc=self.nc, js=self.js,
            store=self.store, runtime=self.runtime, isolation=self.isolation,
            images=self.images, egress=self.egress, secrets=self.secrets,
            checkpoints=self.checkpoints, snapshots=self.snapshots,
            environments=self.environments, publish_confession=self.publish_confession,
            control_dir=self.control_dir, remove_control_dir=self.remove_control_dir)

    def _done(self, task: asyncio.Task[None]) -> None:
        if self._attempts.pop(task, None) is None:
            return
        self.metrics.running.set(len(self._attempts))
        if self._consumer is not None and not self._stop.is_set():
            self._consumer.release(1)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("attempt_crashed", error=repr(exc))

    async def _drain(self) -> None:
        # Unsubscribe before handing anything back: the server drops pull requests whose
        # inbox lost interest, so a naked message goes straight to another executor
        # instead of to our own outstanding requests (and from there nowhere until the
        # ack wait). Acks and naks of messages we hold do not need the subscription.
        if self._consumer is not None:
            await self._consumer.stop()
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)
        if self._attempts:
            log.info("draining", running=len(self._attempts))
            for attempt in self._attempts.values():
                attempt.stop("executor draining")
            _, late = await asyncio.wait(set(self._attempts),
                                         timeout=self.settings.stop_grace_s + 60)
            if late:
                # Past the drain's wait: NATS is gone or slow, so neither the drain's
                # checkpoint nor the hand-back gets through (the lease lapses and the
                # server redelivers the task instead). Their containers and volumes must
                # not outlive us: their own cleanup used to run only once the loop ended,
                # after the runtime was closed, and removed nothing. Cancel them, then
                # clean up here, while the runtime is open (their finally blocks still
                # wait on NATS a little: the lease, the output).
                log.warning("drain_timed_out", running=len(late))
                attempts = [self._attempts[task] for task in late if task in self._attempts]
                for task in late:
                    task.cancel()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(
                        *(a.cleanup() for a in attempts), return_exceptions=True),
                        CLEANUP_WAIT_S)
                await asyncio.wait(late, timeout=1)

    def _unlock(self) -> None:
        while self._locks:
            os.close(self._locks.pop())  # releases the flock: a successor may start now

    def _detail(self) -> dict[str, object]:  # for /healthz
        return {"running": len(self._attempts), "slots": self.settings.slots,
                "runtime": self.runtime.name, "limits_enforced": self.runtime.limits_enforced}

    async def publish_confession(self, confession: Confession) -> None:
        await publish_confession(self.js, confession)
        self.metrics.confessions.labels(confession.source or "executor",
                                        confession.severity).inc()


def node_lock_dir() -> Path:
    """Where this user's executors keep their node id locks: the user's runtime directory
    (``/run/user/<uid>``, as for the Podman socket) where there is one, else a private
    directory in /tmp. The same for every executor of the user, whatever its settings."""
    uid = os.geteuid()
    runtime = Path(f"/run/user/{uid}")
    if runtime.is_dir():
        return _private_dir(runtime / "vigil", 0o700, "fix its owner or mode")
    return _private_dir(Path(f"/tmp/vigil-{uid}"), 0o700,  # noqa: S108 - checked: ours, private
                        "fix its owner or mode")


def _private_dir(d: Path, mode: int, fix: str) -> Path:
    """Create ``d`` with ``mode``, or check that the existing one is a directory (not a
    symlink) owned by this user and writable only by it: the paths are predictable."""
    try:
        d.mkdir(mode=mode)
        os.chmod(d, mode)
    except FileExistsError:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise SettingsError(
                f"{d} exists but is not a directory owned by this executor's user and "
                f"writable only by it; remove it, or {fix}") from None
    return d


def _flock(path: Path, busy: Callable[[], SettingsError]) -> int:
    """An fd holding an exclusive flock on ``path``; ``busy()`` is raised if another
    process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise busy() from None
    return fd
