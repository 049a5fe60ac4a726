"""A runaway agent is contained: its own host uids (a user namespace per agent), so its
process limit is its own; no nested namespaces or mounts inside it; a lower CPU priority
than the services. Real rootless Podman, the shipped NATS permissions, tenants submitting
as their own NATS users."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from support import Platform, as_user, eventually
from vigil import subjects
from vigil.embedded import AGENT_NICE, PodmanService
from vigil_executor.isolation import autogroup_enabled, nice_of
from vigil_executor.service import Executor

pytestmark = [pytest.mark.integration, pytest.mark.podman]

NPROC = 64  # the smallest VIGIL_NPROC: the fork bomb is bounded and quick

# Forks until the kernel says no (EAGAIN at RLIMIT_NPROC), says so, and holds every
# process until it is stopped.
BOMB = r"""
import os, signal
n = 0
try:
    while True:
        if os.fork() == 0:
            signal.pause()
            os._exit(0)
        n += 1
except OSError as exc:
    print(f"AT LIMIT {n} {exc.errno}", flush=True)
signal.pause()
"""

# What an agent may not do (each outcome printed), and what it still may.
HARDENING = r"""
import ctypes, errno, json, os, subprocess, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
def outcome(rc):
    return "ok" if rc == 0 else errno.errorcode.get(ctypes.get_errno(), "?")
