"""`vigil replay` against real nats-server processes and the real services.

- a replay to a subject run twice publishes each message once, and one killed (SIGKILL)
  midway resumes without duplicates, as the least-privilege `operator` NATS user;
- the task KV rebuilt from the event log equals the live one after a mixed workload;
- redriving a dead task makes it run again as a new attempt.

The commands run through the real argument parser (`vigil replay ...`); the killed replay
is a real `vigil` process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from support import (
    ExecutorProcess,
    Platform,
    as_user,
    assert_no_violations,
    eventually,
    shipped_server,
    stored_events,
)
from vigil import codec, subjects, topology
from vigil.cli import build_parser
from vigil.errors import VigilError
from vigil.jetstream import publish_event
from vigil.messages import Accepted, Confession, Finished, Started, TaskSpec, TaskState
from vigil.natsserver import NatsServer

pytestmark = pytest.mark.integration

SOURCE = "vigil.issues.agent.info"
TARGET = "vigil.issues.replay.info"
VIGIL = str(Path(sys.executable).parent / "vigil")


async def vigil_replay(*argv: str) -> tuple[int, str, str]:
    """Run `vigil replay <argv>` in this event loop: (exit code, stdout, stderr)."""
    args: argparse.Namespace = build_parser().parse_args(["replay", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = await args.impl(args, out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
async def operator_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server with the production users: `admin` sets up, `operator` replays."""
    server = shipped_server(tmp_path / "nats", sync_always=True)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
    assert_no_violations(server)


async def target_copies(js: Any) -> list[str]:
    """The source of every message on the target subject (its Vigil-Replay-Of header)."""
    info = await js.stream_info(subjects.STREAM_ISSUES, subjects_filter=TARGET)
    if not (info.state.subjects or {}).get(TARGET):
        return []
    sub = await js.subscribe(TARGET, stream=subjects.STREAM_ISSUES, ordered_consumer=True)
    found: list[str] = []
    try:
        while len(found) < info.state.subjects[TARGET]:
            msg = await sub.next_msg(timeout=5)
            found.append(msg.headers["Vigil-Replay-Of"])
    finally:
        await sub.unsubscribe()
    return found


