"""Unit tests: what an agent's exit becomes (verdict, error, platform confession).

``Attempt._judge`` is pure logic around one call out, the confession: the executor here
is a stand-in that records what would be published (no NATS, no container)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from vigil.messages import Confession, TaskSpec, TaskState, WorkItem
from vigil_executor.agentio import AgentOutput
from vigil_executor.attempt import Attempt
from vigil_executor.runtime import ExitInfo
from vigil_executor.settings import ExecutorSettings

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Recorder:
    """What the attempt publishes: confessions, and events on the task's timeline."""

    def __init__(self) -> None:
        self.settings = ExecutorSettings(node_id="node-7", memory_mb=512)
        self.js = None
        self.confessions: list[Confession] = []
        self.events: list[Any] = []

    async def publish_confession(self, confession: Confession) -> None:
        self.confessions.append(confession)

    def emit(self, event: Any, *, once: bool = False) -> None:
        self.events.append(event)


def attempt_of(rec: Recorder) -> Attempt:
    a = Attempt(rec, msg=None)  # type: ignore[arg-type]
    a.work = WorkItem(task_id="t-oom", tenant="acme",
                      spec=TaskSpec(command=["python3", "eat.py"], image="img:7"),
                      submitted_at=NOW)
    a.state = TaskState(id="t-oom", tenant="acme", status="running", attempt=2,
                        executor="node-7", created_at=NOW, updated_at=NOW)
    a.sink = rec  # type: ignore[assignment]
    return a


async def output_with(lines: list[bytes]) -> AgentOutput:
    async def noop(*_: Any) -> None:
        pass

    out = AgentOutput("t-oom", 2, lambda e: None, noop, noop, noop)
    for line in lines:
        await out.feed("stdout", line)
    out.flush()
    return out


async def test_an_oom_killed_agent_fails_retryably_and_the_platform_confesses() -> None:
    rec = Recorder()
    attempt = attempt_of(rec)
    out = await output_with([b"allocating"])
    outcome = await attempt._judge(ExitInfo(exit_code=137, oom_killed=True), out,
                                   timed_out=False, timeout_s=60)
    assert outcome.status == "failed" and outcome.exit_code == 137
    assert outcome.error == "killed by the kernel: out of memory (limit 512 MiB)"
    assert outcome.retryable_cause == "agent ran out of memory (exit code 137)"
    (c,) = rec.confessions
    assert (c.category, c.severity, c.source, c.component) == ("oom", "error", "executor",
                                                               "executor")
    assert (c.task_id, c.tenant, c.attempt, c.node) == ("t-oom", "acme", 2, "node-7")
    assert c.summary == outcome.error and c.id == "executor-t-oom-a2-oom"
    assert c.data == {"image": "img:7"}  # the auditor's fingerprint names the image
    (event,) = rec.events  # and it is on the task's timeline
    assert event.confession_id == c.id and event.source == "executor"


async def test_exit_137_without_the_oom_flag_is_an_ordinary_failure() -> None:
    rec = Recorder()
    outcome = await attempt_of(rec)._judge(ExitInfo(exit_code=137), await output_with([b"x"]),
                                           timed_out=False, timeout_s=60)
    assert outcome.status == "failed" and "out of memory" not in (outcome.error or "")
    assert rec.confessions == []


async def test_time_limit_and_silent_exit_confess_with_the_image() -> None:
    rec = Recorder()
    attempt = attempt_of(rec)
    timed = await attempt._judge(ExitInfo(exit_code=143), await output_with([]),
                                 timed_out=True, timeout_s=1.5)
    assert timed.status == "timed_out"
    silent = await attempt._judge(ExitInfo(exit_code=3), await output_with([]),
                                  timed_out=False, timeout_s=60)
    assert silent.error == "agent exited with code 3 (no output)"
    assert [(c.category, c.data) for c in rec.confessions] == [
        ("time_limit", {"image": "img:7"}), ("silent_failure", {"image": "img:7"})]
