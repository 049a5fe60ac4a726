"""Bad input is a 4xx at once, naming what is wrong, and changes nothing: through the
gateway (HTTP) and the raw NATS door. Real nats-server, scheduler, executor, gateway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from support import Platform, eventually, stored_events
from vigil import subjects
from vigil.api import LAST_EVENT_ID_MAX

pytestmark = pytest.mark.integration


@pytest.fixture
async def http(platform: Platform) -> AsyncIterator[aiohttp.ClientSession]:
    await platform.scheduler()
    await platform.executor()
    gw = await platform.gateway(sse_keepalive_s=0.2)
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gw.http_port}") as session:
        yield session


async def submissions(platform: Platform) -> int:
    info = await platform.js.stream_info(subjects.STREAM_SUBMIT)
    return int(info.state.messages)


def spec(task_id: str, **fields: Any) -> bytes:
    return json.dumps({"id": task_id, "command": ["true"], **fields}).encode()


@pytest.mark.parametrize(("body", "status", "field", "says"), [
    (b'{"id": "u8", "command": ["caf\xe9"]}', 400, "$", "not UTF-8"),
    (b'{"id": "u8-skip", "command": ["true"], "x": "\xff"}', 400, "$", "not UTF-8"),
    (spec("nul-arg", command=["sh", "-c", "a\x00b"]), 422, "$.command[2]", "regex"),
    (spec("nul-env", env={"FOO": "a\x00"}), 422, "$.env.FOO", "NUL"),
    (spec("nul-label", labels={"team": "\x00"}), 422, "$.labels.team", "NUL"),
    (spec("exit-big", retry={"non_retryable_exit_codes": [2**32]}), 422,
     "$.retry.non_retryable_exit_codes[0]", "<= 255"),
    (spec("far", not_before="9999-12-31T23:59:59Z", queue_timeout_s=86_400), 422,
     "$.not_before", "365 days"),
], ids=["utf8", "utf8-unknown-field", "nul-arg", "nul-env", "nul-label", "exit-code",
        "not-before"])
async def test_a_refused_submission_names_its_field_and_creates_nothing(
    http: aiohttp.ClientSession, platform: Platform, body: bytes, status: int, field: str,
    says: str,
) -> None:
    before = await submissions(platform)
    async with http.post("/v1/tasks", data=body,
                         headers={"Content-Type": "application/json"}) as r:
        answer = await r.json()
        assert r.status == status, answer
    assert answer["error"]["field"] == field
    assert says in answer["error"]["message"]
    assert answer["error"]["code"] == ("invalid_json" if status == 400 else "invalid_field")
    # Nothing was published, so nothing can be created later either.
    assert await submissions(platform) == before
    task_id = body.split(b'"id": "')[1].split(b'"')[0].decode()
    assert await platform.state(task_id) is None


async def test_a_whole_number_as_a_float_is_the_integer(
    http: aiohttp.ClientSession, platform: Platform
) -> None:
    async with http.post("/v1/tasks", data=spec("two", priority=2.0, max_attempts=1.0)) as r:
        assert r.status == 202, await r.text()
    state = await platform.final_state("two")
    assert state.status == "succeeded"
    assert state.spec is not None and (state.spec.priority, state.spec.max_attempts) == (2, 1)


async def test_cancel_with_a_body_that_is_not_utf8_is_a_400(
    http: aiohttp.ClientSession, platform: Platform
) -> None:
    async with http.post("/v1/tasks", data=spec("keep", pool="nowhere")) as r:
        assert r.status == 202, await r.text()
    async with http.post("/v1/tasks/keep/cancel", data=b'{"reason": "\xff"}') as r:
        answer = await r.json()
        assert r.status == 400, answer
    assert answer["error"]["field"] == "$" and "not UTF-8" in answer["error"]["message"]
    state = await platform.state("keep")
    assert state is not None and state.status == "queued" and state.cancel_requested_at is None


@pytest.mark.parametrize(("headers", "query", "field"), [
    ({"Last-Event-ID": str(2**64)}, "", "Last-Event-ID"),
    ({"Last-Event-ID": str(LAST_EVENT_ID_MAX + 1)}, "", "Last-Event-ID"),
    ({"Last-Event-ID": ""}, "", "Last-Event-ID"),
    ({"Last-Event-ID": "-1"}, "", "Last-Event-ID"),
    ({"Last-Event-ID": "+1"}, "", "Last-Event-ID"),
    ({"Last-Event-ID": "1.2.3"}, "", "Last-Event-ID"),
    ({"Last-Event-ID": f"1.{LAST_EVENT_ID_MAX + 1}"}, "", "Last-Event-ID"),
    ({}, "?last_event_id=", "last_event_id"),
    ({}, f"?last_event_id={2**64}", "last_event_id"),
    ({"Last-Event-ID": "1"}, "?last_event_id=x", "last_event_id"),
    ({}, "?follow=1", "follow"),
    ({}, "?last_event_id=1&colour=red", "colour"),
], ids=["2^64", "max+1", "empty", "negative", "plus", "three-parts", "output-max+1",
        "query-empty", "query-2^64", "both-query-bad", "unknown", "unknown-after-known"])
async def test_events_refuse_a_bad_resume_point_or_parameter(
    http: aiohttp.ClientSession, platform: Platform, headers: dict[str, str], query: str,
    field: str,
) -> None:
    async with http.post("/v1/tasks", data=spec("ev")) as r:
        assert r.status == 202, await r.text()
    await platform.final_state("ev")
    async with http.get(f"/v1/tasks/ev/events{query}", headers=headers) as r:
        assert r.status == 400, await r.text()
        assert r.content_type == "application/json"
        assert (await r.json())["error"]["field"] == field


async def test_events_resume_after_the_largest_id_is_an_empty_stream_that_ends(
    http: aiohttp.ClientSession, platform: Platform
) -> None:
    async with http.post("/v1/tasks", data=spec("ev-max")) as r:
        assert r.status == 202, await r.text()
    await platform.final_state("ev-max")
    events = await stored_events(platform.js, "ev-max")
    assert events
    for last in (f"{LAST_EVENT_ID_MAX}.{LAST_EVENT_ID_MAX}", "0" * 5 + "1", "1.1"):
        async with http.get("/v1/tasks/ev-max/events", headers={"Last-Event-ID": last}) as r:
            assert r.status == 200
            text = await asyncio.wait_for(r.text(), 10)
        ids = [line[4:] for line in text.splitlines() if line.startswith("id: ")]
        if last.startswith(str(LAST_EVENT_ID_MAX)):
            assert ids == []  # nothing after it, and the stream still ended
        else:
            # Each event sent is past the resume point in one of the two streams (a bare
            # id is one of a gateway from before VIGIL_OUTPUT: the output comes again).
            events, _, output = last.partition(".")
            after = (int(events), int(output or 0))
            positions = [tuple(map(int, i.split("."))) for i in ids]
            assert positions and all(e > after[0] or o > after[1] for e, o in positions)


@pytest.mark.parametrize(("payload", "says", "field"), [
    (b'{"command": ["caf\xe9"]}', "not UTF-8", "$"),
    (b"\xff\xfe", "not UTF-8", "$"),
    (b'{"command": ["a\\u0000b"]}', "regex", "$.command[0]"),
    (b'{"command": ["true"], "env": {"FOO": "\\u0000"}}', "NUL", "$.env.FOO"),
    (b'{"command": ["true"], "not_before": "9999-12-31T23:59:59Z", "queue_timeout_s": 100}',
     "365 days", "$.not_before"),
    (b'{"command": ["true"], "retry": {"non_retryable_exit_codes": [-1]}}', ">= 0",
     "$.retry.non_retryable_exit_codes[0]"),
], ids=["utf8", "utf16", "nul-arg", "nul-env", "not-before", "exit-code"])
async def test_a_raw_submission_that_can_never_run_fails_at_once(
    platform: Platform, payload: bytes, says: str, field: str
) -> None:
    """Recorded as failed (under the rule's id), confessed, terminated on the first
    delivery: never retried, never a crash."""
    await platform.scheduler()
    await platform.auditor()
    ack = await platform.publish_spec(payload, msg_id="raw-bad")
    state = await platform.final_state("raw-bad")
    assert state.status == "failed" and state.attempt == 0
    error = state.error or ""
    assert says in error
    assert ("not valid JSON" if field == "$" else f"(at {field})") in error

    async def confession() -> list[dict[str, Any]]:
        return [c for c in await platform.confessions("invalid_submission")
                if c["data"]["submit_seq"] == ack.seq]

    (confessed,) = await eventually(confession, what="the scheduler's confession")
    assert confessed["task_id"] == "raw-bad" and says in confessed["detail"]
    assert confessed["data"]["field"] == field

    async def settled() -> Any:
        info = await platform.js.consumer_info(subjects.STREAM_SUBMIT,
                                               subjects.CONSUMER_SCHEDULER)
        return info if info.num_ack_pending == 0 and info.num_pending == 0 else None

    info = await eventually(settled, what="the submission to be settled")
    assert info.num_redelivered == 0
    assert [e["kind"] for e in await stored_events(platform.js, "raw-bad")] == [
        "finished", "confession"]  # nothing ran


@pytest.mark.parametrize("path", [
    "/v1/tasks?colour=red", "/v1/tasks/q?colour=red", "/v1/tasks/q/logs?colour=red",
    "/v1/tasks/q/logs?follow=1&colour=red", "/v1/executors?colour=red",
    "/v1/incidents?colour=red", "/v1/incidents/x?colour=red",
])
async def test_every_route_refuses_a_query_parameter_it_does_not_know(
    http: aiohttp.ClientSession, platform: Platform, path: str
) -> None:
    async with http.post("/v1/tasks", data=spec("q")) as r:
        assert r.status == 202, await r.text()
    async with http.get(path) as r:
        answer = await r.json()
        assert r.status == 400, answer
    assert answer["error"]["field"] == "colour"
    assert "unknown query parameter 'colour'" in answer["error"]["message"]
    async with http.post("/v1/tasks/q/cancel?colour=red") as r:
        assert r.status == 400
    state = await platform.state("q")
    assert state is not None and state.cancel_requested_at is None
