"""Unit tests of the SDK's own logic (retries, paging, resuming a log, timeouts) against a
scripted HTTP server: the failures it needs (a 429 at the right moment, a stream cut in
the middle of a line) cannot be ordered from a real gateway. The real gateway is in
tests/test_cli.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web

from vigil.client import Client, GatewayError, WaitTimeout, _retry_after
from vigil.errors import VigilError

pytestmark = pytest.mark.unit

NOW = "2026-05-01T12:00:00Z"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def state(task_id: str, status: str) -> dict[str, Any]:
    return {"id": task_id, "tenant": "acme", "status": status, "attempt": 1,
            "created_at": NOW, "updated_at": NOW}


def err(status: int, code: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": f"{code} here"}},
                             status=status, headers=headers)


class Fake:
    """A scripted gateway: ``routes`` maps "METHOD path" to a handler; requests are kept."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.seen: list[web.Request] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request)
        handler = self.routes.get(f"{request.method} {request.path}")
        if handler is None:
            return err(404, "not_found")
        return await handler(request)

    def calls(self, key: str) -> list[web.Request]:
        return [r for r in self.seen if f"{r.method} {r.path}" == key]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[Fake, Client]]:
    f = Fake()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", f.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with Client(f"http://127.0.0.1:{port}", "vgl_test", timeout_s=5) as client:
        yield f, client
    await runner.cleanup()


def page(ids: list[str], cursor: str | None) -> web.Response:
    return web.json_response({"tasks": [{**state(i, "succeeded")} for i in ids],
                              "next_cursor": cursor})


async def test_reads_retry_429_and_503_as_retry_after_says(fake: tuple[Fake, Client]) -> None:
    f, client = fake
    answers = [err(429, "rate_limited", {"Retry-After": "0"}),
               err(503, "unavailable", {"Retry-After": "0"})]

    async def tasks(_: web.Request) -> web.Response:
        return answers.pop(0) if answers else page(["t1"], None)

    f.routes["GET /v1/tasks"] = tasks
    got = await client.list_tasks(status=["failed", "dead"], labels={"a": "1", "b": "2"},
                                  created_after=datetime(2026, 5, 1, 10), limit=10)
    assert [t.id for t in got.tasks] == ["t1"] and got.next_cursor is None
    assert len(f.calls("GET /v1/tasks")) == 3
    query = f.seen[-1].query
    assert query.getall("status") == ["failed,dead"]
    assert query.getall("label") == ["a=1", "b=2"]
    assert query["created_after"] == "2026-05-01T10:00:00Z"  # naive means UTC
    assert query["limit"] == "10" and "Bearer vgl_test" in f.seen[-1].headers["Authorization"]


async def test_retries_are_bounded_and_long_waits_are_not_waited(
        fake: tuple[Fake, Client]) -> None:
    f, client = fake

    async def busy(_: web.Request) -> web.Response:
        return err(503, "unavailable", {"Retry-After": "0"})

    async def slow(_: web.Request) -> web.Response:
        return err(429, "rate_limited", {"Retry-After": "120"})

    f.routes["GET /v1/tasks/t1"] = busy
    with pytest.raises(GatewayError) as exc:
        await client.get("t1")
    assert exc.value.status == 503 and exc.value.retryable
    assert len(f.calls("GET /v1/tasks/t1")) == 4  # the call and 3 retries
    f.routes["GET /v1/tasks/t2"] = slow
    with pytest.raises(GatewayError) as exc:
        await client.get("t2")
    assert exc.value.code == "rate_limited" and exc.value.retry_after == 120
    assert len(f.calls("GET /v1/tasks/t2")) == 1


async def test_submit_is_retried_only_with_an_idempotency_key(fake: tuple[Fake, Client]) -> None:
    f, client = fake
    refusals = 2

    async def submit(request: web.Request) -> web.Response:
        nonlocal refusals
        if refusals:
            refusals -= 1
            return err(429, "rate_limited", {"Retry-After": "0"})
        return web.json_response({"id": "t1", "status": "queued"}, status=202)

    f.routes["POST /v1/tasks"] = submit
    with pytest.raises(GatewayError, match="HTTP 429"):
        await client.submit({"command": ["true"]})
    accepted = await client.submit({"command": ["true"]}, idempotency_key="k1")
    assert accepted["id"] == "t1"
    assert [r.headers.get("Idempotency-Key") for r in f.calls("POST /v1/tasks")] == [
        None, "k1", "k1"]


async def test_iter_tasks_follows_cursors(fake: tuple[Fake, Client]) -> None:
    f, client = fake
    pages = {"": page(["t5", "t4"], "c1"), "c1": page(["t3", "t2"], "c2"),
             "c2": page(["t1"], None)}

    async def tasks(request: web.Request) -> web.Response:
        return pages[request.query.get("cursor", "")]

    f.routes["GET /v1/tasks"] = tasks
    ids = [t.id async for t in client.iter_tasks(status="succeeded", page_size=2)]
    assert ids == ["t5", "t4", "t3", "t2", "t1"]
    assert [r.query.get("limit") for r in f.calls("GET /v1/tasks")] == ["2"] * 3


