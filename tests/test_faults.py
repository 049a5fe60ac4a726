"""Node loss, for real: executors are separate processes, killed with SIGKILL, stopped with
SIGTERM, frozen with SIGSTOP. Every test asserts the outcome: the task ends exactly once,
nothing is lost, a stale attempt never overwrites, and the agent resumed from its
checkpoint (its own output proves it did not start over).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from support import ExecutorProcess, Platform, as_user, eventually, stored_events
from vigil import codec, subjects
from vigil.embedded import PodmanService
from vigil.messages import AttemptRecord, TaskSpec, TaskState, WorkItem, utcnow

pytestmark = [pytest.mark.fault, pytest.mark.podman, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
AGENT = (ROOT / "tests" / "agents" / "counter.py").read_text()
ACK_WAIT_S = 6


def executor(tmp_path: Path, platform: Platform, podman: PodmanService, node: str,
             **extra: Any) -> ExecutorProcess:
    return ExecutorProcess(tmp_path, platform.url, node, runtime="podman",
                           podman_url=podman.url, ack_wait_s=ACK_WAIT_S, heartbeat_s=1,
                           stop_grace_s=2, **extra)


def counter_task(task_id: str, steps: int, step_s: float = 0.25, **extra: Any) -> dict:
    return {"id": task_id, "command": ["python3", "-c", AGENT],
            "env": {"STEPS": str(steps), "STEP_S": str(step_s)}, **extra}


async def containers_of(podman: PodmanService, node: str) -> list[dict]:
    filters = json.dumps({"label": [f"dev.vigil.executor={node}"]})
    assert podman.socket is not None
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(podman.socket))) \
            as http, http.get("http://podman/v4.0.0/libpod/containers/json",
                              params={"all": "true", "filters": filters}) as r:
        return list(await r.json() or [])


async def outcome_of(platform: Platform, task_id: str) -> tuple[list[dict], list[str]]:
    """(finished events as stored, agent output lines) — from the stream, not live."""
    events = await stored_events(platform.js, task_id)
    finished = [e for e in events if e["kind"] == "finished"]
    lines = [line for e in events if e["kind"] == "log" for line in e["lines"]]
    return finished, lines


def resumed_from(lines: list[str], attempt: int) -> int:
    line = next(ln for ln in lines if ln.endswith(f"attempt={attempt}"))
    return int(line.split()[2])


@pytest.fixture
async def issues(platform: Platform) -> list[dict]:
    seen: list[dict] = []

    async def on_msg(msg: Any) -> None:
        seen.append(json.loads(msg.data))

    await platform.nc.subscribe(f"{subjects.ISSUES}.>", cb=on_msg)
    return seen


async def test_kill9_resumes_elsewhere_from_checkpoint_and_orphan_is_removed(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path,
    issues: list[dict],
) -> None:
    await platform.scheduler()
    a = executor(tmp_path, platform, podman, "kill-a").start()
    b = executor(tmp_path, platform, podman, "kill-b")
    try:
        await a.ready()
        await platform.publish_spec(counter_task("k9", steps=40))
        await platform.events.wait_for("k9", "checkpoint", count=3, timeout=60)
        await b.start().ready()
        a.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await a.exited()
        started = await platform.events.wait_for("k9", "started", count=2, timeout=60)
        failover_s = time.monotonic() - killed_at
        state = await platform.final_state("k9", timeout=90)
        assert state.status == "succeeded" and state.executor == "kill-b"
        assert [(h.attempt, h.executor, h.outcome) for h in state.history] == [
            (1, "kill-a", "lost"), (2, "kill-b", "succeeded")]
        assert started[1]["resumed"] is True
        finished, lines = await outcome_of(platform, "k9")
        assert len(finished) == 1 and finished[0]["attempt"] == 2
        assert resumed_from(lines, 2) >= 3  # the agent carried on; it did not start over
        assert lines[-1] == "done at 40"
        # Bounded by the ack wait after the last heartbeat (+ a container start).
        assert failover_s < ACK_WAIT_S + 1 + 5, failover_s
        assert any(i.get("category") == "lost_heartbeat" and i.get("task_id") == "k9"
                   for i in issues)

        # The killed node's container outlived it; its next life removes it and says so.
        assert await containers_of(podman, "kill-a")
        a.start()
        await a.ready()
        assert await containers_of(podman, "kill-a") == []
        await eventually(lambda: _found(issues, "node_lost", "k9"), what="orphan confession")
    finally:
        a.kill()
        b.kill()


async def _found(issues: list[dict], category: str, task_id: str) -> bool:
    return any(i.get("category") == category and i.get("task_id") == task_id for i in issues)


async def test_sigterm_hands_the_task_over_in_seconds(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path
) -> None:
    await platform.scheduler()
    a = executor(tmp_path, platform, podman, "term-a").start()
    b = executor(tmp_path, platform, podman, "term-b")
    try:
        await a.ready()
        await platform.publish_spec(counter_task("term", steps=40))
        await platform.events.wait_for("term", "checkpoint", count=3, timeout=60)
        await b.start().ready()
        a.signal(signal.SIGTERM)
        termed_at = time.monotonic()
        started = await platform.events.wait_for("term", "started", count=2, timeout=30)
        handover_s = time.monotonic() - termed_at
        assert await a.exited() == 0
        state = await platform.final_state("term", timeout=90)
        assert state.status == "succeeded" and state.executor == "term-b"
        assert [h.outcome for h in state.history] == ["handed_back", "succeeded"]
        assert started[1]["resumed"] is True
        finished, lines = await outcome_of(platform, "term")
        assert len(finished) == 1
        assert resumed_from(lines, 2) >= 3
        # Drain = seamless migration: no ack wait, only the agent's grace + a container start.
        assert handover_s < 5.0, handover_s
        print(f"SIGTERM to running on the other node: {handover_s:.2f}s")
    finally:
        a.kill()
        b.kill()


async def test_frozen_executor_cannot_overwrite_the_newer_attempt(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path
) -> None:
    await platform.scheduler()
    a = executor(tmp_path, platform, podman, "frozen-a").start()
    b = executor(tmp_path, platform, podman, "frozen-b")
    try:
        await a.ready()
        await platform.publish_spec(counter_task("frozen", steps=60, step_s=0.25))
        await platform.events.wait_for("frozen", "checkpoint", count=2, timeout=60)
        await b.start().ready()
        a.signal(signal.SIGSTOP)  # frozen past the ack wait: its lease lapses
        await platform.events.wait_for("frozen", "started", count=2, timeout=60)
        a.signal(signal.SIGCONT)  # wakes up believing it still runs attempt 1
        await eventually(lambda: _logged(a, "lease_lost"), timeout=30, what="a to notice")
        await eventually(lambda: _none_left(podman, "frozen-a"), timeout=30,
                         what="a to remove its container")
        state = await platform.final_state("frozen", timeout=120)
        assert state.status == "succeeded" and state.executor == "frozen-b"
        assert state.attempt == 2
        finished, lines = await outcome_of(platform, "frozen")
        assert [f["attempt"] for f in finished] == [2]  # the stale attempt recorded nothing
        assert resumed_from(lines, 2) >= 2
    finally:
        a.kill()
        b.kill()


async def test_a_late_result_from_a_frozen_executor_is_fenced_off(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path,
    issues: list[dict],
) -> None:
    """The agent (no checkpoints) finishes while its executor is frozen past the ack wait,
    and a newer attempt runs to success elsewhere. The frozen executor wakes with a result
    in hand: it records nothing, touches nothing, and removes its container."""
    await platform.scheduler()
    a = executor(tmp_path, platform, podman, "late-a").start()
    b = executor(tmp_path, platform, podman, "late-b")
    script = 'echo "attempt $VIGIL_ATTEMPT"; sleep 4; echo "done $VIGIL_ATTEMPT"'
    try:
        await a.ready()
        await platform.publish_spec({"id": "late", "command": ["sh", "-c", script]})
        await platform.events.wait_for("late", "started")
        a.signal(signal.SIGSTOP)  # frozen before its agent ends, and past the ack wait
        await b.start().ready()
        state = await platform.final_state("late", timeout=90)
        assert state.status == "succeeded" and state.executor == "late-b", state
        # The frozen node's agent ran to its end meanwhile; its result is unrecorded.
        await eventually(lambda: _all_exited(podman, "late-a"), timeout=30,
                         what="the frozen executor's agent to exit")
        before = await platform.store.get("acme", "late")
        a.signal(signal.SIGCONT)  # wakes up with attempt 1's exit code in hand
        await eventually(lambda: _logged(a, "lease_lost"), timeout=30, what="a to notice")
        await eventually(lambda: _none_left(podman, "late-a"), timeout=30,
                         what="a to remove its container")
        await eventually(lambda: _found(issues, "lease_lost", "late"), timeout=30,
                         what="a to confess its lost lease")
        assert await platform.store.get("acme", "late") == before  # not one write: same revision
        assert [(h.attempt, h.executor, h.outcome) for h in state.history] == [
            (1, "late-a", "lost"), (2, "late-b", "succeeded")]
        finished, lines = await outcome_of(platform, "late")
        assert [(f["attempt"], f["executor"], f["status"]) for f in finished] == [
            (2, "late-b", "succeeded")]
        assert "done 2" in lines
        assert "task_finished" not in a.log_text()
        lost = next(i for i in issues
                    if i.get("category") == "lease_lost" and i.get("task_id") == "late")
        assert (lost["component"], lost["node"], lost["attempt"]) == ("executor", "late-a", 1)
    finally:
        a.kill()
        b.kill()


async def _all_exited(podman: PodmanService, node: str) -> bool:
    found = await containers_of(podman, node)
    return bool(found) and all(c.get("State") == "exited" for c in found)


async def _logged(proc: ExecutorProcess, event: str) -> bool:
    return f'"event":"{event}"' in proc.log_text()


async def _none_left(podman: PodmanService, node: str) -> bool:
    return await containers_of(podman, node) == []


async def test_a_task_that_keeps_killing_its_executor_goes_dead_with_evidence(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path,
    issues: list[dict],
) -> None:
    await platform.scheduler()
    # Lost attempts do not spend max_attempts (the node failed, not the agent): even with
    # one attempt allowed the task runs again after a kill; max_lost_attempts ends the loop.
    spec = counter_task("doomed", steps=1000, step_s=0.2, max_attempts=1)
    nodes = ["doom-a", "doom-b", "doom-c"]
    procs = [executor(tmp_path, platform, podman, n, max_lost_attempts=2) for n in nodes]
    try:
        await procs[0].start().ready()
        await platform.publish_spec(spec)
        for i in range(2):
            await eventually(lambda i=i: _checkpointed(platform, "doomed", attempt=i + 1),
                             timeout=60, what=f"attempt {i + 1} to checkpoint")
            await procs[i + 1].start().ready()
            procs[i].signal(signal.SIGKILL)  # the task "kills" the node it runs on
            await procs[i].exited()
        state = await platform.final_state("doomed", timeout=60)
        assert state.status == "dead"
        assert [(h.attempt, h.executor, h.outcome) for h in state.history] == [
            (1, "doom-a", "lost"), (2, "doom-b", "lost")]
        assert state.checkpoint is not None  # the last checkpoint is kept as evidence
        assert "crash loop: 2 attempts lost their executor" in (state.error or "")
        assert "max_lost_attempts is 2" in (state.error or "")
        # ... and the last attempt's last output lines, read back from its log events
        # (the executor that printed them is dead).
        events = await stored_events(platform.js, "doomed")
        last_lines = [ln for e in events if e["kind"] == "log" and e["attempt"] == 2
                      for ln in e["lines"]]
        assert state.tail and state.tail == last_lines[-20:], (state.tail, last_lines)
        assert any(ln.startswith("start at ") and ln.endswith("attempt=2")
                   for ln in last_lines)
        dead = next(i for i in issues
                    if i.get("category") == "task_dead" and i.get("task_id") == "doomed")
        assert (dead["component"], dead["node"]) == ("executor", "doom-c")
        finished = [e for e in events if e["kind"] == "finished"]
        assert [f["status"] for f in finished] == ["dead"]
    finally:
        for p in procs:
            p.kill()


async def _checkpointed(platform: Platform, task_id: str, attempt: int) -> bool:
    return any(c["attempt"] == attempt for c in platform.events.of(task_id, "checkpoint"))


async def test_nats_restart_mid_batch_loses_nothing(platform: Platform, nats_server,
                                                    tmp_path: Path) -> None:
    await platform.scheduler()
    await platform.executor(slots=8, workspace_root=str(tmp_path / "ws"),
                            state_dir=str(tmp_path / "st"))
    ids = [f"batch-{i}" for i in range(60)]
    for i in ids:
        await platform.publish_spec({"id": i, "command": ["sh", "-c", "sleep 0.2; echo ok"]})
    await platform.events.wait_for(ids[5], "finished", timeout=30)
    await nats_server.stop()
    await nats_server.restart()  # at once: the services see a hard drop, then the server
    for i in ids:
        state = await platform.final_state(i, timeout=90)
        assert state.status == "succeeded", (i, state.error)
    for i in ids:
        finished, lines = await outcome_of(platform, i)
        assert len(finished) == 1, (i, finished)
        assert lines == ["ok"], (i, lines)


@pytest.mark.integration
async def test_losing_one_node_of_a_three_node_cluster_loses_nothing(
    nats_cluster: list, tmp_path: Path
) -> None:
    from support import start_platform

    url = ",".join(s.url for s in nats_cluster)
    platform = await _cluster_platform(url, start_platform)
    try:
        await platform.scheduler(replicas=3)
        await platform.executor(slots=8, replicas=3, workspace_root=str(tmp_path / "ws"),
                                state_dir=str(tmp_path / "st"))
        ids = [f"r3-{i}" for i in range(40)]
        for i in ids:
            await platform.publish_spec({"id": i, "command": ["sh", "-c", "sleep 0.3; echo ok"]})
        await platform.events.wait_for(ids[3], "finished", timeout=60)
        # SIGKILL one of three nodes mid-batch: the one that leads the work stream, so
        # the work queue itself fails over, not just a follower.
        info = await platform.js.stream_info(subjects.STREAM_WORK)
        assert info.cluster is not None and info.cluster.leader, info.cluster
        (leader,) = [s for s in nats_cluster if s.name == info.cluster.leader]
        leader.kill()
        for i in ids:
            state = await platform.final_state(i, timeout=120)
            assert state.status == "succeeded", (i, state.error)
        for i in ids:
            events = await stored_events(platform.js, i)
            state = await platform.state(i)
            assert state is not None
            finished = [e for e in events if e["kind"] == "finished"]
            assert len(finished) == 1, (i, finished)
            # At-least-once execution, exactly-once outcome: an attempt that could not
            # renew its lease (or record its start) while the cluster failed over is
            # recorded as lost (or handed back) and the task runs again. Every attempt
            # is in the history, only the last succeeded and it printed its line once;
            # a lost attempt printed it at most once (it may have been lost before its
            # agent ran, or before its output was stored).
            outcomes = [(h.attempt, h.outcome) for h in state.history]
            assert [n for n, _ in outcomes] == list(range(1, state.attempt + 1)), outcomes
            assert outcomes[-1][1] == "succeeded", (i, outcomes)
            assert all(o in ("lost", "handed_back") for _, o in outcomes[:-1]), (i, outcomes)
            by_attempt: dict[int, list[str]] = {}
            for e in events:
                if e["kind"] == "log":
                    by_attempt.setdefault(e["attempt"], []).extend(e["lines"])
            assert by_attempt.get(state.attempt) == ["ok"], (i, by_attempt)
            assert all(n <= state.attempt and lines == ["ok"]
                       for n, lines in by_attempt.items()), (i, by_attempt)
    finally:
        await platform.stop()
        await platform.nc.close()


async def _cluster_platform(url: str, start: Any) -> Platform:
    """The cluster elects its JetStream meta leader after start: retry until R3 works."""
    from vigil import topology
    from vigil.conn import connect

    nc = await connect(as_user(url, "admin"), "pytest-setup", wait_s=30)
    try:
        async def ready() -> bool:
            try:
                await topology.ensure_topology(nc.jetstream(timeout=5), replicas=3)
            except Exception:
                return False
            return True

        await eventually(ready, timeout=60, what="the cluster to accept R3 streams")
    finally:
        await nc.close()
    platform: Platform = await start(url)
    return platform


@pytest.mark.integration
async def test_executor_that_cannot_renew_its_lease_stops_its_agent(
    platform: Platform, nats_server, tmp_path: Path
) -> None:
    """NATS unreachable longer than the ack wait: the executor must assume the task is
    someone else's now, stop its agent and record nothing; when NATS is back the task is
    redelivered and runs to one outcome."""
    await platform.scheduler()
    ex = await platform.executor(workspace_root=str(tmp_path / "ws"),
                                 state_dir=str(tmp_path / "st"), ack_wait_s=4, heartbeat_s=1)
    marker = tmp_path / "beats"
    script = f"for i in $(seq 1 60); do echo $VIGIL_ATTEMPT >> {marker}; sleep 0.1; done"
    await platform.publish_spec({"id": "cut-off", "command": ["sh", "-c", script]})
    await platform.events.wait_for("cut-off", "started", timeout=30)
    nats_server.signal(signal.SIGSTOP)  # NATS hangs: no renewal gets through
    try:
        await eventually(lambda: _leases_lost(ex), timeout=30, what="the lease to be given up")
        # The agent was stopped: no process writes its output file any more.
        await eventually(lambda: _no_process_mentions(str(marker)), timeout=10,
                         what="the agent to be stopped")
    finally:
        nats_server.signal(signal.SIGCONT)
    state = await platform.final_state("cut-off", timeout=60)
    assert state.status == "succeeded"
    # Attempt 1 was given up; on a loaded machine a tight test lease (4 s) may lapse once
    # more while NATS catches up. Whatever happened, each earlier attempt is recorded as
    # lost and exactly one outcome exists.
    outcomes = [h.outcome for h in state.history]
    assert outcomes[-1] == "succeeded" and set(outcomes[:-1]) == {"lost"}
    finished, _ = await outcome_of(platform, "cut-off")
    assert [f["attempt"] for f in finished] == [state.attempt]


async def _leases_lost(ex: Any) -> bool:
    return bool(ex.metrics.leases_lost._value.get() >= 1)


async def _no_process_mentions(text: str) -> bool:
    """No live process has ``text`` in its command line (the process runtime's agents)."""
    return await asyncio.to_thread(_no_process_mentions_sync, text)


def _no_process_mentions_sync(text: str) -> bool:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            return False
    return True


@pytest.mark.integration
async def test_dropped_confessions_are_reported_when_the_lease_is_lost(
    platform: Platform, tmp_path: Path
) -> None:
    """An attempt that loses its lease stops its agent mid-output (the output pump is
    cancelled, not ended): the confessions the rate limit dropped are still reported
    (the report used to run only when the output ended by itself)."""
    await platform.scheduler()
    ex = await platform.executor(workspace_root=str(tmp_path / "ws"),
                                 state_dir=str(tmp_path / "st"),
                                 max_confessions=1, confessions_per_min=0)
    confess = "".join(
        f"echo '::vigil::confess {{\"summary\": \"loop {i}\", \"severity\": \"info\"}}'; "
        for i in range(3))
    script = f'[ "$VIGIL_ATTEMPT" -gt 1 ] && exit 0; {confess}exec sleep 60'
    await platform.publish_spec({"id": "usurped", "command": ["sh", "-c", script]})
    await eventually(lambda: _agent_confessed(platform, "usurped"), what="the agent's confession")
    # A newer attempt takes the task over (as after this node froze past the ack wait):
    # the heartbeat's next state read gives the lease up and stops the agent.
    got = await platform.store.get("acme", "usurped")
    assert got is not None and got[0].attempt == 1
    taken = msgspec.structs.replace(got[0], attempt=2, executor="elsewhere")
    assert await platform.store.cas(taken, got[1]) is not None
    await eventually(lambda: _leases_lost(ex), what="the lease to be given up")
    (dropped,) = await eventually(
        lambda: _confessed(platform, "confession_rate_limit", "usurped"),
        what="the dropped confessions to be reported")
    assert dropped["summary"] == "2 confessions dropped by the rate limit (burst 1, 0 a minute)"
    assert dropped["attempt"] == 1
    # The message's lease lapses and a third attempt runs (and ends at once).
    state = await platform.final_state("usurped", timeout=60)
    assert state.status == "succeeded" and state.attempt == 3, state


async def _agent_confessed(platform: Platform, task_id: str) -> bool:
    return any(c.get("source") == "agent" and c.get("task_id") == task_id
               for c in await platform.confessions())


async def _confessed(platform: Platform, category: str, task_id: str) -> list[dict]:
    return [c for c in await platform.confessions(category=category)
            if c.get("task_id") == task_id]


@pytest.mark.integration
async def test_a_redelivery_resends_a_lost_task_dead_confession(
    platform: Platform, tmp_path: Path
) -> None:
    """An executor recorded a task ``dead`` and died before its confession and its ack:
    the work message comes back, and the executor that gets it re-sends ``finished`` and
    the ``task_dead`` confession, with the ids the first one would have used."""
    now = utcnow()
    spec = TaskSpec(command=["true"], id="buried", max_attempts=2)
    work = WorkItem(task_id="buried", tenant="acme", spec=spec, submitted_at=now)
    ack = await platform.js.publish(subjects.work("default"), codec.encode(work))
    history = [AttemptRecord(attempt=n, executor="gone", started_at=now, ended_at=now,
                             outcome="failed", error="agent exited with code 1")
               for n in (1, 2)]
    dead = TaskState(id="buried", tenant="acme", status="dead", attempt=2, executor="gone",
                     created_at=now, updated_at=now, started_at=now, finished_at=now,
                     spec=spec, exit_code=1, error="agent exited with code 1; 2 of 2 "
                     "attempts failed", history=history, work_seq=ack.seq, delivery=1)
    assert await platform.store.create(dead) is not None
    await platform.executor(workspace_root=str(tmp_path / "ws"), state_dir=str(tmp_path / "st"))
    (confession,) = await eventually(lambda: _confessed(platform, "task_dead", "buried"),
                                     what="the task_dead confession")
    assert confession["id"] == "executor-acme.buried-a2-dead" and confession["attempt"] == 2
    assert confession["summary"] == ("task buried is dead: agent exited with code 1; "
                                     "2 of 2 attempts failed")
    (finished,) = await platform.events.wait_for("buried", "finished")
    assert finished["status"] == "dead"
    # A re-published copy of the work (another message) is acked away: still one.
    await platform.js.publish(subjects.work("default"), codec.encode(work))
    await eventually(lambda: _work_settled(platform), what="both work messages acked")
    assert len(await _confessed(platform, "task_dead", "buried")) == 1
    assert (await platform.state("buried")) == dead  # nothing written


async def _work_settled(platform: Platform) -> bool:
    info = await platform.js.consumer_info(subjects.STREAM_WORK,
                                           subjects.consumer_executor("default"))
    return bool(info.delivered.stream_seq >= 2 and info.num_ack_pending == 0
                and info.num_pending == 0)
