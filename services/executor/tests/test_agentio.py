"""Unit tests: line splitting, control lines, log batching, the Podman create body."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from vigil.messages import Log, Progress, TaskSpec, WorkItem
from vigil_executor.agentio import (
    MAX_CONTROL_BYTES,
    MIB,
    AgentOutput,
    ConfessionLimiter,
    ConfessionTooLarge,
    ControlError,
    OutputLimit,
    agent_confession,
    parse_control,
)
from vigil_executor.podman import PodmanRuntime
from vigil_executor.runtime import LineSplitter, TruncatedLine
from vigil_executor.sandbox import container_spec
from vigil_executor.settings import ExecutorSettings

pytestmark = pytest.mark.unit


def test_line_splitter_joins_chunks_and_truncates() -> None:
    s = LineSplitter(max_len=8)
    assert s.feed(b"ab") == []
    assert s.feed(b"c\nde\n") == [b"abc", b"de"]
    assert s.feed(b"0123456789") == []  # too long: kept short, out with its newline
    (cut, ok) = s.feed(b"abc\nok\n")  # the rest of the long line is dropped, but counted
    assert cut == b"01234567 [truncated: 13 bytes]" and ok == b"ok"
    assert isinstance(cut, TruncatedLine) and cut.size == 13 and cut.limit == 8
    assert s.feed(b"tail") == []
    assert s.flush() == [b"tail"]
    assert s.flush() == []


def test_line_splitter_counts_a_long_line_across_chunks_and_at_flush() -> None:
    s = LineSplitter(max_len=4)
    assert s.feed(b"abcdefgh\nxyz") == [b"abcd [truncated: 8 bytes]"]
    assert s.feed(b"0123") == []
    assert s.feed(b"4567") == []
    (cut,) = s.feed(b"89\n")
    assert isinstance(cut, TruncatedLine) and cut.size == 13  # xyz + 0..9
    assert s.feed(b"ABCDEFG") == []
    (cut,) = s.flush()  # the output ended inside a long line
    assert isinstance(cut, TruncatedLine) and cut.size == 7 and cut.startswith(b"ABCD ")


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


async def test_output_past_its_limit_is_dropped_with_markers_and_one_call() -> None:
    emitted: list[Any] = []
    limits: list[OutputLimit] = []
    confessed: list[Any] = []
    checkpoints: list[dict[str, Any]] = []

    async def on_confess(c: Any) -> None:
        confessed.append(c)

    async def on_checkpoint(note: dict[str, Any]) -> None:
        checkpoints.append(note)

    async def on_malformed(_: Any) -> None:
        pass

    async def on_limit(limit: OutputLimit) -> None:
        limits.append(limit)

    out = AgentOutput("t", 1, emitted.append, on_confess, on_checkpoint, on_malformed,
                      limit_bytes=20, on_limit=on_limit)
    await out.feed("stdout", b"123456789")  # 10 bytes with its newline
    await out.feed("stdout", b'::vigil::progress {"a":1}')  # 26: over, dropped
    await out.feed("stdout", b"x")  # would fit, but the stored output stays a prefix
    await out.feed("stderr", b"late")
    await out.feed("stdout", b'::vigil::confess {"summary": "still heard"}')
    await out.feed("stdout", b"::vigil::checkpoint")
    out.close()
    lines = [(e.stream, line) for e in emitted if isinstance(e, Log) for line in e.lines]
    assert lines[0] == ("stdout", "123456789")
    assert lines[1][0] == "stderr" and lines[1][1].startswith(
        "[vigil: output limit 0.0 MiB reached; 0.0 MiB (1 lines) dropped so far")
    assert lines[2][1].startswith("[vigil: output limit 0.0 MiB reached; 0.0 MiB (3 lines) "
                                  "dropped;")
    assert len(lines) == 3 and not any(isinstance(e, Progress) for e in emitted)
    assert len(limits) == 1 and limits[0].stored == 10
    assert limits[0].dropped == 26 + 2 + 5 and limits[0].dropped_lines == 3
    assert [c.summary for c in confessed] == ["still heard"] and checkpoints == [{}]
    assert list(out.tail)[-1] == lines[2][1]  # the task's state shows the total
    assert out.lines_by_stream == {"stdout": 1, "stderr": 0}  # markers are not the agent's


def test_output_limit_arithmetic() -> None:
    limit = OutputLimit(5 * MIB)
    assert limit.take(5 * MIB) and not limit.reached
    assert not limit.take(1) and limit.reached and not limit.take(0)
    assert limit.marker(final=True) == (
        "[vigil: output limit 5.0 MiB reached; 0.0 MiB (2 lines) dropped; raise "
        "resources.output_mb to keep more]")


def test_confession_limiter_is_a_token_bucket() -> None:
    now = [0.0]
    bucket = ConfessionLimiter(burst=3, per_min=6, clock=lambda: now[0])  # one per 10 s
    assert [bucket.allow() for _ in range(5)] == [True, True, True, False, False]
    now[0] = 9.0
    assert bucket.allow() is False  # 0.9 of a token is not one
    now[0] = 10.0
    assert bucket.allow() is True and bucket.allow() is False
    now[0] = 1_000.0  # a long quiet spell refills to the burst, not beyond
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    assert bucket.accepted == 7 and bucket.dropped == 5
    assert bucket.report() == 5  # once ...
    assert bucket.report() == 0  # ... and only once
    assert bucket.allow() is False and bucket.report() == 0


def test_confession_limiter_without_refill_is_a_cap_and_reports_nothing_when_clean() -> None:
    bucket = ConfessionLimiter(burst=2, per_min=0, clock=lambda: 0.0)
    assert bucket.report() == 0
    assert [bucket.allow() for _ in range(3)] == [True, True, False]
    assert ConfessionLimiter(burst=0, per_min=0).allow() is False


def test_oversize_confession_is_refused_with_its_size() -> None:
    body = '{"summary": "s", "detail": "' + "x" * MAX_CONTROL_BYTES + '"}'
    line = "::vigil::confess " + body
    with pytest.raises(ConfessionTooLarge) as caught:
        parse_control(line)
    assert caught.value.size == len(line.encode()) and caught.value.limit == MAX_CONTROL_BYTES
    assert str(caught.value) == (f"confession too large ({len(line.encode())} bytes > "
                                 f"{MAX_CONTROL_BYTES} byte limit)")
    # Another command over the limit stays an ordinary malformed line.
    with pytest.raises(ControlError) as other:
        parse_control("::vigil::progress " + body)
    assert not isinstance(other.value, ConfessionTooLarge)
    # Sizes count bytes, not characters.
    wide = '::vigil::confess {"summary": "' + "é" * 9_000 + '"}'
    with pytest.raises(ConfessionTooLarge):
        parse_control(wide)


def test_long_fields_are_cut_with_a_visible_marker() -> None:
    c = agent_confession({"summary": "s" * 2_500, "detail": "d" * 9_000, "hint": "h",
                          "category": "c" * 10})
    assert c.summary.endswith(" [truncated 2500 chars to 2000]") and len(c.summary) == 2_000
    assert c.detail is not None and len(c.detail) == 8_000
    assert c.detail.startswith("d" * 7_000) and c.detail.endswith("[truncated 9000 chars to 8000]")
    assert c.hint == "h" and c.category == "c" * 10  # short ones untouched


async def test_output_refuses_each_oversize_confession_and_keeps_it_as_log() -> None:
    emitted: list[Any] = []
    confessed: list[Any] = []
    malformed: list[ControlError] = []

    async def on_confess(c: Any) -> None:
        confessed.append(c)

    async def on_checkpoint(p: Any) -> None:
        pass

    async def on_malformed(error: ControlError) -> None:
        malformed.append(error)

    out = AgentOutput("t", 1, emitted.append, on_confess, on_checkpoint, on_malformed)
    splitter = LineSplitter(max_len=MAX_CONTROL_BYTES)
    big = b'::vigil::confess {"summary": "s", "detail": "' + b"x" * 40_000 + b'"}'
    lines = splitter.feed(big + b"\n" + big + b"\n" + b"::vigil::bogus {}\n" * 2)
    for line in lines:
        await out.feed("stdout", line)
    out.flush()
    assert confessed == []
    # Each oversize confession is reported with its real size (the executor rate-limits
    # them like any confession); other malformed lines once per attempt.
    assert [type(e) for e in malformed] == [ConfessionTooLarge, ConfessionTooLarge,
                                            ControlError]
    too_large = malformed[0]
    assert isinstance(too_large, ConfessionTooLarge)
    assert too_large.size == len(big) and too_large.limit == MAX_CONTROL_BYTES
    logged = [line for e in emitted if isinstance(e, Log) for line in e.lines]
    assert len(logged) == 4 and logged[0].endswith(f"[truncated: {len(big)} bytes]")


async def test_a_confession_cut_by_a_short_line_limit_is_too_large_not_malformed() -> None:
    malformed: list[ControlError] = []

    async def on_malformed(error: ControlError) -> None:
        malformed.append(error)

    async def noop(*_: Any) -> None:
        pass

    out = AgentOutput("t", 1, lambda e: None, noop, noop, on_malformed)
    line = b'::vigil::confess {"summary": "' + b"y" * 600 + b'"}'
    (cut,) = LineSplitter(max_len=256).feed(line + b"\n")
    await out.feed("stdout", cut)
    out.flush()
    (error,) = malformed
    assert isinstance(error, ConfessionTooLarge)
    assert (error.size, error.limit) == (len(line), 256)


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

    # A third at most: half (the old rule) let one failed renewal lose the lease.
    for heartbeat in (6, 5, 3.5):
        with pytest.raises(msgspec.ValidationError,
                           match=r"at most a third of ack_wait_s .* one lost heartbeat"):
            msgspec.convert({"ack_wait_s": 10, "heartbeat_s": heartbeat}, ExecutorSettings)
    assert msgspec.convert({"ack_wait_s": 3, "heartbeat_s": 1}, ExecutorSettings).heartbeat_s == 1


def test_judge_delivery() -> None:
    from vigil.messages import TaskState
    from vigil.transitions import delivery_verdict as judge_delivery

    now = datetime(2026, 1, 1, tzinfo=UTC)
    fresh = TaskState(id="t", tenant="a", status="scheduled", created_at=now, updated_at=now)
    assert judge_delivery(fresh, work_seq=5, delivery=1) == "claim"
    held = TaskState(id="t", tenant="a", status="running", created_at=now, updated_at=now,
                     work_seq=5, delivery=2)
    assert judge_delivery(held, 5, 3) == "claim"      # the server redelivered: lease lapsed
    assert judge_delivery(held, 5, 2) == "stale"      # the holder's own delivery, again
    assert judge_delivery(held, 5, 1) == "stale"      # an older one, late from a frozen node
    assert judge_delivery(held, 9, 1) == "duplicate"  # another work item for the same task