async def test_cancel_decodes_answers_and_the_finished_conflict(
        fake: tuple[Fake, Client]) -> None:
    f, client = fake

    async def cancel(request: web.Request) -> web.Response:
        body = await request.json() if await request.read() else {}
        task_id = request.path.split("/")[3]
        if task_id == "done":
            return err(409, "finished")
        return web.json_response(
            {"id": task_id, "status": "running", "cancel_requested_at": NOW,
             "links": {k: f"/v1/tasks/{task_id}/{k}" for k in ("self", "events", "logs",
                                                                  "cancel")},
             "note": body.get("reason")}, status=202)

    f.routes["POST /v1/tasks/t1/cancel"] = cancel
    f.routes["POST /v1/tasks/done/cancel"] = cancel
    answer = await client.cancel("t1", reason="wrong data")
    assert answer.status == "running" and answer.note == "wrong data"
    assert answer.cancel_requested_at == datetime(2026, 5, 1, 12, tzinfo=UTC)
    with pytest.raises(GatewayError) as exc:
        await client.cancel("done")
    assert (exc.value.status, exc.value.code) == (409, "finished")
    assert "finished here" in str(exc.value)


async def test_followed_log_resumes_without_repeating_lines(fake: tuple[Fake, Client]) -> None:
    f, client = fake
    lines = [f"line {i}" for i in range(1, 7)]
    connections = 0

    async def logs(request: web.Request) -> web.StreamResponse:
        nonlocal connections
        connections += 1
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        if connections == 1:
            # Three whole lines and half of the fourth, then the connection dies.
            await response.write("\n".join(lines[:3]).encode() + b"\nline")
            assert request.transport is not None
            request.transport.close()
            return response
        if connections == 2:
            # A clean end while the task still runs (e.g. the gateway restarting).
            await response.write("".join(f"{x}\n" for x in lines[:4]).encode())
            await response.write_eof()
            return response
        await response.write("".join(f"{x}\n" for x in lines).encode())
        await response.write_eof()
        return response

    statuses = ["running", "succeeded"]

    async def get(_: web.Request) -> web.Response:
        return web.json_response(state("t1", statuses.pop(0)))

    f.routes["GET /v1/tasks/t1/logs"] = logs
    f.routes["GET /v1/tasks/t1"] = get
    got = [line async for line in client.logs("t1", follow=True, stream="stdout")]
    assert got == lines
    assert connections == 3
    assert all(r.query["follow"] == "1" and r.query["stream"] == "stdout"
               for r in f.calls("GET /v1/tasks/t1/logs"))


async def test_plain_log_and_long_lines(fake: tuple[Fake, Client]) -> None:
    f, client = fake
    long = "x" * 300_000  # longer than aiohttp's readline limit

    async def logs(_: web.Request) -> web.Response:
        return web.Response(text=f"a\r\n{long}\nno newline at the end")

    f.routes["GET /v1/tasks/t1/logs"] = logs
    got = [line async for line in client.logs("t1")]
    assert got == ["a", long, "no newline at the end"]


async def test_wait_times_out_with_the_last_state(fake: tuple[Fake, Client]) -> None:
    f, client = fake
    never = asyncio.Event()

    async def get(_: web.Request) -> web.Response:
        return web.json_response(state("t1", "running"))

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": hello\n\n")
        await never.wait()
        return response

    f.routes["GET /v1/tasks/t1"] = get
    f.routes["GET /v1/tasks/t1/events"] = events
    try:
        with pytest.raises(WaitTimeout) as exc:
            await client.wait("t1", timeout_s=0.3)
    finally:
        never.set()
    assert isinstance(exc.value, TimeoutError) and isinstance(exc.value, VigilError)
    assert exc.value.state is not None and exc.value.state.status == "running"
    assert "still running" in str(exc.value) and "vigil cancel t1" in str(exc.value)


async def test_wait_returns_at_once_for_a_finished_task(fake: tuple[Fake, Client]) -> None:
    f, client = fake

    async def get(_: web.Request) -> web.Response:
        return web.json_response(state("t1", "failed"))

    f.routes["GET /v1/tasks/t1"] = get
    assert (await client.wait("t1", timeout_s=5)).status == "failed"
    assert not f.calls("GET /v1/tasks/t1/events")


async def test_unreachable_gateway_fails_fast() -> None:
    async with Client("http://127.0.0.1:9", timeout_s=5) as client:
        with pytest.raises(VigilError, match="cannot reach the gateway") as exc:
            await client.get("t1")
        assert exc.value.retryable
        with pytest.raises(VigilError, match="cannot reach the gateway"):
            [line async for line in client.logs("t1", follow=True)]


def test_retry_after_forms() -> None:
    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    later = datetime.now(UTC) + timedelta(seconds=30)
    got = _retry_after(format_datetime(later, usegmt=True))
    assert got is not None and 25 <= got <= 31
