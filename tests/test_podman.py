"""Agents in real rootless Podman containers, through the whole platform."""

from __future__ import annotations

import json
import os
import pwd
import re
from typing import Any

import pytest

from support import Platform, eventually
from vigil import codec, subjects
from vigil.embedded import PodmanService
from vigil.errors import SettingsError
from vigil.messages import TaskState
from vigil_executor.service import Executor

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


def host_uid(info: dict[str, Any], outer: int) -> int:
    """The host uid of id ``outer`` of the rootless Podman user's namespace (Podman's
    ``/info`` has that namespace's map)."""
    for m in info["host"]["idMappings"]["uidmap"]:
        if m["container_id"] <= outer < m["container_id"] + m["size"]:
            return int(m["host_id"] + outer - m["container_id"])
    raise AssertionError(f"{outer} is not mapped in the Podman user's namespace")


async def podman_platform(platform: Platform, podman: PodmanService, **overrides) -> Executor:
    await platform.scheduler()
    return await platform.executor(**{"runtime": "podman", "unsafe_runtime": False,
                                      "podman_url": podman.url, **overrides})


async def test_container_is_rootless_offline_readonly(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    ex = await podman_platform(platform, podman)
    await platform.publish_spec({"id": "probe", "command": ["python3", "-c", PROBE]})
    state = await platform.final_state("probe", timeout=60)
    assert state.status == "succeeded", state.error
    lines = [line for e in platform.events.of("probe", "log") for line in e["lines"]]
    facts = json.loads(next(line for line in lines if line.startswith("FACTS "))[6:])
    # Rootless, and a user namespace of its own: container root maps to one of the
    # Podman user's subordinate ids (the map's host column is an id of the Podman user's
    # namespace, which maps 1.. onto that range), never to host root nor to the Podman
    # user itself, and the agent has VIGIL_USERNS_SIZE ids.
    inside, outer, count = (int(x) for x in facts["uid_map"][:3])
    assert len(facts["uid_map"]) == 3  # one range
    podman_uid = pwd.getpwnam("vigil").pw_uid if os.geteuid() == 0 else os.getuid()
    host = host_uid(ex.runtime.info, outer)
    assert inside == 0 and outer >= 1 and count == ex.settings.userns_size == 2048
    assert host not in (0, podman_uid)
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
    # Whether this host can enforce limits (cgroup v2, delegated), said on every start.
    assert started["limits_enforced"] is ex.runtime.limits_enforced


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
    # One attempt: its failure is the task's (a budget of several, spent, is `dead`).
    await platform.publish_spec({"id": "exit3", "command": ["sh", "-c", "exit 3"],
                                 "max_attempts": 1})
    state = await platform.final_state("exit3", timeout=60)
    assert state.status == "failed" and state.exit_code == 3
    assert "no output" in (state.error or "")
    confessions = platform.events.of("exit3", "confession")
    assert any(c["source"] == "executor" and "without any output" in c["summary"]
               for c in confessions)
    # Platform confessions name the image: the auditor's fingerprint groups by it.
    stored = await platform.confessions(category="silent_failure")
    assert stored and all(c["data"]["image"] == agent_image for c in stored)


async def test_time_limit_in_container(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    ex = await podman_platform(platform, podman, stop_grace_s=1)
    await platform.publish_spec({"id": "sleeper", "command": ["sleep", "60"], "timeout_s": 1})
    state = await platform.final_state("sleeper", timeout=60)
    assert state.status == "timed_out", state.error
    assert state.error == "killed after exceeding its time limit of 1s"
    # The platform confessed it for the agent, which said nothing.
    (confession,) = await platform.confessions(category="time_limit")
    assert confession["summary"] == state.error and confession["severity"] == "warning"
    assert (confession["source"], confession["component"]) == ("executor", "executor")
    assert confession["task_id"] == "sleeper" and confession["tenant"] == "acme"
    assert confession["node"] == ex.settings.node_id and confession["attempt"] == 1
    assert confession["data"] == {"image": agent_image}
    (event,) = platform.events.of("sleeper", "confession")
    assert event["confession_id"] == confession["id"]


async def test_a_second_executor_with_the_same_node_id_refuses_to_start(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    """Two live executors with one node id: the second used to clear the first one's live
    control directories ("could not start the container ... error mounting
    .../control/<task>-a<n> to rootfs at /run/vigil: no such file", the flaky time-limit
    test of side-by-side runs) and remove its running containers as orphans, found by
    the node id's label, so a state directory of its own would not help. Now it refuses
    to start, with or without one, and the running agent is untouched."""
    ex = await podman_platform(platform, podman, stop_grace_s=1)
    node = ex.settings.node_id
    await platform.publish_spec({"id": "held", "command": ["sleep", "60"], "timeout_s": 8})
    await platform.events.wait_for("held", "started", timeout=60)
    refused = re.escape(f"another executor with node id {node} is running on this host; "
                        "give each executor its own VIGIL_NODE_ID")
    with pytest.raises(SettingsError, match=refused):
        await platform.executor(runtime="podman", unsafe_runtime=False,
                                podman_url=podman.url, node_id=node)
    with pytest.raises(SettingsError, match=refused):
        await platform.executor(runtime="podman", unsafe_runtime=False,
                                podman_url=podman.url, node_id=node,
                                state_dir=f"/tmp/vigil-executor-{node}-elsewhere")
    state = await platform.final_state("held", timeout=60)
    assert state.status == "timed_out", state.error  # ran to its limit, not removed


async def test_unenforceable_limits_are_confessed_with_component_and_node(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    ex = await podman_platform(platform, podman)
    node = ex.settings.node_id
    host = ex.runtime.info["host"]  # type: ignore[attr-defined]
    found = [c for c in await platform.confessions(category="limits_unenforced")
             if c.get("node") == node]
    if ex.runtime.limits_enforced:
        # cgroup v2 with delegated controllers: nothing to confess.
        assert host["cgroupVersion"] == "v2" and found == []
        return
    # cgroup v1 (hybrid here), or v2 without delegation, rootless: memory/CPU/pids limits
    # are not enforceable, and the executor says so.
    (confession,) = found  # said at start, before taking any work
    assert (confession["source"], confession["component"]) == ("executor", "executor")
    assert confession["severity"] == "warning"
    assert confession["summary"] == f"resource limits are not enforceable on node {node}"
    version = host.get("cgroupVersion") or "unknown"
    assert confession["detail"].startswith(f"cgroup {version} rootless: memory/CPU/pids "
                                           "limits cannot be enforced")
    assert "cgroup v2" in confession["hint"]


async def test_helper_confess_reaches_the_issues_stream(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    """images/agent/vigil_agent.py's confess(), run in the agent image, end to end."""
    ex = await podman_platform(platform, podman)
    agent = (
        "import vigil_agent\n"
        "vigil_agent.confess(summary='the frobnicator is missing', severity='error',\n"
        "                    category='tooling', detail='looked in /usr/bin and /opt',\n"
        "                    hint='install frobnicator in the image')\n"
        "print('confessed', flush=True)\n"
    )
    await platform.publish_spec({"id": "confessor", "command": ["python3", "-c", agent]})
    state = await platform.final_state("confessor", timeout=60)
    assert state.status == "succeeded", state.error
    agent_says = [c for c in await platform.confessions() if c.get("source") == "agent"]
    (c,) = agent_says
    assert (c["summary"], c["severity"], c["category"]) == (
        "the frobnicator is missing", "error", "tooling")
    assert c["detail"] == "looked in /usr/bin and /opt"
    assert c["hint"] == "install frobnicator in the image"
    assert c["task_id"] == "confessor" and c["tenant"] == "acme" and c["attempt"] == 1
    assert c["component"] == "agent" and c["node"] == ex.settings.node_id
    assert c["id"] == "acme.confessor-a1-c1"  # the task key names the tenant
    (event,) = platform.events.of("confessor", "confession")
    assert event["source"] == "agent" and event["confession_id"] == c["id"]
    lines = [line for e in platform.events.of("confessor", "log") for line in e["lines"]]
    assert lines == ["confessed"]  # the control line is not a log line


async def test_confession_rate_and_size_limits_in_a_container(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    """One oversize confession and six small ones against a bucket of three that does not
    refill: the oversize one is refused by name and size, two small ones get through, and
    the four dropped are reported once."""
    await podman_platform(platform, podman, max_confessions=3, confessions_per_min=0)
    agent = (
        "import json, vigil_agent\n"
        "big = {'summary': 'huge evidence', 'severity': 'warning', 'detail': 'x' * 20000}\n"
        "line = '::vigil::confess ' + json.dumps(big, separators=(',', ':'))\n"
        "print('SIZE', len(line.encode()), flush=True)\n"
        "vigil_agent.confess(**big)\n"
        "for i in range(6):\n"
        "    vigil_agent.confess(f'looping {i}', severity='info', category='loop')\n"
    )
    await platform.publish_spec({"id": "chatty", "command": ["python3", "-c", agent]})
    state = await platform.final_state("chatty", timeout=60)
    assert state.status == "succeeded", state.error
    lines = [line for e in platform.events.of("chatty", "log") for line in e["lines"]]
    size = int(lines[0].split()[1])
    assert size > 20_000
    # The refused line is kept as log, cut, with its real size.
    assert lines[1].endswith(f" [truncated: {size} bytes]")
    stored = await platform.confessions()
    assert [c["summary"] for c in stored if c.get("source") == "agent"] == [
        "looping 0", "looping 1"]
    (too_large,) = [c for c in stored if c.get("category") == "confession_too_large"]
    assert too_large["summary"].startswith(
        f"agent confession too large ({size} bytes > 16384 byte limit)")
    assert too_large["source"] == "executor" and too_large["task_id"] == "chatty"
    (dropped,) = [c for c in stored if c.get("category") == "confession_rate_limit"]
    assert dropped["summary"] == ("4 confessions dropped by the rate limit (burst 3, "
                                  "0 a minute)")
    assert dropped["task_id"] == "chatty" and dropped["data"] == {"image": agent_image}
    assert not [c for c in stored if c.get("category") == "malformed_control_line"]


async def test_an_image_no_node_has_waits_queued_and_is_never_handed_out(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    """The executor advertises the images Podman holds; a task whose image no node has
    stays queued, says so and is confessed, and times out in the queue: no node spends a
    delivery finding out (the executor's own check stays, for a stale advert)."""
    await platform.scheduler(unservable_after_s=0)
    executor = await platform.executor(runtime="podman", unsafe_runtime=False,
                                       podman_url=podman.url)
    kv = await platform.js.key_value(subjects.KV_EXECUTORS)
    advert = codec.any_decoder.decode((await kv.get(executor.settings.node_id)).value)
    assert agent_image in advert["images"]
    await platform.publish_spec({"id": "noimg", "command": ["true"],
                                 "image": "localhost/does-not-exist:1", "queue_timeout_s": 3})

    async def waiting() -> TaskState | None:
        state = await platform.state("noimg")
        return state if state is not None and state.waiting else None

    state = await eventually(waiting, what="the task to say which image nobody has")
    assert state.status == "queued"
    assert "has image 'localhost/does-not-exist:1'" in (state.waiting or "")
    final = await platform.final_state("noimg")
    assert final.status == "timed_out" and final.history == []
    assert platform.events.of("noimg", "retrying") == []
    confessions = await platform.confessions(category="unservable")
    assert any(c.get("task_id") == "noimg" for c in confessions)
    # A task naming an image the node has, by its short name, runs there.
    await platform.publish_spec({"id": "short", "command": ["true"], "image": "vigil-agent"})
    assert (await platform.final_state("short", timeout=60)).status == "succeeded"
