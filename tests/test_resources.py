"""A task's resources on real rootless Podman (cgroup v1 here: the executor's watchdog
enforces them), through the whole platform under the shipped NATS permissions: a hog is
stopped with a precise outcome, the node keeps its memory and disk, the started event and
GET /v1/executors say how each limit is enforced, and a task over its tenant's maximum is
a 422 naming the field."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support import Platform, eventually, podman_argv
from vigil import auth
from vigil.embedded import PodmanService
from vigil_executor.service import Executor

pytestmark = [pytest.mark.integration, pytest.mark.podman, pytest.mark.slow]

# Four processes, each touching 400 MiB in 8 MiB steps every 50 ms (~160 MiB/s each),
# then holding it; each prints (its index, MiB touched, time) after every step, so the
# moment their sum crosses a limit is known from the agent's own words.
HOG = r"""
import os, sys, time
def hog(i):
    chunks = []
    while True:
        if len(chunks) < 50:
            chunks.append(bytearray(8 << 20))  # bytearray(n) is zeroed: touched
        print(f"HOG {i} {len(chunks) * 8} {time.time():.3f}", flush=True)
        time.sleep(0.05)
for i in range(3):
    if os.fork() == 0:
        hog(i + 1)
hog(0)
"""

# Writes the workspace 16 MiB at a time, as fast as the disk takes it, to 2 GiB.
DD = ["sh", "-c", "dd if=/dev/zero of=$VIGIL_WORKSPACE/fill bs=16M count=128 2>&1; "
      "echo dd-finished"]

# Starts threads until told to stop: past a pids limit of 32.
THREADS = r"""
import threading, time
for n in range(200):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    print("threads", n + 1, flush=True)
    time.sleep(0.02)
