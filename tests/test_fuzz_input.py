"""Arbitrary bytes and arbitrary JSON at every door that takes input, against the real
services: the gateway (in-process, auth off), a real ``vigil-scheduler`` process (its
log is read for tracebacks) and a ``null``-runtime executor (a fuzzer must not run
what it generates). Never a 5xx; never a crash or a redelivery in the scheduler: every
raw submission ends defined at once - a task state, or a terminated message and a
confession. Derandomized and bounded, so a run is quick and repeatable.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import Platform, SchedulerProcess, eventually, session_node_id
from vigil import ids, subjects
from vigil.messages import STATUSES
from vigil.secrets import new_key_line

pytestmark = pytest.mark.integration

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=10,
)
# Nearly valid specs: one odd value in an otherwise good spec reaches furthest.
ODD = JSON | st.text() | st.sampled_from(["\x00", "a\x00b", "\ud7ff", "\U0010ffff", ""])
SPECS = st.fixed_dictionaries(
    {"command": st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3) | ODD},
    optional={
        "env": st.dictionaries(st.from_regex(r"\A[A-Z]{1,4}\Z"), st.text(max_size=6) | ODD,
                               max_size=2),
        "labels": st.dictionaries(st.text(min_size=1, max_size=6), st.text(max_size=6) | ODD,
                                  max_size=2),
        "priority": st.integers(-1, 10) | st.floats(-1, 10) | ODD,
        "max_attempts": st.integers(0, 50) | ODD,
        "not_before": st.datetimes().map(lambda t: t.isoformat() + "Z") | ODD,
        "queue_timeout_s": st.floats(0, 10**7) | ODD,
        "retry": st.fixed_dictionaries({}, optional={
            "non_retryable_exit_codes": st.lists(st.integers(-2**40, 2**40), max_size=2)}) | ODD,
        "pool": st.sampled_from(["default", "fuzz-idle"]) | ODD,
        "image": st.just("localhost/vigil-agent:latest") | ODD,
    },
).map(lambda spec: json.dumps(spec).encode())
# Valid JSON text made invalid UTF-8 in the middle of a string (or a lone surrogate).
BROKEN = st.tuples(SPECS, st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x80"])).map(
    lambda t: t[0].replace(b'["', b'["' + t[1], 1) if b'["' in t[0] else t[0] + t[1])
PAYLOADS = (st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()) | SPECS
            | BROKEN)


@dataclass
class Stack:
    http: aiohttp.ClientSession
    scheduler: SchedulerProcess
    platform: Platform


@pytest.fixture
async def stack(platform: Platform, tmp_path: Path) -> AsyncIterator[Stack]:
    scheduler = SchedulerProcess(tmp_path, platform.url, session_node_id(),
                                 unservable_after_s=0).start()
    try:
        await scheduler.ready()
        await platform.executor(runtime="null", node_id=session_node_id())
        gw = await platform.gateway(sse_keepalive_s=0.2, rate_limit_rps=0,
                                    secrets_key=new_key_line("fuzz"))
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gw.http_port}") as http:
            for task_id, pool in (("fz-done", "default"), ("fz-queued", "fuzz-idle")):
                body = json.dumps({"id": task_id, "command": ["true"], "pool": pool})
                async with http.post("/v1/tasks", data=body) as r:
                    assert r.status == 202, await r.text()
            await platform.final_state("fz-done")
            yield Stack(http, scheduler, platform)
    finally:
        scheduler.kill()
    assert_scheduler_log_clean(scheduler)


def assert_scheduler_log_clean(scheduler: SchedulerProcess) -> None:
    for line in scheduler.log_text().splitlines():
        entry = json.loads(line) if line.startswith("{") else {"event": line}
        assert "exception" not in entry and "Traceback" not in line, line
        assert entry.get("event") not in ("submission_crashed", "admission_crashed",
                                          "handler_crashed", "submission_retry"), line


async def stream_count(platform: Platform, stream: str) -> int:
    return int((await platform.js.stream_info(stream)).state.messages)


async def answer(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """A 4xx is a JSON error naming what is wrong; never a 5xx."""
    assert response.status < 500, await response.text()
    if response.status < 400:
        return {}
    assert response.content_type == "application/json"
    body: dict[str, Any] = await response.json()
    assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"]
    return body


@settings(FUZZ, max_examples=150)
@given(body=PAYLOADS)
async def test_submit_answers_4xx_or_accepts_never_5xx(stack: Stack, body: bytes) -> None:
    before = await stream_count(stack.platform, subjects.STREAM_SUBMIT)
    async with stack.http.post("/v1/tasks", data=body) as r:
        refused = await answer(r)
        status = r.status
    if refused and status != 409:  # (409: the id exists; a duplicate is published)
        assert await stream_count(stack.platform, subjects.STREAM_SUBMIT) == before
    if status in (400, 422):
        assert refused["error"]["field"], refused


@settings(FUZZ, max_examples=60)
@given(body=PAYLOADS | st.just(b""), task=st.sampled_from(["fz-done", "fz-queued"]))
async def test_cancel_answers_4xx_or_acts_never_5xx(stack: Stack, body: bytes,
                                                   task: str) -> None:
    before = await stream_count(stack.platform, subjects.STREAM_CONTROL)
    async with stack.http.post(f"/v1/tasks/{task}/cancel", data=body) as r:
        refused = await answer(r)
        status = r.status
    if status in (400, 422):
        assert refused["error"]["field"], refused
        assert await stream_count(stack.platform, subjects.STREAM_CONTROL) == before


SECRET_BODIES = (PAYLOADS | st.fixed_dictionaries({"value": ODD}).map(
    lambda v: json.dumps(v).encode()))


@settings(FUZZ, max_examples=80)
@given(body=SECRET_BODIES, name=st.sampled_from(["fz-secret", "fz_2"]) | st.text(max_size=8))
async def test_secret_put_answers_4xx_or_stores_never_5xx(stack: Stack, body: bytes,
                                                          name: str) -> None:
    from urllib.parse import quote

    async with stack.http.put(f"/v1/secrets/{quote(name, safe='')}", data=body) as r:
        refused = await answer(r)
        status = r.status
        stored = {} if refused else await r.json()
    if status in (400, 422):
        assert refused["error"]["field"], refused
    if not refused:  # metadata only: no field for the value
        assert set(stored) == {"name", "size", "key_id", "created_at", "updated_at"}


HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                    exclude_characters="\x7f"), max_size=24)


@settings(FUZZ, max_examples=50)
@given(last=HEADER_TEXT | st.integers(-1, 2**70).map(str)
       | st.sampled_from(["", "0", "00", "9223372036854775807", "9223372036854775808"]))
async def test_last_event_id_is_a_400_or_a_stream_that_ends(stack: Stack, last: str) -> None:
    async with stack.http.get("/v1/tasks/fz-done/events",
                              headers={"Last-Event-ID": last}) as r:
        refused = await answer(r)
        if r.status == 200:
            assert r.content_type == "text/event-stream"
            await asyncio.wait_for(r.read(), 10)  # the task is finished: the stream ends
    if refused:
        assert r.status == 400 and refused["error"]["field"] == "Last-Event-ID"
    else:
        assert re.fullmatch(r"[0-9]+(\.[0-9]+)?", last.strip())


_msg_ids = itertools.count()


def expected_id(payload: bytes, msg_id: str | None, seq: int) -> str:
    """The public id rule: the spec's own (valid) id, else a valid Nats-Msg-Id, else s<seq>."""
    try:
        value = json.loads(payload.decode())
    except ValueError:
        value = None
    spec_id = value.get("id") if isinstance(value, dict) else None
    return ids.task_id_for(spec_id if ids.is_valid_id(spec_id) else None, msg_id, seq)


