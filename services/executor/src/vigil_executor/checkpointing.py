"""An attempt's checkpoints: on the agent's request, periodically if configured, and on
drain.

Each is the workspace archive in the object store (:mod:`vigil_executor.checkpoint`) and
the task's state pointing to it (compare-and-set), at the head of a short history. A
snapshot the agent did not vouch for (periodic, or a drain that had to kill it) never
replaces one it did; an agent that keeps failing right after restoring the same
checkpoint rolls back to the one before it (see :mod:`vigil_executor.checkpoint_rules`).
A checkpoint that fails is an event and a confession; the agent carries on.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import structlog

from vigil.errors import VigilError
from vigil.messages import Checkpoint, CheckpointRef, TaskState, utcnow
from vigil_executor import checkpoint_rules
from vigil_executor.checkpoint import object_name
from vigil_executor.checkpoint_rules import drain_was_clean, may_replace
from vigil_executor.hold import Hold
from vigil_executor.runtime import ExitInfo

log = structlog.get_logger("vigil.executor")

# After a drain's stop has returned, how long the runtime may take to report the agent's
# exit code (it is known by then; a runtime that does not say counts as not clean).
EXIT_REPORT_S = 5.0


class Checkpointing:
    def __init__(self, h: Hold) -> None:
        self._h = h
        self._taken = 0  # this attempt's checkpoints, for their object names

    async def request(self, payload: dict[str, Any]) -> None:
        """``::vigil::checkpoint``: snapshot now; the agent waits for the reply file."""
        seq = payload.get("seq")
        note = payload.get("note") if isinstance(payload.get("note"), dict) else {}
        # Clean: the agent blocks until the reply, so nothing writes the workspace.
        ok, error = await self.take("agent", note or {}, clean=True)
        if isinstance(seq, int) and self._h.control is not None:
            self._reply(f"checkpoint-{seq}.json", {"ok": ok, "error": error})

    async def periodic(self) -> None:
        every = self._h.ctx.settings.checkpoint_interval_s
        if every <= 0:
            return
        while True:
            await asyncio.sleep(every)
            # Taken while the agent writes: never clean (ADR 8).
            await self.take("periodic", {}, clean=False)

    async def drain_snapshot(self, waiter: asyncio.Task[ExitInfo]) -> None:
        """The drain's snapshot of the stopped agent's workspace. Clean only when the
        agent exited 0 by itself within its grace (it handled SIGTERM and saved its
        state); an agent that had to be killed may have left a file half written, and
        such a snapshot must not replace the checkpoint the agent vouched for."""
        exit_info: ExitInfo | None = None
        try:
            exit_info = await asyncio.wait_for(asyncio.shield(waiter), EXIT_REPORT_S)
        except Exception as exc:  # not learnt, for whatever reason: not clean
            log.warning("drain_exit_unknown", error=str(exc) or type(exc).__name__)
        await self.take("drain", {}, clean=drain_was_clean(exit_info),
                        exit_code=exit_info.exit_code if exit_info else None)

    async def take(self, reason: str, note: dict[str, Any], *, clean: bool,
                   exit_code: int | None = None) -> tuple[bool, str | None]:
        """Snapshot the workspace and make it the head of the task's checkpoint history.
        Never raises: a failed checkpoint is an event and a confession, and the agent
        carries on. A snapshot that may not replace the head (checkpoint_rules.
        may_replace) is not taken at all: it would only be deleted again."""
        h = self._h
        container, work = h.container, h.work
        if container is None or work is None or h.state is None:
            return False, "no running container"
        async with h.write_lock:
            state = h.state
            head = state.checkpoint
            if not may_replace(clean, head):
                assert head is not None
                # Periodic skips repeat every interval: logged only when debugging.
                (log.debug if reason == "periodic" else log.info)(
                    "checkpoint_skipped", reason=reason, exit_code=exit_code, kept=head.name,
                    why="not clean, and the task's checkpoint is one the agent vouched for")
                return False, f"not taken: checkpoint {head.name} is kept"
            self._taken += 1
            name = object_name(work.tenant, work.task_id, state.attempt, self._taken)
            try:
                saved = await h.ctx.checkpoints.save(
                    name, container.export_workspace(),
                    description=f"workspace of task {work.task_id}, attempt {state.attempt} "
                    f"({reason})",
                )
            except VigilError as exc:  # too large, Podman refused, NATS down: all say why
                error = str(exc)
                h.sink.emit(Checkpoint(
                    task_id=work.task_id, attempt=state.attempt, time=utcnow(), name=name,
                    reason=reason, note=note, ok=False, error=error, clean=clean,
                ))
                await h.confess("error", "checkpoint_failed",
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
                fell_off[:] = dropped  # of the state actually written (cas may retry)
                return checkpoint_rules.with_history(s, kept, now)

            updated_ = await h.cas(record)
            if updated_ is None:
                # Fenced: a newer attempt owns the task. Its state must not point here.
                h.ctx.checkpoints.delete_later(saved.name)
                return False, "this attempt no longer owns the task"
            updated = updated_
            h.saved = saved.name
        for old in fell_off:
            h.ctx.checkpoints.delete_later(old.name)
        h.sink.emit(Checkpoint(
            task_id=work.task_id, attempt=updated.attempt, time=now, name=saved.name,
            size=saved.size, digest=saved.digest, reason=reason, note=note, clean=clean,
        ))
        log.info("checkpoint_saved", reason=reason, name=saved.name, size=saved.size,
                 clean=clean, exit_code=exit_code)
        return True, None

    def _reply(self, name: str, body: dict[str, Any]) -> None:
        control = self._h.control
        assert control is not None
        tmp = control / f".{name}.tmp"
        tmp.write_text(json.dumps(body), encoding="utf-8")
        os.chmod(tmp, 0o644)
        tmp.replace(control / name)  # atomic: the agent never reads half a file
