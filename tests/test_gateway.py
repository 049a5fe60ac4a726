"""The gateway's HTTP API against real NATS and a real scheduler/executor."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support import Platform, eventually
from vigil import auth, subjects
from vigil.client import Client

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(platform: Platform, tmp_path: Path):
    tokens = tmp_path / "tokens.json"
    keys = {
        "submitter": auth.add_token(tokens, "s", "acme", "submitter"),
        "viewer": auth.add_token(tokens, "v", "acme", "viewer"),
        "other": auth.add_token(tokens, "o", "globex", "operator"),
    }
    await platform.scheduler()
    await platform.executor()
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens), max_body_bytes=4096)
    url = f"http://127.0.0.1:{gw.http_port}"
    async with aiohttp.ClientSession() as http:
        yield url, keys, http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_submit_get_and_follow_events(api) -> None:
    url, keys, _ = api
    async with Client(url, keys["submitter"]) as client:
        accepted = await client.submit({"command": ["sh", "-c", "echo hello; echo bye"]})
        assert accepted["status"] in ("queued", "scheduled", "running", "succeeded")
        kinds, lines = [], []
        async for ev in client.events(accepted["id"]):
            kinds.append(ev.kind)
            lines += ev.data.get("lines", [])
        state = await client.get(accepted["id"])
    assert state.status == "succeeded"
    assert kinds[0] == "accepted" and kinds[-1] == "finished"
    assert lines == ["hello", "bye"]


async def test_wait_and_events_take_an_event_larger_than_a_line_limit(
    platform: Platform,
) -> None:
    """A log batch of long lines (the longest lines an executor may keep, 64 KiB; a
    control character is six bytes in JSON) is one SSE data line of over 700 KiB.
    aiohttp's readline refuses a line over its buffer's high-water mark (512 KiB with
    its default buffer), which ended the SDK's event stream with an error, and so
    ``client.wait()`` and ``vigil submit --wait``."""
    await platform.scheduler()
    await platform.executor(max_line_bytes=65_536)
    gw = await platform.gateway()
    program = ("import sys\nfor i in range(2):\n"
               "    sys.stdout.write(chr(1) * 65000 + str(i) + chr(10))\n")
    async with Client(f"http://127.0.0.1:{gw.http_port}") as client:
        accepted = await client.submit({"command": [sys.executable, "-c", program]})
        events = [ev async for ev in client.events(accepted["id"])]
        state = await client.wait(accepted["id"], timeout_s=60)
    lines = [line for ev in events for line in ev.data.get("lines", [])]
    biggest = max(len(json.dumps(ev.data)) for ev in events)
    assert state.status == "succeeded", state.error
    assert lines == ["\x01" * 65000 + str(i) for i in range(2)]
    assert biggest > 2 * 262_144  # one event's data was over the line limit


async def test_idempotency_key_returns_the_same_task(api) -> None:
    url, keys, http = api
    body = json.dumps({"command": ["true"]})
    headers = {**bearer(keys["submitter"]), "Idempotency-Key": "order-42"}
    async with http.post(f"{url}/v1/tasks", data=body, headers=headers) as r1:
        assert r1.status == 202
        first = await r1.json()
    async with http.post(f"{url}/v1/tasks", data=body, headers=headers) as r2:
        assert r2.status == 200
        second = await r2.json()
    assert first["id"] == second["id"]
    # Concurrent duplicates converge on one task too.
    headers["Idempotency-Key"] = "order-43"

    async def post() -> str:
        async with http.post(f"{url}/v1/tasks", data=body, headers=headers) as r:
            assert r.status in (200, 202), await r.text()
            return (await r.json())["id"]

    ids = await asyncio.gather(*[post() for _ in range(5)])
    assert len(set(ids)) == 1


async def test_an_idempotency_key_reused_with_another_body_is_a_409(api) -> None:
    url, keys, http = api
    headers = {**bearer(keys["submitter"]), "Idempotency-Key": "order-77"}
    async with http.post(f"{url}/v1/tasks", data=b'{"command": ["true"]}',
                         headers=headers) as r:
        assert r.status == 202
        first = (await r.json())["id"]
    # Another body under the same key: the client's bug is named, nothing new runs.
    async with http.post(f"{url}/v1/tasks", data=b'{"command": ["false"]}',
                         headers=headers) as r:
        assert r.status == 409
        body = await r.json()
    assert body["error"]["code"] == "idempotency_key_reused"
    assert body["error"]["field"] == "Idempotency-Key" and first in body["error"]["message"]
    # The same body again (whitespace and key order do not matter) is the same task.
    async with http.post(f"{url}/v1/tasks", data=b'{ "command" : [ "true" ] }',
                         headers=headers) as r:
        assert r.status == 200 and (await r.json())["id"] == first
    # Another tenant's same key is its own task, whatever its body.
    other = {**bearer(keys["other"]), "Idempotency-Key": "order-77"}
    async with http.post(f"{url}/v1/tasks", data=b'{"command": ["false"]}',
                         headers=other) as r:
        assert r.status == 202 and (await r.json())["id"] != first


async def test_ids_of_the_platforms_shape_are_refused(api) -> None:
    url, keys, http = api
    for task_id in ("s12", "t_" + "b" * 26, "k_" + "c" * 26):
        body = json.dumps({"command": ["true"], "id": task_id})
        async with http.post(f"{url}/v1/tasks", data=body,
                             headers=bearer(keys["submitter"])) as r:
            assert r.status == 422, task_id
            error = (await r.json())["error"]
        assert error["field"] == "$.id" and "platform makes" in error["message"]
    # Near misses are ordinary ids.
    for task_id in ("s12x", "t_short", "S12"):
        body = json.dumps({"command": ["true"], "id": task_id})
        async with http.post(f"{url}/v1/tasks", data=body,
                             headers=bearer(keys["submitter"])) as r:
            assert r.status == 202, task_id


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{oops", 400, "$"),
        (b'{"image": "x"}', 422, "$.command"),
        (b'{"command": "echo hi"}', 422, "$.command"),
        (b'{"command": [""]}', 422, "$.command[0]"),
        (b'{"command": ["true"], "timeout_s": -1}', 422, "$.timeout_s"),
        (b'{"command": ["true"], "max_attempts": 0}', 422, "$.max_attempts"),
        (b'{"command": ["true"], "id": "no spaces"}', 422, "$.id"),
        (b'{"command": ["true"], "timeout": 5}', 422, "$.timeout"),  # typo of timeout_s
        (b'{"command": ["true"], "env": {"1BAD": "x"}}', 422, "$.env"),
    ],
)
async def test_invalid_bodies_name_the_field_and_change_nothing(
    api, platform: Platform, body, status, field
) -> None:
    url, keys, http = api
    before = (await platform.js.stream_info(subjects.STREAM_SUBMIT)).state.messages
    async with http.post(f"{url}/v1/tasks", data=body, headers=bearer(keys["submitter"])) as r:
        assert r.status == status
        err = (await r.json())["error"]
    assert err["field"] == field
    assert err["message"]
    # Nothing was submitted: the stream every submission goes through did not grow.
    assert (await platform.js.stream_info(subjects.STREAM_SUBMIT)).state.messages == before
    # ... and the services keep serving: a good task runs.
    async with Client(url, keys["submitter"]) as client:
        accepted = await client.submit({"command": ["true"]})
        assert (await client.wait(accepted["id"])).status == "succeeded"


async def test_refused_task_id_may_be_submitted_again(api, platform: Platform) -> None:
    """The scheduler's rule over HTTP too: an id refused at admission is free for a fixed
    submission; a task that ran keeps its id; a rejected body spends no Idempotency-Key."""
    url, keys, http = api
    headers = bearer(keys["submitter"])
    # Refused by the scheduler (a raw NATS client's invalid spec) ...
    await platform.publish_spec({"id": "fix-me", "image": "x"})
    assert (await platform.final_state("fix-me")).status == "failed"
    # ... then submitted again, fixed, over HTTP: it runs under that id.
    body = {"id": "fix-me", "command": ["sh", "-c", "echo fixed"]}
    async with http.post(f"{url}/v1/tasks", json=body, headers=headers) as r:
        assert r.status == 202, await r.text()
        assert (await r.json())["id"] == "fix-me"
    async with Client(url, keys["submitter"]) as client:
        async def ran() -> Any:
            state = await client.get("fix-me")
            return state if state.status == "succeeded" else None

        state = await eventually(ran, timeout=30, what="the fixed task to succeed")
    assert state.attempt == 1
    async with http.post(f"{url}/v1/tasks", json=body, headers=headers) as r:
        assert r.status == 409  # it ran: the id is taken now
    # An invalid body with an Idempotency-Key is refused before anything is recorded, so
    # the fixed body under the same key is a new task, and the same again is that task.
    keyed = {**headers, "Idempotency-Key": "fix-42"}
    async with http.post(f"{url}/v1/tasks", json={"image": "x"}, headers=keyed) as r:
        assert r.status == 422
    async with http.post(f"{url}/v1/tasks", json={"command": ["true"]}, headers=keyed) as r:
        assert r.status == 202, await r.text()
        task_id = (await r.json())["id"]
    async with http.post(f"{url}/v1/tasks", json={"command": ["true"]}, headers=keyed) as r:
        assert r.status == 200 and (await r.json())["id"] == task_id


async def test_unknown_field_message_names_it(api) -> None:
    url, keys, http = api
    async with http.post(f"{url}/v1/tasks", data=b'{"command": ["true"], "timeout": 5}',
                         headers=bearer(keys["submitter"])) as r:
        err = (await r.json())["error"]
    assert "timeout" in err["message"]


async def test_auth_and_tenant_isolation(api) -> None:
    url, keys, http = api
    body = b'{"command": ["true"]}'
    async with http.post(f"{url}/v1/tasks", data=body) as r:
        assert r.status == 401
    async with http.post(f"{url}/v1/tasks", data=body, headers=bearer("vgl_wrong")) as r:
        assert r.status == 401
    async with http.post(f"{url}/v1/tasks", data=body, headers=bearer(keys["viewer"])) as r:
        assert r.status == 403
    async with http.post(f"{url}/v1/tasks", data=body, headers=bearer(keys["submitter"])) as r:
        task_id = (await r.json())["id"]
    async with http.get(f"{url}/v1/tasks/{task_id}", headers=bearer(keys["viewer"])) as r:
        assert r.status == 200
    async with http.get(f"{url}/v1/tasks/{task_id}", headers=bearer(keys["other"])) as r:
        assert r.status == 404  # another tenant's task looks like no task
    async with http.get(f"{url}/v1/tasks/{task_id}/events", headers=bearer(keys["other"])) as r:
        assert r.status == 404
    async with http.get(f"{url}/healthz") as r:
        assert r.status == 200


async def test_body_limit_and_unknown_task(api) -> None:
    url, keys, http = api
    big = json.dumps({"command": ["echo", "x" * 10_000]})
    async with http.post(f"{url}/v1/tasks", data=big, headers=bearer(keys["submitter"])) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "body_too_large"
    async with http.get(f"{url}/v1/tasks/nope", headers=bearer(keys["viewer"])) as r:
        assert r.status == 404
    async with http.get(f"{url}/v1/tasks/bad%20id", headers=bearer(keys["viewer"])) as r:
        assert r.status == 404


async def test_explicit_id_conflict_is_409(api) -> None:
    url, keys, http = api
    body = b'{"command": ["true"], "id": "fixed-1"}'
    async with http.post(f"{url}/v1/tasks", data=body, headers=bearer(keys["submitter"])) as r:
        assert r.status == 202
    async with http.post(f"{url}/v1/tasks", data=body, headers=bearer(keys["submitter"])) as r:
        assert r.status == 409
        assert (await r.json())["error"]["field"] == "$.id"
    # Ids are per tenant: another tenant's "fixed-1" is its own task, and nothing it is
    # told says that one exists elsewhere.
    async with http.post(f"{url}/v1/tasks", data=body, headers=bearer(keys["other"])) as r:
        assert r.status == 202
        assert (await r.json())["tenant"] == "globex"
    async with http.get(f"{url}/v1/tasks/fixed-1", headers=bearer(keys["submitter"])) as r:
        assert (await r.json())["tenant"] == "acme"


async def test_sse_resumes_after_last_event_id(api) -> None:
    url, keys, _ = api
    async with Client(url, keys["submitter"]) as client:
        accepted = await client.submit({"command": ["sh", "-c", "for i in 1 2 3; do echo $i; "
                                                    "sleep 0.1; done"]})
        first = []
        async for ev in client.events(accepted["id"]):
            first.append(ev)
            if ev.kind == "started":
                break
        rest = [ev async for ev in client.events(accepted["id"], last_event_id=first[-1].id)]
        everything = [ev async for ev in client.events(accepted["id"])]
    # An id is the position in both streams (lifecycle, output): each part only grows,
    # and resuming after one gives exactly the events not seen yet (the two streams'
    # events interleave as they arrive, so the order across them may differ).
    positions = [tuple(map(int, e.id.split("."))) for e in first + rest]
    for part in (0, 1):
        assert [p[part] for p in positions] == sorted(p[part] for p in positions)
    assert len(positions) == len(set(positions))
    assert sorted(e.id for e in everything) == sorted(e.id for e in first + rest)
    assert {e.kind for e in everything} >= {"accepted", "started", "log", "finished"}


async def test_task_view_shows_its_confessions(api) -> None:
    url, keys, _ = api
    line = '::vigil::confess {"summary": "npm registry unreachable", "severity": "error"}'
    async with Client(url, keys["submitter"]) as client:
        accepted = await client.submit({"command": ["sh", "-c", f"echo '{line}'"]})
        await client.wait(accepted["id"])
        confessions = await client.confessions(accepted["id"])
    assert [(c["source"], c["summary"]) for c in confessions] == [
        ("agent", "npm registry unreachable")]


async def test_metrics_exposed(api) -> None:
    url, _, http = api
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    assert "vigil_http_requests_total" in text


async def test_a_stream_handler_that_is_cancelled_ends_cancelled(platform: Platform) -> None:
    """The SSE and log handlers used to swallow CancelledError: a server shutting down
    (which cancels its handlers) saw them return as if finished. The request is aiohttp's
    test request (its socket side is a stand-in); NATS, the store and the task are real."""
    from aiohttp.test_utils import make_mocked_request

    from vigil_gateway.events import Position, stream_events
    from vigil_gateway.logs import stream_logs

    await platform.scheduler()
    gw = await platform.gateway()
    await platform.publish_spec({"id": "waits", "command": ["true"]})  # no executor: queued
    state = await eventually(lambda: platform.state("waits", "acme"), what="task stored")
    streams = {
        "events": lambda req: stream_events(req, gw.js, gw.store, state, Position(), 0.2,
                                            asyncio.Event()),
        "logs": lambda req: stream_logs(req, gw.js, gw.store, state, follow=True, only=None,
                                        tick_s=0.2, stopping=asyncio.Event()),
    }
    for name, stream in streams.items():
        request = make_mocked_request("GET", f"/v1/tasks/waits/{name}")
        handler = asyncio.create_task(stream(request))
        # Following: the answer's head is written, and the handler waits for more.
        async def answering(writer: Any = request.writer) -> bool | None:
            return writer.write_headers.called or None

        await eventually(answering, what=f"the {name} answer to start")
        assert not handler.done()
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        assert handler.cancelled(), name
