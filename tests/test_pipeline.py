"""A task's path through real NATS: raw submission -> scheduler -> executor -> outcome.

The executor uses the (unsafe) process runtime here so these tests isolate the platform's
own logic; tests/test_podman.py runs the same path in rootless containers.
"""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from support import Platform, advertise, as_user, eventually, stored_events
from vigil import subjects
from vigil.messages import TaskState

pytestmark = pytest.mark.integration


async def test_raw_nats_client_submits_and_reads_state_from_kv(
    platform: Platform, nats_server
) -> None:
    await platform.scheduler()
    await platform.executor()
    # A client with no Vigil code: plain nats-py, JSON bytes, the public subject and key,
    # as the README shows it, as the tenant's own least-privilege NATS user.
    nc = await nats.connect(as_user(nats_server.url, "tenant-acme"),
                            inbox_prefix=b"_INBOX_T.acme")
    try:
        js = nc.jetstream()
        spec = {"command": ["sh", "-c", "echo out; echo err >&2; exit 0"]}
        ack = await js.publish("vigil.submit.acme", json.dumps(spec).encode(),
                               headers={"Nats-Msg-Id": "raw-1"})
        assert ack.stream == "VIGIL_SUBMIT"

        async def final() -> dict | None:
            # The id rule: no spec id -> the message id; the key is <tenant>.<id>.
            reply = await nc.request("$JS.API.DIRECT.GET.KV_vigil-tasks.$KV.vigil-tasks.acme.raw-1",
                                     b"", timeout=2)
            if not reply.data:  # 404: not there yet (a status header, no body)
                return None
            state = json.loads(reply.data)
            return state if state["status"] in ("succeeded", "failed") else None

        state = await eventually(final, what="raw-1 in vigil-tasks")
    finally:
        await nc.close()
    assert state["status"] == "succeeded"
    assert state["tenant"] == "acme"
    assert state["exit_code"] == 0
    assert state["attempt"] == 1
    assert state["executor"]
    for key in ("id", "tenant", "status", "attempt", "executor", "exit_code", "error",
                "created_at", "updated_at"):
        assert key in state
    kinds = [e["kind"] for e in await stored_events(platform.js, "raw-1")]
    assert kinds[:3] == ["accepted", "scheduled", "started"]  # as stored: the timeline
    assert kinds[-1] == "finished"
    lines = [(e["stream"], line) for e in platform.events.of("raw-1", "log") for line in e["lines"]]
    assert ("stdout", "out") in lines and ("stderr", "err") in lines


@pytest.mark.fault
async def test_same_msg_id_twice_runs_once(platform: Platform, tmp_path) -> None:
    await platform.scheduler()
    await platform.executor()
    marker = tmp_path / "runs"
    spec = {"command": ["sh", "-c", f"echo run >> {marker}"]}
    first = await platform.publish_spec(spec, msg_id="dup-1")
    second = await platform.publish_spec(spec, msg_id="dup-1")
    assert second.duplicate and second.seq == first.seq  # JetStream's dedupe window
    state = await platform.final_state("dup-1")
    assert state.status == "succeeded"
    # A different message id (as a re-publish after the dedupe window would be): the task
    # id still protects, the scheduler never creates a task whose id exists.
    await platform.publish_spec({**spec, "id": "dup-1"}, msg_id="other-msg-id")
    await eventually(lambda: _consumer_idle(platform), what="scheduler to drain")
    assert marker.read_text().count("run") == 1
    assert len(platform.events.of("dup-1", "started")) == 1


async def _consumer_idle(platform: Platform) -> bool:
    info = await platform.js.consumer_info(subjects.STREAM_SUBMIT, subjects.CONSUMER_SCHEDULER)
    return info.num_pending == 0 and info.num_ack_pending == 0


