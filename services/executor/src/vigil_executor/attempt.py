"""One attempt of one task on this node: claim, run, record, ack — in that order.

- **Claim**: compare-and-set the task to ``running`` as attempt n+1. A task whose previous
  attempt is still ``running`` lost its executor (the server redelivered it after the
  ack wait): that attempt is recorded as ``lost``. Lost attempts do not spend
  ``max_attempts`` (the node failed, not the agent); after ``max_lost_attempts`` of them
  (an executor setting) the task is ``dead``: a crash loop, or a task that kills nodes.
- **Run**: create the container; if an earlier attempt left a checkpoint, restore the
  workspace into it first (``VIGIL_RESUMED=1``); start it; keep the lease.
- **Checkpoint** on the agent's request, periodically if configured, and on drain: the
  workspace archive goes to the object store and the state points to it (CAS), at the
  head of a short history. A snapshot the agent did not vouch for (periodic, or a drain
  that had to kill it) never replaces one it did; an agent that keeps failing right
  after restoring the same checkpoint rolls back to the one before it (see
  :mod:`vigil_executor.checkpoint_rules`).
- **Record** the outcome with compare-and-set on the revision this attempt last wrote, so a
  stale attempt (a frozen or partitioned executor) can never overwrite a newer one; ack
  the work message only after the outcome and every event are durable.
- **Retry** an agent failure (non-zero exit, OOM kill) while ``max_attempts`` allows and
  the exit code is retryable (see :mod:`vigil_executor.retry`): the task goes back to
  ``scheduled`` (CAS) with the failed attempt in its history, its exit code and error
  still shown and ``retry_at`` set; a ``retrying`` event names the reason; the work
  message is naked with the backoff as its delay. JetStream's redelivery is the timer,
  durable and on any node; the redelivery claims attempt n+1 like any other.
  ``timed_out`` and ``cancelled`` are final, never retried.
- **Hand back** (drain, Podman trouble, image missing on this node): snapshot the stopped
  agent's workspace, return the task to ``scheduled`` without spending an attempt, and nak
  the message (drain: without delay; a missing image: 5 s growing to 60 s, by delivery).

docs/decisions/0009-retries.md has the rule table: which outcomes count, which retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import msgspec
import nats.errors
import structlog
from nats.aio.msg import Msg
from structlog.contextvars import bound_contextvars

from vigil import codec
from vigil.errors import ImageNotFound, NatsUnavailable, RuntimeUnavailable, VigilError
from vigil.jetstream import log_tail
from vigil.messages import (
    HISTORY_KEPT,
    SUMMARY_CHARS,
    TAIL_LINE_CHARS,
    AttemptRecord,
    Checkpoint,
    CheckpointRef,
    Confession,
    ConfessionEvent,
    Finished,
    Progress,
    Retrying,
    Started,
    TaskState,
    WorkItem,
    utcnow,
)
from vigil_executor import checkpoint_rules
from vigil_executor.agentio import (
    MIB,
    AgentOutput,
    ConfessionLimiter,
    ConfessionTooLarge,
    ControlError,
    OutputLimit,
    clip,
    mib,
)
from vigil_executor.checkpoint import (
    RESTORE_BACKOFF_S,
    RESTORE_DELIVERIES,
    RESTORE_HAND_BACK_S,
    RESTORE_TRIES,
    CheckpointError,
    archive_problem,
    object_name,
    restore_failure,
)
from vigil_executor.checkpoint_rules import Rollback, drain_was_clean, may_replace
from vigil_executor.claim import (
    HandBack,
    LeaseClock,
    LeaseLost,
    Outcome,
    RestoreGaveUp,
    first_running_state,
    judge_delivery,
    lost_attempts,
    may_hand_back,
    spent_attempts,
)
from vigil_executor.egress import EgressProxy, EgressUnavailable
from vigil_executor.environment import EnvironmentFailed, EnvironmentRun, Hooks
from vigil_executor.images import ImageRefused
from vigil_executor.isolation import priority
from vigil_executor.retry import (
    DEFAULT_POLICY,
    IMAGE_MISSING_MAX_DELAY_S,
    Verdict,
    after_failure,
    image_missing_delay,
)
from vigil_executor.runtime import Container, ContainerError, ContainerSpec, ExitInfo
from vigil_executor.sandbox import container_spec
from vigil_executor.secrets import NO_SECRETS, SecretRefused
from vigil_executor.sink import EventSink
from vigil_executor.watchdog import Crossing, Watchdog

if TYPE_CHECKING:
    from vigil_executor.service import Executor

log = structlog.get_logger("vigil.executor")

OUTPUT_GRACE_S = 10.0
# After a drain's stop has returned, how long the runtime may take to report the agent's
# exit code (it is known by then; a runtime that does not say counts as not clean).
EXIT_REPORT_S = 5.0
RUNTIME_RETRY_DELAY_S = 5.0
LABELS_RETRY_DELAY_S = 0.5
# A redelivery this close to its retry_at runs now: server timers and clocks are not exact.
EARLY_TOLERANCE_S = 0.25


class Attempt:
    def __init__(self, ex: Executor, msg: Msg) -> None:
        self.ex = ex
        self.msg = msg
        self.work: WorkItem | None = None
        self.state: TaskState | None = None
        self.revision = 0
        self.container: Container | None = None
        self.volume: str | None = None  # the attempt's workspace volume, once it may exist
        self.sink = EventSink(ex.js)
        self.output: AgentOutput | None = None
        self.confessions = ConfessionLimiter(ex.settings.max_confessions,
                                             ex.settings.confessions_per_min)
        self.control: Path | None = None
        self.egress: EgressProxy | None = None  # the attempt's proxy, if its task has egress
        self.secrets = NO_SECRETS  # what the agent was given (vigil_executor.secrets)
        self._lease_ok = time.monotonic()
        self._stopping: str | None = None  # reason, when the executor drains
        self._stop_event = asyncio.Event()
        self._cancel_event = asyncio.Event()  # the scheduler marked the task cancelled
        self._lease: asyncio.Task[None] | None = None
        self._lease_done = asyncio.Event()
        self._write_lock = asyncio.Lock()  # one state write (and checkpoint) at a time
        self._checkpoints = 0
        # What this attempt did with checkpoints, for its AttemptRecord (by object name).
        self._restored: str | None = None
        self._restore_failed: str | None = None
        self._saved: str | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._pump_task: asyncio.Task[None] | None = None  # the agent's output, once started
        self.env: EnvironmentRun | None = None  # its task's persistent environment, if any
        self.watchdog: Watchdog | None = None  # measures the running agent (its resources)

    # entry point ----------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            self.work = codec.work_decoder.decode(self.msg.data)
        except msgspec.DecodeError as exc:
            await self._poison(f"undecodable work item: {exc}")
            return
        self.sink.tenant = self.work.tenant
        with bound_contextvars(task_id=self.work.task_id, executor=self.ex.settings.node_id):
            missing = _missing_labels(self.work.spec.node_labels, self.ex.settings.label_map)
            if missing:
                # Not for this node: back to the pool at once (no attempt, no state
                # change); a node with the labels takes it. The scheduler only queues
                # tasks some live node can run.
                log.info("labels_mismatch", missing=missing)
                with contextlib.suppress(Exception):
                    await self.msg.nak(delay=LABELS_RETRY_DELAY_S)
                return
            try:
                await self._run()
            except LeaseLost as exc:
                self.ex.metrics.leases_lost.inc()
                log.warning("lease_lost", reason=str(exc))
                await self._confess_lease_lost(str(exc))
            except HandBack as exc:
                await self._hand_back(exc)
            except NatsUnavailable as exc:
                # We could not record what happened; the lease will lapse and another node
                # (or this one) retries the task. Nothing is acked, nothing is lost.
                log.error("nats_unavailable_mid_task", error=str(exc))
            except Exception as exc:
                # A bug of ours must not lose the task, nor be charged to the agent or the
                # node: hand it back as the attempt's record (not left `running`, which
                # the next delivery would count as a lost node) for another try (the
                # consumer's max deliveries bound the loop) and say so loudly.
                log.exception("attempt_failed_unexpectedly")
                with contextlib.suppress(Exception):
                    await self._confess("critical", "executor_bug",
                                        f"executor failed handling the task: {exc!r}")
                if await self._may_hand_back():
                    with contextlib.suppress(Exception):
                        await self._hand_back(HandBack(
                            f"executor error: {clip(repr(exc), 300)}", RUNTIME_RETRY_DELAY_S,
                            kind="executor error"))
                else:
                    # A newer delivery holds the task: our nak would redeliver the message
                    # under its feet (ADR 7). Its lease is not ours to touch; do nothing.
                    log.warning("not_handing_back", reason="a newer attempt holds the task")
            finally:
                for task in self._background:
                    task.cancel()
                self.sink.cancel()
                await self.cleanup()

    def stop(self, reason: str) -> None:
        """Ask this attempt to hand its task back (executor draining)."""
        self._stopping = reason
        self._stop_event.set()

    def cancel(self) -> None:
        """The task was cancelled: stop the agent (grace, then kill), record ``cancelled``."""
        if not self._cancel_event.is_set():
            log.info("cancel_received")
            self._cancel_event.set()

    async def _cas(self, change: Callable[[TaskState], TaskState]) -> TaskState | None:
        """Write ``change(state)`` by compare-and-set; None when fenced off.

        Besides this attempt, only the scheduler writes a running task: it marks a cancel
        request. That moves the revision without taking the task away, so a failed CAS
        is retried on the fresh state while it is still this attempt's (same attempt,
        executor, work message and delivery); anything else is a newer attempt's task.
        """
        assert self.state is not None
        for _ in range(5):
            updated = self.secrets.masker.state(change(self.state))
            rev = await self.ex.store.cas(updated, self.revision)
            if rev is not None:
                self.state, self.revision = updated, rev
                return updated
            got = await self.ex.store.get_state(self.state)
            if got is None or not _same_attempt(got[0], self.state):
                return None
            self.state, self.revision = got
            if got[0].cancel_requested_at is not None:
                self.cancel()
        return None

    # steps ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self.work is not None
        if not await self._claim():
            return
        assert self.state is not None
        attempt = self.state.attempt
        with bound_contextvars(attempt=attempt):
            self._lease = asyncio.create_task(self._heartbeat())
            retry_in: float | None = None
            try:
                outcome = await self._execute(attempt)
                if self.env is not None:
                    outcome = await self.env.commit(outcome, self.container,
                                                    self.msg.metadata.num_delivered)
                # The lease is kept until the ack: recording can take a while if NATS is
                # slow, and a lapse now would hand a finished task to someone else.
                retry_in = await self._record(outcome)
                if self.env is not None and retry_in is None:
                    await self.env.release()  # the task ended: the next one may take it
            finally:
                self._lease_done.set()
                self._lease.cancel()
                await asyncio.wait({self._lease}, timeout=self.ex.settings.heartbeat_s + 10)
                if self._lease.done() and not self._lease.cancelled():
                    with contextlib.suppress(LeaseLost, Exception):
                        self._lease.result()
            if retry_in is not None:
                # Only now that the heartbeat has stopped: an in-progress ack sent after
                # the nak would reset the message's timer to the ack wait.
                with contextlib.suppress(Exception):
                    await self.msg.nak(delay=retry_in)
                log.info("task_retrying", delay_s=round(retry_in, 3))

    async def _claim(self) -> bool:
        """Move the task to ``running`` as attempt n+1; False when there is nothing to run."""
        assert self.work is not None
        store = self.ex.store
        if await self._claim_fresh():
            return True
        for _ in range(10):
            got = await store.get(self.work.tenant, self.work.task_id)
            if got is None:
                await self._poison(f"work item for unknown task {self.work.task_id}")
                return False
            state, rev = got
            meta = self.msg.metadata
            if state.terminal:
                log.info("duplicate_delivery", status=state.status)
                await self._finished_again(state)
                await self.msg.ack()
                return False
            verdict = judge_delivery(state, meta.sequence.stream, meta.num_delivered)
            if verdict == "duplicate":
                log.info("duplicate_work_item", held_by=state.work_seq)
                await self.msg.ack()
                return False
            if verdict == "stale":
                log.warning("stale_delivery", delivery=meta.num_delivered, held=state.delivery,
                            holder=state.executor)
                return False
            now = utcnow()
            history = list(state.history)
            if state.cancel_requested_at is not None:
                # Cancelled while its executor was gone: finish the cancel, run nothing.
                await self._cancelled_unrun(state, rev)
                return False
            if early := _retry_not_due(state, now):
                # Redelivered before its backoff was over (the executor that set it died
                # before its nak arrived, and the ack wait was shorter): wait out the rest.
                log.info("retry_not_due", retry_at=str(state.retry_at), wait_s=round(early, 3))
                await self.msg.nak(delay=early)
                return False
            if state.status == "running":
                # The previous attempt's executor stopped renewing its lease: it is gone.
                history.append(AttemptRecord(
                    attempt=state.attempt, executor=state.executor,
                    started_at=state.started_at, ended_at=now, outcome="lost",
                    error="its executor stopped renewing the lease",
                ))
                lost = msgspec.structs.replace(state, history=history)
                limit = self.ex.settings.max_lost_attempts
                if lost_attempts(lost) >= limit:
                    await self._dead(lost, rev, limit)
                    return False
                await self._confess(
                    "warning", "lost_heartbeat",
                    f"attempt {state.attempt} of task {state.id} lost its executor "
                    f"{state.executor}; running attempt {state.attempt + 1} here",
                    task_id=state.id, tenant=state.tenant, attempt=state.attempt,
                    confession_id=f"{state.key}-a{state.attempt}-lost",
                )
            running = msgspec.structs.replace(
                state, status="running", attempt=state.attempt + 1,
                executor=self.ex.settings.node_id, started_at=now, updated_at=now,
                exit_code=None, error=None, finished_at=None, history=history[-HISTORY_KEPT:],
                limit=None, peak=None,
                work_seq=meta.sequence.stream, delivery=meta.num_delivered, retry_at=None,
            )
            new_rev = await store.cas(running, rev)
            if new_rev is not None:
                self.state, self.revision = running, new_rev
                self.ex.metrics.tasks.labels("running").inc()
                return True
        raise HandBack("could not claim the task: its state kept changing", delay_s=1.0)

    async def _claim_fresh(self) -> bool:
        """The common case in one round trip: a first delivery of a task nobody touched
        since it was scheduled. CAS on the revision the work item carries; on any
        mismatch the caller reads the state and decides."""
        work = self.work
        assert work is not None
        if work.revision <= 0 or self.msg.metadata.num_delivered != 1:
            return False
        running = first_running_state(work, self.ex.settings.node_id, utcnow(),
                                      self.msg.metadata.sequence.stream)
        rev = await self.ex.store.cas(running, work.revision)
        if rev is None:
            return False
        self.state, self.revision = running, rev
        self.ex.metrics.tasks.labels("running").inc()
        return True

    async def _execute(self, attempt: int) -> Outcome:
        try:
            return await self._run_agent(attempt)
        finally:
            await self._output_ended()
            if self.egress is not None:  # its last events go out before the outcome
                await self.egress.close()

    async def _run_agent(self, attempt: int) -> Outcome:
        assert self.work is not None and self.state is not None
        ex, work = self.ex, self.work
        self.control = ex.control_dir(work.tenant, work.task_id, attempt)
        spec = container_spec(work, attempt, ex.settings, control_dir=str(self.control))
        t0 = time.perf_counter()
        resumed = False
        try:
            if not await ex.runtime.image_exists(spec.image):
                await ex.images.ensure(spec.image, self._image_progress)  # or ImageNotFound
            if work.spec.environment is not None:  # before the proxy and secrets: may wait
                self.env = EnvironmentRun(ex.environments, ex.snapshots, ex.settings, work,
                                          attempt, Hooks(self._cas, self._confess, self.sink.emit))
                await self.env.hold(self.msg.metadata.num_delivered)
                self._spawn(self.env.keep())
            self.egress = await ex.egress.open(work, attempt, self.control,
                                               runtime=ex.runtime.name, emit=self.sink.emit,
                                               confess=self._confess)
            mount = self.egress.mount if self.egress is not None else None
            self.secrets = await ex.secrets.open(work, attempt, self.msg.metadata.num_delivered,
                                                 self._confess_secrets)
            self.secrets.guard(self.sink)
            with tempfile.TemporaryFile() as archive:
                restoring = await self._fetch_checkpoint(archive)
                resumed = restoring is not None
                if self.env is not None:
                    restoring = await self.env.workspace(self.state, restoring, archive)
                spec = container_spec(work, attempt, ex.settings, control_dir=str(self.control),
                                      resumed=resumed, egress=mount, secrets=self.secrets)
                self.volume = spec.workspace_volume
                self.container = await ex.runtime.create(spec)
                if restoring is not None:
                    await self._unpack(spec, archive, restoring)
                    self._restored = restoring.name
                if self.env is not None and not resumed:
                    self.env.restored(restoring)
            nice = await self.container.start()
        except ImageNotFound as exc:
            # The node's problem, not the task's: another node may have the image (or this
            # one, once it is pulled). Hand back with a growing delay; no attempt is spent.
            # The consumer's max deliveries and the queue timeout bound the wait.
            error = f"image {spec.image} not found on node {ex.settings.node_id}"
            delay = image_missing_delay(self.msg.metadata.num_delivered)
            await self._confess("error", "image_missing", error,
                                hint=f"{exc}; push it once (vigil image push {spec.image}: "
                                "every node loads it on first use) or load it on this node")
            raise HandBack(f"{error}; handing the task back", delay,
                           kind="image missing") from exc
        except EgressUnavailable as exc:  # the node's problem, as a missing image is
            await self._confess("error", "egress_unavailable", str(exc), hint=exc.hint)
            raise HandBack(f"{exc}; handing the task back", image_missing_delay(
                self.msg.metadata.num_delivered), kind="egress unavailable") from exc
        except RuntimeUnavailable as exc:
            await self._confess("error", "runtime_unavailable", str(exc))
            raise HandBack(f"container runtime unavailable: {exc}", RUNTIME_RETRY_DELAY_S,
                           kind="container runtime unavailable") from exc
        except RestoreGaveUp as exc:
            return Outcome("failed", None, str(exc), dead=True)
        except SecretRefused as exc:
            await self._confess("error", exc.category, str(exc), hint=exc.hint)
            return Outcome("failed", None, f"{exc}; {exc.hint}")
        except (ImageRefused, EnvironmentFailed) as exc:
            # Never to run (a tampered image; an environment it cannot start from): the
            # task fails, saying why, and is not retried.
            await self._confess(exc.severity, exc.category, str(exc))
            return Outcome("failed", None, str(exc))
        except ContainerError as exc:
            # Raised by create or by start: the host's failure is handed back, the task's
            # own (its command, its settings) fails it.
            return await self._start_failed(exc, None)
        except (HandBack, LeaseLost):
            raise  # already decided: the callers below handle them
        except VigilError as exc:
            if exc.retryable:
                # Passing trouble of the platform's (NATS away in the middle of the
                # restore's or an environment's bookkeeping): charged to nobody, tried
                # again (here or elsewhere) after a pause, as a missing runtime is.
                error = f"could not start the task on {ex.settings.node_id}: {exc}"
                await self._confess("error", "platform_unavailable",
                                    f"{error}; handed the task back (no attempt spent)",
                                    hint="check NATS (and the executor's connection to it)")
                raise HandBack(f"{error}; handing the task back", RUNTIME_RETRY_DELAY_S,
                               kind="platform unavailable") from exc
            # Any other refusal of ours: a clear failure of this task, not a crash that
            # would loop through redelivery.
            error = f"could not start the container on {ex.settings.node_id}: {exc}"
            await self._confess("error", "container_start_failed", error)
            return Outcome("failed", None, error)
        ex.metrics.container_start.observe(time.perf_counter() - t0)
        started_at = time.monotonic()
        watchdog = self.watchdog = Watchdog(
            spec.limits, cgroups=ex.runtime.limits_enforced,
            interval_s=ex.settings.watchdog_interval_s,
            autogroup_nice=ex.isolation.autogroup_nice if ex.isolation is not None else 0)
        unwatched = await watchdog.attach(ex.runtime, self.container.id, spec.workspace_volume)
        limits = work.spec.resources
        output_mb = (limits.output_mb if limits else None) or ex.settings.output_mb
        self.sink.emit(Started(
            task_id=work.task_id, attempt=attempt, time=utcnow(), executor=ex.settings.node_id,
            image=spec.image, container=self.container.id[:12], resumed=resumed,
            limits_enforced=ex.runtime.limits_enforced,
            resources={**watchdog.resources,
                       **(ex.isolation.resources() if ex.isolation is not None else {}),
                       **({"priority": priority(nice)} if ex.isolation is not None else {}),
                       "output_mb": {"value": output_mb, "by": "executor"}},
        ), once=True)
        if unwatched:
            await self._confess("error", "watchdog_unavailable",
                                f"the executor cannot watch this agent's "
                                f"{', '.join(watchdog.unwatched())}: {'; '.join(unwatched)}",
                                hint="its started event says how each limit is enforced "
                                "(by: none or rlimit); run the executor as root or as the "
                                "rootless Podman user, with /proc readable")
        self.output = output = AgentOutput(
            work.task_id, attempt, self.sink.emit,
            on_confess=self._agent_confession,
            on_checkpoint=self._checkpoint_request,
            on_malformed=self._malformed, masker=self.secrets.masker,
            limit_bytes=output_mb * MIB, on_limit=self._output_limit,
        )
        pump = self._pump_task = asyncio.create_task(self._pump(self.container, output))
        waiter = asyncio.create_task(self.container.wait())
        stopper = asyncio.create_task(self._stop_event.wait())
        canceller = asyncio.create_task(self._cancel_event.wait())
        periodic = self._spawn(self._periodic_checkpoints())
        guard = asyncio.create_task(watchdog.run())
        assert self._lease is not None
        timed_out = cancelled = False
        crossing: Crossing | None = None
        try:
            done, _ = await asyncio.wait(
                {waiter, stopper, canceller, self._lease, guard}, timeout=spec.timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self._lease in done:
                # The lease is gone (see _heartbeat): the agent must not run on unowned.
                await self.container.stop(0)
                pump.cancel()
                self._lease.result()  # raises LeaseLost
                raise LeaseLost("lease renewal ended")
            if waiter not in done and guard in done:
                # A runaway: killed at once, no grace (nor checkpoint: it would hold the
                # runaway's state).
                crossing = guard.result()
                await self.container.stop(0)
            elif waiter not in done and canceller in done:
                # Cancelled: SIGTERM, the grace period, then SIGKILL. No checkpoint: the
                # task will not run again.
                cancelled = True
                log.info("cancelling_agent", grace_s=ex.settings.stop_grace_s)
                await self.container.stop(ex.settings.stop_grace_s)
            elif waiter not in done:
                if stopper in done:
                    # SIGTERM gives the agent its grace period to checkpoint on its own;
                    # then the stopped agent's workspace is snapshotted (nothing writes it
                    # any more, though a killed agent may have left a file half written)
                    # while the lease is still kept, and handed back.
                    await self.container.stop(ex.settings.stop_grace_s)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(pump, OUTPUT_GRACE_S)
                    output.close()
                    await self._drain_snapshot(waiter)
                    raise HandBack(self._stopping or "executor stopping")
                timed_out = True
                log.warning("time_limit_exceeded", timeout_s=spec.timeout_s)
                await self.container.stop(ex.settings.stop_grace_s)
            try:
                exit_info: ExitInfo = await asyncio.wait_for(
                    asyncio.shield(waiter), ex.settings.stop_grace_s + 60)
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
        ex.metrics.duration.observe(time.monotonic() - started_at)
        if cancelled:
            reason = self.state.cancel_reason if self.state else None
            return Outcome("cancelled", exit_info.exit_code, reason or "cancelled")
        if crossing is not None:
            # Not retried (no retryable_cause): the same task would cross it again.
            await self._confess("error", crossing.limit, crossing.error, hint=crossing.hint)
            return Outcome("failed", exit_info.exit_code, crossing.error,
                           limit=crossing.limit, peak=crossing.peak)
        return await self._judge(exit_info, output, timed_out, spec.timeout_s)

    def _image_progress(self, data: dict[str, Any]) -> None:
        assert self.state is not None
        self.sink.emit(Progress(task_id=self.state.id, attempt=self.state.attempt,
                                time=utcnow(), data=data))

    async def _fetch_checkpoint(self, into: IO[bytes]) -> CheckpointRef | None:
        """Download the newest checkpoint of the task's history that can be restored;
        None for an empty workspace (there is none, or none is left).

        One that can never be restored, here or anywhere (gone from the store, or not
        the archive that was saved), is confessed, dropped from the history, and the one
        before it is tried: handing the task back would only loop. Passing trouble
        (NATS unreachable) hands the task back instead: the progress is not given up."""
        assert self.state is not None
        for ref in checkpoint_rules.history(self.state):
            into.seek(0)
            into.truncate()
            try:
                size = await self.ex.checkpoints.load(ref.name, into)
            except (NatsUnavailable, nats.errors.Error, TimeoutError) as exc:
                # The platform's trouble (NATS away, a permission it lacks), not the
                # agent's nor this node's: starting from an empty workspace would lose the
                # progress, and spending an attempt would charge the agent. Hand back.
                error = (f"could not download checkpoint {ref.name}: "
                         f"{str(exc) or type(exc).__name__}")
                await self._confess("error", "restore_unavailable",
                                    f"{error}; handed the task back (no attempt spent)",
                                    hint="the platform could not read the object store; "
                                    "check NATS and the executor's NATS permissions")
                raise HandBack(error, RESTORE_HAND_BACK_S, kind="restore failed") from exc
            except CheckpointError as exc:
                # The object is gone (expired, deleted by hand): nothing to wait for.
                await self._unrestorable(ref, str(exc), corrupt=False)
                continue
            problem = await asyncio.to_thread(archive_problem, into, ref.digest)
            if problem is not None:
                await self._unrestorable(ref, problem, corrupt=True)
                continue
            into.seek(0)
            log.info("checkpoint_fetched", checkpoint=ref.name, size=size)
            return ref
        return None

    async def _unrestorable(self, ref: CheckpointRef, problem: str, *, corrupt: bool) -> None:
        """Say once (the id names the checkpoint) that ``ref`` can never be restored, and
        drop it from the task's history (the object stays until the store's TTL ends it);
        the caller falls back to the checkpoint before it, or an empty workspace."""
        assert self.state is not None
        refs = checkpoint_rules.history(self.state)
        rest = checkpoint_rules.without(refs, ref.name)
        then = (f"the agent resumes from the checkpoint before it, {rest[0].name} "
                f"(attempt {rest[0].attempt}, {rest[0].reason}), and loses the progress "
                "saved since" if rest else
                "the agent starts from an empty workspace, the progress it saved is lost")
        log.error("checkpoint_unrestorable", checkpoint=ref.name, problem=problem,
                  fallback=rest[0].name if rest else None)
        if corrupt:
            await self._confess(
                "critical", "checkpoint_corrupt",
                f"checkpoint {ref.name} of task {self.state.id} (attempt {ref.attempt}, "
                f"{ref.reason}) is corrupt: {problem}; {then}",
                hint="the object in vigil-checkpoints was damaged or replaced after it was "
                "saved; check who writes to the store. The object is kept until it expires",
                confession_id=f"executor-{_dotted(ref.name)}-corrupt")
        else:
            await self._confess("error", "restore_failed",
                                f"could not restore checkpoint {ref.name}: {problem}; {then}",
                                confession_id=f"executor-{_dotted(ref.name)}-gone")
        async with self._write_lock:
            now = utcnow()
            await self._cas(lambda s: checkpoint_rules.with_history(
                s, checkpoint_rules.without(checkpoint_rules.history(s), ref.name), now))

    async def _unpack(self, spec: ContainerSpec, archive: IO[bytes],
                      ref: CheckpointRef) -> None:
        """Unpack the checkpoint into the created container, or hand the task back.

        An import that fails is tried again (after a short backoff) on a fresh container
        and volume, since a failed unpack may have left part of the files. If it keeps
        failing, the agent must not start from an empty workspace and lose its progress:
        the task goes back to the queue (no attempt spent) with a confession, and its next
        try, here or on another node, restores the same checkpoint. Not forever: the
        ``RESTORE_DELIVERIES``-th delivery that fails on the same checkpoint ends the task
        ``dead`` (RestoreGaveUp), the checkpoint kept as evidence (ADR 8).
        """
        assert self.state is not None
        name = ref.name
        errors: list[str] = []
        for n in range(1, RESTORE_TRIES + 1):
            if n > 1:
                await asyncio.sleep(RESTORE_BACKOFF_S * 2 ** (n - 2))
                self.container = await self.ex.runtime.create(spec)
            assert self.container is not None
            archive.seek(0)
            try:
                await self.container.import_workspace(archive)  # type: ignore[arg-type]
            except Exception as exc:  # whatever the runtime raised, this try failed
                errors.append(str(exc) or type(exc).__name__)
                log.warning("restore_try_failed", checkpoint=name, try_no=n, error=errors[-1])
                container, self.container = self.container, None
                await container.remove()
                await self.ex.runtime.remove_volume(spec.workspace_volume)
                continue
            if errors:
                log.info("restore_retry_succeeded", checkpoint=name, tries=n, errors=errors)
            return
        error = restore_failure(name, self.ex.settings.node_id, RESTORE_TRIES,
                                clip(errors[-1], 600))
        self._restore_failed = name  # on this attempt's record, where the count is kept
        failed = checkpoint_rules.restore_failures(self.state, name) + 1
        if failed >= RESTORE_DELIVERIES:
            # Handing back again would loop until the consumer's max deliveries, each time
            # with nothing new to show; starting empty would lose the progress silently.
            error += (f"; {failed} deliveries could not restore it, so the task is dead "
                      "instead of started from an empty workspace")
            await self._confess(
                "error", "restore_failed", error,
                hint="the checkpoint is kept: fix the cause (check the nodes' Podman "
                "service log) and `vigil replay redrive` the task")
            raise RestoreGaveUp(error)
        await self._confess(
            "error", "restore_failed",
            f"{error}; handed the task back instead of starting it from an empty workspace",
            hint="the next try (after a short delay, on any node) restores the same "
            f"checkpoint; after {RESTORE_DELIVERIES} failed deliveries the task is dead. "
            "If this repeats, check the node's Podman service log")
        raise HandBack(f"{error}; handing the task back", RESTORE_HAND_BACK_S,
                       kind="restore failed")

    async def _start_failed(self, exc: ContainerError, exit_code: int | None) -> Outcome:
        """The container could not start the agent (the runtime refused it, or its init
        could not fork or exec the command). The host's failure (``exc.retryable``: no
        processes or memory left, broken storage, the runtime's 5xx) is the platform's:
        confessed, and the task handed back with a growing delay (the one a missing image
        gets) and no attempt spent; the work consumer's max deliveries bound the loop.
        The task's own (a command the image lacks) fails it, not retried: a retry would
        find the same image."""
        node = self.ex.settings.node_id
        if exc.retryable:
            delay = image_missing_delay(self.msg.metadata.num_delivered)
            error = (f"the container could not start on node {node} for a host reason "
                     f"({exc.cause}): {exc}")
            await self._confess(
                "error", "container_start_infra", f"{error}; handed back, no attempt spent",
                hint=f"node {node} is short of processes, memory or storage, or its Podman "
                f"is failing: check `podman info` and the Podman service log there; the task "
                f"runs again in {delay:g}s, on any node")
            raise HandBack(f"{error}; handing the task back", delay,
                           kind="container start infra") from exc
        error = f"could not start the container on {node}: {exc}"
        await self._confess("error", "container_start_failed", error)
        return Outcome("failed", exit_code, error)

    async def _judge(self, exit_info: ExitInfo, output: AgentOutput, timed_out: bool,
                     timeout_s: float) -> Outcome:
        code = exit_info.exit_code
        if timed_out:
            error = f"killed after exceeding its time limit of {timeout_s:g}s"
            await self._confess("warning", "time_limit", error)
            return Outcome("timed_out", code, error)
        if exit_info.start_error is not None:
            return await self._start_failed(exit_info.start_error, code)
        if code == 0:
            return Outcome("succeeded", 0, None)
        if exit_info.oom_killed:
            memory = (self.watchdog.limits.memory_mb if self.watchdog is not None
                      else self.ex.settings.memory_mb)
            if self.watchdog is not None and self.watchdog.cgroups:
                # The task's own cgroup limit: as precise an outcome as the watchdog's
                # (the kernel killed it at the limit), and not retried either.
                error = f"memory limit {memory} MiB reached: killed by the kernel (cgroup)"
                await self._confess("error", "memory_limit", error, hint=(
                    "raise resources.memory_mb in the task (up to the tenant's maximum, "
                    "resources_max), else look for a leak"))
                return Outcome("failed", code, error, limit="memory_limit", peak=memory)
            error = f"killed by the kernel: out of memory (limit {memory} MiB)"
            await self._confess("error", "oom", error)
            return Outcome("failed", code, error,
                           retryable_cause=f"agent ran out of memory (exit code {code})")
        cause = error = f"agent exited with code {code}"
        if output.total_lines == 0:
            await self._confess(
                "warning", "silent_failure", f"agent exited with code {code} without any output",
                hint="the agent printed nothing; check its command and image",
            )
            error += " (no output)"
        elif output.tail:
            error += f"; last output: {output.tail[-1][:300]}"
        return Outcome("failed", code, error, retryable_cause=cause)

    async def _record(self, outcome: Outcome) -> float | None:
        """Write the outcome (or the retry) by CAS; the retry's delay, or None when acked."""
        assert self.state is not None and self.work is not None
        await self.sink.drain()  # the timeline is durable before the outcome
        now = utcnow()
        tail = self._tail()
        status = outcome.status  # the task's; the attempt's stays outcome.status
        if outcome.retryable_cause is not None:
            verdict, rollback = self._verdict(outcome, now)
            if verdict.retry:
                await self._schedule_retry(outcome, verdict, now, tail, rollback)
                return verdict.delay_s
            outcome = Outcome(outcome.status, outcome.exit_code,
                              f"{outcome.error}; {verdict.why}")
            if verdict.dead:
                status = "dead"  # it kept failing: this attempt failed, the task is dead
        if outcome.dead:
            status = "dead"
        succeeded = outcome.status == "succeeded"

        def finish(state: TaskState) -> TaskState:
            # A cancel's reason is in the state the scheduler marked (who, and why).
            error = (state.cancel_reason or outcome.error if outcome.status == "cancelled"
                     else outcome.error)
            record = self._attempt_record(state, now, outcome.status, error)
            ended = msgspec.structs.replace(
                state, status=status, exit_code=outcome.exit_code,
                error=error, finished_at=now, updated_at=now,
                limit=outcome.limit, peak=outcome.peak,
                history=[*state.history, record][-HISTORY_KEPT:],
                # An agent that never started printed nothing: the evidence is still the
                # last run's output.
                tail=tail if self.output is not None else state.tail,
            )
            # A failed task keeps its checkpoints as evidence; a finished one needs them
            # no more.
            return checkpoint_rules.with_history(ended, [], now) if succeeded else ended

        async with self._write_lock:
            leftovers = checkpoint_rules.leftovers(self.state)
            final = await self._cas(finish)
            if final is None:
                raise LeaseLost("a newer attempt owns the task; not recording this outcome")
        if succeeded:
            for name in leftovers:
                self.ex.checkpoints.delete_later(name)
        self.ex.metrics.tasks.labels(final.status).inc()
        if final.status == "dead":
            await self._confess_dead(final)
        self.sink.emit(Finished(
            task_id=final.id, attempt=final.attempt, time=now, status=final.status,
            exit_code=final.exit_code, error=final.error, executor=final.executor,
            tenant=final.tenant, limit=final.limit, peak=final.peak,
            duration_s=(now - (final.started_at or now)).total_seconds(),
        ), once=True)
        await self.sink.drain()
        await self.msg.ack()
        log.info("task_finished", status=final.status, exit_code=final.exit_code,
                 container=self.container.id[:12] if self.container else None,
                 image=self.work.spec.image)
        return None

    def _attempt_record(self, state: TaskState, now: datetime, outcome: str,
                        error: str | None, *, rolled_back_from: str | None = None
                        ) -> AttemptRecord:
        """This attempt as its history records it, however it ended."""
        return AttemptRecord(attempt=state.attempt, executor=state.executor,
                             started_at=state.started_at, ended_at=now, outcome=outcome,
                             error=error, restored=self._restored, saved=self._saved,
                             restore_failed=self._restore_failed,
                             rolled_back_from=rolled_back_from)

    def _verdict(self, outcome: Outcome, now: datetime) -> tuple[Verdict, Rollback | None]:
        """Retry or not, and whether the retry rolls the task's checkpoint back: this
        failure may be the one that shows the checkpoint is poisoning the task. A rollback
        refunds the failures on that checkpoint, so the older one gets its try whatever
        is left of the budget; it happens only with the retry it is for."""
        assert self.state is not None and self.work is not None
        if self.state.cancel_requested_at is not None:
            return Verdict(False, "not retried: the task was cancelled"), None
        state = self.state
        spec = state.spec or self.work.spec
        record = self._attempt_record(state, now, "failed", outcome.error)
        rollback = checkpoint_rules.rollback(checkpoint_rules.history(state),
                                             [*state.history, record], state.budget_from)
        max_attempts = spec.max_attempts or 1

        def spent(record: AttemptRecord) -> int:
            return spent_attempts(msgspec.structs.replace(
                state, history=[*state.history, record]))

        if rollback is not None:
            refunded = spent(msgspec.structs.replace(
                record, rolled_back_from=rollback.poisoned.name))
            # The backoff counts retries from 1, even when every failure was refunded.
            rolled = after_failure(spec.retry, exit_code=outcome.exit_code,
                                   failures=max(1, refunded), max_attempts=max_attempts)
            if rolled.retry:
                return Verdict(True, f"({refunded} of {max_attempts} attempts spent: the "
                               "failures on that checkpoint do not count); retrying in "
                               f"{rolled.delay_s:.1f}s", rolled.delay_s), rollback
        return after_failure(spec.retry, exit_code=outcome.exit_code, failures=spent(record),
                             max_attempts=max_attempts), None

    async def _schedule_retry(self, outcome: Outcome, verdict: Verdict, now: datetime,
                              tail: list[str], rollback: Rollback | None) -> None:
        """Back to ``scheduled`` with the failure on record (and the checkpoint rolled
        back, if ``rollback``); the caller naks the message with the delay once the lease
        has stopped (see _run)."""
        assert self.state is not None
        retry_at = now + timedelta(seconds=verdict.delay_s)
        poisoned = rollback.poisoned.name if rollback is not None else None

        def again(state: TaskState) -> TaskState:
            record = self._attempt_record(state, now, "failed", outcome.error,
                                          rolled_back_from=poisoned)
            # exit_code and error stay visible until the next attempt starts; the
            # checkpoint stays too: the next attempt resumes from it, like any other.
            retried = msgspec.structs.replace(
                state, status="scheduled", executor=None, exit_code=outcome.exit_code,
                error=outcome.error, updated_at=now, retry_at=retry_at,
                history=[*state.history, record][-HISTORY_KEPT:], tail=tail,
            )
            if poisoned is None:
                return retried
            # ... unless it is the one the task rolls back from: its object is kept (no
            # longer restored) as evidence until the task succeeds or the TTL ends it.
            return checkpoint_rules.with_history(
                retried, checkpoint_rules.without(checkpoint_rules.history(state), poisoned),
                now)

        async with self._write_lock:
            written = await self._cas(again)
            if written is None:
                raise LeaseLost("a newer attempt owns the task; not scheduling a retry")
        self.ex.metrics.retries.inc()
        reason = f"{outcome.retryable_cause} {verdict.why}"
        if rollback is not None:
            reason += f"; {_rolled_back_to(rollback)}"
            await self._confess_rollback(rollback, outcome)
        self.sink.emit(Retrying(
            task_id=written.id, attempt=written.attempt, time=now, reason=reason,
            delay_s=round(verdict.delay_s, 3), exit_code=outcome.exit_code, error=outcome.error,
        ), once=True)  # once: one per attempt, so the id <task>:<attempt>:retrying is unique
        await self.sink.drain()

    async def _confess_rollback(self, rollback: Rollback, outcome: Outcome) -> None:
        """The platform says what it did to the task's workspace, and why."""
        assert self.state is not None
        bad = rollback.poisoned
        tried = ", ".join(str(a) for a in rollback.attempts)
        await self._confess(
            "warning", "checkpoint_rollback",
            f"task {self.state.id}: attempts {tried} failed right after restoring checkpoint "
            f"{bad.name} (attempt {bad.attempt}, {bad.reason}"
            f"{'' if checkpoint_rules.vouched(bad) else ', not vouched for by the agent'}) "
            f"without saving a newer one (last: {outcome.error}); "
            f"{_rolled_back_to(rollback)}",
            hint=f"the workspace in {bad.name} likely holds a state the agent cannot start "
            "from (a file cut short?); it is kept in vigil-checkpoints until the task "
            "succeeds or the object expires. Those attempts did not spend max_attempts")

    async def _finished_again(self, state: TaskState) -> None:
        """Re-publish a finished task's ``finished`` event (same id: a no-op if it is
        stored): an executor that died between recording the outcome and publishing the
        event must not leave waiting clients waiting forever. A redelivery of the very
        message whose attempt made the task ``dead`` re-sends its ``task_dead``
        confession too (same id: the issues stream's duplicate window and the auditor's
        id keep it one), since that executor may have died before sending it."""
        if state.status == "dead" and state.work_seq == self.msg.metadata.sequence.stream:
            await self._confess_dead(state)
        self.sink.emit(Finished(
            task_id=state.id, attempt=state.attempt, time=state.finished_at or utcnow(),
            status=state.status, exit_code=state.exit_code, error=state.error,
            executor=state.executor, limit=state.limit, peak=state.peak,
            duration_s=((state.finished_at - state.started_at).total_seconds()
                        if state.finished_at and state.started_at else None),
        ), once=True)
        await self.sink.drain()

    async def _confess_dead(self, state: TaskState) -> None:
        """The ``task_dead`` confession for ``state``, dead. Its id comes from the task and
        its last attempt (not the time, not a counter), so whoever sends it again for the
        same death sends the same confession, and a death after a redrive (a later
        attempt) is a new one."""
        where = f"; last checkpoint {state.checkpoint.name}" if state.checkpoint else ""
        await self._confess("error", "task_dead", f"task {state.id} is dead: {state.error}{where}",
                            hint="see its history and tail; `vigil replay redrive` runs it "
                            "again with a fresh budget once the cause is fixed",
                            task_id=state.id, tenant=state.tenant, attempt=state.attempt,
                            confession_id=dead_confession_id(state.key, state.attempt))

    def _tail(self) -> list[str]:
        # Evidence, not a log: short lines, so the state stays well under the KV's limit.
        return [line[:TAIL_LINE_CHARS] for line in self.output.tail] if self.output else []

    # checkpoints ------------------------------------------------------------------------------
    async def _checkpoint_request(self, payload: dict[str, Any]) -> None:
        """``::vigil::checkpoint``: snapshot now; the agent waits for the reply file."""
        seq = payload.get("seq")
        note = payload.get("note") if isinstance(payload.get("note"), dict) else {}
        # Clean: the agent blocks until the reply, so nothing writes the workspace.
        ok, error = await self._checkpoint("agent", note or {}, clean=True)
        if isinstance(seq, int) and self.control is not None:
            self._reply(f"checkpoint-{seq}.json", {"ok": ok, "error": error})

    async def _periodic_checkpoints(self) -> None:
        every = self.ex.settings.checkpoint_interval_s
        if every <= 0:
            return
        while True:
            await asyncio.sleep(every)
            # Taken while the agent writes: never clean (ADR 8).
            await self._checkpoint("periodic", {}, clean=False)

    async def _drain_snapshot(self, waiter: asyncio.Task[ExitInfo]) -> None:
        """The drain's snapshot of the stopped agent's workspace. Clean only when the
        agent exited 0 by itself within its grace (it handled SIGTERM and saved its
        state); an agent that had to be killed may have left a file half written, and
        such a snapshot must not replace the checkpoint the agent vouched for."""
        exit_info: ExitInfo | None = None
        try:
            exit_info = await asyncio.wait_for(asyncio.shield(waiter), EXIT_REPORT_S)
        except Exception as exc:  # not learnt, for whatever reason: not clean
            log.warning("drain_exit_unknown", error=str(exc) or type(exc).__name__)
        await self._checkpoint("drain", {}, clean=drain_was_clean(exit_info),
                               exit_code=exit_info.exit_code if exit_info else None)

    async def _checkpoint(self, reason: str, note: dict[str, Any], *, clean: bool,
                          exit_code: int | None = None) -> tuple[bool, str | None]:
        """Snapshot the workspace and make it the head of the task's checkpoint history.
        Never raises: a failed checkpoint is an event and a confession, and the agent
        carries on. A snapshot that may not replace the head (checkpoint_rules.
        may_replace) is not taken at all: it would only be deleted again."""
        container, work = self.container, self.work
        if container is None or work is None or self.state is None:
            return False, "no running container"
        async with self._write_lock:
            state = self.state
            head = state.checkpoint
            if not may_replace(clean, head):
                assert head is not None
                # Periodic skips repeat every interval: logged only when debugging.
                (log.debug if reason == "periodic" else log.info)(
                    "checkpoint_skipped", reason=reason, exit_code=exit_code, kept=head.name,
                    why="not clean, and the task's checkpoint is one the agent vouched for")
                return False, f"not taken: checkpoint {head.name} is kept"
            self._checkpoints += 1
            name = object_name(work.tenant, work.task_id, state.attempt, self._checkpoints)
            try:
                saved = await self.ex.checkpoints.save(
                    name, container.export_workspace(),
                    description=f"workspace of task {work.task_id}, attempt {state.attempt} "
                    f"({reason})",
                )
            except VigilError as exc:  # too large, Podman refused, NATS down: all say why
                error = str(exc)
                self.sink.emit(Checkpoint(
                    task_id=work.task_id, attempt=state.attempt, time=utcnow(), name=name,
                    reason=reason, note=note, ok=False, error=error, clean=clean,
                ))
                await self._confess("error", "checkpoint_failed",
                                    f"checkpoint ({reason}) failed: {error}")
                log.warning("checkpoint_failed", reason=reason, error=error)
                return False, error
            now = utcnow()
            ref = CheckpointRef(name=saved.name, size=saved.size, digest=saved.digest,
                                attempt=state.attempt, reason=reason, taken_at=now,
                                clean=clean)
            fell_off: list[CheckpointRef] = []

            def record(s: TaskState) -> TaskState:
                kept, dropped = checkpoint_rules.pushed(checkpoint_rules.history(s), ref)
                fell_off[:] = dropped  # of the state actually written (_cas may retry)
                return checkpoint_rules.with_history(s, kept, now)

            updated_ = await self._cas(record)
            if updated_ is None:
                # Fenced: a newer attempt owns the task. Its state must not point here.
                self.ex.checkpoints.delete_later(saved.name)
                return False, "this attempt no longer owns the task"
            updated = updated_
            self._saved = saved.name
        for old in fell_off:
            self.ex.checkpoints.delete_later(old.name)
        self.sink.emit(Checkpoint(
            task_id=work.task_id, attempt=updated.attempt, time=now, name=saved.name,
            size=saved.size, digest=saved.digest, reason=reason, note=note, clean=clean,
        ))
        log.info("checkpoint_saved", reason=reason, name=saved.name, size=saved.size,
                 clean=clean, exit_code=exit_code)
        return True, None

    def _reply(self, name: str, body: dict[str, Any]) -> None:
        assert self.control is not None
        tmp = self.control / f".{name}.tmp"
        tmp.write_text(json.dumps(body), encoding="utf-8")
        os.chmod(tmp, 0o644)
        tmp.replace(self.control / name)  # atomic: the agent never reads half a file

    # failure paths -------------------------------------------------------------------------
    async def _dead(self, state: TaskState, rev: int, limit: int) -> None:
        now = utcnow()
        error = (
            f"crash loop: {lost_attempts(state)} attempts lost their executor (the last on "
            f"{state.executor}; max_lost_attempts is {limit}); the task may be killing the "
            "nodes it runs on"
        )
        dead = msgspec.structs.replace(state, status="dead", error=error, finished_at=now,
                                       updated_at=now, history=state.history[-HISTORY_KEPT:],
                                       tail=await self._lost_tail(state))
        if await self.ex.store.cas(dead, rev) is None:
            raise HandBack("task state changed while marking it dead", delay_s=1.0)
        self.ex.metrics.tasks.labels("dead").inc()
        await self._confess_dead(dead)
        self.sink.emit(Finished(task_id=state.id, attempt=state.attempt, time=now,
                                executor=state.executor,
                                status="dead", error=error), once=True)
        await self.sink.drain()
        await self.msg.ack()
        log.warning("task_dead", error=error)

    async def _lost_tail(self, state: TaskState) -> list[str]:
        """The lost attempt's last output lines, from its ``log`` events: the executor that
        knew them is gone. Bounded well inside this delivery's lease; the state's older
        tail if they cannot be read in time."""
        try:
            return await asyncio.wait_for(
                log_tail(self.ex.js, state.tenant, state.id, state.attempt),
                self.ex.settings.ack_wait_s / 2)
        except Exception as exc:
            log.warning("tail_unread", error=str(exc) or type(exc).__name__)
            return state.tail

    async def _cancelled_unrun(self, state: TaskState, rev: int) -> None:
        now = utcnow()
        error = state.cancel_reason or "cancelled"
        history = list(state.history)
        if state.status == "running":
            history.append(AttemptRecord(
                attempt=state.attempt, executor=state.executor, started_at=state.started_at,
                ended_at=now, outcome="lost", error="its executor stopped renewing the lease",
            ))
        final = msgspec.structs.replace(state, status="cancelled", error=error, finished_at=now,
                                        updated_at=now, history=history[-HISTORY_KEPT:])
        if await self.ex.store.cas(final, rev) is None:
            raise HandBack("task state changed while recording its cancel", delay_s=1.0)
        self.ex.metrics.tasks.labels("cancelled").inc()
        self.sink.emit(Finished(task_id=state.id, attempt=state.attempt, time=now,
                                executor=state.executor,
                                status="cancelled", error=error), once=True)
        await self.sink.drain()
        await self.msg.ack()
        log.info("task_cancelled_unrun")

    async def _hand_back(self, exc: HandBack) -> None:
        """Return the task to ``scheduled`` (not spending an attempt) and nak the message."""
        self.ex.metrics.handed_back.labels(exc.kind or exc.reason.split(":")[0][:40]).inc()
        state = self.state
        if state is not None and state.status == "running":
            now = utcnow()
            tail = self._tail()

            def back(s: TaskState) -> TaskState:
                record = self._attempt_record(s, now, "handed_back", exc.reason)
                return msgspec.structs.replace(
                    s, status="scheduled", executor=None, updated_at=now,
                    # An attempt that printed nothing (its agent never ran: the image is
                    # missing, the checkpoint would not restore) keeps the last run's
                    # output as the evidence, for whoever ends the task later.
                    history=[*s.history, record][-HISTORY_KEPT:], tail=tail or s.tail,
                    retry_at=now + timedelta(seconds=exc.delay_s) if exc.delay_s else None,
                )

            try:
                async with self._write_lock:
                    written = await self._cas(back)
            except NatsUnavailable:
                return  # the lease will lapse instead; the server redelivers then
            if written is None:
                # Someone else holds the task now: a nak from us would redeliver the
                # message under the new holder's feet. Leave it alone.
                log.info("hand_back_fenced", reason=exc.reason)
                return
            self.sink.emit(Retrying(
                task_id=state.id, attempt=state.attempt, time=now,
                reason=exc.reason, delay_s=exc.delay_s,
            ), once=True)
            with contextlib.suppress(NatsUnavailable):
                await self.sink.drain()
        with contextlib.suppress(Exception):
            await self.msg.nak(delay=exc.delay_s or None)
        log.info("task_handed_back", reason=exc.reason, delay_s=exc.delay_s)

    async def _may_hand_back(self) -> bool:
        """Whether this delivery may still nak its message (see claim.may_hand_back).
        False when the state cannot be read either: the ack wait redelivers then."""
        assert self.work is not None
        meta = self.msg.metadata
        try:
            got = await asyncio.wait_for(self.ex.store.get(self.work.tenant, self.work.task_id),
                                         self.ex.settings.heartbeat_s)
        except Exception:
            return False
        return may_hand_back(got[0] if got else None, meta.sequence.stream, meta.num_delivered)

    async def _confess_lease_lost(self, reason: str) -> None:
        """The platform says what the agent cannot: its node lost the task under it.
        Bounded, since NATS itself may be what cut us off, and the container must go."""
        state = self.state
        if state is None:
            return
        node = self.ex.settings.node_id
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._confess(
                "warning", "lease_lost",
                f"executor {node} lost its lease on task {state.id} (attempt "
                f"{state.attempt}): {reason}; it stopped the agent and recorded nothing",
                hint="the node was frozen, overloaded or cut off from NATS for about the ack "
                "wait; the task runs again (or already runs) on another attempt",
            ), self.ex.settings.heartbeat_s)

    async def _poison(self, why: str) -> None:
        """A work message that can never run: terminate it (no redelivery) and confess."""
        log.error("poison_work_item", error=why)
        with contextlib.suppress(Exception):
            await self._confess("error", "poison_work_item", why,
                                confession_id=f"executor-poison-{self.msg.metadata.sequence.stream}")
        with contextlib.suppress(Exception):
            await self.msg.term()

    async def cleanup(self) -> None:
        """However the attempt ended: its container and its volume go (the workspace
        lives on in the checkpoint, not in this node's volume). Needs only the runtime,
        not NATS. Idempotent: a drain that ran out of time calls it too (Executor._drain)."""
        if self.egress is not None:
            await self.egress.close()
        if self.container is not None:
            with contextlib.suppress(Exception):
                await self.container.remove()
        if self.volume is not None:
            with contextlib.suppress(Exception):
                await self.ex.runtime.remove_volume(self.volume)
        if self.control is not None:
            self.ex.remove_control_dir(self.control)
        self.secrets.remove()

    # lease ------------------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Keep the lease, or end (raising LeaseLost) when it is gone.

        Each tick sends an in-progress ack and then a PING/PONG round trip: nats-py buffers
        publishes while disconnected, so only the flush proves the server got the renewal.
        The same tick reads the task's state: if it moved to another attempt, a newer
        attempt owns the task (this executor was frozen or partitioned past the ack wait).

        The timing is :class:`~vigil_executor.claim.LeaseClock`'s: renewals on a fixed
        cadence, the lease given up at ``ack_wait - heartbeat / 2`` after the last
        confirmed renewal was sent, so one failed renewal does not lose it and the agent
        is stopped before the server hands the task to another node, not after. A tick
        that comes late (the process was frozen by SIGSTOP, the host stalled) reads the
        state before renewing: a late in-progress ack must not renew a lease that another
        attempt holds now.
        """
        conf = self.ex.settings
        assert self.state is not None
        task_id, attempt = self.state.id, self.state.attempt
        clock = LeaseClock(conf.ack_wait_s, conf.heartbeat_s, self._lease_ok)
        failure: str | None = None  # why the newest renewal failed, until one succeeds
        while not self._lease_done.is_set():
            # Not asyncio.sleep + cancel: on Python 3.11 a cancel that lands while a
            # wait_for (inside flush, or ours) completes is swallowed, and a cancelled
            # heartbeat would renew forever, holding the attempt and its slot. The event
            # ends the loop whatever happens to the cancel.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lease_done.wait(),
                                       max(0.0, clock.wake_at() - time.monotonic()))
            if self._lease_done.is_set():
                return
            now = time.monotonic()
            if clock.late(now) and not clock.expired(now):
                # A tick was missed: we were asleep. Who holds the task now?
                log.warning("lease_late", lapsed_s=round(clock.lapsed(now), 1))
                await self._still_holder(task_id, attempt)
                now = time.monotonic()
            if clock.expired(now):
                # No time left to ask anyone: the agent must stop before the server can
                # hand the task to another node.
                lapsed = clock.lapsed(now)
                if failure is not None:
                    raise LeaseLost(f"could not renew the lease for {lapsed:.1f}s (ack "
                                    f"wait {conf.ack_wait_s:g}s; {failure})")
                raise LeaseLost(f"no renewal for {lapsed:.1f}s (the process was frozen "
                                f"or stalled; ack wait {conf.ack_wait_s:g}s)")
            if not clock.is_due(now):
                continue  # the timer fired a hair early
            clock.advance(now)
            sent = time.monotonic()
            try:
                await self.msg.in_progress()
                # nats-py annotates the timeout as int; any positive number works.
                await self.ex.nc.flush(timeout=clock.renewal_timeout(sent))  # type: ignore[arg-type]
            except Exception as exc:  # any failure to renew counts
                failure = str(exc) or type(exc).__name__
                log.warning("lease_renewal_failed", error=failure,
                            lapsed_s=round(clock.lapsed(time.monotonic()), 1))
                continue
            clock.renewed(sent)
            self._lease_ok = sent
            failure = None
            current = await self._still_holder(task_id, attempt)
            if current is not None and current.cancel_requested_at is not None:
                # The core-NATS nudge is best effort; the state is the truth.
                self.cancel()

    async def _still_holder(self, task_id: str, attempt: int) -> TaskState | None:
        """The task's state, raising LeaseLost if another attempt holds it now; None when
        it cannot be read within a heartbeat (the lease timing decides then)."""
        try:
            assert self.work is not None
            got = await asyncio.wait_for(self.ex.store.get(self.work.tenant, task_id),
                                         self.ex.settings.heartbeat_s)
        except (TimeoutError, NatsUnavailable):
            return None
        current = got[0] if got else None
        if current is None or current.attempt != attempt:
            raise LeaseLost(
                f"task is now {current.status if current else 'gone'} with attempt "
                f"{current.attempt if current else '?'}"
                f"{f' on {current.executor}' if current and current.executor else ''}; "
                f"this attempt ({attempt}) lost it")
        return current

    # agent callbacks ---------------------------------------------------------------------------
    async def _agent_confession(self, confession: Confession) -> None:
        assert self.state is not None
        if not self.confessions.allow():
            if self.confessions.dropped == 1:
                log.warning("confessions_rate_limited", burst=self.confessions.burst,
                            per_min=self.confessions.per_min)
            return  # counted; reported once when the agent's output ends (_output_ended)
        n = self.confessions.accepted
        cid = f"{self.state.key}-a{self.state.attempt}-c{n}"
        full = msgspec.structs.replace(
            confession, id=cid, source="agent", task_id=self.state.id, tenant=self.state.tenant,
            attempt=self.state.attempt, node=self.ex.settings.node_id, component="agent",
            time=utcnow(),
        )
        await self.ex.publish_confession(full)
        self.sink.emit(ConfessionEvent(
            task_id=self.state.id, attempt=self.state.attempt, time=utcnow(),
            confession_id=cid, summary=full.summary, severity=full.severity, source="agent",
        ))

    async def _confess_secrets(self, severity: str, category: str, summary: str,
                               hint: str | None) -> None:
        await self._confess(severity, category, summary, hint=hint)

    async def _malformed(self, error: ControlError) -> None:
        if isinstance(error, ConfessionTooLarge):
            # The agent's confession, refused: it spends a token like one that got through.
            if not self.confessions.allow():
                return
            assert self.state is not None
            await self._confess(
                "warning", "confession_too_large",
                f"agent {error}; it was refused (the line is kept as log)",
                hint="keep the summary short and the evidence in `detail` (cut at 8,000 "
                "characters with a marker); the whole line must fit the limit",
                confession_id=f"executor-{self.state.key}-a{self.state.attempt}-"
                f"c{self.confessions.accepted}-too-large")
            return
        await self._confess("warning", "malformed_control_line",
                            f"agent printed a malformed ::vigil:: control line: {error}",
                            hint="see the agent contract in the README; the line was kept as log")

    async def _output_limit(self, limit: OutputLimit) -> None:
        """Once per attempt, when its output first goes past the limit. Bounded, and never
        fatal: the output must go on being read (the agent would block on a full pipe),
        and the marker line already says what the confession would."""
        try:
            await asyncio.wait_for(self._confess_output_limit(limit), self.ex.settings.heartbeat_s)
        except Exception as exc:
            log.warning("output_limit_confession_failed", error=str(exc) or type(exc).__name__)

    async def _confess_output_limit(self, limit: OutputLimit) -> None:
        await self._confess(
            "warning", "output_limit",
            f"agent output passed its limit of {mib(limit.limit)}: the rest of this "
            "attempt's output is dropped (a marker line says how much); the agent keeps "
            "running",
            hint="raise resources.output_mb in the task spec (up to the tenant's maximum; "
            "VIGIL_OUTPUT_MB is the node's default), or have the agent write bulky output "
            "to its workspace")

    async def _report_dropped(self) -> None:
        """Once per attempt, when its output ends: how many confessions the limit dropped."""
        dropped = self.confessions.report()
        if not dropped:
            return
        try:
            await self._confess(
                "warning", "confession_rate_limit",
                f"{dropped} confessions dropped by the rate limit (burst "
                f"{self.confessions.burst}, {self.confessions.per_min:g} a minute)",
                hint="an agent that confesses this often is likely looping; the first ones "
                "got through (VIGIL_MAX_CONFESSIONS, VIGIL_CONFESSIONS_PER_MIN)")
        except Exception as exc:  # the count is lost, the task's outcome must not be
            log.warning("dropped_confessions_report_failed", dropped=dropped, error=str(exc))

    async def _confess(self, severity: str, category: str, summary: str, *,
                       hint: str | None = None, task_id: str | None = None,
                       tenant: str | None = None, attempt: int | None = None,
                       confession_id: str | None = None) -> None:
        state, work = self.state, self.work
        task_id = task_id or (state.id if state else work.task_id if work else None)
        tenant = tenant or (state.tenant if state else work.tenant if work else None)
        attempt = attempt if attempt is not None else (state.attempt if state else None)
        # Ids are per tenant: the confession's id names the tenant too, or two tenants'
        # tasks of one id would share confession ids (and the auditor count one of them).
        cid = confession_id or f"executor-{tenant}.{task_id}-a{attempt}-{category}"
        # The image is part of the auditor's fingerprint (one incident per image's problem).
        image = work.spec.image if work is not None else None
        # A runtime's error can be long, and hold what the agent printed.
        summary = clip(self.secrets.masker.mask(summary), SUMMARY_CHARS)
        confession = Confession(
            id=cid, summary=summary, severity=severity, category=category,  # type: ignore[arg-type]
            hint=hint, task_id=task_id, tenant=tenant or (work.tenant if work else None),
            attempt=attempt, source="executor", node=self.ex.settings.node_id,
            component="executor", time=utcnow(), data={"image": image} if image else {},
        )
        await self.ex.publish_confession(confession)
        if task_id is not None and state is not None:
            self.sink.emit(ConfessionEvent(
                task_id=task_id, attempt=state.attempt, time=utcnow(), confession_id=cid,
                summary=summary, severity=severity, source="executor",
            ))

    async def _pump(self, container: Container, output: AgentOutput) -> None:
        lines = self.ex.metrics.log_lines
        async for stream, line in container.output():
            await self.sink.room()
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
            await asyncio.wait_for(self._report_dropped(), self.ex.settings.heartbeat_s)
        except TimeoutError:
            log.warning("dropped_confessions_report_failed", dropped=self.confessions.dropped,
                        error="timed out")

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _dotted(object_name: str) -> str:
    """A checkpoint's object name (``<tenant>/<task>/a<n>-<m>``) as part of an id: dots,
    which neither a tenant nor a task id can hold, keep the parts apart."""
    return object_name.replace("/", ".")


def dead_confession_id(task_key: str, attempt: int) -> str:
    """The ``task_dead`` confession's id, from the task's key (``<tenant>.<id>``)."""
    return f"executor-{task_key}-a{attempt}-dead"


def _rolled_back_to(rollback: Rollback) -> str:
    to = rollback.to
    where = (f"checkpoint {to.name} (attempt {to.attempt}, {to.reason})" if to is not None
             else "an empty workspace (no older checkpoint is kept)")
    return (f"rolled back from checkpoint {rollback.poisoned.name}: the next attempt "
            f"restores {where}")


def _retry_not_due(state: TaskState, now: datetime) -> float:
    """Seconds until a ``scheduled`` task's ``retry_at`` (0 when due or unset). Capped by
    the longest delay the policy can ask for, so a node whose clock runs behind the one
    that set it cannot hold the task back for long."""
    if state.status != "scheduled" or state.retry_at is None:
        return 0.0
    left = (state.retry_at - now).total_seconds()
    if left <= EARLY_TOLERANCE_S:
        return 0.0
    policy = (state.spec.retry if state.spec else None) or DEFAULT_POLICY
    return min(left, max(policy.backoff_max_s, IMAGE_MISSING_MAX_DELAY_S))


def _same_attempt(current: TaskState, mine: TaskState) -> bool:
    """Whether ``current`` is still the attempt ``mine`` describes (see Attempt._cas)."""
    return (current.status == "running" and current.attempt == mine.attempt
            and current.executor == mine.executor and current.work_seq == mine.work_seq
            and current.delivery == mine.delivery)


def _missing_labels(needed: dict[str, str], have: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in needed.items() if have.get(k) != v}
