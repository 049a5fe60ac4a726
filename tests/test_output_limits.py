"""Output is bounded (issue #12, part 3).

An agent that prints far more than its ``resources.output_mb`` keeps running and finishes;
what it printed past the limit is dropped with a marker line and one ``output_limit``
confession; the task's ``finished`` event and ``vigil replay rebuild`` stay exact. The
bulky event kinds (log, progress, egress) live in ``VIGIL_OUTPUT``, bounded in bytes and
discarding its oldest; the lifecycle kinds stay in ``VIGIL_EVENTS``, which nothing but age
removes, so filling ``VIGIL_OUTPUT`` never costs a task its ``finished`` event.

Real rootless Podman and a real nats-server with the shipped users.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import DiscardPolicy

from support import Platform, as_user, session_node_id
from vigil import auth, subjects, topology
from vigil.client import Client
from vigil.embedded import PodmanService
from vigil.jetstream import read_stored
from vigil.natsserver import NatsServer
from vigil.rebuild import RebuildRun

MIB = 1024 * 1024


def podman_settings(podman: PodmanService) -> dict[str, object]:
    return {"runtime": "podman", "unsafe_runtime": False, "podman_url": podman.url,
            "stop_grace_s": 1, "node_id": session_node_id()}
LINE = 1_000  # bytes per printed line, its newline included

FLOOD_AGENT = f"""
import sys
line = "x" * {LINE - 1} + "\\n"
chunk = line * 100
for _ in range(int(sys.argv[1]) // len(chunk)):
    sys.stdout.write(chunk)
sys.stdout.flush()
print('::vigil::confess {{"summary": "still heard after the flood", "severity": "info"}}',
      flush=True)
print("the end", flush=True)
"""


async def stored(js: Any, stream: str, tenant: str, task_id: str) -> list[dict[str, Any]]:
    return [json.loads(d) for d in await read_stored(js, stream, subjects.task_events(
        tenant, task_id), limit=1_000_000)]


async def rebuilt_equals_live(js: Any) -> None:
    run = RebuildRun(js, io.StringIO())
    result = await run.run()
    assert result.same, result.to_json()


@pytest.mark.podman
async def test_fifty_megabytes_past_a_five_megabyte_limit_are_dropped_and_the_agent_finishes(
    platform: Platform, podman: PodmanService, agent_image: str, nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    await platform.scheduler()
    await platform.executor(**podman_settings(podman))
    tokens = tmp_path / "tokens.json"
    key = auth.add_token(tokens, "v", "acme", "viewer")
    gateway = await platform.gateway(auth="tokens", tokens_file=str(tokens))
    printed = 50 * MIB
    await platform.publish_spec({
        "id": "flood", "image": agent_image, "timeout_s": 120,
        "command": ["python3", "-c", FLOOD_AGENT, str(printed)],
        "resources": {"output_mb": 5},
    })
    state = await platform.final_state("flood", timeout=150)
    assert state.status == "succeeded", state

    output = await stored(platform.js, subjects.STREAM_OUTPUT, "acme", "flood")
    lines = [(e["stream"], line) for e in output if e["kind"] == "log" for line in e["lines"]]
    markers = [line for s, line in lines if line.startswith("[vigil: output limit")]
    agent = [line for s, line in lines if not line.startswith("[vigil: output limit")]
    kept = sum(len(line.encode()) + 1 for line in agent)
    # Every line is kept while it fits, none after the first that does not: at most one
    # line short of the limit, never over it.
    assert 5 * MIB - LINE < kept <= 5 * MIB, kept
    assert all(line == "x" * (LINE - 1) for line in agent)
    assert len(markers) == 2 and all(s == "stderr" for s, line in lines if line in markers)
    assert "so far" in markers[0] and "45.0 MiB" in markers[1], markers
    assert state.tail[-1] == markers[1]  # the task's state says how much was dropped

    events = await stored(platform.js, subjects.STREAM_EVENTS, "acme", "flood")
    kinds = [e["kind"] for e in events]
    assert "log" not in kinds and kinds.count("finished") == 1
    confessions = [e for e in events if e["kind"] == "confession"]
    limits = [c for c in confessions if "output passed its limit" in c["summary"]]
    assert len(limits) == 1 and limits[0]["source"] == "executor"
    assert any(c["summary"] == "still heard after the flood" for c in confessions)
    started = next(e for e in events if e["kind"] == "started")
    assert started["resources"]["output_mb"] == {"value": 5, "by": "executor"}
    finished = next(e for e in events if e["kind"] == "finished")
    took = (datetime.fromisoformat(finished["time"])
            - datetime.fromisoformat(started["time"])).total_seconds()
    # What `vigil logs` and the SSE stream give: the same lines, then the end.
    async with Client(f"http://127.0.0.1:{gateway.http_port}", key) as client:
        assert [line async for line in client.logs("flood")] == [line for _, line in lines]
        sse = [ev async for ev in client.events("flood")]
    assert sse[-1].kind == "finished"
    assert sum(len(ev.data["lines"]) for ev in sse if ev.kind == "log") == len(lines)
    info = await platform.js.stream_info(subjects.STREAM_OUTPUT)
    print(f"\nprinted {printed / MIB:.0f} MiB, kept {kept / MIB:.2f} MiB of lines, "
          f"VIGIL_OUTPUT holds {info.state.bytes / MIB:.2f} MiB; started -> finished {took:.1f} s")
    assert info.state.bytes < 6 * MIB
    await rebuilt_equals_live(platform.js)


@pytest.mark.integration
async def test_a_full_output_stream_drops_old_output_but_never_a_finished_event(
    platform: Platform, nats_server: NatsServer,
) -> None:
    await platform.scheduler()
    await platform.executor()
    # After the services' own ensure_topology (which would set the default size back).
    await topology.ensure_stream(platform.js, topology.output_stream(max_bytes=256 * 1024))
    ids = [f"chatty-{i}" for i in range(6)]
    for task_id in ids:  # each prints ~100 KiB: together far past the stream's 256 KiB
        await platform.publish_spec({"id": task_id, "command": [
            "python3", "-c", "import sys; sys.stdout.write(('y' * 99 + '\\n') * 1000)"]})
        assert (await platform.final_state(task_id)).status == "succeeded"
    info = await platform.js.stream_info(subjects.STREAM_OUTPUT)
    assert info.state.bytes <= 256 * 1024 and info.state.first_seq > 1  # old output went
    first_logs = await stored(platform.js, subjects.STREAM_OUTPUT, "acme", ids[0])
    assert first_logs == [] or len(first_logs) < 10
    for task_id in ids:  # ... but every task's lifecycle is whole
        kinds = [e["kind"] for e in await stored(platform.js, subjects.STREAM_EVENTS, "acme",
                                                  task_id)]
        assert kinds[:1] == ["accepted"] and kinds[-1] == "finished", kinds
    t0 = time.monotonic()
    await rebuilt_equals_live(platform.js)
    assert time.monotonic() - t0 < 30


@pytest.mark.integration
async def test_a_deployment_from_before_the_output_stream_is_migrated_in_place(
    nats_server: NatsServer,
) -> None:
    """VIGIL_EVENTS on vigil.events.> with a task's log and finished in it: the scheduler's
    ensure_topology (its shipped user) narrows it and creates VIGIL_OUTPUT; nothing stored
    is lost, the old log stays readable (a task's filter matches it still), new output
    goes to VIGIL_OUTPUT, and a second run changes nothing."""
    admin = await nats.connect(as_user(nats_server.url, "admin"))
    js = admin.jetstream()
    old = dataclasses.replace(topology.EVENTS, subjects=(f"{subjects.EVENTS}.>",))
    await js.add_stream(config=old.config(1))
    await js.publish(subjects.event("acme", "old", "log"), b'{"kind": "log"}')
    await js.publish(subjects.event("acme", "old", "finished"), b'{"kind": "finished"}')
    scheduler = await nats.connect(as_user(nats_server.url, "scheduler"),
                                   inbox_prefix=subjects.inbox("scheduler").encode())
    try:
        for _ in range(2):
            await topology.ensure_topology(scheduler.jetstream(), output_max_bytes=MIB)
        events = await js.stream_info(subjects.STREAM_EVENTS)
        assert set(events.config.subjects or ()) == {
            subjects.events_of_kind(k) for k in subjects.LIFECYCLE_KINDS}
        assert events.state.messages == 2
        output = await js.stream_info(subjects.STREAM_OUTPUT)
        assert output.config.max_bytes == MIB and output.config.discard == DiscardPolicy.OLD
        await js.publish(subjects.event("acme", "new", "log"), b'{"kind": "log"}')
        assert await stored(js, subjects.STREAM_EVENTS, "acme", "old") == [
            {"kind": "log"}, {"kind": "finished"}]
        assert await stored(js, subjects.STREAM_OUTPUT, "acme", "new") == [{"kind": "log"}]
    finally:
        await scheduler.close()
        await admin.close()
