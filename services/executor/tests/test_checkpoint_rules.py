"""Unit tests: which snapshot may head a task's checkpoint history, what the history keeps,
when a task rolls back to an older checkpoint, and what that refunds (no server)."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from vigil import codec
from vigil.messages import AttemptRecord, CheckpointRef, TaskState
from vigil.transitions import set_aside, spent_attempts
from vigil_executor.checkpoint_rules import (
    CHECKPOINTS_KEPT,
    Rollback,
    drain_was_clean,
    history,
    leftovers,
    may_replace,
    pushed,
    restore_failures,
    rollback,
    vouched,
    with_history,
    without,
)
from vigil_executor.runtime import ExitInfo

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def ref(name: str, reason: str = "agent", *, clean: bool | None = None,
        attempt: int = 1) -> CheckpointRef:
    return CheckpointRef(name=name, size=10, digest="sha256:00", attempt=attempt, reason=reason,
                         taken_at=NOW, clean=reason == "agent" if clean is None else clean)


def failed(attempt: int, restored: str | None, *, saved: str | None = None,
           rolled_back_from: str | None = None) -> AttemptRecord:
    return AttemptRecord(attempt=attempt, outcome="failed", restored=restored, saved=saved,
                         rolled_back_from=rolled_back_from)


def state(refs: list[CheckpointRef], records: list[AttemptRecord] | None = None,
          budget_from: int = 0) -> TaskState:
    records = records or []
    s = TaskState(id="t", tenant="acme", status="running", created_at=NOW, updated_at=NOW,
                  attempt=len(records) + 1, history=records, budget_from=budget_from)
    return with_history(s, refs, NOW)


# which snapshot may head the history ---------------------------------------------------------
def test_the_agent_vouches_for_what_it_asked_for_and_for_a_clean_drain() -> None:
    assert vouched(ref("a1", "agent"))
    assert vouched(ref("a1", "agent", clean=False))  # recorded before `clean` existed
    assert vouched(ref("d1", "drain", clean=True))
    assert not vouched(ref("d1", "drain", clean=False))
    assert not vouched(ref("p1", "periodic"))


def test_a_drain_is_clean_only_when_the_agent_exited_0_by_itself() -> None:
    assert drain_was_clean(ExitInfo(exit_code=0))
    assert not drain_was_clean(ExitInfo(exit_code=143))  # died of SIGTERM (no handler)
    assert not drain_was_clean(ExitInfo(exit_code=137))  # SIGKILL when the grace ran out
    assert not drain_was_clean(ExitInfo(exit_code=1))  # its handler failed
    assert not drain_was_clean(ExitInfo(exit_code=0, oom_killed=True))
    assert not drain_was_clean(None)  # the runtime did not say


def test_an_unclean_snapshot_never_replaces_one_the_agent_vouched_for() -> None:
    # The soak's case: the agent's own checkpoint, then a drain that killed it mid-write.
    assert not may_replace(False, ref("a1", "agent"))
    assert not may_replace(False, ref("d1", "drain", clean=True))
    # Better than nothing: no checkpoint, or only unclean ones so far.
    assert may_replace(False, None)
    assert may_replace(False, ref("p1", "periodic"))
    assert may_replace(False, ref("d1", "drain", clean=False))
    # A clean one always may: the agent's own request, a drain it handled.
    assert may_replace(True, ref("a1", "agent"))
    assert may_replace(True, None)


# the history -------------------------------------------------------------------------------
def test_the_history_keeps_the_newest_three_and_says_what_fell_off() -> None:
    refs: list[CheckpointRef] = []
    fell: list[list[str]] = []
    for n in range(1, 6):
        refs, dropped = pushed(refs, ref(f"a{n}"))
        fell.append([c.name for c in dropped])
    assert CHECKPOINTS_KEPT == 3
    assert [c.name for c in refs] == ["a5", "a4", "a3"]
    assert fell == [[], [], [], ["a1"], ["a2"]]


def test_the_state_keeps_checkpoint_at_the_head_of_its_history() -> None:
    s = state([ref("a3"), ref("a2"), ref("a1")])
    assert s.checkpoint == ref("a3") and [c.name for c in s.checkpoints] == ["a3", "a2", "a1"]
    emptied = with_history(s, [], NOW)
    assert emptied.checkpoint is None and emptied.checkpoints == []
    assert [c.name for c in without(history(s), "a2")] == ["a3", "a1"]


def test_a_state_from_before_the_history_decodes_and_reads_as_its_one_checkpoint() -> None:
    # What an older executor wrote (no `checkpoints`, no `clean`, no typed attempt fields).
    old = {"id": "t", "tenant": "acme", "status": "scheduled", "created_at": NOW.isoformat(),
           "updated_at": NOW.isoformat(),
           "checkpoint": {"name": "t/a1-2", "size": 5, "digest": "sha256:ab", "attempt": 1,
                          "reason": "drain", "taken_at": NOW.isoformat()},
           "history": [{"attempt": 1, "outcome": "handed_back", "error": "executor draining"}]}
    s = codec.state_decoder.decode(msgspec.json.encode(old))
    assert s.checkpoints == [] and s.checkpoint is not None and s.checkpoint.clean is False
    assert [c.name for c in history(s)] == ["t/a1-2"]
    assert not vouched(s.checkpoint)  # an old drain snapshot: not known to be clean
    assert s.history[0].restored is None and s.history[0].rolled_back_from is None
    # An older executor rewriting a newer state drops the history; the head still leads.
    stale = msgspec.structs.replace(state([ref("a2"), ref("a1")]), checkpoint=ref("a3"))
    assert [c.name for c in history(stale)] == ["a3", "a2", "a1"]


# rollback ----------------------------------------------------------------------------------
def test_two_failures_right_after_restoring_the_same_checkpoint_roll_back() -> None:
    refs = [ref("x2"), ref("x1")]
    one = [failed(2, "x2")]
    assert rollback(refs, one) is None  # one failure may be the world's fault
    two = [*one, failed(3, "x2")]
    assert rollback(refs, two) == Rollback(poisoned=refs[0], to=refs[1], attempts=(2, 3))


def test_with_no_older_checkpoint_the_rollback_is_to_an_empty_workspace() -> None:
    refs = [ref("x1")]
    assert rollback(refs, [failed(2, "x1"), failed(3, "x1")]) == Rollback(
        poisoned=refs[0], to=None, attempts=(2, 3))
    # An empty workspace is as far back as it goes: its failures roll nothing back.
    assert rollback([], [failed(4, None), failed(5, None)]) is None


def test_what_breaks_the_count_and_what_does_not() -> None:
    refs = [ref("x2"), ref("x1")]
    lost = AttemptRecord(attempt=3, outcome="lost", restored="x2")
    back = AttemptRecord(attempt=4, outcome="handed_back", restored="x2")
    # A lost or handed-back attempt says nothing about the workspace: skipped, neither
    # counted nor ending the count.
    assert rollback(refs, [lost, back, failed(5, "x2")]) is None
    assert rollback(refs, [failed(2, "x2"), lost, back, failed(5, "x2")]) is not None
    # A failure that saved a checkpoint of its own is not "right after restoring".
    assert rollback(refs, [failed(2, "x2", saved="x9"), failed(3, "x2")]) is None
    # Nor one that restored another checkpoint: the failures must be consecutive.
    assert rollback(refs, [failed(2, "x2"), failed(3, "x1"), failed(4, "x2")]) is None
    # Nor failures that restored an older head.
    assert rollback(refs, [failed(2, "x1"), failed(3, "x1")]) is None


def test_a_redrive_gives_the_checkpoint_fresh_tries() -> None:
    refs = [ref("x2"), ref("x1")]
    records = [failed(2, "x2"), failed(3, "x2"), failed(4, "x2")]
    assert rollback(refs, records, budget_from=3) is None  # only attempt 4 counts
    assert rollback(refs, [*records, failed(5, "x2")], budget_from=3) is not None


def test_a_rollback_refunds_the_failures_on_the_checkpoint_it_gave_up() -> None:
    # max_attempts 3: attempt 1 failed (after saving x2, the poison), 2 and 3 crashed on
    # x2. Without the refund the budget would be spent before x1 got its try.
    records = [failed(1, None, saved="x2"), failed(2, "x2"), failed(3, "x2")]
    assert spent_attempts(state([ref("x2"), ref("x1")], records)) == 3
    records[-1] = failed(3, "x2", rolled_back_from="x2")
    rolled = state([ref("x1")], records)
    assert set_aside(rolled) == {"x2"}
    assert spent_attempts(rolled) == 1  # attempt 1 still counts: it did not restore x2
    # Failures after the rollback count again, and a redrive resets the set-aside list.
    assert spent_attempts(state([ref("x1")], [*records, failed(4, "x1")])) == 2
    assert set_aside(state([ref("x1")], records, budget_from=3)) == set()


def test_restore_failures_are_counted_by_the_typed_field_not_the_message() -> None:
    def back(n: int, name: str | None, error: str = "anything") -> AttemptRecord:
        return AttemptRecord(attempt=n, outcome="handed_back", restore_failed=name, error=error)

    s = state([ref("x1")], [back(1, None, "could not restore checkpoint x1 on n1 (…)"),
                            back(2, "x1"), back(3, "x0"), back(4, "x1")])
    assert restore_failures(s, "x1") == 2
    assert restore_failures(msgspec.structs.replace(s, budget_from=2), "x1") == 1


def test_a_succeeded_task_leaves_its_history_and_what_it_rolled_back_from() -> None:
    s = state([ref("x3"), ref("x1")],
              [failed(2, "x2"), failed(3, "x2", rolled_back_from="x2")])
    assert leftovers(s) == ["x3", "x1", "x2"]
    assert leftovers(state([])) == []
