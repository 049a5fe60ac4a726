"""No workspace volume is left behind: every way an attempt ends (drain, a lost lease,
NATS gone mid-task, the executor killed and restarted) removes its container and its
per-attempt volume. Counted through the Podman API, as an operator would see them."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from support import ExecutorProcess, Platform, eventually, session_node_id
from vigil.embedded import PodmanService
from vigil.natsserver import NatsServer

pytestmark = [pytest.mark.integration, pytest.mark.podman]

ROOT = Path(__file__).resolve().parent.parent
AGENT = (ROOT / "tests" / "agents" / "counter.py").read_text()


async def podman_get(podman: PodmanService, path: str, **params: str) -> Any:
    assert podman.socket is not None
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(podman.socket))) \
            as http, http.get(f"http://podman/v4.0.0/libpod{path}", params=params) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def volumes_of(podman: PodmanService, node: str) -> list[str]:
    """The node's workspace volumes, by name (whatever labels they carry or lack)."""
    found = await podman_get(podman, "/volumes/json")
    return sorted(v["Name"] for v in found or [] if v["Name"].startswith(f"vigil-ws-{node}-"))


async def containers_of(podman: PodmanService, node: str) -> list[str]:
    filters = json.dumps({"label": [f"dev.vigil.executor={node}"]})
    found = await podman_get(podman, "/containers/json", all="true", filters=filters)
    return [c["Id"] for c in found or []]


async def nothing_left(podman: PodmanService, node: str) -> bool:
    return not await volumes_of(podman, node) and not await containers_of(podman, node)


def podman_settings(podman: PodmanService, **overrides: object) -> dict[str, Any]:
    return {"runtime": "podman", "unsafe_runtime": False, "podman_url": podman.url,
            "stop_grace_s": 1, **overrides}


def counter(task_id: str, steps: int = 200, step_s: float = 0.1) -> dict[str, Any]:
    return {"id": task_id, "command": ["python3", "-c", AGENT],
            "env": {"STEPS": str(steps), "STEP_S": str(step_s)}}


async def running_volume(platform: Platform, podman: PodmanService, node: str,
                         task_id: str) -> None:
    """The attempt's agent has started and checkpointed: its volume exists now."""
    await platform.events.wait_for(task_id, "checkpoint", timeout=60)
    assert await volumes_of(podman, node), "the attempt's volume should exist while it runs"


