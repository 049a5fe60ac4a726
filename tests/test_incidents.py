"""Confessions become incidents: one per problem, counted once, alerted once, replayable."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig
from nats.js.errors import NoKeysError

from support import AuditorProcess, Platform, eventually
from vigil import codec, subjects
from vigil.cli import build_parser
from vigil.consume import keep_lease
from vigil.jetstream import retrying
from vigil_auditor.notify import verify
from vigil_auditor.record import to_record
from vigil_auditor.triage import ESCALATE_COUNT, key_of

pytestmark = pytest.mark.integration
SECRET = "test-secret"


@contextlib.asynccontextmanager
async def webhook_receiver(port: int, hook: Any) -> AsyncIterator[str]:
    """A real HTTP receiver on ``port`` whose ``POST /hook`` calls ``hook``."""
    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


async def incidents(platform: Platform, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    kv = await platform.js.key_value(subjects.KV_INCIDENTS)
    try:
        # Retried: on this busy 2-core machine a listing can time out, and an empty
        # answer would read as "nothing counted".
        keys = await retrying("list incidents", kv.keys)
    except NoKeysError:  # an empty bucket
        return {}
    out = {}
    for key in keys:
        if key not in skip:
            entry = await retrying("read incident", functools.partial(kv.get, key))
            out[key] = json.loads(entry.value)
    return out


async def drained(platform: Platform, stream: str = subjects.STREAM_ISSUES,
                  consumer: str = subjects.CONSUMER_AUDITOR) -> bool:
    """Everything the consumer was given is acked: nothing more will be redelivered."""
    info = await platform.js.consumer_info(stream, consumer)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def scrape(port: int) -> dict[str, float]:
    """``{sample: value}`` from a service's /metrics, e.g. ``'vigil_incidents_open'``."""
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def confessed(metrics: dict[str, float], source: str, severity: str) -> float:
    return metrics.get(f'vigil_confessions_total{{severity="{severity}",source="{source}"}}',
                       0.0)


def incident_key(source: str, body: dict[str, Any]) -> str:
    """The incident a confession lands in, as the auditor computes it."""
    record = to_record(subjects.issue(source, body["severity"]), json.dumps(body).encode(),
                       None, 1, datetime.now(UTC))
    key = key_of(record)
    assert key is not None
    return key


async def publish_issue(platform: Platform, source: str, body: dict[str, Any]) -> int:
    """Publish a confession with no ``Nats-Msg-Id``: the stream keeps every copy."""
    ack = await platform.js.publish(subjects.issue(source, body["severity"]),
                                    json.dumps(body).encode())
    return int(ack.seq)


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


async def test_a_task_past_the_first_hundred_counts_once_however_often_it_confesses(
    platform: Platform,
) -> None:
    """``tasks`` names the first 100 tasks; ``tasks_total`` used to count every later
    task again at each of its confessions (the check "seen before?" looked only at the
    100 named). 150 tasks, each confessing twice: 150 in all, within the estimate's
    error, not 200."""
    await platform.auditor()
    for round_ in range(2):
        for i in range(150):
            await publish_issue(platform, "agent", {
                "id": f"c{round_}-{i}", "summary": "apt mirror timed out",
                "severity": "warning", "category": "network", "task_id": f"job-{i}",
                "tenant": "acme"})

    async def counted() -> dict | None:
        found = [i for i in (await incidents(platform)).values()
                 if i["title"] == "apt mirror timed out"]
        return found[0] if found and found[0]["count"] == 300 else None

    incident = await eventually(counted, timeout=120, what="300 confessions counted")
    assert len(incident["tasks"]) == 100
    assert 145 <= incident["tasks_total"] <= 155, incident["tasks_total"]
    # The bookkeeping behind the estimate is nobody's to read through the API.
    assert incident["tasks_sketch"]


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

    port = unused_tcp_port_factory()
    down = f"http://127.0.0.1:{unused_tcp_port_factory()}/nobody-home"
    async with webhook_receiver(port, hook):
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