time.sleep(60)
"""

MIB = 1024 * 1024


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


async def podman_platform(platform: Platform, podman: PodmanService, **overrides: Any
                          ) -> Executor:
    await platform.scheduler()
    return await platform.executor(**{"runtime": "podman", "unsafe_runtime": False,
                                      "podman_url": podman.url, **overrides})


def volumes() -> set[str]:
    import subprocess

    done = subprocess.run([*podman_argv(), "volume", "ls", "--format", "{{.Name}}"],
                          capture_output=True, text=True, check=True, timeout=60)
    return set(done.stdout.split())


async def test_a_four_process_memory_hog_is_stopped_at_its_limit(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    ex = await podman_platform(platform, podman)
    if ex.runtime.limits_enforced:
        pytest.skip("cgroup v2 delegated here: the kernel enforces memory, not the watchdog")
    lowest = mem_available_mb()
    done = asyncio.Event()

    async def watch_memory() -> None:
        # The host's MemAvailable every 50 ms until the task has ended (and at once then).
        nonlocal lowest
        while not done.is_set():
            lowest = min(lowest, mem_available_mb())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.05)

    watcher = asyncio.create_task(watch_memory())
    try:
        await platform.publish_spec({"id": "hog", "command": ["python3", "-c", HOG],
                                     "resources": {"memory_mb": 1024}, "max_attempts": 3})
        state = await platform.final_state("hog", timeout=90)
    finally:
        done.set()
        await watcher
    assert lowest >= 2048, f"the host's MemAvailable fell to {lowest:.0f} MiB"
    assert state.status == "failed" and state.attempt == 1, state  # not retried
    assert state.limit == "memory_limit" and state.peak is not None and state.peak > 1024
    assert state.error is not None and state.error.startswith(
        "memory limit 1024 MiB crossed: "), state.error
    assert "processes" in state.error
    # Crossed when the four processes' own counts summed past 1024 MiB (their PSS crossed
    # a little earlier: each interpreter's own pages); stopped when they fell silent.
    touched: dict[str, int] = {}
    crossed_at = last_at = None
    for event in platform.events.of("hog", "log"):
        for line in event["lines"]:
            # Four processes share the pipe: a line may hold two reports run together.
            for i, mb, at in re.findall(r"HOG (\d) (\d+) (\d+\.\d{3})", line):
                touched[i] = int(mb)
                last_at = float(at)
                if crossed_at is None and sum(touched.values()) > 1024:
                    crossed_at = float(at)
    assert last_at is not None, "the hog's output was not stored"
    if crossed_at is None:
        # Stopped before their own counts summed past 1024 MiB: the interpreters' pages
        # took the PSS over first. Stopped within 0 s of crossing, then.
        print(f"hog: stopped before its counts crossed, peak {state.peak} MiB, host "
              f"MemAvailable low {lowest:.0f} MiB")
    else:
        print(f"hog: crossed at +0, last line at +{last_at - crossed_at:.2f}s, peak "
              f"{state.peak} MiB, host MemAvailable low {lowest:.0f} MiB")
        assert last_at - crossed_at <= 3.0, f"stopped {last_at - crossed_at:.2f}s after crossing"
    (finished,) = platform.events.of("hog", "finished")
    assert (finished["limit"], finished["peak"]) == ("memory_limit", state.peak)
    (started,) = platform.events.of("hog", "started")
    assert started["resources"]["memory_mb"] == {"value": 1024, "by": "watchdog"}
    assert started["resources"]["pids"]["by"] == "watchdog"
    assert started["resources"]["cpus"]["by"] == "none"  # cgroup v1 rootless: said so
    found = await eventually(lambda: _confessions(platform, "memory_limit", "hog"),
                             what="the memory_limit confession")
    assert found[0]["severity"] == "error" and "resources.memory_mb" in found[0]["hint"]
    assert not platform.events.of("hog", "retrying")


async def _confessions(platform: Platform, category: str, task_id: str) -> list[Any]:
    return [c for c in await platform.confessions(category) if c.get("task_id") == task_id]


async def test_a_workspace_filled_past_disk_mb_is_stopped_and_its_volume_removed(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    ex = await podman_platform(platform, podman)
    await platform.publish_spec({"id": "dd", "command": DD, "resources": {"disk_mb": 512}})
    started = (await platform.events.wait_for("dd", "started", timeout=60))[0]
    assert started["resources"]["disk_mb"] == {"value": 512, "by": "watchdog"}
    state = await platform.final_state("dd", timeout=90)
    assert state.status == "failed" and state.attempt == 1, state
    assert state.limit == "disk_limit" and state.peak is not None
    assert 512 < state.peak < 512 + 256, state.peak  # stopped before it wrote much more
    assert state.error == f"disk limit 512 MiB crossed: the workspace held {state.peak:.0f} MiB"
    lines = [line for e in platform.events.of("dd", "log") for line in e["lines"]]
    assert "dd-finished" not in lines, lines
    print(f"dd: peak {state.peak} MiB (limit 512)")
    await eventually(lambda: _confessions(platform, "disk_limit", "dd"),
                     what="the disk_limit confession")
    node = ex.settings.node_id

    async def volume_gone() -> bool:
        return not any(node in v for v in await asyncio.to_thread(volumes))

    await eventually(volume_gone, timeout=30, what="the workspace volume to be removed")


async def test_threads_past_the_pids_limit_are_stopped(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    ex = await podman_platform(platform, podman)
    if ex.runtime.limits_enforced:
        pytest.skip("cgroup v2 delegated here: forks fail at the limit instead")
    await platform.publish_spec({"id": "threads", "command": ["python3", "-c", THREADS],
                                 "resources": {"pids": 32}})
    state = await platform.final_state("threads", timeout=90)
    assert state.status == "failed" and state.limit == "pids_limit", state
    assert state.peak is not None and state.peak > 32
    assert state.error is not None and state.error.startswith("pids limit 32 crossed: ")
    counts = [int(line.split()[1]) for e in platform.events.of("threads", "log")
              for line in e["lines"] if line.startswith("threads ")]
    assert counts and max(counts) < 200  # stopped long before it was done


async def test_how_limits_are_enforced_is_advertised_and_a_task_over_its_maximum_is_a_422(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.json"
    headers = {"Authorization": f"Bearer {auth.add_token(tokens, 's', 'acme', 'submitter')}"}
    await platform.scheduler(resources_default='{"memory_mb": 512}',
                             tenant_limits=json.dumps({"acme": {"resources_max": {
                                 "memory_mb": 2048}}}))
    ex = await platform.executor(runtime="podman", unsafe_runtime=False,
                                 podman_url=podman.url)
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens))
    url = f"http://127.0.0.1:{gw.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/tasks", headers=headers, json={
                "id": "greedy", "command": ["true"], "resources": {"memory_mb": 4096}}) as r:
            status, body = r.status, await r.json()
        assert status == 422, body
        assert (body["error"]["code"], body["error"]["field"]) == ("rejected",
                                                                   "$.resources.memory_mb")
        assert "maximum of 2048 MiB" in body["error"]["message"]
        async with http.post(f"{url}/v1/tasks", headers=headers, json={
                "id": "modest", "command": ["true"]}) as r:
            assert r.status == 202, await r.text()
        state = await platform.final_state("modest", timeout=60, tenant="acme")
        assert state.status == "succeeded", state.error
        assert state.spec is not None and state.spec.resources is not None
        assert state.spec.resources.memory_mb == 512  # the default, stored
        (started,) = platform.events.of("modest", "started")
        assert started["resources"]["memory_mb"]["value"] == 512
        async with http.get(f"{url}/v1/executors", headers=headers) as r:
            listing = await r.json()
    (mine,) = [e for e in listing["executors"] if e["node"] == ex.settings.node_id]
    expected = "cgroup" if ex.runtime.limits_enforced else "watchdog"
    assert mine["enforcement"]["memory_mb"] == expected
    assert mine["enforcement"]["disk_mb"] == "watchdog"
    assert mine["enforcement"]["cpus"] == ("cgroup" if ex.runtime.limits_enforced else "none")
