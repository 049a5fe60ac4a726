"""Restoring a task's workspace from its checkpoint into a new attempt's container.

If an earlier attempt left a checkpoint, the newest one of the task's history that can
be restored is downloaded (:func:`fetch`) and unpacked into the created container before
it starts (:func:`unpack`; the agent then sees ``VIGIL_RESUMED=1``). One that can never
be restored (gone from the store, or not the archive that was saved) is confessed and
dropped from the history, and the one before it is tried (:func:`unrestorable`). Passing
trouble hands the task back instead, so that no progress is given up: NATS unreachable
while downloading, or an unpack that keeps failing; after ``RESTORE_DELIVERIES``
deliveries that could not unpack the same checkpoint, the task is dead (ADR 8).
"""

from __future__ import annotations

import asyncio
from typing import IO

import nats.errors
import structlog

from vigil.errors import NatsUnavailable
from vigil.messages import CheckpointRef, utcnow
from vigil_executor import checkpoint_rules
from vigil_executor.agentio import clip
from vigil_executor.checkpoint import (
    RESTORE_BACKOFF_S,
    RESTORE_DELIVERIES,
    RESTORE_HAND_BACK_S,
    RESTORE_TRIES,
    CheckpointError,
    archive_problem,
    restore_failure,
)
from vigil_executor.claim import HandBack, RestoreGaveUp
from vigil_executor.hold import Hold
from vigil_executor.runtime import ContainerSpec

log = structlog.get_logger("vigil.executor")


async def fetch(h: Hold, into: IO[bytes]) -> CheckpointRef | None:
    """Download the newest checkpoint of the task's history that can be restored;
    None for an empty workspace (there is none, or none is left).

    One that can never be restored, here or anywhere (gone from the store, or not
    the archive that was saved), is confessed, dropped from the history, and the one
    before it is tried: handing the task back would only loop. Passing trouble
    (NATS unreachable) hands the task back instead: the progress is not given up."""
    assert h.state is not None
    for ref in checkpoint_rules.history(h.state):
        into.seek(0)
        into.truncate()
        try:
            size = await h.ctx.checkpoints.load(ref.name, into)
        except (NatsUnavailable, nats.errors.Error, TimeoutError) as exc:
            # The platform's trouble (NATS away, a permission it lacks), not the
            # agent's nor this node's: starting from an empty workspace would lose the
            # progress, and spending an attempt would charge the agent. Hand back.
            error = (f"could not download checkpoint {ref.name}: "
                     f"{str(exc) or type(exc).__name__}")
            await h.confess("error", "restore_unavailable",
                            f"{error}; handed the task back (no attempt spent)",
                            hint="the platform could not read the object store; "
                            "check NATS and the executor's NATS permissions")
            raise HandBack(error, RESTORE_HAND_BACK_S, kind="restore failed") from exc
        except CheckpointError as exc:
            # The object is gone (expired, deleted by hand): nothing to wait for.
            await unrestorable(h, ref, str(exc), corrupt=False)
            continue
        problem = await asyncio.to_thread(archive_problem, into, ref.digest)
        if problem is not None:
            await unrestorable(h, ref, problem, corrupt=True)
            continue
        into.seek(0)
        log.info("checkpoint_fetched", checkpoint=ref.name, size=size)
        return ref
    return None