async def test_the_same_confession_id_counts_once_and_an_unfinished_one_is_finished(
    platform: Platform,
) -> None:
    body = {"id": "h1", "summary": "disk full on /data", "severity": "error",
            "category": "disk"}
    # The same confession twice, as two stream messages (no Nats-Msg-Id, so the stream's
    # duplicate window does not catch it; the same happens after the window).
    first = await publish_issue(platform, "human", body)
    second = await publish_issue(platform, "human", body)
    assert second != first
    # A crash between recording a confession and triaging it: the record is there (written
    # by a previous auditor from this very message), the incident is not. It must still be
    # counted, once.
    orphan = {"id": "h2", "summary": "disk full on /scratch", "severity": "error",
              "category": "disk"}
    seq = await publish_issue(platform, "human", orphan)
    record = to_record(subjects.issue("human", "error"), json.dumps(orphan).encode(), None,
                       seq, datetime.now(UTC))
    confessions = await platform.js.key_value(subjects.KV_CONFESSIONS)
    await confessions.create(record.id, codec.encode(record))
    auditor = await platform.auditor()

    async def both() -> dict | None:
        found = await incidents(platform)
        total = sum(i["count"] for i in found.values())
        return found if total >= 2 and await drained(platform) else None

    found = await eventually(both, timeout=30, what="the confessions to be triaged")
    (incident,) = found.values()  # "disk full on <path>"
    assert incident["count"] == 2, incident  # h1 once, h2 once
    samples = [s["confession_id"] for s in incident["first_samples"]]
    assert samples == ["human.h1", "human.h2"]
    metrics = await scrape(auditor.http_port)
    # Recorded first by this auditor: h1 (once); h2 was recorded before it started.
    assert confessed(metrics, "human", "error") == 1


