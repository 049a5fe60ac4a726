"""The platform's failures are not charged to the agent: a container that cannot start
for a host reason (no processes left for the rootless user, a Podman 5xx) hands its task
back, no attempt spent, with a confession; the task runs once the host is healthy. A
command the image lacks is the task's own failure and still fails it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from support import Platform, session_node_id
from vigil.embedded import PodmanService
from vigil_executor.podman import PodmanRuntime
from vigil_executor.podman_container import PodmanContainer
from vigil_executor.podman_errors import error_of
from vigil_executor.runtime import ContainerSpec

pytestmark = [pytest.mark.integration, pytest.mark.podman]

# Podman's answer to a start whose runc could not fork (the rootless user at RLIMIT_NPROC).
EAGAIN = json.dumps({
    "cause": "OCI runtime error", "response": 500,
    "message": "runc: runc create failed: unable to start container process: can't fork: "
               "resource temporarily unavailable: OCI runtime error"}).encode()


class RefusedStart(PodmanRuntime):
    """Real Podman, except that the first container's start is answered with a 500."""

    def __init__(self, url: str, refusals: int = 1) -> None:
        super().__init__(url)
        self.refusals = refusals

    async def create(self, spec: ContainerSpec) -> PodmanContainer:
        container = await super().create(spec)
        if self.refusals > 0:
            self.refusals -= 1

            async def refuse() -> None:
                raise error_of(500, EAGAIN, f"/containers/{container.id}/start")

            container.start = refuse  # type: ignore[method-assign]
        return container


class StarvedInit(PodmanRuntime):
    """Real Podman; the first container gets RLIMIT_NPROC 1, so its init (catatonit)
    cannot fork the agent, for real: what another agent forking to the limit does."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.starved = 0

    def create_body(self, spec: ContainerSpec) -> dict[str, Any]:
        body = super().create_body(spec)
        if self.starved == 0:
            self.starved += 1
            body["r_limits"] = [
                {"type": "nproc", "soft": 1, "hard": 1} if r["type"] == "nproc" else r
                for r in body["r_limits"]]
        return body


def settings(podman: PodmanService) -> dict[str, Any]:
    return {"runtime": "podman", "unsafe_runtime": False, "podman_url": podman.url,
            "stop_grace_s": 1, "node_id": session_node_id()}


def lines_of(platform: Platform, task_id: str) -> list[str]:
    return [line for e in platform.events.of(task_id, "log") for line in e["lines"]]


async def handed_back_then_succeeded(platform: Platform, task_id: str, node: str,
                                     cause: str) -> None:
    """One attempt handed back for the host's failure (its only budget not spent: the
    task allows one), the next succeeding; a confession and a retrying event say why."""
    state = await platform.final_state(task_id, timeout=90)
    assert state.status == "succeeded", state.error
    assert [(h.attempt, h.outcome) for h in state.history] == [
        (1, "handed_back"), (2, "succeeded")]
    prefix = f"the container could not start on node {node} for a host reason ({cause}): "
    assert (state.history[0].error or "").startswith(prefix)
    (retrying,) = platform.events.of(task_id, "retrying")
    assert retrying["reason"].startswith(prefix) and retrying["delay_s"] == 5.0
    (confession,) = [c for c in await platform.confessions(category="container_start_infra")
                     if c.get("task_id") == task_id]
    assert confession["summary"].startswith(prefix)
    assert confession["summary"].endswith("; handed back, no attempt spent")
    assert confession["attempt"] == 1 and confession["node"] == node
    assert not await platform.confessions(category="container_start_failed")
    assert lines_of(platform, task_id)[-1] == "ran"


async def test_a_podman_500_at_start_is_handed_back_not_charged(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    await platform.scheduler()
    conf = settings(podman)
    await platform.executor(runtime_impl=RefusedStart(podman.url), **conf)
    await platform.publish_spec({"id": "refused", "command": ["sh", "-c", "echo ran"],
                                 "max_attempts": 1})
    await handed_back_then_succeeded(platform, "refused", conf["node_id"], "eagain")


async def test_an_init_that_cannot_fork_the_agent_is_the_hosts_failure(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    await platform.scheduler()
    conf = settings(podman)
    runtime = StarvedInit(podman.url)
    await platform.executor(runtime_impl=runtime, **conf)
    await platform.publish_spec({"id": "starved", "command": ["sh", "-c", "echo ran"],
                                 "max_attempts": 1})
    await handed_back_then_succeeded(platform, "starved", conf["node_id"], "eagain")
    assert runtime.starved == 1
    # The evidence is on the timeline: catatonit's own words, as attempt 1's output.
    first = [ln for e in platform.events.of("starved", "log") if e["attempt"] == 1
             for ln in e["lines"]]
    assert first[-1] == ("ERROR (catatonit:1): failed to spawn pid1: Resource temporarily "
                         "unavailable")


async def test_a_command_missing_from_the_image_fails_the_task(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    """Not retried either: the next attempt would find the same image."""
    await platform.scheduler()
    conf = settings(podman)
    await platform.executor(**conf)
    await platform.publish_spec({"id": "typo", "command": ["pyhton3", "-c", "print(1)"],
                                 "max_attempts": 3})
    state = await platform.final_state("typo", timeout=60)
    assert state.status == "failed" and state.attempt == 1
    assert [h.outcome for h in state.history] == ["failed"]
    assert state.error == (f"could not start the container on {conf['node_id']}: the "
                           "container's init could not start the agent: failed to exec "
                           "pid1: No such file or directory")
    (confession,) = await platform.confessions(category="container_start_failed")
    assert confession["task_id"] == "typo" and confession["summary"] == state.error
    assert not await platform.confessions(category="container_start_infra")
