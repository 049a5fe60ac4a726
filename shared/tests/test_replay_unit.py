"""Unit tests of `vigil replay`'s pure logic: the event fold, the diff, ids, windows, rate."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vigil import codec, ids, progress, rebuild, redrive, replay
from vigil.messages import (
    Accepted,
    Cancelling,
    Checkpoint,
    Event,
    Finished,
    Log,
    Retrying,
    Scheduled,
    Started,
    TaskSpec,
    TaskState,
)
from vigil.replay import StoredMsg

pytestmark = pytest.mark.unit

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def lifecycle(task_id: str = "t1") -> list[Event]:
    return [
        Accepted(task_id=task_id, time=at(0), tenant="acme", submit_seq=7),
        Scheduled(task_id=task_id, time=at(1), pool="default"),
        Started(task_id=task_id, attempt=1, time=at(2), executor="node-a", image="img"),
        Log(task_id=task_id, attempt=1, time=at(3), stream="stdout", lines=["hi"]),
        Finished(task_id=task_id, attempt=1, time=at(4), status="failed", exit_code=3,
                 error="agent exited with code 3"),
    ]


def folded(events: list[Event], ids: list[str | None] | None = None) -> rebuild.Fold:
    fold = rebuild.Fold()
    for i, e in enumerate(events):
        fold.apply("acme", e, ids[i] if ids else None)
    return fold


# the fold ---------------------------------------------------------------------------------
def test_fold_follows_a_task_to_its_outcome() -> None:
    state = folded(lifecycle()).states()["acme.t1"]
    assert (state.tenant, state.status, state.attempt, state.executor) == (
        "acme", "failed", 1, "node-a")
    assert (state.exit_code, state.error) == (3, "agent exited with code 3")
    assert (state.created_at, state.finished_at, state.submit_seq) == (at(0), at(4), 7)


def test_fold_is_idempotent_for_duplicated_events_anywhere() -> None:
    events = lifecycle()
    once = folded(events).states()
    # The same message id stored again later (a publish retried outside the duplicate
    # window): e.g. a resumed admission re-sending `accepted` after the task started.
    ids = [f"t1:{e.attempt}:{type(e).__name__}" for e in events]
    replayed = [*events, events[0], events[1]]
    fold = folded(replayed, [*ids, ids[0], ids[1]])
    assert fold.states() == once
    assert fold.skipped == 2
    # Without message ids, identical content is the same event.
    assert folded([*events, events[2], events[0]]).states() == once


def test_hand_back_and_redrive_return_the_task_to_scheduled() -> None:
    events = [
        *lifecycle()[:3],
        Retrying(task_id="t1", attempt=1, time=at(3), reason="executor stopping"),
    ]
    state = folded(events).states()["acme.t1"]
    assert (state.status, state.executor, state.attempt) == ("scheduled", None, 1)
    redriven = [
        *lifecycle(),
        Retrying(task_id="t1", attempt=1, time=at(10), reason="redriven by vigil replay"),
        Scheduled(task_id="t1", attempt=1, time=at(10), pool="default"),
    ]
    state = folded(redriven).states()["acme.t1"]
    assert (state.status, state.exit_code, state.error, state.finished_at) == (
        "scheduled", None, None, None)
    rerun = [*redriven,
             Started(task_id="t1", attempt=2, time=at(11), executor="node-b", image="img"),
             Finished(task_id="t1", attempt=2, time=at(12), status="succeeded", exit_code=0)]
    state = folded(rerun).states()["acme.t1"]
    assert (state.status, state.attempt, state.executor, state.exit_code) == (
        "succeeded", 2, "node-b", 0)


def test_refused_submission_is_a_failed_task_from_its_finished_event() -> None:
    refused = Finished(task_id="bad", time=at(5), status="failed", error="invalid task spec",
                       tenant="acme", submit_seq=9)
    state = folded([refused]).states()["acme.bad"]
    assert (state.status, state.tenant, state.submit_seq, state.attempt) == (
        "failed", "acme", 9, 0)
    assert state.created_at == state.finished_at == at(5) and state.spec is None


def test_events_without_their_beginning_are_incomplete_not_invented() -> None:
    fold = folded(lifecycle()[2:])  # accepted and scheduled aged out of the stream
    assert fold.states() == {} and fold.incomplete() == {"acme.t1"}
    no_tenant = Finished(task_id="old", time=at(5), status="failed", error="x")
    assert folded([no_tenant]).incomplete() == {"acme.old"}


def test_cancel_requests_and_their_outcome() -> None:
    events = [*lifecycle()[:3],
              Cancelling(task_id="t1", attempt=1, time=at(3), reason="user"),
              Cancelling(task_id="t1", attempt=1, time=at(4), reason="again")]
    state = folded(events).states()["acme.t1"]
    assert state.cancel_requested_at == at(3) and state.status == "running"
    # A queued task is cancelled in one step: its `finished` is the request's time too.
    queued = [lifecycle()[0], Finished(task_id="t1", time=at(2), status="cancelled")]
    assert folded(queued).states()["acme.t1"].cancel_requested_at == at(2)
    # A redrive starts afresh: the old request does not stop the new attempt.
    redriven = [*events, Finished(task_id="t1", attempt=1, time=at(5), status="cancelled"),
                Retrying(task_id="t1", attempt=1, time=at(6), reason="redriven"),
                Scheduled(task_id="t1", attempt=1, time=at(6), pool="default")]
    assert folded(redriven).states()["acme.t1"].cancel_requested_at is None


def test_a_failed_attempt_to_be_retried_keeps_its_failure_visible() -> None:
    # The executor's `retrying` carries the failed attempt's exit code and error.
    events = [*lifecycle()[:3],
              Retrying(task_id="t1", attempt=1, time=at(5), reason="retryable: exit 3",
                       exit_code=3, error="exit 3")]
    state = folded(events).states()["acme.t1"]
    assert (state.status, state.executor, state.exit_code, state.error, state.finished_at) == (
        "scheduled", None, 3, "exit 3", None)
    started = Started(task_id="t1", attempt=2, time=at(6), executor="node-b", image="img")
    state = folded([*events, started]).states()["acme.t1"]
    assert (state.status, state.attempt, state.exit_code, state.error) == (
        "running", 2, None, None)


def test_unknown_and_uninteresting_kinds_change_nothing() -> None:
    fold = folded(lifecycle())
    before = fold.states()
    later = {"kind": "teleported", "task_id": "t1", "time": at(9).isoformat()}
    fold.apply_raw(StoredMsg("VIGIL_EVENTS", 99, "vigil.events.acme.t1.teleported", at(9), {},
                             json.dumps(later).encode()))
    fold.apply("acme", Checkpoint(task_id="t1", attempt=1, time=at(9), name="cp"))
    assert {k: rebuild.compare(v, fold.states()[k]) for k, v in before.items()} == {
        "acme.t1": []}
    assert fold.last_seq == 99


# the diff ---------------------------------------------------------------------------------
def live_state(**changes: object) -> TaskState:
    spec = TaskSpec(command=["echo", "hi"], id="t1", image="resolved:latest", timeout_s=3600,
                    max_attempts=3, labels={"team": "ml"})
    base = TaskState(id="t1", tenant="acme", status="succeeded", attempt=1, executor="node-a",
                     exit_code=0, created_at=at(0), updated_at=at(9), started_at=at(1),
                     finished_at=at(4), spec=spec, submit_seq=7, tail=["hi"], delivery=1)
    return TaskState(**{**{f: getattr(base, f) for f in base.__struct_fields__}, **changes})


def test_diff_compares_the_documented_fields_only() -> None:
    live = live_state()
    rebuilt = TaskState(id="t1", tenant="acme", status="succeeded", attempt=1,
                        executor="node-a", exit_code=0, created_at=at(0), updated_at=at(4),
                        finished_at=at(4), submit_seq=7,
                        spec=TaskSpec(command=["echo", "hi"], labels={"team": "ml"}))
    assert rebuild.compare(live, rebuilt) == []  # updated_at, tail, image, ... not compared
    d = rebuild.diff({"t1": live}, {"t1": live_state(status="failed", exit_code=1)})
    assert [f.field for f in d.mismatched["t1"]] == ["status", "exit_code"]
    assert not d.same
    other_spec = live_state(spec=TaskSpec(command=["false"]))
    assert [f.field for f in rebuild.compare(live, other_spec)] == [
        "spec.command", "spec.labels"]


def test_diff_sorts_tasks_into_only_live_only_rebuilt_and_aged_out() -> None:
    old = live_state(id="old", created_at=T0 - timedelta(days=8))
    d = rebuild.diff({"t1": live_state(), "old": old, "gone": live_state(id="gone")},
                     {"t1": live_state(), "new": live_state(id="new")},
                     log_start=T0 - timedelta(days=7))
    assert (d.equal, d.only_live, d.only_rebuilt, d.aged_out) == (1, ["gone"], ["new"],
                                                                 ["old"])
    assert rebuild.diff({"p": live_state(id="p")}, {}, incomplete={"p"}).same


def test_rebuilt_state_round_trips_through_the_codec() -> None:
    fold = folded(lifecycle())
    fold.tasks["acme.t1"].spec = TaskSpec(command=["echo"])
    state = fold.states()["acme.t1"]
    assert codec.state_decoder.decode(codec.encode(state)) == state
    assert state.spec is not None and state.spec.id == "t1"


# ids, windows, rate, progress --------------------------------------------------------------
def test_replay_ids_are_stable_and_message_ids_derive_from_source_and_replay() -> None:
    window = {"subject": "vigil.issues.>", "from_seq": None, "to_seq": 9, "since": "2h",
              "until": None}
    a = replay.replay_id_for("VIGIL_ISSUES", window, "vigil.issues.replay.info")
    assert a == replay.replay_id_for("VIGIL_ISSUES", dict(window), "vigil.issues.replay.info")
    assert a != replay.replay_id_for("VIGIL_ISSUES", window, "vigil.issues.other.info")
    assert replay.replay_msg_id(a, "VIGIL_ISSUES", 42) == f"rp-{a}-VIGIL_ISSUES-42"
    headers = replay.replay_headers({"Nats-Msg-Id": "orig", "Nats-Expected-Stream": "X",
                                     "Trace": "1"}, a, "VIGIL_ISSUES", 42)
    assert headers == {"Trace": "1", "Vigil-Replay-Of": "VIGIL_ISSUES:42",
                       "Nats-Msg-Id": f"rp-{a}-VIGIL_ISSUES-42"}
    # Always a valid task id (a replayed submission's, by the id rule), never a platform one.
    long_id = replay.replay_msg_id("x" * 64, "VIGIL_SUBMIT", 10**12)
    assert ids.is_valid_id(long_id) and not ids.is_platform_id(long_id)
    assert long_id == replay.replay_msg_id("x" * 64, "VIGIL_SUBMIT", 10**12)


def test_parse_time_takes_iso_or_a_duration_back() -> None:
    now = at(0)
    assert replay.parse_time("90s", now) == now - timedelta(seconds=90)
    assert replay.parse_time("1h30m", now) == now - timedelta(minutes=90)
    assert replay.parse_time("2d", now) == now - timedelta(days=2)
    assert replay.parse_time("2024-05-01T12:00:00Z") == T0
    assert replay.parse_time("2024-05-01T12:00:00") == T0  # naive = UTC
    with pytest.raises(replay.ReplayError, match="neither an ISO time"):
        replay.parse_time("yesterday")


def test_window_bounds_are_inclusive() -> None:
    w = replay.Window(from_seq=5, to_seq=7, since=at(0), until=at(10))
    assert [s for s in range(1, 10) if w.admits(s, at(5))] == [5, 6, 7]
    assert not w.admits(6, at(11)) and w.admits(6, at(10)) and not w.admits(6, at(-1))


async def test_token_bucket_limits_the_rate() -> None:
    clock = [0.0]

    async def sleep(seconds: float) -> None:
        clock[0] += seconds

    bucket = progress.TokenBucket(10.0, burst=1.0, clock=lambda: clock[0], sleep=sleep)
    for _ in range(21):
        await bucket.take()
    assert clock[0] == pytest.approx(2.0)
    unlimited = progress.TokenBucket(0, clock=lambda: clock[0], sleep=sleep)
    for _ in range(1000):
        await unlimited.take()
    assert clock[0] == pytest.approx(2.0)


def test_progress_renders_count_rate_and_eta() -> None:
    assert progress.render_progress("replay", 120, 480, 1.0) == \
        "replay [######------------------] 120/480  25% 120/s ETA 3s"
    assert progress.render_progress("read", 5, 0, 1.0) == "read 5 5/s"
    out = io.StringIO()
    clock = [0.0]
    bar = progress.ProgressBar("x", 10, out, tty=False, every_s=2.0, clock=lambda: clock[0])
    for _ in range(10):
        clock[0] += 0.5
        bar.advance()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("x [") and "10/10" in lines[-1]


def test_operator_url_prefers_flag_then_env_then_client_json(tmp_path: Path) -> None:
    (tmp_path / "client.json").write_text(json.dumps(
        {"nats_url": "nats://admin@h:1", "nats_operator_url": "nats://operator@h:1"}))
    d = str(tmp_path)
    assert replay.operator_url("nats://flag:1", d, {"VIGIL_NATS_URL": "nats://env:1"}) == \
        "nats://flag:1"
    assert replay.operator_url(None, d, {"VIGIL_NATS_URL": "nats://env:1"}) == "nats://env:1"
    assert replay.operator_url(None, d, {}) == "nats://operator@h:1"
    assert replay.operator_url(None, None, {"VIGIL_DATA_DIR": d}) == "nats://operator@h:1"
    with pytest.raises(replay.ReplayError, match="vigil up"):
        replay.operator_url(None, str(tmp_path / "nowhere"), {})


# redrive selection ------------------------------------------------------------------------
def test_redrive_chooses_dead_tasks_by_default_and_explains_refusals() -> None:
    states = [
        (live_state(id="d1", status="dead", finished_at=at(5)), 11),
        (live_state(id="d2", status="dead", tenant="other", finished_at=at(3)), 12),
        (live_state(id="f1", status="failed"), 13),
        (live_state(id="ok", status="succeeded"), 14),
        (live_state(id="nospec", status="failed", spec=None), 15),
    ]
    chosen = redrive.choose(states, redrive.Selection())
    assert [(c.state.id, c.revision) for c in chosen.tasks] == [("d2", 12), ("d1", 11)]
    assert [c.state.id for c in redrive.choose(states, redrive.Selection(
        tenant="acme")).tasks] == ["d1"]
    picked = redrive.choose(states, redrive.Selection(ids=("f1", "ok", "nospec", "nope")))
    assert [c.state.id for c in picked.tasks] == ["f1"]
    assert set(picked.refused) == {"ok", "nospec", "nope"}
    assert "succeeded" in picked.refused["ok"] and "no spec" in picked.refused["nospec"]
    assert redrive.choose(states, redrive.Selection(labels={"team": "web"})).tasks == []
    assert redrive.redrive_msg_id("acme", "d1", 11) == "redrive:acme.d1:11"
    # Ids are per tenant: an id two tenants have needs --tenant, and gets it.
    twins = [(live_state(id="tw", status="dead"), 21),
             (live_state(id="tw", status="dead", tenant="other"), 22)]
    both = redrive.choose(twins, redrive.Selection(ids=("tw",)))
    assert both.tasks == [] and "--tenant" in both.refused["tw"]
    one = redrive.choose(twins, redrive.Selection(ids=("tw",), tenant="other"))
    assert [(c.state.tenant, c.revision) for c in one.tasks] == [("other", 22)]


def test_every_replay_subcommand_has_help_with_examples() -> None:
    from vigil.cli import build_parser

    parser = build_parser()
    for action in ("timeline", "stream", "redrive", "rebuild"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["replay", action, "--help"])
        assert exit_.value.code == 0
    args = parser.parse_args(["replay", "stream", "events", "--to", "vigil.x.y"])
    assert args.rate == replay.DEFAULT_RATE and args.yes is False and callable(args.impl)