async def test_an_escalation_reaches_the_webhook_once_signed_and_the_alert_subjects(
    platform: Platform, unused_tcp_port_factory: Any
) -> None:
    received: list[tuple[str, dict, bool]] = []
    on_subjects: list[tuple[str, dict]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        signed = verify(SECRET, request.headers.get("X-Vigil-Signature", ""), body)
        received.append((request.headers["X-Vigil-Alert-Id"], json.loads(body), signed))
        return web.Response(status=204)

    async def on_alert(msg: Msg) -> None:
        on_subjects.append((msg.subject, json.loads(msg.data)))

    await platform.nc.subscribe(f"{subjects.ALERTS}.>", cb=on_alert)
    port = unused_tcp_port_factory()
    async with webhook_receiver(port, hook):
        await platform.auditor(webhook_urls=f"http://127.0.0.1:{port}/hook",
                               webhook_secret=SECRET)
        for n in range(ESCALATE_COUNT):  # warnings, enough within the window to escalate
            await publish_issue(platform, "agent", {
                "id": f"esc-{n}", "summary": f"build cache corrupted on runner {n}",
                "severity": "warning", "category": "cache", "task_id": f"esc-task-{n}",
                "tenant": "acme"})

        async def escalated() -> bool:
            return any(body["reason"] == "escalated" for _, body, _ in received)

        await eventually(escalated, timeout=30, what="the escalated alert at the webhook")
        # Every confession triaged and every alert acked by the notifier (after recording
        # its delivery): nothing is left that could be delivered again.
        await eventually(lambda: drained(platform), timeout=30, what="triage to finish")
        await eventually(lambda: drained(platform, subjects.STREAM_ALERTS,
                                         subjects.CONSUMER_NOTIFIER),
                         timeout=30, what="the notifier to ack every alert")
    assert all(signed for _, _, signed in received)  # a valid HMAC on every delivery
    got = [(body["reason"], body["severity"]) for _, body, _ in received]
    assert got == [("opened", "warning"), ("escalated", "error")]  # each exactly once
    escalation = received[1][1]
    assert escalation["count"] == ESCALATE_COUNT and escalation["source"] == "agent"
    assert escalation["title"] == "build cache corrupted on runner <n>"
    assert received[1][0] == escalation["id"]
    # The same two alerts on vigil.alerts.<severity>, once each.
    assert [(subject, body["id"]) for subject, body in on_subjects] == [
        (subjects.alert("warning"), received[0][0]), (subjects.alert("error"), received[1][0])]


async def test_a_confession_that_cannot_be_triaged_is_confessed_acked_and_can_be_retried(
    platform: Platform,
) -> None:
    poison = {"id": "p1", "summary": "scratch volume is read-only", "severity": "error",
              "category": "disk", "task_id": "poisoned-1", "tenant": "acme"}
    # An incident record nobody can read (written by a newer, incompatible auditor, or
    # corrupted): triage of any confession of that problem fails, every time.
    kv = await platform.js.key_value(subjects.KV_INCIDENTS)
    unreadable = incident_key("agent", poison)
    await kv.put(unreadable, b"{not json")
    auditor = await platform.auditor()
    await publish_issue(platform, "agent", poison)
    healthy = {"id": "ok1", "summary": "registry mirror slow", "severity": "warning"}
    healthy_seq = await publish_issue(platform, "agent", healthy)

    async def given_up() -> dict | None:
        found = await incidents(platform, skip=(unreadable,))
        confessed_ = [i for i in found.values() if i.get("category") == "triage_failed"]
        healthy_ = [i for i in found.values() if i.get("title") == "registry mirror slow"]
        return confessed_[0] if confessed_ and healthy_ and await drained(platform) else None

    # A few quick tries (0.5 s, 1 s apart), then the stream moves on past it. No wall-clock
    # bound: the record's note counts the deliveries (3, not the consumer's ack waits).
    failure = await eventually(given_up, timeout=60, what="the poison confession given up")
    info = await platform.js.consumer_info(subjects.STREAM_ISSUES, subjects.CONSUMER_AUDITOR)
    assert info.ack_floor.stream_seq > healthy_seq  # the confession of the failure, too
    assert failure["source"] == "auditor" and failure["severity"] == "error"
    assert failure["count"] == 1 and failure["tasks"] == ["acme.poisoned-1"]  # by key
    assert failure["title"] == "a confession from agent could not be triaged"
    confessions = await platform.js.key_value(subjects.KV_CONFESSIONS)
    record = json.loads((await confessions.get("agent.p1")).value)
    assert record["confession"]["summary"] == poison["summary"]  # the evidence is kept
    assert "triage failed after 3 deliveries" in record["error"]
    stored = [c for c in await platform.confessions("triage_failed")]
    assert len(stored) == 1 and stored[0]["data"]["confession_id"] == "agent.p1"
    metrics = await scrape(auditor.http_port)
    assert metrics["vigil_confessions_triage_failed_total"] == 1

    # Fix the cause, then do exactly what the hint says: the copy is triaged, once.
    await kv.delete(unreadable)
    command = stored[0]["hint"].split("(once): vigil ", 1)[1].split(" (", 1)[0].split()
    assert command[:2] == ["replay", "stream"], stored[0]["hint"]
    code, out, err = await vigil(*command, "--nats-url", platform.url_for("operator"))
    assert code == 0 and "published 1 messages" in out, (out, err)

    async def triaged() -> dict | None:
        found = await incidents(platform)
        return found.get(unreadable) if await drained(platform) else None

    incident = await eventually(triaged, timeout=30, what="the re-published confession")
    assert incident["count"] == 1 and incident["tasks"] == ["acme.poisoned-1"]
    record = json.loads((await confessions.get("agent.p1")).value)
    assert record["error"] is None and record["stream_seq"] > healthy_seq  # the copy's
    # A further copy of it is a repeat again: counted nothing.
    last = await publish_issue(platform, "agent", poison)

    async def past(seq: int) -> bool:
        info = await platform.js.consumer_info(subjects.STREAM_ISSUES,
                                               subjects.CONSUMER_AUDITOR)
        return bool(info.ack_floor.stream_seq >= seq)

    await eventually(lambda: past(last), timeout=30, what="the repeat to be handled")
    assert (await incidents(platform))[unreadable]["count"] == 1
    assert len(await platform.confessions("triage_failed")) == 1


async def test_a_confession_s_lease_is_kept_while_it_is_handled(platform: Platform) -> None:
    """What keeps a slow triage (one NATS call may retry for 30 s) from being handed to
    another auditor: in-progress acks, here against an ack wait of 1 s."""
    subject = subjects.issue("lease", "info")
    config = ConsumerConfig(durable_name="lease-test", filter_subject=subject, ack_wait=1.0,
                            max_deliver=-1)
    sub = await platform.js.pull_subscribe(subject, durable="lease-test",
                                           stream=subjects.STREAM_ISSUES, config=config)
    await platform.js.publish(subject, b"{}")
    (msg,) = await sub.fetch(1, timeout=10)
    beats: list[bytes] = []

    async def on_beat(m: Msg) -> None:
        beats.append(m.data)

    await platform.nc.subscribe(msg.reply, cb=on_beat)
    lease = asyncio.create_task(keep_lease(msg, 0.2))
    rival = asyncio.create_task(sub.fetch(1, timeout=30))  # would get a redelivery
    try:
        # Fifteen beats: three ack waits and more, and nothing redelivered meanwhile.
        await eventually(lambda: _some(beats[14:]), timeout=30,
                         what="fifteen in-progress acks")
        info = await platform.js.consumer_info(subjects.STREAM_ISSUES, "lease-test")
        assert not rival.done() and info.num_redelivered == 0, info
        assert info.num_ack_pending == 1
    finally:
        lease.cancel()
        rival.cancel()
        await asyncio.gather(lease, rival, return_exceptions=True)
    assert set(beats) == {b"+WPI"}
    await msg.ack()


async def vigil(*argv: str) -> tuple[int, str, str]:
    """Run ``vigil <argv>`` in this event loop: (exit code, stdout, stderr)."""
    args = build_parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = await args.impl(args, out, err)
    return int(code), out.getvalue(), err.getvalue()


async def test_an_alert_that_cannot_be_decoded_is_terminated_and_confessed(
    platform: Platform, unused_tcp_port_factory: Any
) -> None:
    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(json.loads(await request.read()))
        return web.Response(status=204)

    port = unused_tcp_port_factory()
    async with webhook_receiver(port, hook):
        await platform.auditor(webhook_urls=f"http://127.0.0.1:{port}/hook",
                               webhook_secret=SECRET)
        await platform.js.publish(subjects.alert("critical"), b"\xff{not json")
        last = (await platform.js.publish(subjects.alert("error"), b"[1, 2, 3]")).seq

        async def settled() -> list[dict] | None:
            found = await platform.confessions("alert_undecodable")
            if len(found) < 2:
                return None
            info = await platform.js.consumer_info(subjects.STREAM_ALERTS,
                                                   subjects.CONSUMER_NOTIFIER)
            return found if info.ack_floor.stream_seq >= last else None

        found = await eventually(settled, timeout=30, what="both alerts confessed")
        # The confessions are triaged and alerted like any other (that alert is sent).
        await eventually(lambda: _some(received), timeout=30, what="the alert about them")
        await eventually(lambda: drained(platform, subjects.STREAM_ALERTS,
                                         subjects.CONSUMER_NOTIFIER),
                         timeout=30, what="the notifier to settle every alert")
    info = await platform.js.consumer_info(subjects.STREAM_ALERTS, subjects.CONSUMER_NOTIFIER)
    assert info.num_redelivered == 0  # terminated on the first delivery, not retried
    assert len(found) == 2 and {c["severity"] for c in found} == {"error"}
    assert sorted(c["data"]["subject"] for c in found) == [subjects.alert("critical"),
                                                            subjects.alert("error")]
    assert all(c["source"] == "auditor" and c["hint"] for c in found)
    # Only the auditor's own alert reached the receiver, never the garbage.
    assert [(body["category"], body["reason"]) for body in received] == [
        ("alert_undecodable", "opened")]


async def test_incident_metrics_agree_across_auditors_and_follow_the_gateway(
    platform: Platform, tmp_path: Any,
) -> None:
    from vigil import auth

    first = await platform.auditor(node_id="aud-m1")
    second = await platform.auditor(node_id="aud-m2")
    tokens = tmp_path / "tokens.json"
    # These are platform incidents (not an agent's): a platform operator acknowledges them.
    oncall = auth.add_token(tokens, "oncall", None, "operator", "platform")
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens))
    problems = {"a": "cannot resolve registry.internal", "b": "token expired for s3"}
    for n in range(6):
        which = "a" if n % 2 == 0 else "b"
        await publish_issue(platform, "human", {"id": f"m{n}", "summary": problems[which],
                                                "severity": "error", "category": "net"})
    for _ in range(2):  # repeats of m0: two more stream messages, no new confession
        await publish_issue(platform, "human", {"id": "m0", "summary": problems["a"],
                                                "severity": "error", "category": "net"})
    ports = (first.http_port, second.http_port)

    async def agreed(open_now: int, by: dict[str, float]) -> list[dict] | None:
        if not await drained(platform):
            return None
        scraped = [await scrape(p) for p in ports]
        ok = all(m.get("vigil_incidents_open") == open_now for m in scraped) and all(
            m.get(sample) == value for m in scraped for sample, value in by.items())
        return scraped if ok else None

    scraped = await eventually(
        lambda: agreed(2, {'vigil_incidents{severity="error",status="open"}': 2}),
        timeout=30, what="both auditors to count two open incidents")
    # Each confession counted once, by whichever auditor recorded it first.
    assert sum(confessed(m, "human", "error") for m in scraped) == 6
    target = incident_key("human", {"summary": problems["a"], "severity": "error",
                                    "category": "net"})
    async with aiohttp.ClientSession() as http, \
            http.post(f"http://127.0.0.1:{gw.http_port}/v1/incidents/{target}/ack",
                      headers={"Authorization": f"Bearer {oncall}"}) as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "acknowledged"
    await eventually(
        lambda: agreed(1, {'vigil_incidents{severity="error",status="acknowledged"}': 1}),
        timeout=30, what="both auditors to see the acknowledgement")