@pytest.mark.parametrize(
    ("payload", "task_id", "error_part"),
    [
        (b"{not json", "bad-json", "not valid JSON"),
        (json.dumps({"image": "x"}).encode(), "no-command", "missing required field `command`"),
        (json.dumps({"command": []}).encode(), "empty-command", "length >= 1"),
        (json.dumps({"command": ["a", 3]}).encode(), "non-string", "Expected `str`"),
        (json.dumps({"command": ["true"], "id": "bad id!"}).encode(), "fallback-id",
         "$.id"),
        (json.dumps({"command": ["true"], "env": {"VIGIL_TASK_ID": "x"}}).encode(),
         "reserved-env", "reserved"),
    ],
)
async def test_bad_submission_is_recorded_and_terminated(
    platform: Platform, payload: bytes, task_id: str, error_part: str
) -> None:
    await platform.scheduler()
    await platform.executor()
    await platform.auditor()
    ack = await platform.publish_spec(payload, msg_id=task_id)
    state = await platform.final_state(task_id)
    assert state.status == "failed"
    assert error_part in (state.error or "")
    # ... a confession on vigil.issues.scheduler.* names the submission ...
    kv = await platform.js.key_value(subjects.KV_CONFESSIONS)

    async def confession() -> dict | None:
        try:
            entry = await kv.get(f"scheduler.scheduler-invalid-{ack.seq}")
        except nats.js.errors.KeyNotFoundError:
            return None
        return json.loads(entry.value)

    record = await eventually(confession, what="the scheduler's confession")
    assert record["confession"]["data"]["submit_seq"] == ack.seq
    assert error_part in record["confession"]["detail"]
    # ... the message is terminated, not redelivered, and nothing ran ...
    await eventually(lambda: _consumer_idle(platform), what="submission to be settled")
    assert platform.events.of(task_id, "started") == []
    # ... and a good task still runs afterwards.
    await platform.publish_spec({"command": ["true"]}, msg_id=f"{task_id}-good")
    assert (await platform.final_state(f"{task_id}-good")).status == "succeeded"


async def test_fixed_resubmission_takes_over_an_invalid_one(platform: Platform) -> None:
    """The confession says "fix the task spec and submit again": doing so, with the same
    id, must run the fixed task, not be dropped as a duplicate of the refusal."""
    await platform.scheduler()
    await platform.executor()
    await platform.publish_spec({"id": "job-1", "image": "x"})
    first = await platform.final_state("job-1")
    assert first.status == "failed" and "`command`" in (first.error or "")
    # Still wrong, differently: the state tells the newest reason.
    await platform.publish_spec({"id": "job-1", "command": []})

    async def state_of(seq_after: int, status: str) -> TaskState | None:
        s = await platform.state("job-1")
        return s if s and s.submit_seq > seq_after and s.status == status else None

    second = await eventually(lambda: state_of(first.submit_seq, "failed"),
                              what="the second refusal")
    assert "length >= 1" in (second.error or "")
    await platform.publish_spec({"id": "job-1", "command": ["sh", "-c", "echo fixed"]})
    ran = await eventually(lambda: state_of(second.submit_seq, "succeeded"), timeout=30,
                           what="the fixed task to succeed")
    assert ran.attempt == 1 and ran.error is None
    lines = [line for e in platform.events.of("job-1", "log") for line in e["lines"]]
    assert lines == ["fixed"]
    # A task that ran keeps its id: the same again is a duplicate and runs nothing.
    await platform.publish_spec({"id": "job-1", "command": ["sh", "-c", "echo again"]})
    await eventually(lambda: _consumer_idle(platform), what="scheduler to drain")
    assert len(platform.events.of("job-1", "started")) == 1
    after = await platform.state("job-1")
    assert after is not None and after.submit_seq == ran.submit_seq
    assert after.status == "succeeded"


