"""Unit tests: what an agent's exit becomes (verdict, error, platform confession).

``agentrun.judge`` is pure logic around one call out, the confession: the attempt's
context here is a stand-in that records what would be published (no NATS, no
container)."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from vigil.messages import Confession, TaskSpec, TaskState, WorkItem
from vigil_executor.agentio import AgentOutput
from vigil_executor.agentrun import judge
from vigil_executor.claim import HandBack
from vigil_executor.hold import Hold
from vigil_executor.runtime import ContainerError, ExitInfo
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


def attempt_of(rec: Recorder) -> Hold:
    a = Hold(rec, msg=None)  # type: ignore[arg-type]
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
    outcome = await judge(attempt, None, ExitInfo(exit_code=137, oom_killed=True), out,
                          timed_out=False, timeout_s=60)
    assert outcome.status == "failed" and outcome.exit_code == 137
    assert outcome.error == "killed by the kernel: out of memory (limit 512 MiB)"
    assert outcome.retryable_cause == "agent ran out of memory (exit code 137)"
    (c,) = rec.confessions
    assert (c.category, c.severity, c.source, c.component) == ("oom", "error", "executor",
                                                               "executor")
    assert (c.task_id, c.tenant, c.attempt, c.node) == ("t-oom", "acme", 2, "node-7")
    assert c.summary == outcome.error and c.id == "executor-acme.t-oom-a2-oom"
    assert c.data == {"image": "img:7"}  # the auditor's fingerprint names the image
    (event,) = rec.events  # and it is on the task's timeline
    assert event.confession_id == c.id and event.source == "executor"


async def test_exit_137_without_the_oom_flag_is_an_ordinary_failure() -> None:
    rec = Recorder()
    outcome = await judge(attempt_of(rec), None, ExitInfo(exit_code=137),
                          await output_with([b"x"]), timed_out=False, timeout_s=60)
    assert outcome.status == "failed" and "out of memory" not in (outcome.error or "")
    assert rec.confessions == []


async def test_time_limit_and_silent_exit_confess_with_the_image() -> None:
    rec = Recorder()
    attempt = attempt_of(rec)
    timed = await judge(attempt, None, ExitInfo(exit_code=143), await output_with([]),
                        timed_out=True, timeout_s=1.5)
    assert timed.status == "timed_out"
    silent = await judge(attempt, None, ExitInfo(exit_code=3), await output_with([]),
                         timed_out=False, timeout_s=60)
    assert silent.error == "agent exited with code 3 (no output)"
    assert [(c.category, c.data) for c in rec.confessions] == [
        ("time_limit", {"image": "img:7"}), ("silent_failure", {"image": "img:7"})]


async def test_an_init_that_could_not_exec_the_command_fails_the_task_at_once() -> None:
    """The agent never ran because its command is not in the image: the task's own
    failure, not retried (a retry finds the same image), confessed with the cause."""
    rec = Recorder()
    why = ContainerError("the container's init could not start the agent: failed to exec "
                         "pid1: No such file or directory", cause="command_not_runnable",
                         retryable=False)
    outcome = await judge(
        attempt_of(rec), None, ExitInfo(exit_code=1, start_error=why),
        await output_with([b"ERROR (catatonit:6)"]), timed_out=False, timeout_s=60)
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert outcome.retryable_cause is None
    assert outcome.error == f"could not start the container on node-7: {why}"
    (c,) = rec.confessions
    assert (c.category, c.summary) == ("container_start_failed", outcome.error)


async def test_an_init_that_could_not_fork_the_agent_hands_the_task_back() -> None:
    """The host's failure (no processes left for the rootless user): handed back with the
    missing-image delay for this delivery, no outcome, confessed as the platform's."""
    rec = Recorder()
    attempt = attempt_of(rec)
    attempt.msg = SimpleNamespace(metadata=SimpleNamespace(num_delivered=2))  # type: ignore[assignment]
    why = ContainerError("the container's init could not start the agent: failed to spawn "
                         "pid1: Resource temporarily unavailable", cause="eagain",
                         retryable=True)
    with pytest.raises(HandBack) as raised:
        await judge(attempt, None, ExitInfo(exit_code=1, start_error=why),
                    await output_with([]), timed_out=False, timeout_s=60)
    assert raised.value.delay_s == 10.0 and raised.value.kind == "container start infra"
    assert raised.value.reason.startswith(
        "the container could not start on node node-7 for a host reason (eagain): ")
    (c,) = rec.confessions
    assert c.category == "container_start_infra" and c.severity == "error"
    assert c.summary.endswith("; handed back, no attempt spent")
    assert "node node-7 is short of processes" in (c.hint or "")


def test_the_attempts_own_decisions_are_vigil_errors_that_say_if_a_retry_helps() -> None:
    """One hierarchy: a caller that handles VigilError by its ``retryable`` treats a
    hand-back as the passing trouble it is, and a lost lease or a restore given up as
    final for this attempt."""
    from vigil.errors import VigilError
    from vigil_executor.claim import LeaseLost, RestoreGaveUp

    back = HandBack("image missing on node a", 5.0, kind="image missing")
    assert isinstance(back, VigilError) and back.retryable
    assert (back.reason, back.delay_s, back.kind) == ("image missing on node a", 5.0,
                                                      "image missing")
    for final in (LeaseLost("attempt 3 holds it"), RestoreGaveUp("5 deliveries failed")):
        assert isinstance(final, VigilError) and not final.retryable
