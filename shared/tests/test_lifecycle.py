"""The services' shared lifecycle against a real nats-server with the shipped users: what
runs in which order on the way in and out, readiness, reconnects, and the errors before start."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from vigil import subjects
from vigil.errors import NatsUnavailable
from vigil.lifecycle import Late, Lifecycle, NotStarted
from vigil.natsserver import NatsServer
from vigil.ops import HealthCheck, add_ops_routes
from vigil.permissions import random_passwords, shipped_users
from vigil.settings import CommonSettings

pytestmark = pytest.mark.integration

SERVICE = "auditor"  # any service's user: the lifecycle connects as the service it runs


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server with the shipped users: the lifecycle connects as a service's own."""
    nats = NatsServer(store_dir=tmp_path / "nats", users=shipped_users(random_passwords()))
    await nats.start()
    try:
        yield nats
    finally:
        await nats.stop()
    assert "Violation" not in nats.log_file.read_text(), "a permissions violation"


def settings(server: NatsServer) -> CommonSettings:
    return CommonSettings(nats_url=server.url_for(SERVICE), http_port=0)


async def healthz(port: int) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}/healthz") as response:
        return response.status, await response.json()


async def refused(port: int) -> bool:
    try:
        await healthz(port)
    except aiohttp.ClientConnectionError:
        return True
    return False


class Service:
    """A service in miniature: a ``Late`` store, a close step before and after NATS."""

    store = Late[str]()

    def __init__(self, life: Lifecycle) -> None:
        self.life = life
        self.seen: list[tuple[str, bool]] = []  # (step, NATS connected then)

    def note(self, step: str) -> None:
        self.seen.append((step, self.life.conn.nc.is_connected))


async def test_before_start_everything_says_not_started() -> None:
    life = Lifecycle(SERVICE, CommonSettings(), CollectorRegistry())
    service = Service(life)
    with pytest.raises(NotStarted, match="not connected to NATS yet"):
        _ = life.conn
    with pytest.raises(NotStarted, match=r"Service\.store is set at start"):
        _ = service.store
    assert issubclass(NotStarted, NatsUnavailable)  # retryable: the gateway answers 503
    assert life.health() == (False, {"nats": False})


async def test_a_life_in_order(server: NatsServer) -> None:
    checked: list[tuple[int, dict[str, Any]]] = []
    with capture_logs() as logs:
        life = Lifecycle(SERVICE, settings(server), CollectorRegistry(),
                         detail=lambda: {"inflight": 0})
        service = Service(life)
        async with life:
            port = life.http_port
            assert port != 0
            checked.append(await healthz(port))  # up, not connected
            nc, js = await life.connect()
            service.store = "opened"
            await js.stream_info(subjects.STREAM_WORK)  # the topology is there
            checked.append(await healthz(port))  # connected, not started
            life.on_close(lambda: service.note("stop consuming"))
            life.on_close(lambda: service.note("in flight"))
            life.on_close(lambda: service.note("node resources"), after_nats=True)
            life.started(http_port=port)
            checked.append(await healthz(port))
            assert service.store == "opened"
            await life.shutdown()
            await life.shutdown()  # idempotent
            assert life.stopping.is_set()
    assert [status for status, _ in checked] == [503, 503, 200]
    assert checked[2][1] == {"ok": True, "nats": True, "inflight": 0}
    assert service.seen == [("stop consuming", True), ("in flight", True),
                            ("node resources", False)]
    assert nc.is_closed
    assert await refused(port)
    events = [e["event"] for e in logs if e["event"].startswith(SERVICE)]
    assert events == [f"{SERVICE}_started", f"{SERVICE}_stopped"]
    assert next(e for e in logs if e["event"] == f"{SERVICE}_started")["http_port"] == port


async def test_a_failing_start_still_closes_what_it_opened(server: NatsServer) -> None:
    life = Lifecycle(SERVICE, settings(server), CollectorRegistry())
    closed = asyncio.Event()

    async def run() -> None:
        async with life:
            await life.connect()
            life.on_close(closed.set)
            raise RuntimeError("start failed")

    with capture_logs() as logs, pytest.raises(RuntimeError, match="start failed"):
        await run()
    assert closed.is_set() and life.conn.nc.is_closed and life.stopping.is_set()
    assert not life.ready.is_set()
    assert logs[-1]["event"] == f"{SERVICE}_stopped"


async def test_a_failing_close_step_is_logged_and_the_rest_run(server: NatsServer) -> None:
    life = Lifecycle(SERVICE, settings(server), CollectorRegistry())
    after = asyncio.Event()

    def broken() -> None:
        raise OSError("gone")

    with capture_logs() as logs:
        async with life:
            nc, _ = await life.connect()
            life.on_close(broken)
            life.on_close(after.set, after_nats=True)
    assert after.is_set() and nc.is_closed
    failed = next(e for e in logs if e["event"] == "close_step_failed")
    assert "gone" in failed["error"]


async def test_close_waits_for_work_in_flight_up_to_its_deadline(server: NatsServer) -> None:
    life = Lifecycle(SERVICE, settings(server), CollectorRegistry())
    inflight: set[asyncio.Task[Any]] = set()
    never = asyncio.create_task(asyncio.Event().wait())
    async with life:
        await life.connect()
        life.on_close_wait(inflight, 10)  # read at close: what is in flight then
        life.on_close_wait({never}, 0.05)
        inflight.add(asyncio.create_task(life.stopping.wait()))  # ends as close begins
    assert all(t.done() for t in inflight)
    assert not never.done()  # given up at its deadline
    never.cancel()


async def test_an_api_stops_taking_requests_before_the_close_steps(server: NatsServer) -> None:
    def api(health: HealthCheck) -> web.Application:
        app = web.Application()
        add_ops_routes(app, CollectorRegistry(), health)
        return app

    life = Lifecycle("gateway", CommonSettings(nats_url=server.url_for("gateway")),
                     CollectorRegistry(), api=api)
    answered: list[bool] = []
    async with life:
        await life.connect()
        life.started()
        port = life.http_port
        assert (await healthz(port))[0] == 200

        async def probe() -> None:
            answered.append(not await refused(port))

        life.on_close(probe)
    assert answered == [False]  # the API no longer answered when the close steps ran


async def test_resets_run_after_a_reconnect(server: NatsServer) -> None:
    life = Lifecycle(SERVICE, settings(server), CollectorRegistry())
    reset = asyncio.Event()
    async with life:
        nc, _ = await life.connect()
        life.on_reconnect(reset.set)
        life.started()
        await server.stop()
        await server.restart()
        await asyncio.wait_for(reset.wait(), 30)
        assert nc.is_connected and life.health()[0]

