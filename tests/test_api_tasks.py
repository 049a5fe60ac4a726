"""The task API beyond submit/get: lists, cancellation end to end, logs, the rate limit.

Real nats-server, real scheduler and executor (the process runtime, and rootless Podman
for the container-stop case), real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support import ExecutorProcess, Platform, eventually
from vigil import auth
from vigil.embedded import PodmanService

pytestmark = pytest.mark.integration

SLEEPER = ["python3", "-c", "import time\nprint('working', flush=True)\ntime.sleep(60)"]


@pytest.fixture
async def api(platform: Platform, tmp_path: Path):
    tokens = tmp_path / "tokens.json"
    keys = {
        "acme": auth.add_token(tokens, "s", "acme", "submitter"),
        "acme_viewer": auth.add_token(tokens, "v", "acme", "viewer"),
        "globex": auth.add_token(tokens, "g", "globex", "operator"),
    }
    await platform.scheduler()
    await platform.executor(stop_grace_s=2.0)
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens))
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gw.http_port}") as http:
        yield http, keys


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def submit(http: aiohttp.ClientSession, token: str, spec: dict[str, Any]) -> str:
    async with http.post("/v1/tasks", json=spec, headers=bearer(token)) as r:
        assert r.status in (200, 202), await r.text()
        return str((await r.json())["id"])


async def get(http: aiohttp.ClientSession, token: str, path: str) -> tuple[int, Any]:
    async with http.get(path, headers=bearer(token)) as r:
        return r.status, await r.json()


async def test_list_filters_pages_and_isolates_tenants(api, platform: Platform) -> None:
    http, keys = api
    ids = []
    for i in range(7):
        ids.append(await submit(http, keys["acme"], {
            "id": f"list-{i}", "command": ["true"] if i % 2 else ["false"],
            "max_attempts": 1,  # one failure is `failed`; spending more would be `dead`
            "labels": {"batch": "b1" if i < 4 else "b2"}}))
    await submit(http, keys["globex"], {"id": "list-globex", "command": ["true"]})
    for task_id in [*ids, "list-globex"]:
        await platform.final_state(task_id)

    async def settled() -> bool:
        status, body = await get(http, keys["acme"], "/v1/tasks?limit=500")
        return status == 200 and all(t["status"] in ("succeeded", "failed")
                                     for t in body["tasks"]) and len(body["tasks"]) == 7
    await eventually(settled, what="the index to show 7 finished tasks")

    # Pages of 3, newest first, no overlap, no gap, ending with a null cursor.
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        path = "/v1/tasks?limit=3" + (f"&cursor={cursor}" if cursor else "")
        status, body = await get(http, keys["acme"], path)
        assert status == 200, body
        seen += [t["id"] for t in body["tasks"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))

    status, body = await get(http, keys["acme"], "/v1/tasks?status=failed&label=batch=b1")
    assert {t["id"] for t in body["tasks"]} == {"list-0", "list-2"}
    status, body = await get(http, keys["acme"], "/v1/tasks?status=succeeded,failed"
                             "&label=batch=b2")
    assert {t["id"] for t in body["tasks"]} == {"list-4", "list-5", "list-6"}
    future = "2999-01-01T00:00:00Z"
    status, body = await get(http, keys["acme"], f"/v1/tasks?created_after={future}")
    assert status == 200 and body == {"tasks": [], "next_cursor": None}
    status, body = await get(http, keys["acme"], f"/v1/tasks?created_before={future}&limit=1")
    assert [t["id"] for t in body["tasks"]] == ["list-6"]

    # Tenant isolation: globex sees only its task, and may not ask for acme's.
    status, body = await get(http, keys["globex"], "/v1/tasks")
    assert [t["id"] for t in body["tasks"]] == ["list-globex"]
    status, body = await get(http, keys["globex"], "/v1/tasks?tenant=acme")
    assert status == 403 and body["error"]["field"] == "tenant"

    # Bad input names the parameter and changes nothing.
    for query, field in [("status=finished", "status"), ("limit=0", "limit"),
                         ("limit=x", "limit"), ("cursor=%%%", "cursor"),
                         ("created_after=yesterday", "created_after"),
                         ("created_after=2026-01-01T00:00:00", "created_after"),
                         ("label=novalue", "label"), ("colour=red", "colour")]:
        status, body = await get(http, keys["acme"], f"/v1/tasks?{query}")
        assert status == 400, (query, body)
        assert body["error"]["field"] == field, (query, body)


async def test_cancel_a_queued_task_never_starts_it(api, platform: Platform) -> None:
    http, keys = api
    # No executor serves this pool, so the task waits in the queue.
    task_id = await submit(http, keys["acme"], {"id": "cq", "command": ["true"],
                                                "pool": "nowhere"})
    await platform.events.wait_for(task_id, "accepted")
    assert (await platform.state(task_id)).status == "queued"  # type: ignore[union-attr]
    async with http.post(f"/v1/tasks/{task_id}/cancel", json={"reason": "changed my mind"},
                         headers=bearer(keys["acme"])) as r:
        assert r.status == 202, await r.text()
        body = await r.json()
    assert body["status"] == "cancelled"
    state = await platform.final_state(task_id)
    assert state.status == "cancelled" and state.attempt == 0
    assert state.error is not None and "changed my mind" in state.error
    finished = await platform.events.wait_for(task_id, "finished")
    assert finished[0]["status"] == "cancelled"
    assert platform.events.of(task_id, "started") == []
    # Cancelling again is harmless; a viewer may not; another tenant sees no such task.
    async with http.post(f"/v1/tasks/{task_id}/cancel", headers=bearer(keys["acme"])) as r:
        assert r.status == 200
    async with http.post(f"/v1/tasks/{task_id}/cancel",
                         headers=bearer(keys["acme_viewer"])) as r:
        assert r.status == 403
    async with http.post(f"/v1/tasks/{task_id}/cancel", headers=bearer(keys["globex"])) as r:
        assert r.status == 404


async def test_cancel_a_running_task_stops_it(api, platform: Platform) -> None:
    http, keys = api
    task_id = await submit(http, keys["acme"], {"id": "cr", "command": SLEEPER})
    await platform.events.wait_for(task_id, "log")
    t0 = time.monotonic()
    async with http.post(f"/v1/tasks/{task_id}/cancel", headers=bearer(keys["acme"])) as r:
        assert r.status == 202, await r.text()
        body = await r.json()
    assert body["status"] in ("running", "cancelled")
    assert body["cancel_requested_at"] is not None
    state = await platform.final_state(task_id, timeout=20)
    took = time.monotonic() - t0
    assert state.status == "cancelled", state
    assert state.history[-1].outcome == "cancelled"
    assert took < 10, f"cancel took {took:.1f}s"
    kinds = [e["kind"] for e in platform.events.of(task_id)]
    assert "cancelling" in kinds and kinds[-1] == "finished"
    # A finished task cannot be cancelled: a clear 409.
    done = await submit(http, keys["acme"], {"id": "cdone", "command": ["true"]})
    await platform.final_state(done)
    async with http.post(f"/v1/tasks/{done}/cancel", headers=bearer(keys["acme"])) as r:
        assert r.status == 409
        assert (await r.json())["error"]["code"] == "finished"
    async with http.post(f"/v1/tasks/{task_id}/cancel", data=b'{"why": 1}',
                         headers=bearer(keys["acme"])) as r:
        assert r.status == 422
        assert (await r.json())["error"]["field"] == "$.why"


async def test_cancel_while_its_executor_is_gone(platform: Platform, tmp_path: Path) -> None:
    """The cancel mark outlives the executor: the redelivered task is finished as
    cancelled by the next executor, without running again."""
    await platform.scheduler()
    doomed = ExecutorProcess(tmp_path, platform.url, "doomed", runtime="process",
                             unsafe_runtime="true", ack_wait_s=3, heartbeat_s=0.5).start()
    try:
        await doomed.ready()
        short = ["python3", "-c", "import time\nprint('working', flush=True)\ntime.sleep(15)"]
        await platform.publish_spec({"id": "cgone", "command": short})
        await platform.events.wait_for("cgone", "log")
        doomed.kill()
    finally:
        doomed.kill()
    await platform.js.publish("vigil.control.cancel.acme", json.dumps(
        {"task_id": "cgone", "reason": "node lost"}).encode())
    await platform.events.wait_for("cgone", "cancelling")
    await platform.executor(node_id="survivor", ack_wait_s=3.0)
    state = await platform.final_state("cgone", timeout=30)
    assert state.status == "cancelled"
    assert state.error is not None and "node lost" in state.error
    assert [e["executor"] for e in platform.events.of("cgone", "started")] == ["doomed"]
    assert state.history[-1].outcome == "lost"


async def test_logs_plain_and_followed(api, platform: Platform) -> None:
    http, keys = api
    script = ("import sys, time\nfor i in range(5):\n    print(f'line {i}', flush=True)\n"
              "    print(f'err {i}', file=sys.stderr, flush=True)\n    time.sleep(0.1)")
    task_id = await submit(http, keys["acme"], {"id": "logs", "command": ["python3", "-c",
                                                                          script]})
    # Followed from the start: every line, then the answer ends by itself.
    async with http.get(f"/v1/tasks/{task_id}/logs?follow=1&stream=stdout",
                        headers=bearer(keys["acme"])) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await asyncio.wait_for(r.text(), 30)
    assert text.splitlines() == [f"line {i}" for i in range(5)]
    async with http.get(f"/v1/tasks/{task_id}/logs", headers=bearer(keys["acme"])) as r:
        both = (await asyncio.wait_for(r.text(), 10)).splitlines()
    assert sorted(both) == sorted([f"line {i}" for i in range(5)] +
                                  [f"err {i}" for i in range(5)])
    async with http.get(f"/v1/tasks/{task_id}/logs?stream=stdin",
                        headers=bearer(keys["acme"])) as r:
        assert r.status == 400
    async with http.get(f"/v1/tasks/{task_id}/logs", headers=bearer(keys["globex"])) as r:
        assert r.status == 404


async def test_rate_limit_answers_429_with_retry_after(platform: Platform, tmp_path: Path
                                                       ) -> None:
    tokens = tmp_path / "tokens.json"
    token = auth.add_token(tokens, "s", "acme", "viewer")
    other = auth.add_token(tokens, "o", "acme", "viewer")
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens), rate_limit_rps=1.0,
                                rate_limit_burst=5)
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gw.http_port}") as http:
        statuses = []
        for _ in range(8):
            async with http.get("/v1/tasks", headers=bearer(token)) as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert int(r.headers["Retry-After"]) >= 1
                    assert (await r.json())["error"]["code"] == "rate_limited"
        assert statuses[:5] == [200] * 5 and 429 in statuses[5:]
        # The limit is per token: another token is unaffected.
        async with http.get("/v1/tasks", headers=bearer(other)) as r:
            assert r.status == 200


async def test_tokens_from_env_json(platform: Platform) -> None:
    token = auth.new_token()
    entry = {"name": "env", "tenant": "acme", "role": "viewer", "sha256": auth.digest(token)}
    gw = await platform.gateway(auth="tokens", tokens=json.dumps({"tokens": [entry]}))
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gw.http_port}") as http:
        async with http.get("/v1/tasks", headers=bearer(token)) as r:
            assert r.status == 200
        async with http.get("/v1/tasks", headers=bearer(token + "x")) as r:
            assert r.status == 401


@pytest.mark.podman
async def test_cancel_stops_a_real_container(platform: Platform, podman: PodmanService,
                                             agent_image: str) -> None:
    await platform.scheduler()
    await platform.executor(runtime="podman", unsafe_runtime=False, podman_url=podman.url,
                            stop_grace_s=2.0)
    # The agent ignores SIGTERM: only the kill after the grace period ends it.
    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('up', flush=True)\ntime.sleep(120)")
    await platform.publish_spec({"id": "cpod", "command": ["python3", "-c", stubborn]})
    await platform.events.wait_for("cpod", "log", timeout=60)
    t0 = time.monotonic()
    await platform.js.publish("vigil.control.cancel.acme", b'{"task_id": "cpod"}')
    state = await platform.final_state("cpod", timeout=30)
    assert state.status == "cancelled"
    took = time.monotonic() - t0
    assert 1.5 < took < 15, f"grace 2 s then kill, took {took:.1f}s"
