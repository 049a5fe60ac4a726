"""Agents in real rootless Podman containers, through the whole platform."""

from __future__ import annotations

import json
import os
import pwd

import pytest

from support import Platform
from vigil.embedded import PodmanService

pytestmark = [pytest.mark.integration, pytest.mark.podman]

PROBE = r"""
import json, os
facts = {}
facts["uid_map"] = open("/proc/self/uid_map").read().split()
facts["interfaces"] = sorted(os.listdir("/sys/class/net"))
try:
    open("/probe", "w").write("x")
    facts["root_writable"] = True
except OSError as exc:
    facts["root_writable"] = False
    facts["root_error"] = exc.strerror
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
facts["cap_eff"] = status["CapEff"].strip()
facts["no_new_privs"] = status["NoNewPrivs"].strip()
ws = os.environ["VIGIL_WORKSPACE"]
open(os.path.join(ws, "note"), "w").write("ok")
facts["workspace_writable"] = True
facts["env"] = {k: v for k, v in os.environ.items() if k.startswith("VIGIL_")}
import resource
facts["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
print("FACTS " + json.dumps(facts))
"""


async def podman_platform(platform: Platform, podman: PodmanService, **overrides):
    await platform.scheduler()
    await platform.executor(**{"runtime": "podman", "unsafe_runtime": False,
                                             "podman_url": podman.url, **overrides})
    return platform


async def test_container_is_rootless_offline_readonly(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    await podman_platform(platform, podman)
    await platform.publish_spec({"id": "probe", "command": ["python3", "-c", PROBE]})
    state = await platform.final_state("probe", timeout=60)
    assert state.status == "succeeded", state.error
    lines = [line for e in platform.events.of("probe", "log") for line in e["lines"]]
    facts = json.loads(next(line for line in lines if line.startswith("FACTS "))[6:])
    # Rootless: container root maps to an unprivileged host uid, never to host root.
    inside, host, count = (int(x) for x in facts["uid_map"][:3])
    expected = pwd.getpwnam("vigil").pw_uid if os.geteuid() == 0 else os.getuid()
    assert inside == 0 and host == expected and host != 0 and count == 1
    assert facts["interfaces"] == ["lo"]  # no network but loopback
    assert facts["root_writable"] is False and facts["root_error"] == "Read-only file system"
    assert facts["cap_eff"] == "0000000000000000"  # every capability dropped
    assert facts["no_new_privs"] == "1"
    assert facts["workspace_writable"] is True
    assert facts["nofile"] == 1024
    env = facts["env"]
    assert env["VIGIL_TASK_ID"] == "probe" and env["VIGIL_ATTEMPT"] == "1"
    assert env["VIGIL_RESUMED"] == "0" and env["VIGIL_WORKSPACE"] == "/workspace"
    started = platform.events.of("probe", "started")[0]
    assert started["limits_enforced"] is False  # cgroup v1 rootless here; said loudly


async def test_demo_agent_and_helper_module(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    await podman_platform(platform, podman)
    await platform.publish_spec({"id": "demo", "command": ["python3", "/opt/vigil/demo_agent.py"],
                                 "env": {"DEMO_STEPS": "2", "DEMO_STEP_S": "0"}})
    state = await platform.final_state("demo", timeout=60)
    assert state.status == "succeeded"
    lines = [line for e in platform.events.of("demo", "log") for line in e["lines"]]
    assert lines[0] == "hello from Vigil task demo (attempt 1)"
    assert lines[-1] == "demo finished"
    assert [p["data"] for p in platform.events.of("demo", "progress")] == [
        {"step": 1, "of": 2}, {"step": 2, "of": 2}]


async def test_nonzero_exit_and_silent_failure(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    await podman_platform(platform, podman)
    await platform.auditor()
    await platform.publish_spec({"id": "exit3", "command": ["sh", "-c", "exit 3"]})
    state = await platform.final_state("exit3", timeout=60)
    assert state.status == "failed" and state.exit_code == 3
    assert "no output" in (state.error or "")
    confessions = platform.events.of("exit3", "confession")
    assert any(c["source"] == "executor" and "without any output" in c["summary"]
               for c in confessions)


async def test_time_limit_in_container(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    await podman_platform(platform, podman, stop_grace_s=1)
    await platform.publish_spec({"id": "sleeper", "command": ["sleep", "60"], "timeout_s": 1})
    state = await platform.final_state("sleeper", timeout=60)
    assert state.status == "timed_out"


async def test_missing_image_is_handed_back_not_failed(
    platform: Platform, podman: PodmanService
) -> None:
    """A missing image is the node's problem, not the agent's: the task goes back to the
    queue with a delay (another node may have the image), spending no attempt."""
    await podman_platform(platform, podman)
    await platform.publish_spec({"id": "noimg", "command": ["true"],
                                 "image": "localhost/does-not-exist:1", "queue_timeout_s": 60})
    retrying = await platform.events.wait_for("noimg", "retrying", timeout=60)
    assert "localhost/does-not-exist:1 not found on node" in retrying[0]["reason"]
    assert retrying[0]["delay_s"] == 5.0
    state = await platform.state("noimg")
    assert state is not None and state.status == "scheduled"
    assert [h.outcome for h in state.history] == ["handed_back"]
    confessions = await platform.confessions(category="image_missing")
    assert any(c.get("task_id") == "noimg" for c in confessions)
