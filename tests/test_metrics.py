"""Metrics and logs from day one: a podman task through the platform, then each service's
``/metrics`` scraped over real HTTP and the executor's JSON log read from its file."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import ExecutorProcess, Platform, eventually, session_node_id
from vigil.embedded import PodmanService

pytestmark = [pytest.mark.integration, pytest.mark.podman]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: aiohttp.ClientSession, port: int) -> Samples:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a library's stray output; the services' own lines are JSON
        if isinstance(entry, dict):
            out.append(entry)
    return out


async def test_task_metrics_and_log_context(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path
) -> None:
    scheduler = await platform.scheduler()
    # The first task arrives while no executor is up: it waits in the queue and the
    # dispatcher schedules it. The second is admitted with a free slot: the fast path.
    await platform.publish_spec({"id": "m-queued", "command": ["sh", "-c", "echo one"]})
    await platform.events.wait_for("m-queued", "accepted")
    ex = ExecutorProcess(tmp_path, platform.url, session_node_id(), runtime="podman",
                         podman_url=podman.url, heartbeat_s=1, stop_grace_s=2)
    ex.start()
    try:
        await ex.ready()
        started = next(e for e in json_lines(ex.log_path) if e.get("event") == "executor_started")
        ex_port = int(started["http_port"])
        assert (await platform.final_state("m-queued", timeout=60)).status == "succeeded"
        await platform.publish_spec(
            {"id": "m-direct", "command": ["sh", "-c", "echo two; sleep 0.3"]})
        assert (await platform.final_state("m-direct", timeout=60)).status == "succeeded"

        async with aiohttp.ClientSession() as http:
            async def executor_counted() -> Samples | None:
                # The outcome is counted once it is recorded, around the ack.
                got = await scrape(http, ex_port)
                return got if value(got, "vigil_tasks_total", status="succeeded") == 2 else None

            ex_samples = await eventually(executor_counted, what="the executor's counters")
            sched = await scrape(http, scheduler.http_port)
    finally:
        if ex.process.poll() is None:
            ex.signal(signal.SIGTERM)
            await ex.exited(timeout=30)
        ex.kill()

    # The executor: outcomes and transitions by status, run time, container start latency.
    assert value(ex_samples, "vigil_tasks_total", status="running") == 2
    assert value(ex_samples, "vigil_tasks_total", status="failed") in (None, 0)
    assert value(ex_samples, "vigil_task_duration_seconds_count") == 2
    assert (value(ex_samples, "vigil_task_duration_seconds_sum") or 0) >= 0.3
    assert value(ex_samples, "vigil_container_start_seconds_count") == 2
    assert (value(ex_samples, "vigil_container_start_seconds_sum") or 0) > 0
    # The scheduler: both tasks queued then scheduled, one of them by the dispatcher.
    assert value(sched, "vigil_tasks_total", status="queued") == 2
    assert value(sched, "vigil_tasks_total", status="scheduled") == 2
    assert (value(sched, "vigil_scheduler_dispatched_total") or 0) >= 1
    assert value(sched, "vigil_scheduler_submissions_total", outcome="scheduled") == 1

    # The executor's JSON log: lines about a task carry its id and attempt.
    lines = json_lines(ex.log_path)
    about = [e for e in lines if e.get("task_id") == "m-direct" and e.get("attempt") == 1]
    assert about, f"no log line with task_id and attempt among {len(lines)}"
    assert all(e["service"] == "vigil-executor" and e["executor"] == ex.node_id
               for e in about)
    finished = [e for e in about if e.get("event") == "task_finished"]
    assert [(e["status"], e["exit_code"]) for e in finished] == [("succeeded", 0)]
    assert all(e.get("timestamp") and e.get("level") for e in about)
