"""Running the agent: start its container, watch it, read its output, judge its exit.

**Start** (:meth:`AgentRun._start`): the image (loaded from the store if this node lacks
it), a persistent environment's hold, the egress proxy and the secrets, then the
container; if an earlier attempt left a checkpoint, the workspace is restored into it
first (:mod:`vigil_executor.restore`). What goes wrong here is the node's or the
platform's (handed back, no attempt spent) or the task's own (it fails, saying why).

**Supervise** (:meth:`AgentRun._supervise`): the agent runs under its watchdog (resource
limits), its time limit and the lease, while its output is pumped into events and its
control lines answered (confessions, checkpoints). It ends by its exit, a runaway, a
cancel (grace, then kill), the time limit, a drain (its workspace snapshotted, the task
handed back) or the lease lost (killed at once, nothing recorded). :func:`judge` turns
the exit into the attempt's :class:`~vigil_executor.claim.Outcome`.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from typing import Any, NamedTuple

import structlog

from vigil import transitions
from vigil.errors import ImageNotFound, RuntimeUnavailable, VigilError
from vigil.messages import Progress, utcnow
from vigil_executor import restore
from vigil_executor.agentio import MIB, AgentOutput
from vigil_executor.checkpointing import Checkpointing
from vigil_executor.claim import HandBack, LeaseLost, Outcome, RestoreGaveUp
from vigil_executor.confess import AgentConfessions
from vigil_executor.egress import EgressUnavailable
from vigil_executor.environment import EnvironmentFailed, EnvironmentRun, Hooks
from vigil_executor.hold import Hold
from vigil_executor.images import ImageRefused
from vigil_executor.isolation import priority
from vigil_executor.lease import Lease
from vigil_executor.retry import image_missing_delay
from vigil_executor.runtime import Container, ContainerError, ContainerSpec, ExitInfo
from vigil_executor.sandbox import container_spec
from vigil_executor.secrets import SecretRefused
from vigil_executor.watchdog import Crossing, Watchdog

log = structlog.get_logger("vigil.executor")

OUTPUT_GRACE_S = 10.0
RUNTIME_RETRY_DELAY_S = 5.0


class _Running(NamedTuple):
    spec: ContainerSpec
    container: Container
    nice: int | None  # the agent's nice value, when it was lowered
    resumed: bool


class AgentRun:
    def __init__(self, h: Hold, lease: Lease, checkpoints: Checkpointing,
                 confessions: AgentConfessions) -> None:
        self._h = h
        self._lease = lease
        self._checkpoints = checkpoints
        self._confessions = confessions
        self._pump_task: asyncio.Task[None] | None = None  # the agent's output, once started
        self.watchdog: Watchdog | None = None  # measures the running agent (its resources)

    async def execute(self, attempt: int) -> Outcome:
        try:
            started = await self._start(attempt)
            if isinstance(started, Outcome):
                return started
            return await self._supervise(attempt, started)
        finally:
            await self._output_ended()
            if self._h.egress is not None:  # its last events go out before the outcome
                await self._h.egress.close()

    async def _start(self, attempt: int) -> _Running | Outcome:
        h = self._h
        assert h.work is not None and h.state is not None
        ctx, work = h.ctx, h.work
        h.control = ctx.control_dir(work.tenant, work.task_id, attempt)
        spec = container_spec(work, attempt, ctx.settings, control_dir=str(h.control))
        t0 = time.perf_counter()
        resumed = False
        try:
            if not await ctx.runtime.image_exists(spec.image):
                await ctx.images.ensure(spec.image, self._image_progress)  # or ImageNotFound
            if work.spec.environment is not None:  # before the proxy and secrets: may wait
                h.env = EnvironmentRun(ctx.environments, ctx.snapshots, ctx.settings, work,
                                       attempt, Hooks(h.cas, h.confess, h.sink.emit))
                await h.env.hold(h.msg.metadata.num_delivered)
                h.spawn(h.env.keep())
            h.egress = await ctx.egress.open(work, attempt, h.control,
                                             runtime=ctx.runtime.name, emit=h.sink.emit,
                                             confess=h.confess)
            mount = h.egress.mount if h.egress is not None else None
            h.secrets = await ctx.secrets.open(work, attempt, h.msg.metadata.num_delivered,
                                               self._confess_secrets)
            h.secrets.guard(h.sink)
            with tempfile.TemporaryFile() as archive:
                restoring = await restore.fetch(h, archive)
                resumed = restoring is not None
                if h.env is not None:
                    restoring = await h.env.workspace(h.state, restoring, archive)
                spec = container_spec(work, attempt, ctx.settings, control_dir=str(h.control),
                                      resumed=resumed, egress=mount, secrets=h.secrets)
                h.volume = spec.workspace_volume
                h.container = await ctx.runtime.create(spec)
                if restoring is not None:
                    await restore.unpack(h, spec, archive, restoring)
                    h.restored = restoring.name
                if h.env is not None and not resumed:
                    h.env.restored(restoring)
            container = h.container
            nice = await container.start()
        except ImageNotFound as exc:
            # The node's problem, not the task's: another node may have the image (or this
            # one, once it is pulled). Hand back with a growing delay; no attempt is spent.
            # The consumer's max deliveries and the queue timeout bound the wait.
            error = f"image {spec.image} not found on node {ctx.settings.node_id}"
            delay = image_missing_delay(h.msg.metadata.num_delivered)
            await h.confess("error", "image_missing", error,
                            hint=f"{exc}; push it once (vigil image push {spec.image}: "
                            "every node loads it on first use) or load it on this node")
            raise HandBack(f"{error}; handing the task back", delay,
                           kind="image missing") from exc
        except EgressUnavailable as exc:  # the node's problem, as a missing image is
            await h.confess("error", "egress_unavailable", str(exc), hint=exc.hint)
            raise HandBack(f"{exc}; handing the task back", image_missing_delay(
                h.msg.metadata.num_delivered), kind="egress unavailable") from exc
        except RuntimeUnavailable as exc:
            await h.confess("error", "runtime_unavailable", str(exc))
            raise HandBack(f"container runtime unavailable: {exc}", RUNTIME_RETRY_DELAY_S,
                           kind="container runtime unavailable") from exc
        except RestoreGaveUp as exc:
            return Outcome("failed", None, str(exc), dead="unrestorable")
        except SecretRefused as exc:
            await h.confess("error", exc.category, str(exc), hint=exc.hint)
            return Outcome("failed", None, f"{exc}; {exc.hint}")
        except (ImageRefused, EnvironmentFailed) as exc:
            # Never to run (a tampered image; an environment it cannot start from): the
            # task fails, saying why, and is not retried.
            await h.confess(exc.severity, exc.category, str(exc))
            return Outcome("failed", None, str(exc))
        except ContainerError as exc:
            # Raised by create or by start: the host's failure is handed back, the task's
            # own (its command, its settings) fails it.
            return await start_failed(h, exc, None)
        except (HandBack, LeaseLost):
            raise  # already decided: the callers below handle them
        except VigilError as exc:
            if exc.retryable:
                # Passing trouble of the platform's (NATS away in the middle of the
                # restore's or an environment's bookkeeping): charged to nobody, tried
                # again (here or elsewhere) after a pause, as a missing runtime is.
                error = f"could not start the task on {ctx.settings.node_id}: {exc}"
                await h.confess("error", "platform_unavailable",
                                f"{error}; handed the task back (no attempt spent)",
                                hint="check NATS (and the executor's connection to it)")
                raise HandBack(f"{error}; handing the task back", RUNTIME_RETRY_DELAY_S,
                               kind="platform unavailable") from exc
            # Any other refusal of ours: a clear failure of this task, not a crash that
            # would loop through redelivery.
            error = f"could not start the container on {ctx.settings.node_id}: {exc}"
            await h.confess("error", "container_start_failed", error)
            return Outcome("failed", None, error)
        ctx.metrics.container_start.observe(time.perf_counter() - t0)
        return _Running(spec, container, nice, resumed)

    async def _supervise(self, attempt: int, running: _Running) -> Outcome:
        h = self._h
        assert h.work is not None
        ctx, work = h.ctx, h.work
        spec, container, nice, resumed = running
        started_at = time.monotonic()
        watchdog = self.watchdog = Watchdog(
            spec.limits, cgroups=ctx.runtime.limits_enforced,
            interval_s=ctx.settings.watchdog_interval_s,
            autogroup_nice=ctx.isolation.autogroup_nice if ctx.isolation is not None else 0)
        unwatched = await watchdog.attach(ctx.runtime, container.id, spec.workspace_volume)
        limits = work.spec.resources
        output_mb = (limits.output_mb if limits else None) or ctx.settings.output_mb
        assert h.state is not None
        for event in transitions.start(
            h.state, attempt, utcnow(), image=spec.image, container=container.id[:12],
            resumed=resumed, limits_enforced=ctx.runtime.limits_enforced,
            resources={**watchdog.resources,
                       **(ctx.isolation.resources() if ctx.isolation is not None else {}),
                       **({"priority": priority(nice)} if ctx.isolation is not None else {}),
                       "output_mb": {"value": output_mb, "by": "executor"}},
        ).events:
            h.sink.emit(event, once=True)
        if unwatched:
            await h.confess("error", "watchdog_unavailable",
                            f"the executor cannot watch this agent's "
                            f"{', '.join(watchdog.unwatched())}: {'; '.join(unwatched)}",
                            hint="its started event says how each limit is enforced "
                            "(by: none or rlimit); run the executor as root or as the "
                            "rootless Podman user, with /proc readable")
        confessions = self._confessions
        h.output = output = AgentOutput(
            work.task_id, attempt, h.sink.emit,
            on_confess=confessions.confession,
            on_checkpoint=self._checkpoints.request,
            on_malformed=confessions.malformed, masker=h.secrets.masker,
            limit_bytes=output_mb * MIB, on_limit=confessions.output_limit,
        )
        pump = self._pump_task = asyncio.create_task(self._pump(container, output))
        waiter = asyncio.create_task(container.wait())
        stopper = asyncio.create_task(h.stop_requested.wait())
        canceller = asyncio.create_task(h.cancel_requested.wait())
        periodic = h.spawn(self._checkpoints.periodic())
        guard = asyncio.create_task(watchdog.run())
        lease = self._lease.task
        timed_out = cancelled = False
        crossing: Crossing | None = None
        try:
            done, _ = await asyncio.wait(
                {waiter, stopper, canceller, lease, guard}, timeout=spec.timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if lease in done:
                # The lease is gone (see Lease): the agent must not run on unowned.
                await container.stop(0)
                pump.cancel()
                lease.result()  # raises LeaseLost
                raise LeaseLost("lease renewal ended")
            if waiter not in done and guard in done:
                # A runaway: killed at once, no grace (nor checkpoint: it would hold the
                # runaway's state).
                crossing = guard.result()
                await container.stop(0)
            elif waiter not in done and canceller in done:
                # Cancelled: SIGTERM, the grace period, then SIGKILL. No checkpoint: the
                # task will not run again.
                cancelled = True
                log.info("cancelling_agent", grace_s=ctx.settings.stop_grace_s)
                await container.stop(ctx.settings.stop_grace_s)
            elif waiter not in done:
                if stopper in done:
                    # SIGTERM gives the agent its grace period to checkpoint on its own;
                    # then the stopped agent's workspace is snapshotted (nothing writes it
                    # any more, though a killed agent may have left a file half written)
                    # while the lease is still kept, and handed back.
                    await container.stop(ctx.settings.stop_grace_s)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(pump, OUTPUT_GRACE_S)
                    output.close()
                    await self._checkpoints.drain_snapshot(waiter)
                    raise HandBack(h.stopping or "executor stopping")
                timed_out = True
                log.warning("time_limit_exceeded", timeout_s=spec.timeout_s)
                await container.stop(ctx.settings.stop_grace_s)
            try:
                exit_info: ExitInfo = await asyncio.wait_for(
                    asyncio.shield(waiter), ctx.settings.stop_grace_s + 60)
            except TimeoutError:
                raise HandBack("the container runtime did not report the agent's exit",
                               RUNTIME_RETRY_DELAY_S) from None
        finally:
            stopper.cancel()
            canceller.cancel()
            periodic.cancel()
            guard.cancel()
            watchdog.close()
            if not waiter.done():
                waiter.cancel()
        try:
            await asyncio.wait_for(pump, OUTPUT_GRACE_S)
        except TimeoutError:
            log.warning("output_stream_did_not_end")
        output.close()
        ctx.metrics.duration.observe(time.monotonic() - started_at)
        if cancelled:
            reason = h.state.cancel_reason if h.state else None
            return Outcome("cancelled", exit_info.exit_code, reason or "cancelled")
        if crossing is not None:
            # Not retried (no retryable_cause): the same task would cross it again.
            await h.confess("error", crossing.limit, crossing.error, hint=crossing.hint)
            return Outcome("failed", exit_info.exit_code, crossing.error,
                           limit=crossing.limit, peak=crossing.peak)
        return await judge(h, watchdog, exit_info, output, timed_out, spec.timeout_s)

    def _image_progress(self, data: dict[str, Any]) -> None:
        h = self._h
        assert h.state is not None
        h.sink.emit(Progress(task_id=h.state.id, attempt=h.state.attempt,
                             time=utcnow(), data=data))

    async def _confess_secrets(self, severity: str, category: str, summary: str,
                               hint: str | None) -> None:
        await self._h.confess(severity, category, summary, hint=hint)

    async def _pump(self, container: Container, output: AgentOutput) -> None:
        lines = self._h.ctx.metrics.log_lines
        async for stream, line in container.output():
            await self._h.sink.room()
            await output.feed(stream, line)
            lines.labels(stream).inc()

    async def _output_ended(self) -> None:
        """However the agent's run ended (its exit, a drain, the lease lost, an output
        stream that would not end), its output is over now: say once how many
        confessions the rate limit dropped. Bounded: NATS may be what cut us off."""
        pump = self._pump_task
        if pump is None:
            return  # the agent never started
        if not pump.done():
            pump.cancel()
        await asyncio.wait({pump}, timeout=OUTPUT_GRACE_S)
        try:
            await asyncio.wait_for(self._confessions.report_dropped(),
                                   self._h.ctx.settings.heartbeat_s)
        except TimeoutError:
            log.warning("dropped_confessions_report_failed",
                        dropped=self._confessions.limiter.dropped, error="timed out")


async def start_failed(h: Hold, exc: ContainerError, exit_code: int | None) -> Outcome:
    """The container could not start the agent (the runtime refused it, or its init
    could not fork or exec the command). The host's failure (``exc.retryable``: no
    processes or memory left, broken storage, the runtime's 5xx) is the platform's:
    confessed, and the task handed back with a growing delay (the one a missing image
    gets) and no attempt spent; the work consumer's max deliveries bound the loop.
    The task's own (a command the image lacks) fails it, not retried: a retry would
    find the same image."""
    node = h.ctx.settings.node_id
    if exc.retryable:
        delay = image_missing_delay(h.msg.metadata.num_delivered)
        error = (f"the container could not start on node {node} for a host reason "
                 f"({exc.cause}): {exc}")
        await h.confess(
            "error", "container_start_infra", f"{error}; handed back, no attempt spent",
            hint=f"node {node} is short of processes, memory or storage, or its Podman "
            f"is failing: check `podman info` and the Podman service log there; the task "
            f"runs again in {delay:g}s, on any node")
        raise HandBack(f"{error}; handing the task back", delay,
                       kind="container start infra") from exc
    error = f"could not start the container on {node}: {exc}"
    await h.confess("error", "container_start_failed", error)
    return Outcome("failed", exit_code, error)


async def judge(h: Hold, watchdog: Watchdog | None, exit_info: ExitInfo,
                output: AgentOutput, timed_out: bool, timeout_s: float) -> Outcome:
    """What the agent's exit makes of the attempt (confessing what the platform saw)."""
    code = exit_info.exit_code
    if timed_out:
        error = f"killed after exceeding its time limit of {timeout_s:g}s"
        await h.confess("warning", "time_limit", error)
        return Outcome("timed_out", code, error)
    if exit_info.start_error is not None:
        return await start_failed(h, exit_info.start_error, code)
    if code == 0:
        return Outcome("succeeded", 0, None)
    if exit_info.oom_killed:
        memory = (watchdog.limits.memory_mb if watchdog is not None
                  else h.ctx.settings.memory_mb)
        if watchdog is not None and watchdog.cgroups:
            # The task's own cgroup limit: as precise an outcome as the watchdog's
            # (the kernel killed it at the limit), and not retried either.
            error = f"memory limit {memory} MiB reached: killed by the kernel (cgroup)"
            await h.confess("error", "memory_limit", error, hint=(
                "raise resources.memory_mb in the task (up to the tenant's maximum, "
                "resources_max), else look for a leak"))
            return Outcome("failed", code, error, limit="memory_limit", peak=memory)
        error = f"killed by the kernel: out of memory (limit {memory} MiB)"
        await h.confess("error", "oom", error)
        return Outcome("failed", code, error,
                       retryable_cause=f"agent ran out of memory (exit code {code})")
    cause = error = f"agent exited with code {code}"
    if output.total_lines == 0:
        await h.confess(
            "warning", "silent_failure", f"agent exited with code {code} without any output",
            hint="the agent printed nothing; check its command and image",
        )
        error += " (no output)"
    elif output.tail:
        error += f"; last output: {output.tail[-1][:300]}"
    return Outcome("failed", code, error, retryable_cause=cause)
