"""One attempt's use of its task's persistent environment: hold, restore, commit.

The rules are :mod:`vigil.environments`' (docs/decisions/0015); this is their I/O, in the
order an attempt meets them:

1. **Hold** (:meth:`EnvironmentRun.hold`, before the workspace is made): read the
   environment. A ``wait`` one is taken by compare-and-set on its ``holder``, and renewed
   every heartbeat while the agent runs (:meth:`keep`); held by another task, this task
   is handed back (no attempt spent) with a growing delay, its ``retrying`` event saying
   whom it waits for. A hold that is not renewed expires (``VIGIL_ENVIRONMENT_LEASE_S``):
   a dead node holds an environment no longer than that.
2. **Restore** (:meth:`workspace`): the task's own checkpoint takes precedence (a resumed
   attempt carries on), unless the environment moved on since the task started from it
   (then the task fails: its work cannot be committed). Otherwise the environment's
   current snapshot is fetched and unpacked like a checkpoint, and the revision it holds
   is recorded in the task's state as its ``base_revision``.
3. **Commit** (:meth:`commit`, once the agent succeeded): the stopped container's
   workspace is uploaded, then made the next revision by compare-and-set, only if the
   environment is still at the base revision (and, ``wait``, still held by this attempt).
   A workspace left as it was restored (the same archive digest) is no new revision.
   If it moved: ``fail`` fails the task saying so, ``wait`` (the hold was lost: the node
   stalled past the lease) hands it back to run on the new revision. Either way the
   uploaded snapshot is deleted and nothing is overwritten.
4. **Release** (:meth:`release`) when the task ends: a commit releases in the same write.

A snapshot that cannot be read for the platform's reasons (NATS) hands the task back, as
a checkpoint's restore does; one that is gone or corrupt fails the task (starting from an
empty workspace would commit over the environment's work). An upload that fails hands the
task back; a workspace over the snapshot limit fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO

import msgspec
import nats.errors
import structlog

from vigil.environments import (
    Busy,
    Environment,
    EnvironmentStore,
    Snapshot,
    committed,
    conflict,
    released,
    renewed,
    snapshot_name,
    take,
    wait_delay,
)
from vigil.errors import NatsUnavailable, VigilError
from vigil.messages import (
    CheckpointRef,
    EnvironmentEvent,
    EnvironmentUse,
    Event,
    TaskState,
    WorkItem,
    utcnow,
)
from vigil_executor.checkpoint import (
    RESTORE_HAND_BACK_S,
    CheckpointError,
    CheckpointStore,
    CheckpointTooLarge,
    archive_problem,
)
from vigil_executor.claim import HandBack, LeaseLost, Outcome
from vigil_executor.runtime import Container
from vigil_executor.settings import ExecutorSettings

log = structlog.get_logger("vigil.executor.environment")

CAS_TRIES = 10


class EnvironmentFailed(VigilError):
    """The task cannot go on with its environment and fails, not retried: ``category``
    names the reason for the confession."""

    def __init__(self, message: str, *, category: str, severity: str = "error") -> None:
        super().__init__(message, retryable=False)
        self.category = category
        self.severity = severity


@dataclass(frozen=True)
class Hooks:
    """What the attempt lends: writes to its task's state (compare-and-set, None when
    fenced off), confessions and events on its timeline."""

    cas: Callable[[Callable[[TaskState], TaskState]], Awaitable[TaskState | None]]
    confess: Callable[..., Awaitable[None]]
    emit: Callable[[Event], None]


class EnvironmentRun:
    def __init__(self, store: EnvironmentStore, snapshots: CheckpointStore,
                 conf: ExecutorSettings, work: WorkItem, attempt: int, hooks: Hooks) -> None:
        assert work.spec.environment is not None
        self._store = store
        self._snapshots = snapshots
        self._conf = conf
        self._hooks = hooks
        self.tenant = work.tenant
        self.task_id = work.task_id
        self.name = work.spec.environment
        self.attempt = attempt
        self.env: Environment | None = None
        self.base = 0
        self.held = False

    # 1. hold -----------------------------------------------------------------------------
    async def hold(self, delivery: int) -> None:
        """Read the environment and, ``wait``, take it; HandBack when another task has it."""
        for _ in range(CAS_TRIES):
            got = await self._store.get(self.tenant, self.name)
            if got is None:
                raise EnvironmentFailed(
                    f"environment {self.name} does not exist (deleted after the task was "
                    "submitted); create it again, then submit the task again",
                    category="environment_missing")
            env, rev = got
            taken = take(env, self.task_id, self.attempt, self._conf.node_id, utcnow(),
                         self._conf.environment_lease_s)
            if isinstance(taken, Busy):
                raise HandBack(taken.reason(self.name), wait_delay(delivery),
                               kind="environment busy")
            if taken is env:  # a ``fail`` environment: nothing to hold
                self.env = env
                return
            if await self._store.cas(taken, rev) is not None:
                self.env, self.held = taken, True
                log.info("environment_held", environment=self.name, revision=env.revision)
                return
        raise HandBack(f"environment {self.name} kept changing while taking it", 1.0,
                       kind="environment busy")

    async def keep(self) -> None:
        """Renew the hold while the agent runs (cancelled when the attempt ends); stop
        once it is lost: the commit then finds out, and hands the task back."""
        if not self.held:
            return
        every = min(self._conf.heartbeat_s, self._conf.environment_lease_s / 3)
        while True:
            await asyncio.sleep(every)
            try:
                got = await self._store.change(
                    self.tenant, self.name, lambda e: renewed(
                        e, self.task_id, self.attempt, utcnow(),
                        self._conf.environment_lease_s))
            except Exception as exc:  # NATS away: the next tick tries again
                log.warning("environment_renewal_failed", environment=self.name,
                            error=str(exc) or type(exc).__name__)
                continue
            if got is None:
                log.warning("environment_hold_lost", environment=self.name)
                return

    # 2. restore ---------------------------------------------------------------------------
    async def workspace(self, state: TaskState, checkpoint: CheckpointRef | None,
                        archive: IO[bytes]) -> CheckpointRef | None:
        """What the attempt's workspace starts from: the task's ``checkpoint`` (fetched by
        the attempt already), else the environment's snapshot, fetched into ``archive``
        (None: the environment has none, an empty workspace)."""
        env = self.env
        assert env is not None
        use = state.environment
        if checkpoint is not None and use is not None and use.name == self.name:
            if env.revision != use.base_revision:
                raise EnvironmentFailed(
                    f"environment {self.name} moved from revision {use.base_revision} to "
                    f"{env.revision} since this task started from it; its checkpoint "
                    f"{checkpoint.name} builds on revision {use.base_revision}, so its "
                    "workspace can never be committed; submit the task again to run it on "
                    f"revision {env.revision}", category="environment_conflict",
                    severity="warning")
            self.base = use.base_revision
            return checkpoint
        self.base = env.revision
        if use != EnvironmentUse(name=self.name, base_revision=self.base):
            mine = EnvironmentUse(name=self.name, base_revision=self.base)
            if await self._hooks.cas(lambda s: msgspec.structs.replace(s, environment=mine)) \
                    is None:
                raise LeaseLost("a newer attempt owns the task")
        if checkpoint is not None:
            return checkpoint
        snap = env.snapshot
        if snap is None:
            return None
        return await self._fetch(snap, archive)

    async def _fetch(self, snap: Snapshot, archive: IO[bytes]) -> CheckpointRef:
        try:
            await self._snapshots.load(snap.name, archive)
        except (NatsUnavailable, nats.errors.Error, TimeoutError) as exc:
            error = (f"could not download snapshot {snap.name} of environment {self.name}: "
                     f"{str(exc) or type(exc).__name__}")
            await self._hooks.confess(
                "error", "restore_unavailable", f"{error}; handed the task back (no attempt "
                "spent)", hint="the platform could not read the object store; check NATS "
                "and the executor's NATS permissions")
            raise HandBack(error, RESTORE_HAND_BACK_S, kind="restore failed") from exc
        except CheckpointError as exc:
            raise self._broken(snap, str(exc)) from exc
        problem = await asyncio.to_thread(archive_problem, archive, snap.digest)
        if problem is not None:
            raise self._broken(snap, problem)
        archive.seek(0)
        return CheckpointRef(name=snap.name, size=snap.size, digest=snap.digest, attempt=0,
                             reason="environment", taken_at=snap.committed_at, clean=True)

    def _broken(self, snap: Snapshot, problem: str) -> EnvironmentFailed:
        older = [s.revision for s in (self.env.history if self.env else [])
                 if s.name != snap.name]
        fix = (f"`vigil env restore {self.name} {older[0]}` makes an older one current"
               if older else f"`vigil env rm {self.name}` starts it afresh")
        return EnvironmentFailed(
            f"snapshot {snap.name} (revision {snap.revision}) of environment {self.name} "
            f"cannot be restored: {problem}; the task did not start from an empty workspace "
            f"(it would commit over the environment's work): {fix}, then submit the task "
            "again", category="environment_snapshot_broken", severity="critical")

    def restored(self, ref: CheckpointRef | None) -> None:
        """The attempt's workspace holds the environment's revision ``base`` now."""
        self._hooks.emit(EnvironmentEvent(
            task_id=self.task_id, attempt=self.attempt, time=utcnow(),
            environment=self.name, step="restored", revision=self.base,
            snapshot=ref.name if ref is not None else None,
            size=ref.size if ref is not None else 0))

    # 3. commit ----------------------------------------------------------------------------
    async def commit(self, outcome: Outcome, container: Container | None,
                     delivery: int) -> Outcome:
        """Commit the succeeded agent's workspace as the environment's next revision; the
        outcome to record (failed if the commit was refused). Raises HandBack when it
        must run again (see the module's docstring)."""
        if outcome.status != "succeeded" or container is None:
            return outcome
        got = await self._store.get(self.tenant, self.name)
        if got is None:
            return self._missing(outcome)
        env, rev = got
        if (why := conflict(env, self.base, self.task_id, self.attempt)) is not None:
            return await self._conflicted(env, why, outcome, delivery)
        name = snapshot_name(self.tenant, self.name, env.revision + 1, self.task_id,
                             self.attempt)
        try:
            saved = await self._snapshots.save(
                name, container.export_workspace(),
                description=f"environment {self.name} revision {env.revision + 1}, from "
                f"task {self.task_id} attempt {self.attempt}",
                unless=env.snapshot.digest if env.snapshot is not None else None)
        except CheckpointTooLarge as exc:
            error = (f"the agent succeeded, but its workspace was not committed to "
                     f"environment {self.name}: {exc}")
            await self._hooks.confess("error", "environment_commit_failed", error)
            return Outcome("failed", outcome.exit_code, error)
        except VigilError as exc:  # NATS away, Podman could not export: the platform's
            self._snapshots.delete_later(name)
            error = (f"could not commit the workspace to environment {self.name}: {exc}; "
                     "the task runs again (no attempt spent)")
            await self._hooks.confess("error", "environment_commit_failed", error)
            raise HandBack(error, RESTORE_HAND_BACK_S, kind="environment commit failed") \
                from exc
        if not saved.uploaded:
            # The agent left the workspace as it found it: no new revision (a reader does
            # not push writers' snapshots out of the history). Its hold is released with
            # the outcome.
            self._hooks.emit(EnvironmentEvent(
                task_id=self.task_id, attempt=self.attempt, time=utcnow(),
                environment=self.name, step="unchanged", revision=env.revision,
                snapshot=env.snapshot.name if env.snapshot else None, size=saved.size))
            return outcome
        for _ in range(CAS_TRIES):
            now = utcnow()
            snap = Snapshot(revision=env.revision + 1, name=saved.name, size=saved.size,
                            digest=saved.digest, committed_at=now, task_id=self.task_id,
                            attempt=self.attempt)
            updated, dropped = committed(env, snap, now)
            if await self._store.cas(updated, rev) is not None:
                break
            # Someone wrote in between (this attempt's own renewal, a new setting, another
            # commit): judge again on what is there now.
            got = await self._store.get(self.tenant, self.name)
            if got is None:
                self._snapshots.delete_later(saved.name)
                return self._missing(outcome)
            env, rev = got
            if (why := conflict(env, self.base, self.task_id, self.attempt)) is not None:
                self._snapshots.delete_later(saved.name)
                return await self._conflicted(env, why, outcome, delivery)
        else:
            self._snapshots.delete_later(saved.name)
            raise HandBack(f"environment {self.name} kept changing while committing to it",
                           1.0, kind="environment busy")
        self.held = False
        for old in dropped:
            self._snapshots.delete_later(old)
        mine = EnvironmentUse(name=self.name, base_revision=self.base,
                              committed_revision=snap.revision)
        if await self._hooks.cas(lambda s: msgspec.structs.replace(s, environment=mine)) is None:
            raise LeaseLost("a newer attempt owns the task; its commit stands")
        self._hooks.emit(EnvironmentEvent(
            task_id=self.task_id, attempt=self.attempt, time=now, environment=self.name,
            step="committed", revision=snap.revision, snapshot=snap.name, size=snap.size))
        log.info("environment_committed", environment=self.name, revision=snap.revision,
                 snapshot=snap.name, size=snap.size)
        return outcome

    def _missing(self, outcome: Outcome) -> Outcome:
        return Outcome("failed", outcome.exit_code,
                       f"the agent succeeded, but environment {self.name} was deleted while "
                       "the task ran: its workspace was not committed")

    async def _conflicted(self, env: Environment, why: str, outcome: Outcome,
                          delivery: int) -> Outcome:
        if env.policy == "wait":
            reason = (f"{why}; its workspace was not committed; running the task again on "
                      f"revision {env.revision}")
            await self._hooks.confess("warning", "environment_conflict", reason)
            raise HandBack(reason, wait_delay(delivery), kind="environment conflict")
        error = (f"{why}; its workspace was not committed (the environment's policy is "
                 f"fail); submit it again to run it on revision {env.revision}")
        await self._hooks.confess("warning", "environment_conflict", error,
                                  hint="tasks of a `fail` environment run side by side and "
                                  "the first to succeed commits; make it `wait` "
                                  f"(`vigil env set {self.name} --policy wait`) to have "
                                  "them take turns instead")
        return Outcome("failed", outcome.exit_code, error)

    # 4. release ---------------------------------------------------------------------------
    async def release(self) -> None:
        """The task ended: let the next task in. Best effort: a hold not released expires."""
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(Exception):
            await self._store.change(self.tenant, self.name,
                                     lambda e: released(e, self.task_id))

