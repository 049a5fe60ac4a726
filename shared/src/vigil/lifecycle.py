"""One lifecycle for every service: ops server, NATS and topology, readiness, orderly close.

A service's ``run()`` reads::

    async with self._life as life:          # /healthz and /metrics answer (not ready yet)
        conn = await life.connect()          # as the service's NATS user; topology ensured
        ...                                  # its own start: register what to reset and close
        life.started(http_port=life.http_port)   # "<name>_started"; /healthz says ready
        await self._loop(...)                # until shutdown() (SIGTERM)
        ...                                  # its own drain, with its own deadline
    # on the way out, however the body ended: the service's close steps, NATS drained,
    # its after-NATS steps, the ops server stopped, "<name>_stopped"

What a service builds on the connection is set at start: :class:`Late` attributes (and
:attr:`Lifecycle.conn`) raise :class:`NotStarted` before that, never a ``None`` to assert away.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Any, Generic, NamedTuple, TypeVar, overload

import structlog
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from vigil import subjects, topology
from vigil.conn import connect
from vigil.errors import NatsUnavailable
from vigil.ops import HealthCheck, OpsServer, ops_app
from vigil.settings import CommonSettings

T = TypeVar("T")
Step = Callable[[], object]  # a close step: plain, or returning an awaitable


class NotStarted(NatsUnavailable):
    """Used before the service connected to NATS: retry shortly (the gateway answers 503)."""


class Late(Generic[T]):
    """An attribute a service sets at start, once connected. Reading it before raises
    :class:`NotStarted` naming it; once set it is never ``None``."""

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Late[T]: ...

    @overload
    def __get__(self, obj: object, owner: type[Any]) -> T: ...

    def __get__(self, obj: object | None, owner: type[Any]) -> Late[T] | T:
        if obj is None:
            return self
        try:
            value: T = obj.__dict__[self._name]
        except KeyError:
            raise NotStarted(f"not connected to NATS yet ({type(obj).__name__}.{self._name} "
                             "is set at start)") from None
        return value

    def __set__(self, obj: object, value: T) -> None:
        obj.__dict__[self._name] = value


class Connection(NamedTuple):
    """The service's NATS connection and its JetStream context: exists once connected."""

    nc: NATS
    js: JetStreamContext


class Lifecycle:
    """The shared part of a service's life (see the module docstring).

    ``detail`` adds the service's own fields to ``/healthz``. ``api`` builds the service's
    HTTP API around the ops routes (it is given the health check): it is served on the
    ops port and stops *first* on close, so no request starts against a closing
    connection. Without it the ops server serves only ``/healthz`` and ``/metrics`` and
    stops last, so both answer through the drain.
    """

    def __init__(self, name: str, settings: CommonSettings, registry: CollectorRegistry, *,
                 detail: Callable[[], dict[str, object]] | None = None,
                 api: Callable[[HealthCheck], web.Application] | None = None) -> None:
        self.name = name
        self.settings = settings
        self.log = structlog.get_logger(f"vigil.{name}")
        self.stopping = asyncio.Event()  # set by shutdown(), and at close
        self.ready = asyncio.Event()  # set by started(); /healthz is ok while connected
        self.app = api(self.health) if api is not None else ops_app(registry, self.health)
        self._api = api is not None
        self._detail = detail
        self._ops = OpsServer(self.app, settings.http_host, settings.http_port)
        self._conn: Connection | None = None
        self._resets: list[Callable[[], None]] = []
        self._closing: list[Step] = []
        self._after_nats: list[Step] = []

    @property
    def conn(self) -> Connection:
        """The connection; :class:`NotStarted` before :meth:`connect`."""
        if self._conn is None:
            raise NotStarted(f"not connected to NATS yet (the {self.name} is starting)")
        return self._conn

    @property
    def http_port(self) -> int:
        """The ops (or API) server's port once listening (before: as configured)."""
        return self._ops.port

    def health(self) -> tuple[bool, dict[str, object]]:
        """Ready while connected to NATS, once :meth:`started`."""
        connected = self._conn is not None and self._conn.nc.is_connected
        detail = self._detail() if self._detail is not None else {}
        return connected and self.ready.is_set(), {"nats": connected, **detail}

    async def __aenter__(self) -> Lifecycle:
        await self._ops.start()
        return self

    async def connect(self, client: str | None = None) -> Connection:
        """Connect as the service (``vigil-<name>`` unless ``client`` names it otherwise,
        replies on its own inbox prefix), retrying until NATS answers; ensure the topology."""
        s = self.settings
        nc = await connect(s.nats_url, client or f"vigil-{self.name}",
                           inbox_prefix=subjects.inbox(self.name), on_reconnect=self._reconnected)
        self._conn = conn = Connection(nc, nc.jetstream(timeout=5.0))
        await topology.ensure_topology(conn.js, s.replicas, output_max_bytes=s.output_stream_bytes)
        return conn

    def on_reconnect(self, reset: Callable[[], None]) -> None:
        """Call ``reset`` after every reconnect (pull requests do not survive one)."""
        self._resets.append(reset)

    def on_close(self, step: Step, *, after_nats: bool = False) -> None:
        """Run ``step`` at close, in the order registered: by default while NATS is still
        connected (stop consuming, let work in flight end); ``after_nats`` once it is
        drained (the node's own resources). A step that fails is logged; the rest run."""
        (self._after_nats if after_nats else self._closing).append(step)

    def on_close_wait(self, tasks: Collection[asyncio.Future[Any]], deadline_s: float) -> None:
        """At close, wait up to ``deadline_s`` for what ``tasks`` then holds."""
        async def wait() -> None:
            if tasks:
                await asyncio.wait(tasks, timeout=deadline_s)
        self.on_close(wait)

    def started(self, **fields: object) -> None:
        """Log ``<name>_started`` with ``fields``; from now on ``/healthz`` says ready."""
        self.log.info(f"{self.name}_started", **fields)
        self.ready.set()

    async def shutdown(self) -> None:
        """Ask the service to stop (SIGTERM): its loop ends and it drains. Idempotent."""
        self.stopping.set()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stopping.set()  # whatever ended the body: background loops end too
        if self._api:
            await self._ops.stop()
        await self._run(self._closing)
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing anyway
                await self._conn.nc.drain()
        await self._run(self._after_nats)
        await self._ops.stop()
        self.log.info(f"{self.name}_stopped")

    async def _run(self, steps: list[Step]) -> None:
        for step in steps:
            try:
                result = step()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                self.log.warning("close_step_failed", step=getattr(step, "__qualname__", ""),
                                 error=repr(exc))

    async def _reconnected(self) -> None:
        for reset in self._resets:
            reset()