@settings(FUZZ, max_examples=12)
@given(batch=st.lists(st.tuples(PAYLOADS, st.sampled_from(["fresh", "none", "invalid"])),
                      min_size=5, max_size=30))
async def test_raw_submissions_all_end_defined_at_once(
    stack: Stack, batch: list[tuple[bytes, str]]
) -> None:
    platform = stack.platform
    sent: list[tuple[bytes, str | None, int]] = []
    for payload, kind in batch:
        msg_id = {"fresh": f"fz-raw-{os.getpid()}-{next(_msg_ids)}", "none": None,
                  "invalid": "not an id!"}[kind]
        ack = await platform.publish_spec(payload, msg_id=msg_id)
        sent.append((payload, msg_id, ack.seq))

    async def settled() -> Any:
        info = await platform.js.consumer_info(subjects.STREAM_SUBMIT,
                                               subjects.CONSUMER_SCHEDULER)
        return info if info.num_pending == 0 and info.num_ack_pending == 0 else None

    info = await eventually(settled, timeout=10, what="every submission to be settled")
    assert info.num_redelivered == 0
    confessed = {c["data"].get("submit_seq") for c in
                 await platform.confessions("invalid_submission")}
    for payload, msg_id, seq in sent:
        state = await platform.state(expected_id(payload, msg_id, seq))
        assert state is not None or seq in confessed, (payload, msg_id, seq)
        if state is not None and state.submit_seq == seq:
            assert state.status in STATUSES
            if state.status == "failed" and state.attempt == 0:
                assert state.error and seq in confessed  # refused: why, and confessed
    assert_scheduler_log_clean(stack.scheduler)