PROBLEMS = ("tool missing", "token expired", "loop detected")


def replay_body(n: int) -> dict[str, Any]:
    return {"summary": f"{PROBLEMS[n % 3]} in job {n}", "severity": "warning",
            "id": f"r{n}", "task_id": f"job{n}", "tenant": ("acme", "globex")[n % 2]}


@pytest.mark.slow
@pytest.mark.fault
async def test_auditor_killed_mid_stream_and_stream_replayed_rebuild_identical_incidents(
    platform: Platform, tmp_path: Path,
) -> None:
    total = 240

    async def publish(start: int, end: int) -> None:
        for first in range(start, end, 30):
            await asyncio.gather(*[publish_issue(platform, "agent", replay_body(n))
                                   for n in range(first, min(first + 30, end))])

    async def counted() -> int:
        return sum(i["count"] for i in (await incidents(platform)).values())

    await publish(0, total // 2)
    victim = AuditorProcess(tmp_path, platform.url, "aud-victim")
    survivor = AuditorProcess(tmp_path, platform.url, "aud-survivor")
    try:
        await victim.start().ready()

        async def the_rest() -> None:
            # Still flowing while the victim dies: an operator's ack of the first problem,
            # repeats of earlier confessions (same id, another stream message) and the
            # second half.
            acked = incident_key("agent", replay_body(0))
            await publish_issue(platform, "operator", {
                "id": "ack-1", "summary": "ana acknowledged it", "severity": "info",
                "category": "incident_ack", "data": {"incident_id": acked, "by": "ana"}})
            for n in range(0, 40, 8):
                await publish_issue(platform, "agent", replay_body(n))
            await publish(total // 2, total)
            for n in range(total // 2, total, 16):
                await publish_issue(platform, "agent", replay_body(n))

        flowing = asyncio.create_task(the_rest())
        await eventually(lambda: _at_least(counted, 20), timeout=60, what="some progress")
        victim.signal(signal.SIGSTOP)  # freeze, read how far it got, then kill -9
        at_kill = await counted()
        victim.signal(signal.SIGKILL)
        await victim.exited(timeout=10)
        assert 20 <= at_kill < total, at_kill  # killed mid-stream
        await flowing

        # Another auditor takes over: the confession the victim held comes back after the
        # consumer's ack wait; nothing is lost, and no repeat and no redelivery counts twice.
        await survivor.start().ready()

        async def all_counted() -> dict | None:
            if await counted() != total or not await drained(platform):
                return None
            return await incidents(platform)

        before = await eventually(all_counted, timeout=90, what=f"all {total} counted once")
        # Three problems in each of two tenants' agents: six incidents, one per tenant's.
        assert sorted(i["count"] for i in before.values()) == [total // 6] * 6
        statuses = {(i["title"], i["tenant"]): i["status"] for i in before.values()}
        assert statuses == {("tool missing in job <n>", "acme"): "acknowledged",
                            ("tool missing in job <n>", "globex"): "open",
                            ("token expired in job <n>", "acme"): "open",
                            ("token expired in job <n>", "globex"): "open",
                            ("loop detected in job <n>", "acme"): "open",
                            ("loop detected in job <n>", "globex"): "open"}
        survivor.signal(signal.SIGTERM)
        await survivor.exited(timeout=30)
    finally:
        victim.kill()
        survivor.kill()

    # Replay: forget every incident and the auditor's position, consume from the start.
    # Nothing may be alerted again (a core subscriber sees even what the alerts stream
    # would deduplicate), and nothing counted again.
    realerted: list[str] = []

    async def on_alert(msg: Msg) -> None:
        realerted.append(msg.subject)

    await platform.nc.subscribe(f"{subjects.ALERTS}.>", cb=on_alert)
    alerts_before = (await platform.js.stream_info(subjects.STREAM_ALERTS)).state.messages
    assert alerts_before == 18  # per incident: opened, escalated to error, to critical
    await platform.js.delete_key_value(subjects.KV_INCIDENTS)
    await platform.js.delete_consumer(subjects.STREAM_ISSUES, subjects.CONSUMER_AUDITOR)
    replayer = await platform.auditor()

    async def rebuilt() -> dict | None:
        found = await incidents(platform)
        done = sum(i["count"] for i in found.values()) == total and await drained(platform)
        return found if done else None

    after = await eventually(rebuilt, timeout=90, what="the replay")
    assert after == before  # every field, samples and stream times included
    await platform.nc.flush()
    assert realerted == []
    assert (await platform.js.stream_info(subjects.STREAM_ALERTS)).state.messages == 18
    metrics = await scrape(replayer.http_port)
    assert confessed(metrics, "agent", "warning") == 0  # all recorded before the replay
    assert not any(k.startswith("vigil_alerts_total{") for k in metrics)
    assert metrics["vigil_incidents_open"] == 5


async def _at_least(probe: Any, n: int) -> bool:
    return bool(await probe() >= n)


async def test_incident_api_isolates_tenants_filters_and_drives_the_lifecycle(
    platform: Platform, tmp_path: Any
) -> None:
    """Incidents, door by door: an agent's complaints are its tenant's own incident (its
    operators act on it; no other tenant learns of it), the platform's complaints are one
    shared incident each tenant sees narrowed to itself and only a platform token acts on;
    a role never widens a tenant's token beyond its tenant."""
    from vigil import auth

    tokens = tmp_path / "tokens.json"
    viewer_a = auth.add_token(tokens, "va", "acme", "viewer")
    viewer_b = auth.add_token(tokens, "vb", "globex", "viewer")
    operator = auth.add_token(tokens, "op", "acme", "operator")
    operator_b = auth.add_token(tokens, "ob", "globex", "operator")
    oncall = auth.add_token(tokens, "oncall", None, "operator", "platform")
    auditor = await platform.auditor()
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens))
    url = f"http://127.0.0.1:{gw.http_port}/v1/incidents"

    async def confess(n: int, tenant: str, problem: str = "registry",
                      source: str = "agent") -> None:
        summary, severity = {"registry": (f"cannot reach registry mirror {n}", "error"),
                             "quota": (f"quota exceeded for bucket {n}", "warning"),
                             "disk": (f"node disk {n} is full", "error")}[problem]
        body = {"summary": summary, "severity": severity, "category": "network",
                "tenant": tenant, "task_id": f"{tenant}-{n}"}
        await platform.js.publish(subjects.issue(source, severity), json.dumps(body).encode())

    # One problem hits six acme tasks (more than the five samples an incident keeps) and
    # two globex tasks: two incidents, one per tenant. Another problem only globex. The
    # platform's own complaint about a node hits one task of each tenant: one incident.
    for n in range(1, 7):
        await confess(n, "acme")
    await confess(1, "globex")
    await confess(2, "globex")
    await confess(3, "globex", "quota")
    await confess(9, "acme", "disk", source="executor")
    await confess(9, "globex", "disk", source="executor")
    registry, quota = "cannot reach registry mirror <n>", "quota exceeded for bucket <n>"
    disk = "node disk <n> is full"
    async with aiohttp.ClientSession() as http:
        async def call(method: str, where: str, token: str, **params: str
                       ) -> tuple[int, Any]:
            async with http.request(method, where, params=params,
                                    headers={"Authorization": f"Bearer {token}"}) as r:
                return r.status, await r.json()

        async def listed(token: str, **params: str) -> list[dict]:
            status, body = await call("GET", url, token, **params)
            assert status == 200, body
            return list(body["incidents"])

        def titles(found: list[dict]) -> list[tuple[str, str | None]]:
            return sorted((i["title"], i.get("tenant")) for i in found)

        async def all_counted() -> list[dict] | None:
            found = await listed(oncall)
            return found if sorted(i["count"] for i in found) == [1, 2, 2, 6] else None

        await eventually(all_counted, timeout=30, what="four incidents counting 6, 2, 2, 1")
        # A tenant's token, whatever its role, sees its own incidents and the platform's
        # that touched it, narrowed to itself; nothing of the other tenant.
        for token in (viewer_a, operator):
            mine = {i["title"]: i for i in await listed(token)}
            assert set(mine) == {registry, disk}
            assert mine[registry]["tasks"] == [f"acme-{n}" for n in range(1, 7)]
            assert mine[registry]["tenant"] == "acme" and mine[disk]["tenant"] is None
            assert mine[disk]["tasks"] == ["acme-9"] and mine[disk]["tenants"] == ["acme"]
            # Its own count and times, nothing of how busy the others were.
            assert mine[disk]["count"] == 1 and mine[registry]["count"] == 6
            for key in ("last_seq", "window_count", "alerted", "tenant_stats", "reopened"):
                assert key not in mine[disk], key
            for view in mine.values():
                assert "tasks_total" not in view and "tenant_tasks" not in view
            assert "globex" not in json.dumps(mine)
        b_view = {i["title"]: i for i in await listed(viewer_b)}
        assert set(b_view) == {registry, quota, disk}
        assert b_view[registry]["tasks"] == ["globex-1", "globex-2"]
        assert "acme" not in json.dumps(b_view)
        # The platform token sees everything whole.
        whole = {(i["title"], i.get("tenant")): i for i in await listed(oncall)}
        assert whole[(disk, None)]["tenants"] == ["acme", "globex"]
        assert whole[(disk, None)]["tasks_total"] == 2

        # Filters, positive and negative: tenant, status, severity. A tenant's token may
        # not even name another tenant (refused alike, whether it exists or not).
        assert titles(await listed(oncall, tenant="globex")) == [
            (registry, "globex"), (disk, None), (quota, "globex")]
        assert await listed(oncall, tenant="initech") == []
        for other in ("globex", "initech"):
            status, body = await call("GET", url, operator, tenant=other)
            assert status == 403 and body["error"]["field"] == "tenant"
        assert titles(await listed(operator, tenant="acme")) == [(registry, "acme"),
                                                                 (disk, None)]
        assert titles(await listed(operator, severity="warning")) == []
        assert titles(await listed(viewer_b, severity="warning")) == [(quota, "globex")]
        assert titles(await listed(viewer_a, status="open")) == [(registry, "acme"),
                                                                 (disk, None)]
        assert await listed(viewer_a, status="resolved") == []
        status, body = await call("GET", url, viewer_a, severity="bogus")
        assert status == 400 and body["error"]["field"] == "severity"
        status, body = await call("GET", url, viewer_a, nonsense="1")
        assert status == 400 and body["error"]["field"] == "nonsense"

        mine_id = whole[(registry, "acme")]["id"]
        theirs_id = whole[(registry, "globex")]["id"]
        shared_id = whole[(disk, None)]["id"]
        one = f"{url}/{mine_id}"
        # Another tenant's incident is a 404 to every door, for every role, like one that
        # does not exist.
        for token in (viewer_a, operator):
            for method, where in (("GET", f"{url}/{theirs_id}"),
                                  ("POST", f"{url}/{theirs_id}/ack"),
                                  ("POST", f"{url}/{theirs_id}/resolve")):
                status, body = await call(method, where, token)
                if method == "POST" and token == viewer_a:
                    assert status == 403  # the role is checked first: no lookup at all
                else:
                    assert status == 404 and "globex" not in json.dumps(body)
            status, _ = await call("GET", f"{url}/inc_nope", token)
            assert status == 404
        # A platform incident: a tenant's operator sees it, narrowed, but does not act on
        # it; a platform operator does.
        status, body = await call("POST", f"{url}/{shared_id}/ack", operator)
        assert status == 403 and "platform" in body["error"]["message"]
        status, body = await call("POST", f"{url}/{shared_id}/ack", oncall)
        assert status == 200 and body["status"] == "acknowledged"
        # The tenant's own incident: its viewer may not act, its operator may.
        status, _ = await call("POST", f"{one}/ack", viewer_a)
        assert status == 403
        status, body = await call("POST", f"{one}/ack", operator)
        assert status == 200 and body["status"] == "acknowledged"
        assert "globex" not in json.dumps(body)
        assert titles(await listed(operator, status="acknowledged")) == [
            (registry, "acme"), (disk, None)]
        status, body = await call("POST", f"{one}/resolve", operator)
        assert status == 200 and body["status"] == "resolved"
        # globex's own incident of the same problem is untouched by acme's operator.
        status, body = await call("GET", f"{url}/{theirs_id}", viewer_b)
        assert status == 200 and body["status"] == "open"
        assert titles(await listed(viewer_a, status="resolved")) == [(registry, "acme")]
        await confess(7, "acme")  # the problem recurs

        async def reopened() -> dict | None:
            _, body = await call("GET", one, viewer_a)
            return body if body["status"] == "open" else None

        again = await eventually(reopened, timeout=30, what="the incident to reopen")
        assert again["reopened"] == 1 and again["count"] == 7
        assert again["tasks"] == [f"acme-{n}" for n in range(1, 8)]

        async def three_open() -> bool:
            return (await scrape(auditor.http_port)).get("vigil_incidents_open") == 3

        await eventually(three_open, timeout=15, what="the open-incidents gauge to say 3")
        status, _ = await call("POST", f"{url}/{theirs_id}/ack", operator_b)
        assert status == 200
