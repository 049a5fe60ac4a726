"""The small HTTP side of every service: ``/healthz`` and ``/metrics``.

Each service owns one Prometheus registry (no global default registry, so two services in
one test process never collide) and one health check callable.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = structlog.get_logger("vigil.ops")

HealthCheck = Callable[[], tuple[bool, dict[str, object]]]


def add_ops_routes(app: web.Application, registry: CollectorRegistry, health: HealthCheck) -> None:
    async def healthz(_: web.Request) -> web.Response:
        ok, detail = health()
        return web.json_response({"ok": ok, **detail}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)


class OpsServer:
    """Runs an aiohttp app on ``host:port`` (port 0 picks one); ``port`` tells which."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("http_listening", host=self._host, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def ops_app(registry: CollectorRegistry, health: HealthCheck) -> web.Application:
    app = web.Application()
    add_ops_routes(app, registry, health)
    return app
