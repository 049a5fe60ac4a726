"""Which checkpoints a task keeps, and which one an attempt restores: pure functions.

Kept apart from the attempt's I/O, like :mod:`vigil_executor.claim` and
:mod:`vigil_executor.retry`, so that each rule is unit-tested on its own (ADR 8).

- **Vouched for or not.** A checkpoint the agent asked for is consistent: the helper
  blocks the agent until the snapshot is durable. So is a drain snapshot of an agent
  that exited 0 by itself within its grace after SIGTERM (it handled the signal and
  saved its state). A periodic snapshot, or a drain snapshot of an agent that had to be
  killed, may catch a file half written: a soak saw one (an empty state file) replace the
  agent's own good checkpoint and crash every later attempt. Such a snapshot never
  replaces one the agent vouched for; with none to protect it is kept (better than
  nothing), and the rollback below is the safety net.
- **A short history.** The task's state keeps the last ``CHECKPOINTS_KEPT`` checkpoints,
  newest first; an object is deleted when it falls off (or the task succeeds).
- **Rollback.** ``ROLLBACK_AFTER`` consecutive failures of attempts that restored the
  same checkpoint and saved none of their own: the next attempt restores the checkpoint
  before it (none left: an empty workspace). Those failures are refunded: they spent
  the checkpoint, not the task's ``max_attempts`` (see :func:`vigil.transitions.set_aside`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import msgspec

from vigil.messages import AttemptRecord, CheckpointRef, TaskState
from vigil_executor.runtime import ExitInfo

CHECKPOINTS_KEPT = 3
# One failure right after a restore may be the world's fault (a flaky dependency, a node
# under pressure); two in a row from the same workspace are the workspace's. Waiting
# for more would spend attempts without telling us anything new.
ROLLBACK_AFTER = 2


def vouched(ref: CheckpointRef) -> bool:
    """Whether the agent vouched for ``ref``'s consistency (see the module's docstring).

    ``reason == "agent"`` also covers refs recorded before ``clean`` existed."""
    return ref.reason == "agent" or ref.clean


def drain_was_clean(exit_info: ExitInfo | None) -> bool:
    """Whether an agent sent SIGTERM by a drain exited cleanly by itself: exit code 0.

    The runtime's stop ends in SIGKILL when the grace runs out (137), and an agent
    without a handler dies of the SIGTERM itself (143), so a 0 can only come from an
    agent that exited within its grace. ``None`` (the exit could not be learnt) is not
    clean: an unknown state must not replace a known one."""
    return exit_info is not None and exit_info.exit_code == 0 and not exit_info.oom_killed


def may_replace(clean: bool, head: CheckpointRef | None) -> bool:
    """Whether a new snapshot (``clean`` or not) may become the task's checkpoint, the
    one the next attempt restores, in place of ``head``."""
    return clean or head is None or not vouched(head)


def history(state: TaskState) -> list[CheckpointRef]:
    """The task's checkpoints, newest first, headed by the one the next attempt restores.

    A state written before the history existed, or rewritten by an executor that does
    not know it (msgspec drops the unknown field), has only ``checkpoint``."""
    head = state.checkpoint
    if head is None:
        return []
    return [head, *(c for c in state.checkpoints if c.name != head.name)][:CHECKPOINTS_KEPT]


def with_history(state: TaskState, refs: Sequence[CheckpointRef], now: datetime) -> TaskState:
    """``state`` with ``refs`` as its checkpoint history: the one place that keeps
    ``checkpoint`` the head of ``checkpoints``."""
    kept = list(refs)
    return msgspec.structs.replace(state, checkpoint=kept[0] if kept else None,
                                   checkpoints=kept, updated_at=now)


def pushed(refs: Sequence[CheckpointRef], ref: CheckpointRef
           ) -> tuple[list[CheckpointRef], list[CheckpointRef]]:
    """(the history with ``ref`` at its head, the refs that fell off its end)."""
    kept = [ref, *(c for c in refs if c.name != ref.name)]
    return kept[:CHECKPOINTS_KEPT], kept[CHECKPOINTS_KEPT:]


def without(refs: Sequence[CheckpointRef], name: str) -> list[CheckpointRef]:
    """The history without checkpoint ``name`` (one that can never be restored)."""
    return [c for c in refs if c.name != name]


@dataclass(frozen=True)
class Rollback:
    """Give up on ``poisoned`` (the task's checkpoint): the next attempt restores ``to``,
    or an empty workspace when None. ``attempts`` failed right after restoring it."""

    poisoned: CheckpointRef
    to: CheckpointRef | None
    attempts: tuple[int, ...]


def rollback(refs: Sequence[CheckpointRef], attempts: Sequence[AttemptRecord],
             budget_from: int = 0, after: int = ROLLBACK_AFTER) -> Rollback | None:
    """Whether the task's checkpoint (``refs[0]``) is poisoning it, by its attempt
    history (oldest first, the attempt that just failed included).

    Counted backwards from the newest: attempts that ``failed`` (the agent's own
    failure: a non-zero exit, an OOM kill) having restored the head and saved no
    checkpoint of their own; the first failure that does not fit ends the count. Lost
    and handed-back attempts are skipped: a node's death or a drain says nothing about
    the workspace. Only attempts since the newest operator redrive (``budget_from``)
    count: a redrive gives the checkpoint fresh tries, as it gives fresh attempts.
    """
    if not refs:
        return None
    head = refs[0]
    streak: list[int] = []
    for record in reversed(attempts):
        if record.attempt <= budget_from:
            break
        if record.outcome != "failed":
            continue
        if record.restored != head.name or record.saved is not None:
            break
        streak.append(record.attempt)
    if len(streak) < after:
        return None
    return Rollback(poisoned=head, to=refs[1] if len(refs) > 1 else None,
                    attempts=tuple(reversed(streak)))


def restore_failures(state: TaskState, name: str) -> int:
    """Earlier deliveries handed back because checkpoint ``name`` would not restore,
    since the task's newest operator redrive (which gives fresh tries, like a fresh
    budget)."""
    return sum(1 for h in state.history
               if h.outcome == "handed_back" and h.attempt > state.budget_from
               and h.restore_failed == name)


def leftovers(state: TaskState) -> list[str]:
    """Objects a succeeded task no longer needs: its checkpoint history and the
    checkpoints it rolled back from (kept until then as evidence)."""
    rolled = [h.rolled_back_from for h in state.history if h.rolled_back_from is not None]
    return list(dict.fromkeys([*(c.name for c in history(state)), *rolled]))