async def test_invalid_tenant_subject_confesses(platform: Platform) -> None:
    await platform.scheduler()
    await platform.auditor()
    ack = await platform.js.publish("vigil.submit.a.b", b'{"command":["true"]}')
    kv = await platform.js.key_value(subjects.KV_CONFESSIONS)

    async def confession() -> dict | None:
        try:
            return json.loads((await kv.get(f"scheduler.scheduler-invalid-{ack.seq}")).value)
        except nats.js.errors.KeyNotFoundError:
            return None

    record = await eventually(confession)
    assert "is not vigil.submit.<tenant>" in record["confession"]["detail"]


async def test_id_rule_falls_back_to_stream_sequence(platform: Platform) -> None:
    await platform.scheduler()
    await platform.executor()
    ack = await platform.publish_spec({"command": ["true"]})  # no id, no Nats-Msg-Id
    state = await platform.final_state(f"s{ack.seq}")
    assert state.status == "succeeded"


async def test_failure_exit_code_and_error(platform: Platform) -> None:
    await platform.scheduler()
    await platform.executor()
    # One attempt: its failure is the task's (a budget of several, spent, is `dead`).
    await platform.publish_spec({"id": "fails", "command": ["sh", "-c", "echo boom; exit 7"],
                                 "max_attempts": 1})
    state = await platform.final_state("fails")
    assert state.status == "failed"
    assert state.exit_code == 7
    assert "exit" in (state.error or "") and "boom" in (state.error or "")


async def test_time_limit_kills_and_records_timed_out(platform: Platform) -> None:
    await platform.scheduler()
    await platform.executor(stop_grace_s=1)
    await platform.publish_spec({"id": "slow", "command": ["sleep", "30"], "timeout_s": 0.5})
    state = await platform.final_state("slow", timeout=20)
    assert state.status == "timed_out"
    assert "time limit" in (state.error or "")
    # The platform confessed it on the agent's behalf, on the task's timeline too.
    (confession,) = platform.events.of("slow", "confession")
    assert confession["source"] == "executor" and "time limit" in confession["summary"]


async def test_slots_bound_concurrency(platform: Platform, tmp_path) -> None:
    await platform.scheduler()
    await platform.executor(slots=2)
    script = (
        f"date +%s.%N > {tmp_path}/$VIGIL_TASK_ID.start; sleep 0.3; "
        f"date +%s.%N > {tmp_path}/$VIGIL_TASK_ID.end"
    )
    ids = [f"slot-{i}" for i in range(6)]
    await asyncio.gather(*[
        platform.publish_spec({"id": i, "command": ["sh", "-c", script]}) for i in ids
    ])
    for i in ids:
        assert (await platform.final_state(i)).status == "succeeded"
    spans = [(float((tmp_path / f"{i}.start").read_text()),
              float((tmp_path / f"{i}.end").read_text())) for i in ids]
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, delta in edges:
        running += delta
        peak = max(peak, running)
    assert peak == 2  # both slots used, never more


async def test_agent_control_lines_become_events_and_confessions(platform: Platform) -> None:
    await platform.scheduler()
    await platform.executor()
    await platform.auditor()
    script = (
        "echo '::vigil::progress {\"step\": 1}'; "
        "echo '::vigil::confess {\"summary\": \"git missing\", \"severity\": \"error\"}'; "
        "echo '::vigil::confess {not json'; "
        "echo plain"
    )
    await platform.publish_spec({"id": "ctl", "command": ["sh", "-c", script]})
    assert (await platform.final_state("ctl")).status == "succeeded"
    progress = platform.events.of("ctl", "progress")
    assert progress and progress[0]["data"] == {"step": 1}
    confessions = platform.events.of("ctl", "confession")
    summaries = {c["summary"] for c in confessions}
    assert "git missing" in summaries
    assert any("malformed" in s for s in summaries)
    lines = [line for e in platform.events.of("ctl", "log") for line in e["lines"]]
    assert "plain" in lines
    assert "::vigil::confess {not json" in lines  # kept as a log line
    assert not any("git missing" in line for line in lines)


