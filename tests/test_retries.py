"""Retries through a real executor and a real nats-server: agent failures spend
``max_attempts`` and come back after an exponential backoff (JetStream's nak delay is the
timer); a non-retryable exit code ends the task at once; a task that spends its budget is
``dead``, with its evidence; a lost node and a missing image spend nothing; the consumer's
max deliveries bury what is left. docs/decisions/0009-retries.md has the rules.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from support import ExecutorProcess, Platform, advertise, eventually, stored_events
from vigil import subjects, topology
from vigil.cli import build_parser
from vigil.consume import PullConsumer
from vigil.embedded import PodmanService
from vigil.jetstream import publish_event
from vigil.messages import Log, TaskState, utcnow
from vigil_executor.process import ProcessRuntime

pytestmark = pytest.mark.integration

# Fails with exit code 3 until attempt ``n``; prints which attempt it is either way.
FLAKY = 'echo "attempt $VIGIL_ATTEMPT"; [ "$VIGIL_ATTEMPT" -ge {n} ] || exit 3'


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def dirs(tmp_path: Path, node: str) -> dict[str, str]:
    return {"workspace_root": str(tmp_path / f"ws-{node}"),
            "state_dir": str(tmp_path / f"st-{node}")}


async def finished_events(platform: Platform, task_id: str) -> list[dict[str, Any]]:
    return [e for e in await stored_events(platform.js, task_id) if e["kind"] == "finished"]


async def test_agent_failures_are_retried_with_growing_backoff(
    platform: Platform, tmp_path: Path
) -> None:
    await platform.scheduler()
    await platform.executor(**dirs(tmp_path, "x"))
    await platform.publish_spec({
        "id": "flaky", "command": ["sh", "-c", FLAKY.format(n=3)], "max_attempts": 3,
        "retry": {"backoff_s": 1.0, "jitter": 0.2},
    })
    retrying = await platform.events.wait_for("flaky", "retrying", count=2, timeout=30)
    # Between attempts the task waits, scheduled, with the failure still on show.
    waiting = await platform.state("flaky")
    assert waiting is not None
    if waiting.status == "scheduled":  # not yet claimed again (the backoff is ~2 s)
        assert (waiting.attempt, waiting.exit_code, waiting.executor) == (2, 3, None)
        assert waiting.retry_at is not None and waiting.updated_at < waiting.retry_at
        assert "agent exited with code 3" in (waiting.error or "")

    state = await platform.final_state("flaky", timeout=30)
    assert state.status == "succeeded" and state.attempt == 3, state
    assert state.exit_code == 0 and state.error is None and state.retry_at is None
    assert [(h.attempt, h.outcome) for h in state.history] == [
        (1, "failed"), (2, "failed"), (3, "succeeded")]
    assert all("agent exited with code 3" in (h.error or "") for h in state.history[:2])

    assert [r["attempt"] for r in retrying] == [1, 2]
    assert retrying[0]["reason"].startswith("agent exited with code 3 (attempt 1 of 3); "
                                            "retrying in ")
    assert retrying[1]["reason"].startswith("agent exited with code 3 (attempt 2 of 3); ")
    d1, d2 = retrying[0]["delay_s"], retrying[1]["delay_s"]
    assert 0.8 <= d1 <= 1.2 and 1.6 <= d2 <= 2.4, (d1, d2)  # 1 s, 2 s, ±20 %
    # The backoff really was waited: from each failed attempt's end to the next start.
    started = {e["attempt"]: at(e["time"]) for e in platform.events.of("flaky", "started")}
    for failed, delay in zip(state.history[:2], (d1, d2), strict=True):
        assert failed.ended_at is not None
        gap = (started[failed.attempt + 1] - failed.ended_at).total_seconds()
        assert gap >= delay, (failed.attempt, gap, delay)
    # One outcome: the failed attempts did not finish the task.
    assert [(f["attempt"], f["status"]) for f in await finished_events(platform, "flaky")] == [
        (3, "succeeded")]
    lines = [ln for e in platform.events.of("flaky", "log") for ln in e["lines"]]
    assert lines == ["attempt 1", "attempt 2", "attempt 3"]


async def test_non_retryable_exit_code_fails_after_one_attempt(
    platform: Platform, tmp_path: Path
) -> None:
    await platform.scheduler()
    await platform.executor(**dirs(tmp_path, "x"))
    await platform.publish_spec({
        "id": "usage", "command": ["sh", "-c", "echo 'bad flag'; exit 2"], "max_attempts": 3,
        "retry": {"backoff_s": 0.1, "non_retryable_exit_codes": [2, 64]},
    })
    state = await platform.final_state("usage", timeout=30)
    assert state.status == "failed" and state.attempt == 1 and state.exit_code == 2
    assert state.error is not None
    assert state.error.endswith("exit code 2 is not retryable"), state.error
    assert "bad flag" in state.error
    assert [(h.attempt, h.outcome) for h in state.history] == [(1, "failed")]
    assert platform.events.of("usage", "retrying") == []
    assert [f["status"] for f in await finished_events(platform, "usage")] == ["failed"]
    assert len(platform.events.of("usage", "started")) == 1


async def test_exhausting_max_attempts_ends_dead_with_every_attempt_on_record(
    platform: Platform, tmp_path: Path
) -> None:
    """A task that keeps failing goes ``dead`` (DESIGN.md), its evidence kept; an operator
    redrive gives it a fresh budget, and the fixed agent then succeeds."""
    await platform.scheduler()
    ex = await platform.executor(**dirs(tmp_path, "x"))
    # Fails until an operator redrives it (attempt 4 is the redrive's first).
    script = '[ "$VIGIL_ATTEMPT" -ge 4 ] && { echo fixed; exit 0; }; echo nope; exit 5'
    await platform.publish_spec({
        "id": "hopeless", "command": ["sh", "-c", script], "max_attempts": 3,
        "retry": {"backoff_s": 0.2, "jitter": 0},
    })
    state = await platform.final_state("hopeless", timeout=30)
    assert state.status == "dead" and state.attempt == 3 and state.exit_code == 5
    assert (state.error or "").endswith("; 3 of 3 attempts failed"), state.error
    assert [(h.attempt, h.outcome) for h in state.history] == [
        (1, "failed"), (2, "failed"), (3, "failed")]
    assert all("agent exited with code 5; last output: nope" in (h.error or "")
               for h in state.history)
    assert state.tail == ["nope"]  # the last attempt's output, kept as evidence
    assert state.retry_at is None and state.finished_at is not None
    retrying = platform.events.of("hopeless", "retrying")
    assert [(r["attempt"], r["delay_s"]) for r in retrying] == [(1, 0.2), (2, 0.4)]
    assert [f["status"] for f in await finished_events(platform, "hopeless")] == ["dead"]
    (dead,) = [c for c in await platform.confessions("task_dead")
               if c.get("task_id") == "hopeless"]
    assert "3 of 3 attempts failed" in dead["summary"]
    assert (dead["component"], dead["node"], dead["attempt"]) == (
        "executor", ex.settings.node_id, 3)

    code, out, err = await vigil_replay("redrive", "hopeless", "--yes", "--wait",
                                        "--timeout", "30", "--nats-url",
                                        platform.url_for("operator"))
    assert code == 0, out + err
    assert "hopeless: succeeded (attempt 4)" in out
    again = await platform.final_state("hopeless")
    assert (again.status, again.tail) == ("succeeded", ["fixed"])
    assert [h.outcome for h in again.history] == ["failed"] * 3 + ["succeeded"]


async def vigil_replay(*argv: str) -> tuple[int, str, str]:
    """Run `vigil replay <argv>` in this event loop: (exit code, stdout, stderr)."""
    args: argparse.Namespace = build_parser().parse_args(["replay", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = await args.impl(args, out, err)
    return code, out.getvalue(), err.getvalue()


async def test_a_single_failed_attempt_ends_failed_not_dead(
    platform: Platform, tmp_path: Path
) -> None:
    """max_attempts=1: the task failed once, as it was allowed to; it did not keep failing."""
    await platform.scheduler()
    await platform.executor(**dirs(tmp_path, "x"))
    await platform.publish_spec({"id": "once", "command": ["sh", "-c", "echo no; exit 4"],
                                 "max_attempts": 1})
    state = await platform.final_state("once")
    assert state.status == "failed" and state.attempt == 1, state
    assert (state.error or "").endswith("; 1 of 1 attempts failed") and state.tail == ["no"]
    assert [f["status"] for f in await finished_events(platform, "once")] == ["failed"]


async def test_a_lost_attempt_does_not_spend_the_budget(
    platform: Platform, tmp_path: Path
) -> None:
    """max_attempts=1, and the first attempt's node is killed -9: the task still runs
    again elsewhere and succeeds (the node failed, not the agent)."""
    await platform.scheduler()
    pidfile = tmp_path / "agent.pid"
    a = ExecutorProcess(tmp_path, platform.url, "lose-a", runtime="process",
                        unsafe_runtime=1, ack_wait_s=3, heartbeat_s=1,
                        **dirs(tmp_path, "a"))
    script = (f'if [ "$VIGIL_ATTEMPT" = 1 ]; then echo $$ > {pidfile}; exec sleep 60; fi; '
              'echo "ok on attempt $VIGIL_ATTEMPT"')
    try:
        await a.start().ready()
        await platform.publish_spec({"id": "survivor", "command": ["sh", "-c", script],
                                     "max_attempts": 1})
        await platform.events.wait_for("survivor", "started", timeout=30)
        await platform.executor(node_id="lose-b", **dirs(tmp_path, "b"))
        a.signal(signal.SIGKILL)
        await a.exited()
        state = await platform.final_state("survivor", timeout=60)
    finally:
        a.kill()
        with contextlib.suppress(Exception):  # the dead node's agent outlived it
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    assert state.status == "succeeded", state.error
    assert [(h.attempt, h.executor, h.outcome) for h in state.history] == [
        (1, "lose-a", "lost"), (2, "lose-b", "succeeded")]
    assert platform.events.of("survivor", "retrying") == []  # a loss is no retry
    lines = [ln for e in platform.events.of("survivor", "log") for ln in e["lines"]]
    assert lines[-1] == "ok on attempt 2"


class NoImages(ProcessRuntime):
    """A node that has no images at all."""

    async def image_exists(self, image: str) -> bool:
        return False


async def test_missing_image_hands_back_without_spending_an_attempt(
    platform: Platform, tmp_path: Path
) -> None:
    await platform.scheduler()
    bare = await platform.executor(NoImages(tmp_path / "ws-bare"), node_id="bare",
                                   state_dir=str(tmp_path / "st-bare"))
    await platform.publish_spec({"id": "needs-image", "command": ["echo", "hi"],
                                 "max_attempts": 1})
    (handed,) = await platform.events.wait_for("needs-image", "retrying", timeout=30)
    assert "not found on node bare" in handed["reason"] and handed["delay_s"] == 5.0

    async def handed_back() -> TaskState | None:
        s = await platform.state("needs-image")
        return s if s is not None and s.status == "scheduled" else None

    waiting = await eventually(handed_back, what="the task back in the queue")
    assert [h.outcome for h in waiting.history] == ["handed_back"]
    assert waiting.retry_at is not None
    issue = next(c for c in platform.events.of("needs-image", "confession")
                 if "not found" in c["summary"])
    assert issue["source"] == "executor"

    await bare.shutdown()  # a node that has the image takes it when the delay is over
    await platform.executor(node_id="stocked", **dirs(tmp_path, "stocked"))
    state = await platform.final_state("needs-image", timeout=30)
    assert state.status == "succeeded" and state.executor == "stocked"
    assert [(h.attempt, h.outcome) for h in state.history] == [
        (1, "handed_back"), (2, "succeeded")]


@pytest.mark.podman
async def test_retry_in_a_real_container(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    await platform.scheduler()
    await platform.executor(runtime="podman", unsafe_runtime=False, podman_url=podman.url)
    await platform.publish_spec({
        "id": "pod-flaky", "command": ["sh", "-c", FLAKY.format(n=2)], "max_attempts": 2,
        "retry": {"backoff_s": 0.5, "jitter": 0},
    })
    state = await platform.final_state("pod-flaky", timeout=60)
    assert state.status == "succeeded" and state.attempt == 2
    assert [h.outcome for h in state.history] == ["failed", "succeeded"]
    (retrying,) = platform.events.of("pod-flaky", "retrying")
    assert retrying["reason"] == ("agent exited with code 3 (attempt 1 of 2); "
                                  "retrying in 0.5s")


async def test_max_deliveries_buries_a_running_attempt_with_its_evidence(
    platform: Platform,
) -> None:
    """The last resort (ADR 9): a work message that reached the max deliveries while its
    attempt ran. The scheduler records that attempt as lost and keeps its last output
    lines, read back from its log events past other tasks' events, as the tail."""
    await platform.scheduler()
    await topology.ensure_consumer(platform.js, subjects.STREAM_WORK, topology.executor_consumer(
        "default", ack_wait_s=30, max_deliver=3))
    naker = PullConsumer(platform.nc, subjects.STREAM_WORK, "executor-default", capacity=4)
    await naker.start()
    await advertise(platform.js, "ghost")  # capacity, so the scheduler releases the task
    try:
        await platform.publish_spec({"id": "ghosted", "command": ["true"]})
        first = await naker.next()
        # Stand in for an executor that claims attempt 1, prints, and never reports.
        state, rev = await eventually(lambda: platform.store.get("acme", "ghosted"))
        now = utcnow()
        running = msgspec.structs.replace(
            state, status="running", attempt=1, executor="ghost", started_at=now,
            work_seq=first.metadata.sequence.stream, delivery=1)
        assert await platform.store.cas(running, rev) is not None
        for n in range(25):
            if n == 20:  # other tasks' events between: the tail is read back in windows
                for _ in range(1_500):
                    await platform.nc.publish(subjects.event("acme", "noise", "log"), b"{}")
                await platform.nc.flush()
            await publish_event(platform.js, "acme",
                                Log(task_id="ghosted", attempt=1, time=utcnow(),
                                    stream="stdout", lines=[f"line {n}"], first=n), n)
        await first.nak()
        naker.release(1)
        for _ in range(2):  # the remaining deliveries, handed back at once
            msg = await asyncio.wait_for(naker.next(), 30)
            await msg.nak()
            naker.release(1)
        dead = await platform.final_state("ghosted", timeout=60)
    finally:
        await naker.stop()
    assert dead.status == "dead" and "delivered 3 times" in (dead.error or "")
    assert [(h.attempt, h.executor, h.outcome) for h in dead.history] == [(1, "ghost", "lost")]
    assert dead.tail == [f"line {n}" for n in range(5, 25)]