async def test_a_drain_removes_the_attempts_volume(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    node = session_node_id()
    await platform.scheduler()
    ex = await platform.executor(**podman_settings(podman, node_id=node))
    await platform.publish_spec(counter("drained"))
    await running_volume(platform, podman, node, "drained")
    await ex.shutdown()
    await eventually(lambda: nothing_left(podman, node), timeout=30,
                     what="the drained attempt's container and volume to be removed")
    state = await platform.state("drained")
    assert state is not None and state.status == "scheduled"  # handed back


async def test_a_lost_lease_removes_the_attempts_volume(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    """A newer attempt took the task (this node froze past the ack wait): the heartbeat
    gives the lease up, stops the agent, and its volume goes with its container."""
    node = session_node_id()
    await platform.scheduler()
    ex = await platform.executor(**podman_settings(podman, node_id=node))
    await platform.publish_spec(counter("usurped"))
    await running_volume(platform, podman, node, "usurped")
    got = await platform.store.get("acme", "usurped")
    assert got is not None
    taken = msgspec.structs.replace(got[0], attempt=got[0].attempt + 1, executor="elsewhere")
    assert await platform.store.cas(taken, got[1]) is not None
    await eventually(lambda: _leases_lost(ex), what="the lease to be given up")
    await eventually(lambda: nothing_left(podman, node), timeout=30,
                     what="the usurped attempt's container and volume to be removed")


@pytest.mark.fault
async def test_nats_lost_mid_task_removes_the_attempts_volume(
    platform: Platform, podman: PodmanService, agent_image: str, nats_server: NatsServer
) -> None:
    """NATS hangs longer than the ack wait: the executor stops its agent and records
    nothing; the container and the volume go even though NATS is still gone."""
    node = session_node_id()
    await platform.scheduler()
    ex = await platform.executor(**podman_settings(podman, node_id=node, ack_wait_s=4,
                                                   heartbeat_s=1))
    await platform.publish_spec(counter("cut-off"))
    await running_volume(platform, podman, node, "cut-off")
    nats_server.signal(signal.SIGSTOP)
    try:
        await eventually(lambda: _leases_lost(ex), timeout=30, what="the lease to be given up")
        await eventually(lambda: nothing_left(podman, node), timeout=60,
                         what="the cut-off attempt's container and volume to be removed")
    finally:
        nats_server.signal(signal.SIGCONT)


@pytest.mark.fault
async def test_sigterm_of_the_executor_process_leaves_no_volume(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path
) -> None:
    node = session_node_id()
    await platform.scheduler()
    proc = ExecutorProcess(tmp_path, platform.url, node, **podman_settings(podman))
    try:
        await proc.start().ready()
        await platform.publish_spec(counter("termed"))
        await running_volume(platform, podman, node, "termed")
        proc.signal(signal.SIGTERM)
        assert await proc.exited() == 0
        assert await nothing_left(podman, node), (await volumes_of(podman, node),
                                                  proc.log_text()[-2000:])
    finally:
        proc.kill()


@pytest.mark.fault
@pytest.mark.slow
async def test_a_drain_while_nats_is_gone_leaves_no_volume(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path,
    nats_server: NatsServer,
) -> None:
    """SIGTERM while NATS hangs: the drain cannot checkpoint or hand back (the lease
    lapses and the server redelivers instead), and it outlasts its wait; the attempt is
    still ended before the executor closes its runtime, container and volume removed."""
    node = session_node_id()
    await platform.scheduler()
    proc = ExecutorProcess(tmp_path, platform.url, node, **podman_settings(podman))
    try:
        await proc.start().ready()
        await platform.publish_spec(counter("stranded"))
        await running_volume(platform, podman, node, "stranded")
        nats_server.signal(signal.SIGSTOP)
        try:
            proc.signal(signal.SIGTERM)
            assert await proc.exited(timeout=150) == 0
        finally:
            nats_server.signal(signal.SIGCONT)
        assert await nothing_left(podman, node), (await volumes_of(podman, node),
                                                  proc.log_text()[-3000:])
    finally:
        proc.kill()


@pytest.mark.fault
async def test_an_executor_restarted_after_kill9_removes_its_orphaned_volumes(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path
) -> None:
    """kill -9 leaves the running agent's container and volume; the next life of the node
    removes both, and also a volume whose container is already gone (the executor died
    between removing one and the other), found by the volume's own labels. Another
    node's volume is left alone (Podman ORs volume label filters: a filter of managed=1
    and executor=<node> once matched every node's volumes)."""
    node, other = session_node_id(), session_node_id()
    decoy = f"vigil-ws-{other}-decoy-a1"
    await platform.scheduler()
    # A long lease: the task is not redelivered (to a second attempt here) during the test.
    proc = ExecutorProcess(tmp_path, platform.url, node,
                           **podman_settings(podman, ack_wait_s=120))
    try:
        await proc.start().ready()
        await platform.publish_spec(counter("killed"))
        await running_volume(platform, podman, node, "killed")
        proc.signal(signal.SIGKILL)
        await proc.exited()
        (volume,) = await volumes_of(podman, node)
        (cid,) = await containers_of(podman, node)
        # One more orphan: the container of an earlier attempt removed, its volume not.
        await _remove_container_only(podman, cid)
        assert await volumes_of(podman, node) == [volume]
        await _podman(podman, "POST", "/volumes/create", json={"Name": decoy, "Label": {
            "dev.vigil.managed": "1", "dev.vigil.executor": other}})
        await proc.start().ready()
        await eventually(lambda: nothing_left(podman, node), timeout=30,
                         what="the orphaned volume to be removed")
        assert await volumes_of(podman, other) == [decoy]
        proc.signal(signal.SIGTERM)
        assert await proc.exited() == 0
    finally:
        proc.kill()
        await _podman(podman, "DELETE", f"/volumes/{decoy}", params={"force": "true"})


async def _remove_container_only(podman: PodmanService, cid: str) -> None:
    status = await _podman(podman, "DELETE", f"/containers/{cid}",
                           params={"force": "true", "t": "0"})
    assert status in (200, 204)


async def _podman(podman: PodmanService, method: str, path: str, **kwargs: Any) -> int:
    assert podman.socket is not None
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(podman.socket))) \
            as http, http.request(method, f"http://podman/v4.0.0/libpod{path}", **kwargs) as r:
        return r.status


async def _leases_lost(ex: Any) -> bool:
    return bool(ex.metrics.leases_lost._value.get() >= 1)