@pytest.mark.fault
async def test_max_deliveries_makes_the_task_dead(platform: Platform) -> None:
    """A work message that keeps coming back (here: a consumer that naks it every time)
    reaches the server's max deliveries; the advisory, captured durably, buries the task."""
    from vigil import topology
    from vigil.consume import PullConsumer

    await platform.scheduler()
    await platform.auditor()
    await topology.ensure_consumer(platform.js, subjects.STREAM_WORK,
                                   topology.executor_consumer("default", ack_wait_s=30))
    naker = PullConsumer(platform.nc, subjects.STREAM_WORK, "executor-default", capacity=4)
    await naker.start()
    await advertise(platform.js, "naker")  # capacity, so the scheduler releases the task

    async def nak_forever() -> None:
        while True:
            msg = await naker.next()
            await msg.nak()
            naker.release(1)

    pump = asyncio.create_task(nak_forever())
    try:
        await platform.publish_spec({"id": "bounced", "command": ["true"]})
        state = await platform.final_state("bounced", timeout=60)
    finally:
        pump.cancel()
        await naker.stop()
    assert state.status == "dead"
    assert f"delivered {topology.MAX_DELIVERIES} times" in (state.error or "")

    # ... and the message no longer sits in the work queue. The scheduler deletes it as
    # the burial's last step, after the state, the confession and the event (the other
    # way round, a crash in between would leave a task nothing can find again), so the
    # dead state is visible a moment before the queue is empty: wait for it.
    async def work_queue_empty() -> bool:
        info = await platform.js.stream_info(subjects.STREAM_WORK)
        return info.state.messages == 0
    await eventually(work_queue_empty, what="the dead task's work message to be deleted")
    finished = await platform.events.wait_for("bounced", "finished")
    assert [f["status"] for f in finished] == ["dead"]
    # The evidence: no attempt ever ran (nothing to add to history or tail), and the
    # scheduler confessed the burial, naming itself.
    assert (state.history, state.tail) == ([], [])
    (buried,) = [c for c in await platform.confessions("max_deliveries")
                 if c.get("task_id") == "bounced"]
    assert buried["component"] == "scheduler" and buried["node"]


async def test_a_field_a_newer_service_wrote_survives_this_versions_rewrite(
    platform: Platform,
) -> None:
    """Rolling upgrade: a newer service stored a task state with a field this version's
    TaskState lacks; this version reads it, changes it and writes it back by
    compare-and-set. Decoding drops the field, so the rewrite used to erase it."""
    from datetime import UTC, datetime

    import msgspec

    from vigil import codec
    from vigil.jetstream import TaskStore
    from vigil.messages import TaskSpec

    now = datetime.now(UTC)
    store = await TaskStore.open(platform.js)
    state = TaskState(id="upgrade", tenant="acme", status="queued", created_at=now,
                      updated_at=now, spec=TaskSpec(command=["true"]))
    rev = await store.create(state)
    assert rev is not None
    kv = await platform.js.key_value(subjects.KV_TASKS)
    newer = json.loads(codec.encode(state))
    newer["placement_hint"] = {"zone": "eu", "tries": [1, 2]}  # a newer version's field
    rev = await kv.update(state.key, json.dumps(newer).encode(), last=rev)

    old = await TaskStore.open(platform.js)  # this version, in another service
    got = await old.get("acme", "upgrade")
    assert got is not None
    changed = msgspec.structs.replace(got[0], waiting="changed by this version")
    new_rev = await old.cas(changed, got[1])
    assert new_rev is not None
    again = await old.cas(msgspec.structs.replace(changed, waiting="and again"), new_rev)
    assert again is not None  # its own write's version keeps them too
    stored = json.loads((await kv.get(state.key)).value)
    assert stored["waiting"] == "and again"
    assert stored["placement_hint"] == {"zone": "eu", "tries": [1, 2]}
    # Read back by this version, the state is whole and the extra field is ignored.
    final = await old.get("acme", "upgrade")
    assert final is not None and final[0].waiting == "and again"
