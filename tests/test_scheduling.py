"""The scheduler under load and over time: fairness, priority, delayed starts, timeouts,
quotas, unservable tasks, executors' registry. Real nats-server, real scheduler and
executors (the process runtime: real processes, no sandbox needed for what is measured).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support import Platform, SchedulerProcess, eventually, session_node_id
from vigil import auth, subjects
from vigil_executor.process import ProcessRuntime

pytestmark = pytest.mark.integration


def started_order(platform: Platform) -> list[str]:
    return [s.split(".")[3] for s, _ in platform.events.events if s.endswith(".started")]


async def publish_many(platform: Platform, tenant: str, specs: list[dict[str, Any]]) -> None:
    acks = [platform.js.publish(subjects.submit(tenant), json.dumps(spec).encode())
            for spec in specs]
    await asyncio.gather(*acks)


@pytest.mark.slow
async def test_a_small_tenant_is_not_starved_by_a_big_backlog(platform: Platform) -> None:
    await platform.scheduler()
    await platform.executor(slots=4)
    sleepy = ["python3", "-c", "import time; time.sleep(0.2)"]
    await publish_many(platform, "big", [{"id": f"a{i:04d}", "command": sleepy}
                                         for i in range(1000)])
    # Tenant A's 1,000 tasks are admitted (and nearly all queued) before B submits.
    await platform.events.wait_for("a0999", "accepted", timeout=60)
    await publish_many(platform, "small", [{"id": f"b{i}", "command": sleepy}
                                           for i in range(10)])

    async def all_b_started() -> bool:
        return all(platform.events.of(f"b{i}", "started") for i in range(10))
    await eventually(all_b_started, timeout=60, what="B's ten tasks to start")
    order = started_order(platform)
    last_b = max(order.index(f"b{i}") for i in range(10))
    a_before = sum(1 for task in order[:last_b] if task.startswith("a"))
    print(f"\nfairness: {a_before} of tenant A's 1000 tasks started before the last of "
          f"B's 10 (limit for the issue: 100)")
    assert a_before < 100


async def test_priority_jumps_the_queue(platform: Platform) -> None:
    await platform.scheduler()
    await platform.executor(slots=1)
    hold = ["python3", "-c", "import time; time.sleep(1)"]
    await platform.publish_spec({"id": "blocker", "command": hold})
    await platform.events.wait_for("blocker", "started")
    await publish_many(platform, "acme", [{"id": f"low{i}", "command": ["true"],
                                           "priority": 1} for i in range(4)])
    await platform.events.wait_for("low3", "accepted")
    await platform.publish_spec({"id": "urgent", "command": ["true"], "priority": 9})
    for task_id in ("urgent", "low0", "low1", "low2", "low3"):
        await platform.final_state(task_id)
    order = started_order(platform)
    assert order[:2] == ["blocker", "urgent"], order
    assert order[2:] == ["low0", "low1", "low2", "low3"]


async def test_not_before_delays_the_start(platform: Platform) -> None:
    await platform.scheduler()
    await platform.executor()
    start = datetime.now(UTC) + timedelta(seconds=2)
    await platform.publish_spec({"id": "later", "command": ["true"],
                                 "not_before": start.isoformat()})
    await platform.events.wait_for("later", "accepted")

    async def waiting() -> Any:
        state = await platform.state("later")
        return state if state and state.waiting else None
    state = await eventually(waiting, what="the state to say why it waits")
    assert state.status == "queued" and "not before" in (state.waiting or "")
    final = await platform.final_state("later", timeout=30)
    assert final.status == "succeeded"
    assert final.started_at is not None and final.started_at >= start


async def test_queue_timeout_ends_a_task_nobody_runs(platform: Platform) -> None:
    await platform.scheduler(unservable_after_s=0)  # no grace for executors to advertise
    await platform.auditor()
    await platform.executor()  # serves pool "default" only
    await platform.publish_spec({"id": "stuck", "command": ["true"], "pool": "gpu",
                                 "queue_timeout_s": 1.5})
    await platform.events.wait_for("stuck", "accepted")

    async def says_why() -> Any:
        state = await platform.state("stuck")
        return state if state and state.waiting else None
    waiting = await eventually(says_why, what="the task to say nobody can run it")
    assert "no live executor serves pool 'gpu'" in (waiting.waiting or "")
    state = await platform.final_state("stuck", timeout=30)
    assert state.status == "timed_out"
    assert "queue timeout" in (state.error or "")
    assert platform.events.of("stuck", "started") == []
    confessions = await platform.confessions(category="unservable")
    assert any(c.get("task_id") == "stuck" for c in confessions)
    # ... and once for the pool, by the dispatcher, and on the task's own timeline.
    assert any(c.get("task_id") is None and c["data"]["pool"] == "gpu" for c in confessions)
    on_timeline = platform.events.of("stuck", "confession")
    assert {e["source"] for e in on_timeline} == {"scheduler"}


async def test_time_limit_ends_timed_out(platform: Platform) -> None:
    await platform.scheduler()
    await platform.executor(stop_grace_s=1)
    await platform.publish_spec({"id": "slow", "command": ["sleep", "30"], "timeout_s": 1})
    state = await platform.final_state("slow", timeout=30)
    assert state.status == "timed_out"
    assert "time limit" in (state.error or "")


async def test_quota_rejects_with_a_reason(platform: Platform, tmp_path: Path) -> None:
    scheduler = await platform.scheduler(
        tenant_limits=json.dumps({"acme": {"max_queued": 3}}))
    await platform.auditor()
    tokens = tmp_path / "tokens.json"
    token = auth.add_token(tokens, "s", "acme", "submitter")
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens))
    # Nobody serves this pool, so the tasks stay queued and count against the limit.
    for i in range(3):
        await platform.publish_spec({"id": f"q{i}", "command": ["true"], "pool": "idle"})
        await platform.events.wait_for(f"q{i}", "accepted")

    # The scheduler admits against its own reading of the queue's depths, which may be
    # up to half a second old: three entries in the stream are not yet three to it.
    async def counted_as_queued() -> bool:
        dispatcher = scheduler._dispatcher
        return dispatcher is not None and dispatcher.backlog.tenant_depth("acme") >= 3
    await eventually(counted_as_queued, what="the scheduler to count three queued tasks")
    # A raw NATS publisher: a failed state naming the limit, an event, a confession (the
    # latter two follow the state).
    await platform.publish_spec({"id": "q3", "command": ["true"], "pool": "idle"})
    state = await platform.final_state("q3")
    assert state.status == "failed" and state.rejected_by == "max_queued"
    assert "limit 3" in (state.error or "")
    await platform.events.wait_for("q3", "rejected")

    async def confessed() -> bool:
        confessions = await platform.confessions(category="quota_rejected")
        return any(c.get("task_id") == "q3" for c in confessions)
    await eventually(confessed, what="q3's quota_rejected confession")
    # Over HTTP: 429 with Retry-After, and nothing queued.
    async with aiohttp.ClientSession() as http, http.post(
            f"http://127.0.0.1:{gw.http_port}/v1/tasks",
            json={"command": ["true"], "pool": "idle"},
            headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 429, await r.text()
        assert r.headers["Retry-After"]
        assert (await r.json())["error"]["code"] == "quota_exceeded"
    info = await platform.js.stream_info(subjects.STREAM_QUEUE)
    assert info.state.messages == 3


async def test_executors_advertise_and_are_listed(platform: Platform, tmp_path: Path) -> None:
    await platform.scheduler()
    await platform.executor(node_id="node-a", pool="default", slots=3, labels="gpu=a100")
    tokens = tmp_path / "tokens.json"
    token = auth.add_token(tokens, "v", "acme", "viewer")
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens))
    url = f"http://127.0.0.1:{gw.http_port}/v1/executors"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        async def listed() -> Any:
            async with http.get(url) as r:
                body = await r.json()
                return body["executors"] or None
        executors = await eventually(listed, what="the executor's advertisement")
    [entry] = executors
    assert entry["node"] == "node-a" and entry["pool"] == "default"
    assert entry["slots"] == 3 and entry["labels"] == {"gpu": "a100"}
    assert entry["free"] == 3 and entry["draining"] is False


async def test_drain_withdraws_the_advertisement(platform: Platform) -> None:
    ex = await platform.executor(node_id="leaving")
    kv = await platform.js.key_value(subjects.KV_EXECUTORS)

    async def present() -> bool:
        try:
            return (await kv.get("leaving")).value is not None
        except Exception:
            return False
    await eventually(present, what="the advertisement")
    t0 = time.monotonic()
    await ex.shutdown()

    async def gone() -> bool:
        return not await present()
    await eventually(gone, timeout=15, what="the advertisement to be withdrawn")
    assert time.monotonic() - t0 < 10


@pytest.mark.slow
@pytest.mark.fault
async def test_two_schedulers_schedule_each_task_exactly_once(platform: Platform,
                                                              tmp_path: Path) -> None:
    """500 tasks through two scheduler processes; one is killed -9 mid-run. Every task
    ends succeeded, started once, as attempt 1: nothing lost, nothing run twice."""
    first = SchedulerProcess(tmp_path, platform.url, "sched-1").start()
    second = SchedulerProcess(tmp_path, platform.url, "sched-2").start()
    try:
        await first.ready()
        await second.ready()
        await platform.executor(slots=16, runtime="null")
        ids = [f"dup{i:03d}" for i in range(500)]
        await publish_many(platform, "acme", [{"id": i, "command": ["true"]} for i in ids])

        async def some_admitted() -> bool:
            return sum(1 for i in ids if platform.events.of(i, "accepted")) >= 50
        await eventually(some_admitted, timeout=60, what="50 admissions")
        first.kill()  # mid-run: its unacknowledged submissions go to the other one
        handled = {p.node_id: p.log_text().count('"task_id"') for p in (first, second)}
        print(f"\nlog lines naming a task at the kill: {handled}")

        async def all_done() -> bool:
            for task_id in ids:
                state = await platform.state(task_id)
                if state is None or not state.terminal:
                    return False
            return True
        await eventually(all_done, timeout=120, what="all 500 tasks to finish")
        for task_id in ids:
            state = await platform.state(task_id)
            assert state is not None and state.status == "succeeded", state
            assert state.attempt == 1, state
            assert len(platform.events.of(task_id, "started")) == 1, task_id
            assert len(platform.events.of(task_id, "finished")) == 1, task_id
    finally:
        first.kill()
        second.kill()


async def test_node_labels_place_a_task_on_a_matching_executor(platform: Platform) -> None:
    await platform.scheduler(unservable_after_s=0)
    await platform.executor(node_id="plain", slots=4)
    await platform.executor(node_id="gpu-node", slots=1, labels="gpu=a100")
    for i in range(3):
        await platform.publish_spec({"id": f"gpu{i}", "command": ["true"],
                                     "node_labels": {"gpu": "a100"}})
    for i in range(3):
        state = await platform.final_state(f"gpu{i}")
        assert state.status == "succeeded" and state.executor == "gpu-node", state
        assert state.attempt == 1  # a node without the label hands it back, spending nothing
    # Labels nobody advertises: the task says so and waits (here until its queue timeout).
    await platform.publish_spec({"id": "tpu", "command": ["true"],
                                 "node_labels": {"tpu": "v5"}, "queue_timeout_s": 2})

    async def says_why() -> Any:
        state = await platform.state("tpu")
        return state if state and state.waiting else None
    waiting = await eventually(says_why, what="the task to say nobody can run it")
    assert "labels {'tpu': 'v5'}" in (waiting.waiting or "")
    assert (await platform.final_state("tpu")).status == "timed_out"


async def test_a_labelled_task_bounced_by_other_nodes_waits_instead_of_dying(
    platform: Platform,
) -> None:
    """A task with node_labels is released while a node with the labels advertises a free
    slot; if that slot is gone before the node pulls it, the nodes without the labels hand
    it back, each time a delivery of the pool's shared consumer. It used to be buried
    ``dead`` at the max deliveries without ever running; now it waits in the queue again
    (``requeued``) and runs when a node with its labels is free."""
    from support import advertise
    from vigil import topology

    await platform.scheduler(unservable_after_s=0)
    await platform.executor(node_id="plain", slots=2)
    # Few deliveries, so the hand-backs run out in seconds.
    await topology.ensure_consumer(platform.js, subjects.STREAM_WORK, topology.executor_consumer(
        "default", ack_wait_s=5.0, max_deliver=4))
    # A node with the labels that the registry shows free but that never pulls: as one
    # whose slot was taken just after the task was released to it.
    await advertise(platform.js, "gpu-busy", slots=1, labels={"gpu": "a100"})
    await platform.publish_spec({"id": "gpu-task", "command": ["true"],
                                 "node_labels": {"gpu": "a100"}})

    async def requeued() -> Any:
        state = await platform.state("gpu-task")
        return state if state is not None and state.requeued >= 1 else None

    state = await eventually(requeued, timeout=60, what="the task to be queued again")
    assert not state.terminal, state.error
    # The node with the labels is free again (here: a real one starts): the task runs.
    registry = await platform.js.key_value(subjects.KV_EXECUTORS)
    await registry.delete("gpu-busy")
    await platform.executor(node_id="gpu-node", slots=1, labels="gpu=a100")
    final = await platform.final_state("gpu-task", timeout=90)
    assert final.status == "succeeded", final.error
    assert final.executor == "gpu-node" and final.attempt == 1


async def test_running_limit_holds_a_tenant_back(platform: Platform) -> None:
    await platform.scheduler(tenant_limits=json.dumps({"acme": {"max_running": 1}}))
    await platform.executor(slots=4)
    hold = ["python3", "-c", "import time; time.sleep(0.5)"]
    await publish_many(platform, "acme", [{"id": f"one{i}", "command": hold}
                                          for i in range(3)])
    states = [await platform.final_state(f"one{i}") for i in range(3)]
    assert all(s.status == "succeeded" for s in states)
    spans = sorted((s.started_at, s.finished_at) for s in states)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end is not None and start is not None
        # (a slot's advert lags by up to its 2 s interval, so allow a brief overlap)
        assert start >= end - timedelta(milliseconds=200), spans


async def test_a_task_in_retry_backoff_does_not_hold_its_slot(platform: Platform) -> None:
    """A failed attempt waiting out a long backoff is a work message naked with a delay:
    it holds no slot, so the one-slot pool runs the next task meanwhile."""
    await platform.scheduler()
    await platform.executor(slots=1)
    await platform.publish_spec({"id": "flaky", "command": ["false"], "max_attempts": 2,
                                 "retry": {"backoff_s": 60, "jitter": 0}})
    await platform.events.wait_for("flaky", "retrying")
    await platform.publish_spec({"id": "next", "command": ["true"]})
    state = await platform.final_state("next", timeout=20)
    assert state.status == "succeeded"
    flaky = await platform.state("flaky")
    assert flaky is not None and flaky.status == "scheduled" and flaky.retry_at is not None


async def test_cancelled_queued_tasks_stop_counting_against_the_queued_limit(
        platform: Platform) -> None:
    scheduler = await platform.scheduler(
        tenant_limits=json.dumps({"acme": {"max_queued": 2}}))
    for i in range(2):  # nobody serves this pool: both stay queued
        await platform.publish_spec({"id": f"held{i}", "command": ["true"], "pool": "idle"})
        await platform.events.wait_for(f"held{i}", "accepted")
    for i in range(2):
        await platform.js.publish("vigil.control.cancel.acme",
                                  json.dumps({"task_id": f"held{i}"}).encode())
        assert (await platform.final_state(f"held{i}")).status == "cancelled"

    async def counted_as_queued() -> bool:  # the scheduler sees both entries
        dispatcher = scheduler._dispatcher
        return dispatcher is not None and dispatcher.backlog.tenant_depth("acme") == 2
    await eventually(counted_as_queued, what="the scheduler to count two queued entries")
    # Their entries still count, but a new submission is not refused for them: the
    # scheduler sweeps the stale ones out first.
    await platform.publish_spec({"id": "fresh", "command": ["true"], "pool": "idle"})
    await platform.events.wait_for("fresh", "accepted")
    state = await platform.state("fresh")
    assert state is not None and state.status == "queued" and state.rejected_by is None
    info = await platform.js.stream_info(subjects.STREAM_QUEUE)
    assert info.state.messages == 1  # only fresh's entry is left


class Stocked(ProcessRuntime):
    """The process runtime, on a node holding just these images (as Podman would list)."""

    def __init__(self, root: Path, images: set[str]) -> None:
        super().__init__(root)
        self.held = images

    async def image_exists(self, image: str) -> bool:
        return image in self.held

    async def images(self) -> list[str]:
        return sorted(self.held)


async def test_an_image_no_executor_has_waits_queued_and_says_so(
    platform: Platform, tmp_path: Path
) -> None:
    await platform.scheduler(unservable_after_s=0)
    await platform.executor(Stocked(tmp_path / "ws-a", {"localhost/vigil-agent:latest"}),
                            node_id=session_node_id())
    await platform.publish_spec({"id": "no-such", "command": ["true"],
                                 "image": "localhost/nope:1", "queue_timeout_s": 2})
    await platform.publish_spec({"id": "soon", "command": ["true"], "image": "localhost/soon:2"})
    await platform.publish_spec({"id": "held", "command": ["true"],
                                 "image": "localhost/vigil-agent:latest"})
    assert (await platform.final_state("held")).status == "succeeded"

    async def says_why(task_id: str) -> Any:
        state = await platform.state(task_id)
        return state if state and state.waiting else None
    waiting = await eventually(lambda: says_why("no-such"), what="the task to say why")
    assert waiting.status == "queued"
    assert waiting.waiting == "no live executor of pool 'default' has image 'localhost/nope:1'"
    final = await platform.final_state("no-such")
    assert final.status == "timed_out" and "has image 'localhost/nope:1'" in (final.error or "")
    # The scheduler held it back: no executor ever had to hand it back.
    assert platform.events.of("no-such", "started") == []
    assert platform.events.of("no-such", "retrying") == []
    confessions = await platform.confessions(category="unservable")
    (told,) = [c for c in confessions if c.get("task_id") == "no-such"]
    assert told["data"]["image"] == "localhost/nope:1" and "nope" in told["summary"]
    # A node that has the image comes: the waiting task runs there. (Released to the
    # pool, the node without the image may pull it first: it hands it back, the fallback.)
    assert (await says_why("soon")).status == "queued"
    await platform.executor(Stocked(tmp_path / "ws-b", {"localhost/soon:2"}),
                            node_id="stocked")
    state = await platform.final_state("soon")
    assert state.status == "succeeded" and state.executor == "stocked"
    assert state.waiting is None
    assert {h.outcome for h in state.history[:-1]} <= {"handed_back"}
