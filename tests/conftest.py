"""Fixtures: real nats-server processes (free port, temp store) and rootless Podman."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from support import (
    USED_NODES,
    Platform,
    assert_no_violations,
    podman_argv,
    shipped_server,
    start_platform,
)
from vigil.embedded import PodmanService
from vigil.natsserver import NatsServer

AGENT_IMAGE = "localhost/vigil-agent:latest"


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server as shipped: Vigil's users and permissions (see tests/support.py). Its
    log must show no permission violation when the test ends."""
    server = shipped_server(tmp_path / "nats", sync_always=True)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
    assert_no_violations(server)


@pytest.fixture
async def platform(nats_server: NatsServer) -> AsyncIterator[Platform]:
    p = await start_platform(nats_server.url)
    try:
        yield p
    finally:
        await p.stop()
        await p.nc.close()


@pytest.fixture(scope="session")
async def podman(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PodmanService]:
    """A rootless Podman API service for the whole session (as user vigil when root)."""
    logs = tmp_path_factory.mktemp("podman")
    service = PodmanService(logs / "podman.log", tag=f"pytest-{os.getpid()}")
    before = {c for c, _ in _managed_containers()}
    await service.start()
    try:
        yield service
    finally:
        # Fault tests kill executors for real: their agents' containers outlive them (as
        # on a real dead node, until an executor of that name restarts). Remove the ones
        # this session's executors made, so nothing keeps running after the tests (and
        # nothing of another test run on this host is touched).
        leftovers = [c for c, node in _managed_containers()
                     if c not in before and node in USED_NODES]
        if leftovers:
            _podman_cli(["rm", "-f", "-t", "0", *leftovers])
        await service.stop()


def _podman_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*podman_argv(), *args], capture_output=True, text=True,
                          check=False, timeout=120)


def _managed_containers() -> list[tuple[str, str]]:
    """(container id, executor node id) of every Vigil-managed container."""
    done = _podman_cli(["ps", "-a", "--no-trunc", "--filter", "label=dev.vigil.managed=1",
                        "--format", '{{.ID}} {{index .Labels "dev.vigil.executor"}}'])
    if done.returncode != 0:
        return []
    return [(line.split()[0], " ".join(line.split()[1:]))
            for line in done.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def agent_image() -> str:
    """The default agent image must have been built by setup (./dev test does it)."""
    if _podman_cli(["image", "exists", AGENT_IMAGE]).returncode != 0:
        pytest.fail(f"{AGENT_IMAGE} is missing: run ./dev setup (scripts/build-agent-image.sh)")
    return AGENT_IMAGE


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[list[NatsServer]]:
    """Three nats-server processes in one JetStream cluster (R3 streams survive one loss)."""
    route_ports = [_free_port() for _ in range(3)]
    servers = []
    for i in range(3):
        routes = [f"nats://127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i]
        servers.append(shipped_server(tmp_path / f"n{i}", name=f"n{i}",
                                      cluster_name="vigil-test", cluster_port=route_ports[i],
                                      routes=routes, sync_always=True))
    try:
        for server in servers:
            await server.start()
        yield servers
    finally:
        for server in servers:
            await server.stop()
    assert_no_violations(*servers)