@pytest.mark.fault
async def test_replay_to_a_subject_publishes_each_message_once_even_when_killed_midway(
    operator_nats: NatsServer,
) -> None:
    admin = await nats.connect(operator_nats.url_for("admin"))
    try:
        js = admin.jetstream()
        await topology.ensure_topology(js)
        sources = []
        for i in range(300):
            c = Confession(summary=f"complaint {i}", severity="info", source="agent",
                           id=f"c{i}")
            ack = await js.publish(SOURCE, codec.encode(c), headers={"Nats-Msg-Id": f"c{i}"})
            sources.append(f"{subjects.STREAM_ISSUES}:{ack.seq}")
        url = operator_nats.url_for("operator")
        replay_args = ("stream", "issues", "--subject", "vigil.issues.agent.>", "--to", TARGET,
                       "--nats-url", url)

        code, out, _ = await vigil_replay(*replay_args)  # dry run
        assert code == 0 and "would publish 300 messages" in out and "dry run" in out
        assert await target_copies(js) == []

        # A real `vigil` process, slowed down, killed -9 once it is partway through.
        proc = await asyncio.create_subprocess_exec(
            VIGIL, "replay", *replay_args, "--yes", "--rate", "100",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await eventually(lambda: _at_least(js, 60), timeout=30, what="replay to get going")
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        partial = await target_copies(js)
        assert 60 <= len(partial) < 300, len(partial)

        code, out, err = await vigil_replay(*replay_args, "--yes", "--rate", "0")
        assert code == 0, err
        assert "earlier runs of this replay re-published up to seq" in out
        copies = await target_copies(js)
        assert sorted(copies) == sorted(sources)  # every message once: none lost, none twice

        code, out, err = await vigil_replay(*replay_args, "--yes")
        assert code == 0, err
        assert "published 0 messages" in out
        assert len(await target_copies(js)) == 300

        # Reading is a separate, harmless path: JSON lines on stdout, a summary on stderr.
        code, out, err = await vigil_replay("stream", "VIGIL_ISSUES", "--subject", SOURCE,
                                            "--from-seq", "11", "--to-seq", "20",
                                            "--nats-url", url)
        lines = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and [r["seq"] for r in lines] == list(range(11, 21))
        assert lines[0]["data"]["summary"] == "complaint 10" and lines[0]["subject"] == SOURCE
        assert "10 messages from VIGIL_ISSUES" in err
    finally:
        await admin.close()


async def _at_least(js: Any, n: int) -> bool:
    info = await js.stream_info(subjects.STREAM_ISSUES, subjects_filter=TARGET)
    return (info.state.subjects or {}).get(TARGET, 0) >= n


async def test_every_subcommand_works_as_the_least_privileged_operator_user(
    operator_nats: NatsServer,
) -> None:
    """The `operator` NATS user may do what `vigil replay` needs, and the tools need no more:
    ordered reads of streams and buckets, message gets, a scratch bucket made and removed."""
    admin = await nats.connect(operator_nats.url_for("admin"))
    try:
        js = admin.jetstream()
        await topology.ensure_topology(js)
        t0 = datetime.now(UTC)
        spec = TaskSpec(command=["echo", "hi"], id="p1")
        ack = await js.publish(subjects.submit("acme"), codec.encode(spec))
        for event in (Accepted(task_id="p1", time=t0, tenant="acme", submit_seq=ack.seq),
                      Started(task_id="p1", attempt=1, time=t0, executor="n1", image="img"),
                      Finished(task_id="p1", attempt=1, time=t0, status="succeeded",
                               exit_code=0)):
            await publish_event(js, "acme", event)
        state = TaskState(id="p1", tenant="acme", status="succeeded", attempt=1,
                          executor="n1", exit_code=0, created_at=t0, updated_at=t0,
                          finished_at=t0, spec=spec, submit_seq=ack.seq)
        await (await js.key_value(subjects.KV_TASKS)).put("acme.p1", codec.encode(state))
    finally:
        await admin.close()
    url = ("--nats-url", operator_nats.url_for("operator"))
    code, out, err = await vigil_replay("rebuild", "--yes", *url)
    assert code == 0 and "matched and was deleted" in out, out + err
    code, out, _ = await vigil_replay("timeline", "p1", *url)
    assert code == 0 and "echo hi" in out and "succeeded (attempt 1, exit 0)" in out
    code, out, _ = await vigil_replay("redrive", "--status", "failed", *url)
    assert code == 0 and "no tasks to redrive" in out
    code, out, _ = await vigil_replay("stream", "submit", *url)
    assert code == 0 and json.loads(out)["data"]["command"] == ["echo", "hi"]


# rebuild -----------------------------------------------------------------------------------
@pytest.mark.slow
async def test_rebuilt_task_kv_equals_the_live_one_after_a_mixed_workload(
    platform: Platform, nats_server: NatsServer,
) -> None:
    await platform.scheduler()
    await platform.executor()
    await platform.publish_spec({"id": "ok", "command": ["sh", "-c", "echo hello"],
                                 "labels": {"team": "ml"}})
    await platform.publish_spec({"id": "fails", "command": ["sh", "-c", "echo oops; exit 3"]})
    await platform.publish_spec({"id": "slow", "command": ["sleep", "30"], "timeout_s": 1})
    await platform.publish_spec(b'{"id": "refused", "command": []}')  # invalid: refused
    await platform.publish_spec({"command": ["true"]}, tenant="other", msg_id="by-msg-id")
    outcomes = {t: (await platform.final_state(t)).status
                for t in ("ok", "fails", "slow", "refused", "by-msg-id")}
    # "fails" keeps failing through the default 3 attempts: dead (ADR 9).
    assert outcomes == {"ok": "succeeded", "fails": "dead", "slow": "timed_out",
                        "refused": "failed", "by-msg-id": "succeeded"}

    url = ("--nats-url", as_user(nats_server.url, "operator"))
    code, out, _ = await vigil_replay("rebuild", "--json", *url)
    diff = json.loads(out)
    assert code == 0 and diff["same"], diff
    assert diff["equal"] == 5 and diff["rebuilt"] == 5 == diff["live"]

    code, out, err = await vigil_replay("rebuild", "--yes", "--into", "vigil-tasks-check",
                                        "--keep", *url)
    assert code == 0, out + err
    assert "the event log explains vigil-tasks" in out
    rebuilt = await platform.js.key_value("vigil-tasks-check")
    assert json.loads((await rebuilt.get("acme.fails")).value)["exit_code"] == 3
    with pytest.raises(VigilError, match="already exists"):  # never overwritten
        await vigil_replay("rebuild", "--yes", "--into", "vigil-tasks-check", *url)

    # The comparison is real: a live state the log does not explain is reported.
    kv = await platform.js.key_value(subjects.KV_TASKS)
    entry = await kv.get("acme.fails")
    forged = msgspec.structs.replace(codec.state_decoder.decode(entry.value), exit_code=4)
    await kv.put("acme.fails", codec.encode(forged))
    code, out, _ = await vigil_replay("rebuild", *url)
    assert code == 1 and "acme.fails  exit_code: live 4  rebuilt 3" in out

    code, out, _ = await vigil_replay("timeline", "fails", *url)
    assert code == 0
    kinds = [line.split()[4] for line in out.splitlines()[1:] if line[:1].isdigit()]
    assert kinds[:4] == ["submission", "accepted", "scheduled", "started"]
    assert kinds[-1] == "finished" and re.search(r"dead \(attempt 3, exit 3\)", out)
    code, out, _ = await vigil_replay("timeline", "fails", "--json", "--no-logs", *url)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[-1]["kind"] == "state" and "log" not in {r["kind"] for r in rows}


# redrive -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.fault
async def test_redriving_a_dead_task_runs_it_again_as_a_new_attempt(
    platform: Platform, nats_server: NatsServer, tmp_path: Path,
) -> None:
    await platform.scheduler()
    marker = tmp_path / "first-run.pid"
    # The first run parks (and is killed with its node); a rerun finds the marker and ends.
    command = ["sh", "-c", f"if [ -e {marker} ]; then echo again; exit 0; fi; "
               f"echo $$ > {marker}; exec sleep 120"]
    node = ExecutorProcess(tmp_path, platform.url, "redrive-a", runtime="process",
                           unsafe_runtime=1, ack_wait_s=3, heartbeat_s=1)
    try:
        await node.start().ready()
        await platform.publish_spec({"id": "doomed", "command": command})
        await platform.events.wait_for("doomed", "started", timeout=30)
        node.signal(signal.SIGKILL)  # the node dies with attempt 1
        await node.exited()
    finally:
        node.kill()
    # One lost node is all this executor tolerates: it calls the task a crash loop, dead.
    await platform.executor(ack_wait_s=3, heartbeat_s=1, max_lost_attempts=1)
    dead = await platform.final_state("doomed", timeout=30)
    assert dead.status == "dead" and dead.attempt == 1

    url = ("--nats-url", as_user(nats_server.url, "operator"))
    code, out, _ = await vigil_replay("redrive", *url)
    assert code == 0 and "doomed" in out and "dry run" in out
    assert (await platform.state("doomed")).status == "dead"  # type: ignore[union-attr]

    code, out, err = await vigil_replay("redrive", "doomed", "--reason", "node fixed",
                                        "--yes", "--wait", "--timeout", "60", *url)
    assert code == 0, out + err
    assert "doomed: succeeded (attempt 2)" in out
    state = await platform.state("doomed")
    assert state is not None and (state.status, state.attempt) == ("succeeded", 2)
    events = await stored_events(platform.js, "doomed")
    assert [e["attempt"] for e in events if e["kind"] == "started"] == [1, 2]
    assert any(e["kind"] == "retrying" and "redrive" in e["reason"] for e in events)

    # Once redriven, the same request is a no-op, and the event log explains the result.
    code, out, err = await vigil_replay("redrive", "doomed", "--yes", *url)
    assert code == 1 and "it is succeeded" in err
    code, out, _ = await vigil_replay("rebuild", *url)
    assert code == 0, out
    _kill_parked(marker)


def _kill_parked(marker: Path) -> None:
    # The first run's process outlived its killed executor (the process runtime does not
    # isolate); do not leave it behind.
    if marker.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(marker.read_text().strip()), signal.SIGKILL)