facts = {
    "unshare_user": outcome(libc.unshare(0x10000000)),
    "unshare_mount": outcome(libc.unshare(0x00020000)),
    "mount_tmpfs": outcome(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
    "umount": outcome(libc.umount2(b"/workspace", 0)),
    "unshare_files": outcome(libc.unshare(0x400)),
    "cli_unshare_U": subprocess.run(["unshare", "-U", "true"], capture_output=True).returncode,
}
seen = []
t = threading.Thread(target=seen.append, args=("thread",)); t.start(); t.join()
facts["thread"] = seen == ["thread"]
facts["sh"] = subprocess.run(["sh", "-c", "echo hi"], capture_output=True, text=True).stdout
facts["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
try:
    os.setpriority(os.PRIO_PROCESS, 0, 0)
    facts["renice_to_0"] = "ok"
except OSError as exc:
    facts["renice_to_0"] = errno.errorcode[exc.errno]
def autogroup():
    try:
        return open("/proc/self/autogroup").read().split()
    except OSError:
        return None  # a kernel without autogroup
facts["autogroup"] = autogroup()
# A session of its own, as pexpect or start_new_session make: the kernel gives it an
# autogroup at nice 0; it reports its group as soon as it is lowered (or after 20 s).
NEW_SESSION = "import json, os, time\n" + (
    "def ag():\n    return open('/proc/self/autogroup').read().split()\n"
    "end = time.monotonic() + 20\n"
    "while ag()[-1] == '0' and time.monotonic() < end:\n    time.sleep(0.05)\n"
    "print(json.dumps(ag()))\n")
if facts["autogroup"] is not None:
    child = subprocess.run([sys.executable, "-c", NEW_SESSION], start_new_session=True,
                           capture_output=True, text=True, timeout=60)
    facts["new_session_autogroup"] = json.loads(child.stdout)
print("FACTS " + json.dumps(facts), flush=True)
"""

# Holds until told to stop (its file appears), after saying its uid map.
HOLD = r"""
import os, time
print("MAP " + " ".join(open("/proc/self/uid_map").read().split()), flush=True)
while not os.path.exists("/run/vigil/never"):
    time.sleep(0.05)
"""


class Tenant:
    """A tenant's own raw NATS client (its shipped user): submits and cancels."""

    def __init__(self, name: str, nc: NATS) -> None:
        self.name = name
        self.nc = nc

    async def submit(self, spec: dict[str, Any]) -> None:
        await self.nc.jetstream().publish(subjects.submit(self.name),
                                          json.dumps(spec).encode(), timeout=5)

    async def cancel(self, task_id: str) -> None:
        await self.nc.publish(subjects.cancel_request(self.name),
                              json.dumps({"task_id": task_id}).encode())
        await self.nc.flush()


@pytest.fixture
async def tenants(platform: Platform) -> AsyncIterator[tuple[Tenant, Tenant]]:
    clients = []
    for name in ("acme", "beta"):
        nc = await nats.connect(as_user(platform.url, f"tenant-{name}"),
                                inbox_prefix=subjects.tenant_inbox(name).encode())
        clients.append(Tenant(name, nc))
    try:
        yield clients[0], clients[1]
    finally:
        for c in clients:
            await c.nc.close()


async def podman_executor(platform: Platform, podman: PodmanService,
                          **overrides: Any) -> Executor:
    await platform.scheduler()
    return await platform.executor(**{"runtime": "podman", "unsafe_runtime": False,
                                      "podman_url": podman.url, **overrides})


def lines(platform: Platform, task_id: str) -> list[str]:
    return [line for e in platform.events.of(task_id, "log") for line in e["lines"]]


async def line_of(platform: Platform, task_id: str, prefix: str,
                  timeout: float = 60) -> str:
    async def probe() -> str | None:
        return next((x for x in lines(platform, task_id) if x.startswith(prefix)), None)

    return await eventually(probe, timeout=timeout, what=f"{task_id} to print {prefix!r}")


async def host_view(ex: Executor, container: str) -> tuple[int, int | None, int | None]:
    """The host uid and nice value of the container's first process, and the nice value
    of its parent (conmon, which Podman spawned), as the host's /proc (and ``ps -o
    uid,ni``) sees them."""
    info = await ex.runtime.api.call("GET", f"/containers/{container}/json")  # type: ignore[attr-defined]
    pid = info["State"]["Pid"]
    status = await asyncio.to_thread(Path(f"/proc/{pid}/status").read_text)
    uid_line = next(x for x in status.splitlines() if x.startswith("Uid:"))
    ppid_line = next(x for x in status.splitlines() if x.startswith("PPid:"))
    return int(uid_line.split()[1]), nice_of(pid), nice_of(int(ppid_line.split()[1]))


def podman_uid() -> int:
    import pwd

    return pwd.getpwnam("vigil").pw_uid if os.geteuid() == 0 else os.getuid()


async def test_a_fork_bomb_in_one_tenant_leaves_another_tenants_task_running(
    platform: Platform, podman: PodmanService, agent_image: str,
    tenants: tuple[Tenant, Tenant],
) -> None:
    acme, beta = tenants
    await podman_executor(platform, podman, slots=2, nproc=NPROC, stop_grace_s=1)
    await acme.submit({"id": "bomb", "command": ["python3", "-c", BOMB], "timeout_s": 300,
                       "max_attempts": 1})
    at_limit = await line_of(platform, "bomb", "AT LIMIT")
    forked, err = (int(x) for x in at_limit.split()[2:])
    assert err == 11 and 0 < forked < NPROC  # EAGAIN: its own RLIMIT_NPROC, not the host's

    # While acme's agent holds every process its uid may have, beta's task starts and runs.
    t0 = time.monotonic()
    await beta.submit({"id": "calm", "command": ["python3", "-c", "print('calm', 6 * 7)"],
                       "max_attempts": 1})
    state = await platform.final_state("calm", timeout=60, tenant="beta")
    took = time.monotonic() - t0
    assert state.status == "succeeded", state.error
    assert lines(platform, "calm") == ["calm 42"]
    assert (await platform.state("bomb", "acme")).status == "running"  # type: ignore[union-attr]
    print(f"beta's task succeeded {took:.2f}s after submission, acme's bomb at {forked} "
          "forks")

    await acme.cancel("bomb")
    bomb = await platform.final_state("bomb", timeout=60, tenant="acme")
    assert bomb.status == "cancelled"


async def test_concurrent_agents_have_host_uids_of_their_own(
    platform: Platform, podman: PodmanService, agent_image: str,
    tenants: tuple[Tenant, Tenant],
) -> None:
    acme, beta = tenants
    ex = await podman_executor(platform, podman, slots=2, stop_grace_s=1)
    await acme.submit({"id": "one", "command": ["python3", "-c", HOLD], "timeout_s": 120})
    await beta.submit({"id": "two", "command": ["python3", "-c", HOLD], "timeout_s": 120})
    maps = [await line_of(platform, t, "MAP ") for t in ("one", "two")]
    ranges = []
    for line in maps:
        inside, outer, count = (int(x) for x in line.split()[1:])
        assert inside == 0 and count == ex.settings.userns_size
        ranges.append(range(outer, outer + count))
    assert not set(ranges[0]) & set(ranges[1])  # disjoint: no uid in common
    seen = [await host_view(ex, platform.events.of(t, "started")[0]["container"])
            for t in ("one", "two")]
    uids = [uid for uid, _, _ in seen]
    assert uids[0] != uids[1] and not {0, podman_uid()} & set(uids)
    # Below the services' priority, as the host sees it (the executor runs in this process);
    # only the agents: the Podman service and each agent's conmon keep the services' own,
    # so starting the next container never waits behind busy agents.
    assert [nice for _, nice, _ in seen] == [AGENT_NICE, AGENT_NICE]
    assert nice_of(os.getpid()) == 0
    assert podman.child is not None and podman.child.process is not None
    assert nice_of(podman.child.process.pid) == 0
    assert [conmon for _, _, conmon in seen] == [0, 0]
    print(f"agents' host uids {uids}, nice {[nice for _, nice, _ in seen]}; executor, "
          "Podman service and conmon nice 0")
    for tenant, task in ((acme, "one"), (beta, "two")):
        await tenant.cancel(task)
        assert (await platform.final_state(task, timeout=60)).status == "cancelled"


async def test_nested_namespaces_and_mounts_are_refused_and_agents_run_niced(
    platform: Platform, podman: PodmanService, agent_image: str,
    tenants: tuple[Tenant, Tenant],
) -> None:
    acme, _ = tenants
    await podman_executor(platform, podman)
    await acme.submit({"id": "probe", "command": ["python3", "-c", HARDENING]})
    state = await platform.final_state("probe", timeout=60)
    assert state.status == "succeeded", state.error
    facts = json.loads((await line_of(platform, "probe", "FACTS "))[6:])
    assert facts["unshare_user"] == "EPERM"  # no nested user namespace
    assert facts["unshare_mount"] == "EPERM"
    assert facts["mount_tmpfs"] == "EPERM" and facts["umount"] == "EPERM"
    assert facts["cli_unshare_U"] != 0  # `unshare -U true` fails
    # What agents do still works: other unshare flags, threads, a shell, fork + exec.
    assert facts["unshare_files"] == "ok" and facts["thread"] is True
    assert facts["sh"] == "hi\n"
    # Below the services' priority (this test's process is the executor's), for good.
    assert facts["nice"] == AGENT_NICE > os.getpriority(os.PRIO_PROCESS, 0)
    assert facts["renice_to_0"] == "EACCES"
    (started,) = platform.events.of("probe", "started")
    assert started["resources"]["userns"] == {"value": "auto:2048", "by": "podman"}
    assert started["resources"]["seccomp"] == {"value": "vigil", "by": "seccomp"}
    assert started["resources"]["priority"] == {"value": AGENT_NICE, "by": "nice"}
    if autogroup_enabled():
        # The kernel weighs sessions before nice values: the agent's session is lowered
        # with it, and a session it starts is lowered by the executor's next sample.
        assert facts["autogroup"][-2:] == ["nice", str(AGENT_NICE)]
        assert facts["new_session_autogroup"][-2:] == ["nice", str(AGENT_NICE)]
        assert facts["new_session_autogroup"][0] != facts["autogroup"][0]