async def unrestorable(h: Hold, ref: CheckpointRef, problem: str, *, corrupt: bool) -> None:
    """Say once (the id names the checkpoint) that ``ref`` can never be restored, and
    drop it from the task's history (the object stays until the store's TTL ends it);
    the caller falls back to the checkpoint before it, or an empty workspace."""
    assert h.state is not None
    refs = checkpoint_rules.history(h.state)
    rest = checkpoint_rules.without(refs, ref.name)
    then = (f"the agent resumes from the checkpoint before it, {rest[0].name} "
            f"(attempt {rest[0].attempt}, {rest[0].reason}), and loses the progress "
            "saved since" if rest else
            "the agent starts from an empty workspace, the progress it saved is lost")
    log.error("checkpoint_unrestorable", checkpoint=ref.name, problem=problem,
              fallback=rest[0].name if rest else None)
    if corrupt:
        await h.confess(
            "critical", "checkpoint_corrupt",
            f"checkpoint {ref.name} of task {h.state.id} (attempt {ref.attempt}, "
            f"{ref.reason}) is corrupt: {problem}; {then}",
            hint="the object in vigil-checkpoints was damaged or replaced after it was "
            "saved; check who writes to the store. The object is kept until it expires",
            confession_id=f"executor-{_dotted(ref.name)}-corrupt")
    else:
        await h.confess("error", "restore_failed",
                        f"could not restore checkpoint {ref.name}: {problem}; {then}",
                        confession_id=f"executor-{_dotted(ref.name)}-gone")
    async with h.write_lock:
        now = utcnow()
        await h.cas(lambda s: checkpoint_rules.with_history(
            s, checkpoint_rules.without(checkpoint_rules.history(s), ref.name), now))


async def unpack(h: Hold, spec: ContainerSpec, archive: IO[bytes], ref: CheckpointRef) -> None:
    """Unpack the checkpoint into the created container, or hand the task back.

    An import that fails is tried again (after a short backoff) on a fresh container
    and volume, since a failed unpack may have left part of the files. If it keeps
    failing, the agent must not start from an empty workspace and lose its progress:
    the task goes back to the queue (no attempt spent) with a confession, and its next
    try, here or on another node, restores the same checkpoint. Not forever: the
    ``RESTORE_DELIVERIES``-th delivery that fails on the same checkpoint ends the task
    ``dead`` (RestoreGaveUp), the checkpoint kept as evidence (ADR 8).
    """
    assert h.state is not None
    name = ref.name
    errors: list[str] = []
    for n in range(1, RESTORE_TRIES + 1):
        if n > 1:
            await asyncio.sleep(RESTORE_BACKOFF_S * 2 ** (n - 2))
            h.container = await h.ctx.runtime.create(spec)
        assert h.container is not None
        archive.seek(0)
        try:
            await h.container.import_workspace(archive)  # type: ignore[arg-type]
        except Exception as exc:  # whatever the runtime raised, this try failed
            errors.append(str(exc) or type(exc).__name__)
            log.warning("restore_try_failed", checkpoint=name, try_no=n, error=errors[-1])
            container, h.container = h.container, None
            await container.remove()
            await h.ctx.runtime.remove_volume(spec.workspace_volume)
            continue
        if errors:
            log.info("restore_retry_succeeded", checkpoint=name, tries=n, errors=errors)
        return
    error = restore_failure(name, h.ctx.settings.node_id, RESTORE_TRIES, clip(errors[-1], 600))
    h.restore_failed = name  # on this attempt's record, where the count is kept
    failed = checkpoint_rules.restore_failures(h.state, name) + 1
    if failed >= RESTORE_DELIVERIES:
        # Handing back again would loop until the consumer's max deliveries, each time
        # with nothing new to show; starting empty would lose the progress silently.
        error += (f"; {failed} deliveries could not restore it, so the task is dead "
                  "instead of started from an empty workspace")
        await h.confess(
            "error", "restore_failed", error,
            hint="the checkpoint is kept: fix the cause (check the nodes' Podman "
            "service log) and `vigil replay redrive` the task")
        raise RestoreGaveUp(error)
    await h.confess(
        "error", "restore_failed",
        f"{error}; handed the task back instead of starting it from an empty workspace",
        hint="the next try (after a short delay, on any node) restores the same "
        f"checkpoint; after {RESTORE_DELIVERIES} failed deliveries the task is dead. "
        "If this repeats, check the node's Podman service log")
    raise HandBack(f"{error}; handing the task back", RESTORE_HAND_BACK_S,
                   kind="restore failed")


def _dotted(object_name: str) -> str:
    """A checkpoint's object name (``<tenant>/<task>/a<n>-<m>``) as part of an id: dots,
    which neither a tenant nor a task id can hold, keep the parts apart."""
    return object_name.replace("/", ".")
