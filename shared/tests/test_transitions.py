"""The task state machine (vigil.transitions): its rules by example, and its invariants
under random sequences of inputs, stale and duplicated ones included (hypothesis)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vigil import transitions as t
from vigil.messages import STATUSES, TERMINAL, Finished, TaskSpec, TaskState, WorkItem

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
MAX_LOST = 3


def new_task(**changes: Any) -> TaskState:
    spec = TaskSpec(id="t1", command=["true"], max_attempts=3)
    state = TaskState(id="t1", tenant="acme", status="queued", created_at=T0, updated_at=T0,
                      spec=spec, submit_seq=7)
    return msgspec.structs.replace(state, **changes)


def running(attempt: int = 1, **changes: Any) -> TaskState:
    return new_task(status="running", attempt=attempt, executor="n1", started_at=T0,
                    work_seq=10, delivery=attempt, **changes)


# the rules, by example ------------------------------------------------------------------------
def test_admit_emits_accepted_and_schedule_emits_scheduled() -> None:
    step = t.admit(new_task())
    assert [type(e).__name__ for e in step.events] == ["Accepted"]
    scheduled = t.schedule(step.state, T0)
    assert scheduled.state.status == "scheduled"
    assert scheduled.events[0].pool == "default"  # type: ignore[attr-defined]


def test_a_quota_refusal_is_failed_at_submission_with_rejected_then_finished() -> None:
    step = t.refuse(new_task(), "over quota", limit="max_queued")
    assert step.state.status == "failed" and step.state.finished_at == T0
    rejected, finished = step.events
    assert isinstance(finished, Finished) and finished.tenant == "acme"
    assert finished.submit_seq == 7 and rejected.limit == "max_queued"  # type: ignore[attr-defined]
    assert t.refusal_events(step.state) == step.events  # resent alike


def test_the_third_lost_attempt_buries_the_task_as_a_crash_loop() -> None:
    state = running(2, history=[t.attempt_record(running(1), T0, "lost", t.LOST)])
    step = t.claim(state, node="n2", now=T0, work_seq=10, delivery=3, max_lost_attempts=3)
    assert step.state.status == "running" and step.state.attempt == 3
    assert step.state.history[-1].outcome == "lost" and step.events == ()
    dead = t.claim(step.state, node="n3", now=T0, work_seq=10, delivery=4,
                   max_lost_attempts=3, tail=["last line"])
    assert dead.state.status == "dead" and dead.state.attempt == 3
    assert "crash loop: 3 attempts" in (dead.state.error or "")
    assert dead.state.tail == ["last line"] and dead.finished is not None


def test_only_the_agents_failures_spend_attempts_and_a_spent_budget_is_dead() -> None:
    state = running(3, history=[
        t.attempt_record(running(1), T0, "failed", "exit 1"),
        t.attempt_record(running(2), T0, "lost", t.LOST),
        t.attempt_record(running(2), T0, "handed_back", "drain")])
    assert t.spent_attempts(state) == 1 and t.lost_attempts(state) == 1
    assert t.after_failure(None, exit_code=1, failures=3, max_attempts=3).dead == "kept_failing"
    assert t.after_failure(None, exit_code=1, failures=1, max_attempts=1).dead is None
    retry = t.after_failure(None, exit_code=1, failures=1, max_attempts=3, uniform=lambda a, b: 0)
    assert retry.retry and retry.delay_s == 1.0


def test_max_deliveries_requeues_an_unclaimed_labelled_task_then_buries_it() -> None:
    labelled = new_task(status="scheduled")
    step = t.exhausted(labelled, T0, deliveries=50, labels={"gpu": "a"}, requeue_limit=2)
    assert step.state.status == "queued" and step.state.requeued == 1 and not step.events
    spent = msgspec.structs.replace(labelled, requeued=2)
    dead = t.exhausted(spent, T0, deliveries=50, labels={"gpu": "a"}, requeue_limit=2)
    assert dead.state.status == "dead" and "node_labels {'gpu': 'a'}" in (dead.state.error or "")
    ran = t.exhausted(running(1), T0, deliveries=50, labels={}, requeue_limit=2)
    assert ran.state.status == "dead" and ran.state.history[-1].outcome == "lost"


def test_redrive_gives_a_fresh_budget_and_refuses_a_succeeded_task() -> None:
    dead = t.bury(running(3), T0, "kept_failing", "3 of 3 failed").state
    step = t.redrive(dead, T0, "redriven by ops")
    assert step.state.status == "scheduled" and step.state.budget_from == 3
    assert step.state.redriven == 1 and step.state.attempt == 3
    assert [type(e).__name__ for e in step.events] == ["Retrying", "Scheduled"]
    done = t.finish(running(1), 1, T0, outcome="succeeded", exit_code=0, error=None,
                    ran=t.Ran(), tail=[]).state
    with pytest.raises(t.Refused):
        t.redrive(done, T0, "again")


def test_a_cancel_ends_a_waiting_task_and_marks_a_running_one() -> None:
    step = t.cancel(new_task(status="scheduled"), T0, "cancelled by ann")
    assert step.state.status == "cancelled" and step.finished is not None
    marked = t.cancel(running(1), T0, "cancelled by ann")
    assert marked.state.status == "running" and marked.state.cancel_reason == "cancelled by ann"
    ended = t.finish(marked.state, 1, T0 + timedelta(seconds=2), outcome="cancelled",
                     exit_code=143, error="stopped", ran=t.Ran(), tail=[])
    assert ended.state.error == "cancelled by ann" and ended.finished is not None
    assert ended.finished.duration_s == 2.0
    with pytest.raises(t.Refused):  # nothing new starts once cancelled
        t.claim(marked.state, node="n2", now=T0, work_seq=10, delivery=9, max_lost_attempts=3)


def test_a_stale_delivery_or_another_attempt_writes_nothing() -> None:
    state = running(2)
    assert t.delivery_verdict(state, 10, 2) == "stale"
    assert t.delivery_verdict(state, 11, 5) == "duplicate"
    with pytest.raises(t.Refused):
        t.claim(state, node="n2", now=T0, work_seq=10, delivery=2, max_lost_attempts=3)
    with pytest.raises(t.Refused):
        t.finish(state, 1, T0, outcome="succeeded", exit_code=0, error=None, ran=t.Ran(),
                 tail=[])


# the invariants, by random sequences ------------------------------------------------------
@dataclass(frozen=True)
class Input:
    name: str
    attempt: int = 0
    delivery: int = 0
    work_seq: int = 10
    outcome: str = "failed"
    dead: bool = False


ATTEMPT_SCOPED = {"start", "hand_back", "retry", "finish"}
# The EDGES each input may take (the table the module states, checked against its code).
TAKES = {"claim": {"claim", "lose", "bury"}, "exhausted": {"requeue", "bury"},
         "hand_back": {"hand back"}, "time_out": {"time out"}, "finish_cancel": {"finish cancel"},
         "finish": {"finish"}}
inputs = st.one_of(
    st.builds(Input, name=st.sampled_from(
        ["schedule", "requeue", "time_out", "cancel", "finish_cancel", "fail", "exhausted",
         "redrive", "bury"])),
    st.builds(Input, name=st.just("claim"), delivery=st.integers(0, 8),
              work_seq=st.sampled_from([10, 10, 10, 11])),
    st.builds(Input, name=st.sampled_from(sorted(ATTEMPT_SCOPED)), attempt=st.integers(0, 6),
              outcome=st.sampled_from(["succeeded", "failed", "timed_out", "cancelled"]),
              dead=st.booleans()),
)


def apply(state: TaskState, i: Input, now: datetime) -> t.Step:
    ran = t.Ran()
    match i.name:
        case "schedule":
            return t.schedule(state, now)
        case "requeue":
            return t.requeue(state, now, "needs labels")
        case "time_out":
            return t.time_out(state, now, "queue timeout")
        case "cancel":
            return t.cancel(state, now, "cancelled by a user")
        case "finish_cancel":
            return t.finish_cancel(state, now)
        case "fail":
            return t.fail(state, now, "admission gave up")
        case "exhausted":
            return t.exhausted(state, now, deliveries=50, labels={"gpu": "a"}, requeue_limit=2)
        case "redrive":
            return t.redrive(state, now, "redriven")
        case "bury":
            return t.bury(state, now, "unrestorable", "checkpoint unreadable", lost="gone")
        case "claim":
            return t.claim(state, node="n", now=now, work_seq=i.work_seq, delivery=i.delivery,
                           max_lost_attempts=MAX_LOST)
        case "start":
            return t.start(state, i.attempt, now, image="img", container=None, resumed=False,
                           limits_enforced=True, resources={})
        case "hand_back":
            return t.hand_back(state, i.attempt, now, ran=ran, reason="drain", delay_s=0.0,
                               tail=[])
        case "retry":
            return t.retry(state, i.attempt, now, ran=ran, reason="exit 1", delay_s=1.0,
                           exit_code=1, error="exit 1", tail=[])
        case _:
            return t.finish(state, i.attempt, now, outcome=i.outcome,  # type: ignore[arg-type]
                            exit_code=0, error=None, ran=ran, tail=[],
                            dead="kept_failing" if i.dead and i.outcome == "failed" else None)


@settings(max_examples=400, deadline=None)
@given(st.lists(inputs, max_size=40))
def test_random_sequences_keep_the_machines_invariants(seq: list[Input]) -> None:
    state = t.admit(new_task()).state
    finishes = 0
    for n, i in enumerate(seq):
        now = T0 + timedelta(seconds=n + 1)
        try:
            step = apply(state, i, now)
        except t.Refused:
            # A stale attempt never writes: every attempt-scoped input of another attempt,
            # or on a task not running, is refused.
            continue
        new = step.state
        if i.name in ATTEMPT_SCOPED:
            assert state.status == "running" and state.attempt == i.attempt, (state, i)
        if i.name == "claim":
            assert t.delivery_verdict(state, i.work_seq, i.delivery) == "claim"
        assert new.status in STATUSES
        if new.status != state.status:
            names = TAKES.get(i.name, {i.name})
            assert any((name, state.status, new.status) in t.EDGES for name in names), (
                f"{i.name} moved {state.status} -> {new.status}, not an edge of the table")
        assert new.status in t.NEXT[state.status] or new == state, (state.status, new.status)
        if state.terminal:
            assert i.name == "redrive", f"{i.name} changed a {state.status} task"
        assert new.attempt >= state.attempt  # attempts never go down
        finished = [e for e in step.events if isinstance(e, Finished)]
        assert len(finished) == (1 if new.terminal and not state.terminal else 0)
        for e in finished:
            assert e.status == new.status and e.task_id == new.id and e.attempt == new.attempt
        finishes += len(finished)
        state = new
    # Every path ends in a defined status: whatever happened, a cancel (and, for a task
    # whose attempt is gone, the executor's finish of it) ends the task.
    if not state.terminal:
        state = t.cancel(state, T0, "the end").state
        if not state.terminal:
            state = t.finish_cancel(state, T0).state
    assert state.status in TERMINAL


def test_claim_first_is_what_claim_writes_for_a_pristine_scheduled_task() -> None:
    spec = TaskSpec(id="t1", command=["true"], max_attempts=3)
    work = WorkItem(task_id="t1", tenant="acme", spec=spec, submitted_at=T0, submit_seq=7)
    scheduled = t.schedule(new_task(spec=spec), T0).state
    via_claim = t.claim(scheduled, node="n", now=T0, work_seq=10, delivery=1,
                        max_lost_attempts=3).state
    assert t.claim_first(work, "n", T0, 10) == msgspec.structs.replace(via_claim, waiting=None)
