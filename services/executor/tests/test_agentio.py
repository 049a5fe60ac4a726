"""Unit tests: line splitting, control lines, log batching, the Podman create body."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from vigil.messages import Log, Progress, TaskSpec, WorkItem
from vigil_executor.agentio import AgentOutput, ControlError, parse_control
from vigil_executor.podman import PodmanRuntime
from vigil_executor.runtime import LineSplitter
from vigil_executor.sandbox import container_spec
from vigil_executor.settings import ExecutorSettings

pytestmark = pytest.mark.unit


def test_line_splitter_joins_chunks_and_truncates() -> None:
    s = LineSplitter(max_len=8)
    assert s.feed(b"ab") == []
    assert s.feed(b"c\nde\n") == [b"abc", b"de"]
    assert s.feed(b"0123456789") == [b"01234567 [truncated]"]
    assert s.feed(b"abc\nok\n") == [b"ok"]  # the rest of the long line is dropped
    assert s.feed(b"tail") == []
    assert s.flush() == [b"tail"]
    assert s.flush() == []


def test_parse_control() -> None:
    assert parse_control("hello") is None
    c = parse_control('::vigil::confess {"summary": "x", "severity": "error"}')
    assert c is not None and c.command == "confess" and c.payload["severity"] == "error"
    assert parse_control("::vigil::checkpoint") is not None
    for bad in ("::vigil::confess {nope", "::vigil::explode {}", "::vigil::progress [1]",
                '::vigil::confess {"severity": "error"}',
                '::vigil::confess {"summary": "x", "severity": "bad"}'):
        with pytest.raises(ControlError):
            parse_control(bad)


async def test_output_batches_logs_and_keeps_order() -> None:
    emitted: list[Any] = []
    confessed: list[Any] = []
    malformed: list[str] = []

    async def on_confess(c: Any) -> None:
        confessed.append(c)

    async def on_checkpoint(p: Any) -> None:
        pass

    async def on_malformed(why: str) -> None:
        malformed.append(why)

    out = AgentOutput("t", 1, emitted.append, on_confess, on_checkpoint, on_malformed)
    await out.feed("stdout", b"one")
    await out.feed("stdout", b"two")
    await out.feed("stderr", b"err")
    await out.feed("stdout", b'::vigil::progress {"step": 1}')
    await out.feed("stdout", b'::vigil::confess {"summary": "s", "severity": "info", "x": 1}')
    await out.feed("stdout", b"::vigil::confess {bad")
    await out.feed("stdout", b"::vigil::confess {bad again")
    out.flush()
    logs = [e for e in emitted if isinstance(e, Log)]
    assert [(e.stream, e.lines, e.first) for e in logs] == [
        ("stdout", ["one", "two"], 0), ("stderr", ["err"], 2),
        ("stdout", ["::vigil::confess {bad", "::vigil::confess {bad again"], 3)]
    assert [type(e) for e in emitted] == [Log, Log, Progress, Log]
    assert confessed[0].summary == "s" and confessed[0].data == {"x": 1}
    assert len(malformed) == 1  # one platform confession per attempt, not per line


async def test_output_flushes_on_a_timer() -> None:
    emitted: list[Any] = []

    async def noop(*_: Any) -> None:
        pass

    flushed = asyncio.Event()

    def emit(event: Any) -> None:
        emitted.append(event)
        flushed.set()

    out = AgentOutput("t", 1, emit, noop, noop, noop)
    await out.feed("stdout", b"lonely")
    assert emitted == []  # a lone line waits for company ...
    await asyncio.wait_for(flushed.wait(), 2.0)
    assert len(emitted) == 1  # ... but not for long: the batch timer flushes it


def test_podman_create_body_is_hardened() -> None:
    conf = ExecutorSettings(node_id="n1", podman_url="unix:///tmp/x.sock")
    work = WorkItem(task_id="t1", tenant="acme",
                    spec=TaskSpec(command=["python3", "a.py"], image="img:1", timeout_s=30,
                                  env={"A": "1"}),
                    submitted_at=datetime(2026, 1, 1, tzinfo=UTC))
    spec = container_spec(work, 2, conf)
    rt = PodmanRuntime("unix:///tmp/x.sock")
    body = rt.create_body(spec)
    assert body["netns"] == {"nsmode": "none"}
    assert body["read_only_filesystem"] is True
    assert body["cap_drop"] == ["all"]
    assert body["no_new_privileges"] is True
    assert body["oci_runtime"] == "runc"
    assert body["env"]["VIGIL_TASK_ID"] == "t1" and body["env"]["VIGIL_ATTEMPT"] == "2"
    assert body["env"]["A"] == "1"
    assert body["labels"]["dev.vigil.executor"] == "n1"
    assert body["timeout"] > 30  # podman's own backstop beyond the executor's limit
    limits = {r["type"]: r["hard"] for r in body["r_limits"]}
    assert limits["nofile"] == 1024 and "nproc" in limits
    assert "data" in limits  # no cgroup limits known yet: the data rlimit stands in
    assert "resource_limits" not in body


def test_unsafe_runtime_needs_explicit_consent() -> None:
    from vigil.errors import SettingsError
    from vigil_executor.service import make_runtime

    with pytest.raises(SettingsError, match="VIGIL_UNSAFE_RUNTIME"):
        make_runtime(ExecutorSettings(runtime="process"))
    assert make_runtime(ExecutorSettings(runtime="null", unsafe_runtime=True)).name == "null"


def test_heartbeat_must_fit_in_ack_wait() -> None:
    import msgspec

    with pytest.raises(msgspec.ValidationError, match="half"):
        msgspec.convert({"ack_wait_s": 10, "heartbeat_s": 6}, ExecutorSettings)


def test_judge_delivery() -> None:
    from vigil.messages import TaskState
    from vigil_executor.claim import judge_delivery

    now = datetime(2026, 1, 1, tzinfo=UTC)
    fresh = TaskState(id="t", tenant="a", status="scheduled", created_at=now, updated_at=now)
    assert judge_delivery(fresh, work_seq=5, delivery=1) == "claim"
    held = TaskState(id="t", tenant="a", status="running", created_at=now, updated_at=now,
                     work_seq=5, delivery=2)
    assert judge_delivery(held, 5, 3) == "claim"      # the server redelivered: lease lapsed
    assert judge_delivery(held, 5, 2) == "stale"      # the holder's own delivery, again
    assert judge_delivery(held, 5, 1) == "stale"      # an older one, late from a frozen node
    assert judge_delivery(held, 9, 1) == "duplicate"  # another work item for the same task
