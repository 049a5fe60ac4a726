"""Confessions become incidents: one per problem, counted once, alerted once, replayable."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from nats.js.errors import NoKeysError

from support import Platform, eventually
from vigil import subjects
from vigil_auditor.notify import verify

pytestmark = pytest.mark.integration
SECRET = "test-secret"


async def incidents(platform: Platform) -> dict[str, dict[str, Any]]:
    kv = await platform.js.key_value(subjects.KV_INCIDENTS)
    try:
        keys = await kv.keys()
    except Exception:  # nats-py raises NoKeysError on an empty bucket
        return {}
    out = {}
    for key in keys:
        out[key] = json.loads((await kv.get(key)).value)
    return out


def confessing(task_id: str, problem: str) -> dict:
    line = json.dumps({"summary": problem, "severity": "error", "category": "tooling"})
    return {"id": task_id, "command": ["sh", "-c", f"echo '::vigil::confess {line}'"]}


async def test_fifty_tasks_with_the_same_problem_make_one_incident(platform: Platform) -> None:
    await platform.scheduler()
    await platform.executor(slots=8)
    await platform.auditor()
    for i in range(50):
        await platform.publish_spec(confessing(
            f"same-{i}", f"git not found in same-{i} after {i + 3} retries at /work/{i}/repo"))
    for i in range(2):
        await platform.publish_spec(confessing(f"other-{i}", f"quota exceeded for bucket {i}"))

    async def counted() -> dict | None:
        found = await incidents(platform)
        counts = sorted(i["count"] for i in found.values() if i["source"] == "agent")
        return found if counts == [2, 50] else None

    found = await eventually(counted, timeout=60, what="two incidents with 50 and 2")
    big = next(i for i in found.values() if i["count"] == 50)
    assert big["title"] == "git not found in <task> after <n> retries at <path>"
    assert big["tasks_total"] == 50 and big["tenants"] == ["acme"]
    assert big["severity"] == "critical"  # 50 errors within the window escalate


async def test_webhook_gets_each_alert_once_signed_and_failures_are_recorded(
    platform: Platform, unused_tcp_port_factory: Any
) -> None:
    received: list[tuple[str, dict]] = []
    fail_next = {"count": 0}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        assert verify(SECRET, request.headers["X-Vigil-Signature"], body)
        if fail_next["count"] > 0:
            fail_next["count"] -= 1
            return web.Response(status=503)
        received.append((request.headers["X-Vigil-Alert-Id"], json.loads(body)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = unused_tcp_port_factory()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    down = f"http://127.0.0.1:{unused_tcp_port_factory()}/nobody-home"
    try:
        await platform.auditor(webhook_urls=f"http://127.0.0.1:{port}/hook,{down}",
                               webhook_secret=SECRET, webhook_max_attempts=3)
        fail_next["count"] = 1  # the first delivery fails: it must be retried
        confession = {"summary": "disk full on /data", "severity": "critical",
                      "category": "disk"}
        for n in range(3):
            await platform.js.publish("vigil.issues.human.critical",
                                      json.dumps({**confession, "id": f"h{n}"}).encode())
        await eventually(lambda: _some(received), timeout=30, what="the alert")
        deliveries = await platform.js.key_value(subjects.KV_DELIVERIES)

        async def failed_recorded() -> bool:
            try:
                keys = await deliveries.keys()
            except NoKeysError:  # nothing recorded yet (nats-py raises on an empty bucket)
                return False
            values = [json.loads((await deliveries.get(k)).value) for k in keys]
            return any(v["status"] == "failed" and v["attempts"] == 3 for v in values)

        # The receiver that is down: retried with backoff (1 s, 2 s), then recorded.
        await eventually(failed_recorded, timeout=30, what="the failed delivery record")
    finally:
        await runner.cleanup()
    ids = [alert_id for alert_id, _ in received]
    assert len(ids) == len(set(ids))  # each alert once, even though the first try failed
    human = [body for _, body in received if body["source"] == "human"]
    assert len(human) == 1  # three confessions, one incident, one alert
    assert human[0]["severity"] == "critical" and human[0]["reason"] == "opened"
    assert human[0]["count"] >= 1
    # The failure to reach the other receiver is itself confessed (and triaged).
    found = await incidents(platform)
    assert any(i["source"] == "auditor" and i["category"] == "webhook_failed"
               for i in found.values())


async def _some(items: list) -> bool:
    return bool(items)


async def test_auditor_killed_and_stream_replayed_rebuild_identical_incidents(
    platform: Platform,
) -> None:
    for n in range(40):
        problem = ["tool missing", "token expired", "loop detected"][n % 3]
        body = {"summary": f"{problem} in job {n}", "severity": "warning", "id": f"r{n}",
                "task_id": f"job{n}", "tenant": "acme"}
        await platform.js.publish("vigil.issues.agent.warning", json.dumps(body).encode())
    auditor = await platform.auditor()
    # Kill it mid-stream (cancel the service task: no graceful shutdown), start another.
    await eventually(lambda: _any_incident(platform), timeout=30, what="some progress")
    platform.tasks[-1].cancel()
    await asyncio.gather(platform.tasks[-1], return_exceptions=True)
    del auditor
    await platform.auditor()

    async def all_counted() -> dict | None:
        found = await incidents(platform)
        return found if sum(i["count"] for i in found.values()) == 40 else None

    before = await eventually(all_counted, timeout=60, what="all 40 counted once")
    assert sorted(i["count"] for i in before.values()) == [13, 13, 14]

    # Replay: forget every incident and the auditor's position, consume from the start.
    await platform.services[-1].shutdown()
    await asyncio.gather(platform.tasks[-1], return_exceptions=True)
    await platform.js.delete_key_value(subjects.KV_INCIDENTS)
    await platform.js.delete_consumer(subjects.STREAM_ISSUES, subjects.CONSUMER_AUDITOR)
    await platform.auditor()
    after = await eventually(all_counted, timeout=60, what="the replay")
    assert after == before


async def _any_incident(platform: Platform) -> bool:
    return bool(await incidents(platform))


async def test_incident_api_isolates_tenants_and_drives_the_lifecycle(
    platform: Platform, tmp_path: Any
) -> None:
    import aiohttp

    from vigil import auth

    tokens = tmp_path / "tokens.json"
    viewer_a = auth.add_token(tokens, "va", "acme", "viewer")
    viewer_b = auth.add_token(tokens, "vb", "globex", "viewer")
    operator = auth.add_token(tokens, "op", "acme", "operator")
    await platform.auditor()
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens))
    url = f"http://127.0.0.1:{gw.http_port}/v1/incidents"

    async def confess(n: int, tenant: str) -> None:
        body = {"summary": f"cannot reach registry mirror {n}", "severity": "error",
                "category": "network", "tenant": tenant, "task_id": f"{tenant}-{n}"}
        await platform.js.publish("vigil.issues.agent.error", json.dumps(body).encode())

    await confess(1, "acme")
    await confess(2, "acme")
    async with aiohttp.ClientSession() as http:
        async def listed(token: str, **params: str) -> list[dict]:
            async with http.get(url, params=params,
                                headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
                return list((await r.json())["incidents"])

        async def both_counted() -> list[dict] | None:
            found = await listed(viewer_a)
            return found if found and found[0]["count"] == 2 else None

        found = await eventually(both_counted, timeout=30, what="an incident counting 2")
        (incident,) = found
        assert incident["count"] == 2 and incident["status"] == "open"
        assert await listed(viewer_b) == []  # globex never sees acme's incident
        assert await listed(viewer_a, status="resolved") == []
        async with http.get(url, params={"severity": "bogus"},
                            headers={"Authorization": f"Bearer {viewer_a}"}) as r:
            assert r.status == 400 and (await r.json())["error"]["field"] == "severity"

        one = f"{url}/{incident['id']}"
        async with http.post(f"{one}/ack", headers={"Authorization": f"Bearer {viewer_a}"}) as r:
            assert r.status == 403
        async with http.post(f"{one}/ack", headers={"Authorization": f"Bearer {operator}"}) as r:
            assert r.status == 200 and (await r.json())["status"] == "acknowledged"
        async with http.post(f"{one}/resolve",
                             headers={"Authorization": f"Bearer {operator}"}) as r:
            assert r.status == 200 and (await r.json())["status"] == "resolved"
        await confess(3, "acme")  # the problem recurs

        async def reopened() -> dict | None:
            async with http.get(one, headers={"Authorization": f"Bearer {viewer_a}"}) as r:
                body = await r.json()
            return body if body["status"] == "open" else None

        again = await eventually(reopened, timeout=30, what="the incident to reopen")
        assert again["reopened"] == 1 and again["count"] == 3
        auditor = platform.services[0]
        assert auditor.metrics.open_incidents._value.get() == 1
        async with http.get(f"{url}/inc_nope",
                            headers={"Authorization": f"Bearer {viewer_a}"}) as r:
            assert r.status == 404
