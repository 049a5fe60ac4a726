"""Two or more instances of a service at once, and one of them killed: nothing is lost and
nothing happens twice.

- two auditor processes share the durable consumer; one is killed with SIGKILL in the
  middle of 300 confessions, and every incident still has exactly its count;
- two gateway processes over one NATS serve the same tasks; an event stream cut by a
  SIGKILL of its gateway resumes on the other with ``Last-Event-ID``, every event once;
- two scheduler processes; the one holding the ``dispatcher`` lease is killed and the
  other takes over within the lease's TTL.

Real nats-server, real service processes (kill -9 for real); the services that are not the
subject of a test run in-process.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, NoKeysError

from support import (
    AuditorProcess,
    GatewayProcess,
    Platform,
    SchedulerProcess,
    eventually,
    stored_events,
)
from vigil import subjects
from vigil.client import Client, StreamEvent
from vigil.errors import VigilError
from vigil.replay import read_bucket

pytestmark = [pytest.mark.integration, pytest.mark.fault]

PROBLEMS = ("disk full on the scratch volume", "git not found on PATH",
            "quota exceeded for the artifact bucket")


async def incident_counts(platform: Platform) -> dict[str, int]:
    """``{title: count}`` of every incident the auditors wrote."""
    kv = await platform.js.key_value(subjects.KV_INCIDENTS)
    try:
        keys = await kv.keys()
    except NoKeysError:
        return {}
    out = {}
    for key in keys:
        incident = json.loads((await kv.get(key)).value)
        out[incident["title"]] = incident["count"]
    return out


async def auditor_drained(platform: Platform) -> bool:
    info = await platform.js.consumer_info(subjects.STREAM_ISSUES, subjects.CONSUMER_AUDITOR)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


@dataclass(frozen=True)
class Delivery:
    auditor: str
    seq: int
    attempt: int


class Wire:
    """Which auditor process is handed which confession, watched on the wire (core NATS
    lets a third subscriber see it): an auditor's pull requests name its inbox, and its
    confessions are delivered there."""

    ACKS = f"$JS.ACK.{subjects.STREAM_ISSUES}.{subjects.CONSUMER_AUDITOR}."

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.inboxes: list[str] = []
        self.followed: set[str] = set()
        self.delivered: list[Delivery] = []

    async def start(self) -> None:
        async def pulled(msg: Msg) -> None:
            if msg.reply and msg.reply not in self.inboxes:
                self.inboxes.append(msg.reply)

        next_ = f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STREAM_ISSUES}.{subjects.CONSUMER_AUDITOR}"
        await self.nc.subscribe(next_, cb=pulled)

    async def follow(self, name: str) -> None:
        """Watch the deliveries to the inbox not yet followed, that of auditor ``name``."""

        async def new_inbox() -> str | None:
            return next((i for i in self.inboxes if i not in self.followed), None)

        inbox = await eventually(new_inbox, what=f"auditor {name} to pull")
        self.followed.add(inbox)

        async def delivered(msg: Msg) -> None:
            if msg.reply and msg.reply.startswith(self.ACKS):  # not a status message
                meta = msg.metadata
                self.delivered.append(Delivery(name, meta.sequence.stream,
                                               meta.num_delivered))

        await self.nc.subscribe(inbox, cb=delivered)
        await self.nc.flush()

    async def held_by(self, js: Any, name: str) -> Delivery | None:
        """The confession ``name`` holds unacknowledged, if the newest one went there (one
        confession is in flight at a time, so the consumer's ack floor tells)."""
        last = self.delivered[-1] if self.delivered else None
        if last is None or last.auditor != name:
            return None
        info = await js.consumer_info(subjects.STREAM_ISSUES, subjects.CONSUMER_AUDITOR)
        return last if info.num_ack_pending == 1 and info.ack_floor.stream_seq < last.seq \
            else None


@pytest.mark.slow
async def test_two_auditors_count_every_confession_once_though_one_is_killed(
        platform: Platform, tmp_path: Path) -> None:
    wire = Wire(platform.nc)
    await wire.start()
    victim, survivor = (AuditorProcess(tmp_path, platform.url, f"aud-{i}") for i in (1, 2))

    async def confession(n: int, summary: str) -> None:
        body = {"id": f"multi-{n}", "summary": summary, "severity": "error",
                "category": "tooling"}
        await platform.js.publish(subjects.issue("human", "error"), json.dumps(body).encode(),
                                   headers={subjects.MSG_ID: f"multi-{n}"})

    async def counted(n: int) -> dict[str, int] | None:
        counts = await incident_counts(platform)
        return counts if sum(counts.values()) >= n else None

    try:
        # One at a time, so that each one's inbox is known from its first pull request.
        await victim.start().ready()
        await wire.follow("victim")
        await survivor.start().ready()
        await wire.follow("survivor")
        started = time.monotonic()
        # 300 confessions, 100 of each problem, interleaved, published in pipelined batches:
        # the first 90 before the victim is frozen, the rest after.
        total = 3 * 100

        async def publish(start: int, end: int) -> None:
            for first in range(start, end, 50):
                await asyncio.gather(*[confession(n, PROBLEMS[n % 3])
                                       for n in range(first, min(first + 50, end))])

        await publish(0, 90)

        async def shared() -> bool:
            both = {d.auditor for d in wire.delivered} == {"victim", "survivor"}
            return both and bool(await counted(60))

        await eventually(shared, timeout=60, what="both auditors to have counted 60")
        # Freeze the victim, then send the rest, and kill it once it holds a confession it
        # has not acked: with one confession in flight across all auditors, the frozen
        # victim's waiting pull request is served as soon as the survivor acks its own
        # (if the victim was not holding one already). Publishing the rest only now makes
        # sure there is something left for it to be handed, however fast the first went.
        victim.signal(signal.SIGSTOP)
        await publish(90, total)
        held = await eventually(lambda: wire.held_by(platform.js, "victim"), timeout=30,
                                what="the frozen victim to hold a confession")
        victim.signal(signal.SIGKILL)
        await victim.exited(timeout=10)
        killed_at = time.monotonic()
        counted_before = sum((await incident_counts(platform)).values())

        # The confession the victim held comes back after the consumer's ack wait (10 s).
        await eventually(lambda: counted(total), timeout=90,
                         what="all 300 confessions to be counted")
        await eventually(lambda: auditor_drained(platform), timeout=30,
                         what="the auditor consumer to have nothing pending")
        counts = await incident_counts(platform)
        assert counts == dict.fromkeys(PROBLEMS, 100), counts  # none lost, none twice
        # Every key of the bucket, read as the project reads buckets (one ordered-consumer
        # pass): nats-py's keys() watcher can end before the first key on a loaded host.
        stored = await read_bucket(platform.js, subjects.KV_CONFESSIONS)
        recorded = [k for k in stored if k.startswith("human.multi-")]
        assert len(recorded) == total
        again = [d for d in wire.delivered if d.seq == held.seq and d.auditor == "survivor"]
        assert again and again[-1].attempt > held.attempt  # the held one was redelivered
        assert len({d.seq for d in wire.delivered}) == total
        by_victim = sum(d.auditor == "victim" for d in wire.delivered)
        print(f"\n300 confessions: {counted_before} counted before the kill; the victim was "
              f"handed {by_victim}, held #{held.seq} when killed; all counted "
              f"{time.monotonic() - killed_at:.1f}s after the kill, "
              f"{time.monotonic() - started:.1f}s in all", file=sys.stderr)
    finally:
        victim.kill()
        survivor.kill()


GATED = """\
import os, sys, time
for i in range(3):
    print(f"before {i}", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.02)
for i in range(3):
    print(f"after {i}", flush=True)
"""


async def _read_until(events: Any, done: Any, into: list[StreamEvent]) -> None:
    async for ev in events:
        into.append(ev)
        if done(into):
            return


def _lines(events: list[StreamEvent]) -> list[str]:
    return [line for ev in events if ev.kind == "log" for line in ev.data.get("lines", [])]


async def test_two_gateways_share_tasks_and_an_event_stream_fails_over(
        platform: Platform, tmp_path: Path) -> None:
    await platform.scheduler()
    await platform.executor()
    gateways = [GatewayProcess(tmp_path, platform.url, f"gw-{i}", sse_keepalive_s=1)
                for i in (1, 2)]
    try:
        for gateway in gateways:
            gateway.start()
        for gateway in gateways:
            await gateway.ready()
        gw1, gw2 = gateways
        gate = tmp_path / "gate"
        async with Client(gw1.url) as one, Client(gw2.url) as two:
            accepted = await one.submit({"id": "multi-gw", "labels": {"via": "gw-1"},
                                         "command": ["python3", "-c", GATED, str(gate)]})
            task_id = accepted["id"]
            # Submitted through gateway 1, visible through gateway 2 at once…
            spec = (await two.get(task_id)).spec
            assert spec is not None and spec.labels == {"via": "gw-1"}

            # …and in its list once its index has caught up.
            async def listed() -> bool:
                page = await two.list_tasks(labels={"via": "gw-1"})
                return [t.id for t in page.tasks] == [task_id]

            await eventually(listed, what="gateway 2 to list the task")

            # An event stream from gateway 1, read until the agent waits at the gate…
            first: list[StreamEvent] = []
            stream = one.events(task_id, reconnect=False)
            async with asyncio.timeout(30):
                await _read_until(stream, lambda got: len(_lines(got)) == 3, first)
            assert _lines(first) == ["before 0", "before 1", "before 2"]
            # …then gateway 1 dies under it: the open stream breaks.
            gw1.kill()
            with pytest.raises(VigilError, match="event stream for multi-gw"):
                await asyncio.wait_for(_read_until(stream, lambda got: False, first), 30)
            gate.touch()
            # The client resumes on gateway 2 after the last event it saw.
            rest: list[StreamEvent] = []
            async with asyncio.timeout(30):
                await _read_until(two.events(task_id, last_event_id=first[-1].id),
                                  lambda got: False, rest)
            everything: list[StreamEvent] = []
            async with asyncio.timeout(30):
                await _read_until(two.events(task_id), lambda got: False, everything)
            assert (await two.get(task_id)).status == "succeeded"

        # An id is the position in both streams (lifecycle, output): each part grows, none
        # is seen twice, none lost (the two streams interleave as their events arrive).
        ids = [tuple(map(int, ev.id.split("."))) for ev in first + rest]
        assert len(ids) == len(set(ids))
        assert all(sorted(i[part] for i in ids) == [i[part] for i in ids] for part in (0, 1))
        assert sorted(ev.id for ev in everything) == sorted(ev.id for ev in first + rest)
        assert everything[0].kind == "accepted" and everything[-1].kind == "finished"
        assert _lines(first + rest) == ["before 0", "before 1", "before 2",
                                        "after 0", "after 1", "after 2"]
        assert len(await stored_events(platform.js, task_id)) == len(everything)
    finally:
        for gateway in gateways:
            gateway.kill()


async def _holder(platform: Platform) -> str | None:
    kv = await platform.js.key_value(subjects.KV_LEASES)
    try:
        entry = await kv.get("dispatcher")
    except KeyNotFoundError:
        return None
    return entry.value.decode() if entry.value else None


@pytest.mark.slow
async def test_the_dispatcher_lease_moves_when_its_scheduler_is_killed(
        platform: Platform, tmp_path: Path) -> None:
    await platform.executor(slots=4)
    schedulers = {f"sched-{i}": SchedulerProcess(tmp_path, platform.url, f"sched-{i}")
                  for i in (1, 2)}
    try:
        # The lease's value is "<VIGIL_NODE_ID>/<random suffix>" of its holder.
        await schedulers["sched-1"].start().ready()
        await eventually(lambda: _holder(platform), what="a dispatcher lease")
        await schedulers["sched-2"].start().ready()
        await platform.publish_spec({"id": "lease-warm", "command": ["true"]})
        assert (await platform.final_state("lease-warm")).status == "succeeded"
        holder = await _holder(platform)
        assert holder is not None
        node = holder.split("/")[0]
        survivor = "sched-2" if node == "sched-1" else "sched-1"
        schedulers[node].signal(signal.SIGKILL)
        await schedulers[node].exited(timeout=10)
        killed_at = time.monotonic()

        ids = [f"lease-after-{i}" for i in range(6)]
        for task_id in ids:
            await platform.publish_spec({"id": task_id, "command": ["true"]})
        # Dispatch resumes once the dead holder's lease expires (TTL 5 s) and the other
        # scheduler takes it; a final state also needs admission, which never paused.
        states = [await platform.final_state(t, timeout=30) for t in ids]
        took = time.monotonic() - killed_at
        assert [s.status for s in states] == ["succeeded"] * len(ids)
        assert all(s.attempt == 1 for s in states)
        # The survivor takes the lease once the dead holder's expires (TTL 5 s).
        async def taken_over() -> str | None:
            current = await _holder(platform)
            return current if current and current.startswith(survivor + "/") else None
        new_holder = await eventually(taken_over, timeout=20,
                                      what="the survivor to hold the lease")
        for task_id in ids:  # dispatched once each, by the survivor
            kinds = [e.get("kind") for e in await stored_events(platform.js, task_id)]
            assert kinds.count("scheduled") == 1 and kinds.count("started") == 1, kinds
        assert took < 15, f"dispatch resumed only {took:.1f}s after the kill"
        print(f"\nlease {holder} killed; {len(ids)} tasks finished {took:.1f}s later under "
              f"{new_holder}", file=sys.stderr)
    finally:
        for scheduler in schedulers.values():
            scheduler.kill()


@pytest.mark.parametrize("order", [(30.0, 6.0), (6.0, 30.0)])
async def test_executors_with_different_leases_never_shorten_the_pools(
    platform: Platform, order: tuple[float, float]
) -> None:
    """The pool's work consumer is shared: its ack wait is when the server redelivers
    any executor's task. Each executor used to set it to its own VIGIL_ACK_WAIT_S, the
    last to start winning, so an executor timing its leases by 30 s could have its tasks
    redelivered to another node after 6 s while it still ran them. The pool keeps the
    longest; each executor gives its leases up at its own (never later than the server)."""
    for n, ack_wait in enumerate(order):
        await platform.executor(node_id=f"lease-{n}", ack_wait_s=ack_wait, heartbeat_s=1.0)
    info = await platform.js.consumer_info(subjects.STREAM_WORK,
                                           subjects.consumer_executor("default"))
    assert info.config.ack_wait == 30.0
    # And the pool works: a task runs on it.
    await platform.scheduler()
    await platform.publish_spec({"id": "leased", "command": ["true"]})
    assert (await platform.final_state("leased")).status == "succeeded"