async def test_a_replay_into_its_own_stream_does_not_chase_its_copies(
    operator_nats: NatsServer,
) -> None:
    """With an open window whose filter also matches the target, the second run must not
    re-publish the first run's copies: the range's end is pinned by the first run."""
    admin = await nats.connect(operator_nats.url_for("admin"))
    try:
        js = admin.jetstream()
        await topology.ensure_topology(js)
        for i in range(5):
            c = Confession(summary=f"complaint {i}", severity="info", source="agent")
            await js.publish(SOURCE, codec.encode(c))
        args = ("stream", "VIGIL_ISSUES", "--subject", "vigil.issues.>", "--since", "1h",
                "--to", TARGET, "--nats-url", operator_nats.url_for("operator"), "--yes")
        code, out, err = await vigil_replay(*args)
        assert code == 0 and "published 5 messages" in out, (out, err)
        for _ in range(2):
            code, out, err = await vigil_replay(*args)
            assert code == 0 and "published 0 messages" in out, (out, err)
        assert len(await target_copies(js)) == 5
    finally:
        await admin.close()


# migrate-keys --------------------------------------------------------------------------------
async def test_migrate_keys_moves_the_old_layout_once_and_reports_the_rest(
    operator_nats: NatsServer,
) -> None:
    """Upgrading to 0.2: tasks kept under their bare id move to <tenant>.<id>, as the
    operator user, after a dry run; a second run finds nothing; odd keys are named."""
    admin = await nats.connect(operator_nats.url_for("admin"))
    try:
        js = admin.jetstream()
        await topology.ensure_topology(js)
        kv = await js.key_value(subjects.KV_TASKS)
        t0 = datetime.now(UTC)
        for task_id, tenant in (("old-1", "acme"), ("old-2", "globex")):
            state = TaskState(id=task_id, tenant=tenant, status="succeeded", attempt=1,
                              created_at=t0, updated_at=t0, spec=TaskSpec(command=["true"]))
            await kv.put(task_id, codec.encode(state))
        await kv.put("stray", b"not a task")
        new = TaskState(id="new-1", tenant="acme", status="queued", created_at=t0,
                        updated_at=t0)
        await kv.put("acme.new-1", codec.encode(new))
        url = ("--nats-url", operator_nats.url_for("operator"))

        code, out, err = await vigil_replay("migrate-keys", *url)
        assert code == 0 and "old-1  ->  acme.old-1" in out and "would move 2" in out
        assert "'stray'" in err
        assert sorted(await kv.keys()) == ["acme.new-1", "old-1", "old-2", "stray"]

        code, out, _ = await vigil_replay("migrate-keys", "--yes", *url)
        assert code == 0 and "moved 2 key(s)" in out, out
        assert sorted(await kv.keys()) == ["acme.new-1", "acme.old-1", "globex.old-2",
                                           "stray"]
        moved = codec.state_decoder.decode((await kv.get("globex.old-2")).value)
        assert (moved.id, moved.tenant, moved.status) == ("old-2", "globex", "succeeded")

        code, out, _ = await vigil_replay("migrate-keys", "--yes", *url)
        assert code == 0 and "nothing to move" in out
    finally:
        await admin.close()
