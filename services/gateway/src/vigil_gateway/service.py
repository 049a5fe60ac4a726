"""The gateway: Vigil's HTTP API over NATS.

It owns no state: submissions are published to ``vigil.submit.<tenant>`` (the same door a
raw NATS client uses) and reads come from the ``vigil-tasks`` bucket and the events
stream. Every request is authenticated by a bearer token mapped to a tenant and a role;
another tenant's task is indistinguishable from a missing one (404).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable

import msgspec
import structlog
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from vigil import codec, ids, subjects, topology
from vigil.auth import Principal, Role, TokenBook
from vigil.conn import connect
from vigil.errors import InvalidTask, NatsUnavailable
from vigil.jetstream import TaskStore, publish
from vigil.messages import TaskState
from vigil.ops import OpsServer, add_ops_routes
from vigil_gateway import incidents, openapi
from vigil_gateway.acceptance import Verdict
from vigil_gateway.errors import error
from vigil_gateway.events import stream_events, task_confessions
from vigil_gateway.metrics import Metrics
from vigil_gateway.settings import GatewaySettings

log = structlog.get_logger("vigil.gateway")

PRINCIPAL = web.RequestKey("principal", Principal)
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
PUBLIC = frozenset({"/healthz", "/metrics", "/openapi.json"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.tokens = TokenBook.load(settings.tokens_file) if settings.auth == "tokens" else None
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._store: TaskStore | None = None
        self._ops: OpsServer | None = None
        self._stop = asyncio.Event()
        self._incidents: incidents.Incidents | None = None
        self.ready = asyncio.Event()
        self._openapi: bytes | None = None
        self.app = self._make_app()

    @property
    def http_port(self) -> int:
        return self._ops.port if self._ops else 0

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise NatsUnavailable("not connected to NATS yet")
        return self._js

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise NatsUnavailable("not connected to NATS yet")
        return self._nc

    @property
    def store(self) -> TaskStore:
        if self._store is None:
            raise NatsUnavailable("not connected to NATS yet")
        return self._store

    # lifecycle ------------------------------------------------------------------------------
    async def run(self) -> None:
        s = self.settings
        if self.tokens is not None and len(self.tokens) == 0:
            log.warning("no_tokens", file=s.tokens_file, note="every request will get 401")
        if s.auth == "none":
            log.warning("auth_disabled", tenant=s.default_tenant,
                        note="VIGIL_AUTH=none: anyone who reaches this port is an operator")
        self._ops = OpsServer(self.app, s.http_host, s.http_port)
        await self._ops.start()
        try:
            self._nc = await connect(s.nats_url, "vigil-gateway",
                                     inbox_prefix=subjects.inbox("gateway"))
            self._js = self._nc.jetstream(timeout=5.0)
            await topology.ensure_topology(self._js, s.replicas)
            self._store = await TaskStore.open(self._js)
            log.info("gateway_started", url=f"http://{s.http_host}:{self._ops.port}")
            self.ready.set()
            await self._stop.wait()
        finally:
            await self._ops.stop()
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.drain()
            log.info("gateway_stopped")

    async def shutdown(self) -> None:
        self._stop.set()

    def _health(self) -> tuple[bool, dict[str, object]]:
        connected = self._nc is not None and self._nc.is_connected
        return connected and self.ready.is_set(), {"nats": connected}

    # app --------------------------------------------------------------------------------------
    def _make_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.max_body_bytes,
            middlewares=[self._errors_mw, self._auth_mw],
        )
        add_ops_routes(app, self.metrics.registry, self._health)
        app.router.add_get("/openapi.json", self.openapi, name="openapi")
        app.router.add_post("/v1/tasks", self.submit, name="submit")
        app.router.add_get("/v1/tasks/{id}", self.get_task, name="get_task")
        app.router.add_get("/v1/tasks/{id}/events", self.events, name="events")
        app.router.add_get("/v1/incidents", self.list_incidents, name="incidents")
        app.router.add_get("/v1/incidents/{id}", self.get_incident, name="incident")
        app.router.add_post("/v1/incidents/{id}/ack", self.ack_incident, name="incident_ack")
        app.router.add_post("/v1/incidents/{id}/resolve", self.resolve_incident,
                            name="incident_resolve")
        return app

    @web.middleware
    async def _errors_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or request.path
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            if exc.status == 413:
                return error(413, "body_too_large",
                             f"request body exceeds {self.settings.max_body_bytes} bytes")
            if exc.status in (404, 405):
                return error(exc.status, "not_found" if exc.status == 404 else "method_not_allowed",
                             exc.reason)
            raise
        except NatsUnavailable as exc:
            status = 503
            log.warning("nats_unavailable", path=request.path, error=str(exc))
            return error(503, "unavailable", "NATS is unreachable; retry shortly",
                         headers={"Retry-After": "2"})
        except Exception:
            log.exception("request_failed", path=request.path)
            return error(500, "internal", "internal error; it has been logged")
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    @web.middleware
    async def _auth_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC:
            return await handler(request)
        if self.tokens is None:
            principal = Principal(name="anonymous", tenant=self.settings.default_tenant,
                                  role="operator")
        else:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return error(401, "unauthenticated",
                             "send `Authorization: Bearer <token>` (see `vigil token create`)",
                             headers={"WWW-Authenticate": 'Bearer realm="vigil"'})
            found = self.tokens.verify(token.strip())
            if found is None:
                return error(401, "unauthenticated", "unknown or revoked token",
                             headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
            principal = found
        request[PRINCIPAL] = principal
        return await handler(request)

    @staticmethod
    def principal(request: web.Request, role: Role) -> Principal:
        p: Principal = request[PRINCIPAL]
        if not p.can(role):
            raise _Forbidden(f"this needs the {role} role; your token has {p.role}")
        return p

    # handlers -------------------------------------------------------------------------------
    async def openapi(self, request: web.Request) -> web.StreamResponse:
        if self._openapi is None:
            self._openapi = msgspec.json.encode(openapi.document())
        return web.Response(body=self._openapi, content_type="application/json")

    async def submit(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "submitter")
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        key = request.headers.get("Idempotency-Key")
        if key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(key):
            return error(400, "invalid_header", "Idempotency-Key must be 1-255 visible ASCII "
                         "characters", field="Idempotency-Key")
        # The body is parsed as JSON whatever its declared type: `curl -d` sends
        # form-urlencoded, and refusing that would help nobody.
        body = await request.read()
        try:
            spec = codec.decode_spec(body, strict=True)
        except InvalidTask as exc:
            status = 400 if exc.malformed else 422
            self.metrics.submissions.labels("invalid").inc()
            return error(status, "invalid_json" if status == 400 else "invalid_field",
                         str(exc), field=exc.field)
        if spec.id is not None:
            task_id = spec.id
        elif key is not None:
            task_id = ids.idempotent_task_id(who.tenant, key)
        else:
            task_id = ids.new_task_id()
        existing = await self.store.get(task_id)
        if existing is not None:
            return self._existing(existing[0], who, key)
        spec = msgspec.structs.replace(spec, id=task_id)
        async with Verdict(self.nc, task_id) as verdict:
            ack = await publish(self.js, subjects.submit(who.tenant), codec.encode(spec), task_id,
                                deadline_s=10.0)
            if ack.duplicate:
                # A concurrent identical request got there first: answer with its task.
                found = await self._wait_state(task_id)
                if found is not None:
                    return self._existing(found, who, key)
                return self._accepted(task_id, who, None, 202)
            kind = await verdict.wait(self.settings.submit_wait_s)
        self.metrics.submissions.labels(kind or "pending").inc()
        state = await self.store.get(task_id) if kind is not None else None
        log.info("task_submitted", task_id=task_id, tenant=who.tenant, verdict=kind)
        if state is not None and state[0].status == "failed" and state[0].attempt == 0:
            # Failed before any attempt: the scheduler refused the spec itself.
            return error(422, "rejected", state[0].error or "the scheduler rejected the task")
        return self._accepted(task_id, who, state[0] if state else None, 202)

    async def _wait_state(self, task_id: str) -> TaskState | None:
        deadline = asyncio.get_running_loop().time() + self.settings.submit_wait_s
        while True:
            found = await self.store.get(task_id)
            if found is not None:
                return found[0]
            if asyncio.get_running_loop().time() > deadline:
                return None
            await asyncio.sleep(0.05)

    def _existing(self, state: TaskState, who: Principal, key: str | None) -> web.Response:
        if state.tenant != who.tenant:
            return error(409, "id_taken", f"task id {state.id!r} is taken; choose another")
        if key is not None:
            # The same Idempotency-Key again: the same answer, not a second task.
            return self._accepted(state.id, who, state, 200)
        return error(409, "exists", f"task {state.id} already exists",
                     field="$.id")

    def _accepted(self, task_id: str, who: Principal, state: TaskState | None,
                  status: int) -> web.Response:
        body: dict[str, object] = {
            "id": task_id,
            "tenant": who.tenant,
            "status": state.status if state else None,
            "links": {"self": f"/v1/tasks/{task_id}", "events": f"/v1/tasks/{task_id}/events"},
        }
        if state is None:
            body["note"] = ("the submission is durable but the scheduler has not accepted it "
                            "yet; poll the self link")
        return web.json_response(body, status=status,
                                 headers={"Location": f"/v1/tasks/{task_id}"})

    async def _visible(self, request: web.Request) -> tuple[TaskState, int] | web.Response:
        try:
            who = self.principal(request, "viewer")
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        task_id = request.match_info["id"]
        if not ids.is_valid_id(task_id):
            return error(404, "not_found", f"no task {task_id!r}")
        found = await self.store.get(task_id)
        if found is None or found[0].tenant != who.tenant:
            return error(404, "not_found", f"no task {task_id!r}")
        return found

    async def get_task(self, request: web.Request) -> web.StreamResponse:
        found = await self._visible(request)
        if isinstance(found, web.Response):
            return found
        state = found[0]
        who: Principal = request[PRINCIPAL]
        if not who.can("submitter") and state.spec is not None and state.spec.env:
            # Env values often carry credentials: a read-only token sees names only.
            hidden = dict.fromkeys(state.spec.env, "<redacted>")
            state = msgspec.structs.replace(
                state, spec=msgspec.structs.replace(state.spec, env=hidden))
        include = set(request.query.get("include", "").split(","))
        if "confessions" not in include:
            return web.Response(body=codec.encode(state), content_type="application/json")
        body = msgspec.to_builtins(state)
        body["confessions"] = await task_confessions(self.js, state.id)
        return web.json_response(body)

    async def events(self, request: web.Request) -> web.StreamResponse:
        found = await self._visible(request)
        if isinstance(found, web.Response):
            return found
        last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        after = 0
        if last:
            if not last.isdigit():
                return error(400, "invalid_header", "Last-Event-ID must be a stream sequence",
                             field="Last-Event-ID")
            after = int(last)
        self.metrics.streams.inc()
        try:
            return await stream_events(request, self.js, self.store, found[0], after,
                                       self.settings.sse_keepalive_s, self._stop)
        finally:
            self.metrics.streams.dec()


    # incidents -----------------------------------------------------------------------------
    def _incidents_store(self) -> incidents.Incidents:
        if self._incidents is None:
            self._incidents = incidents.Incidents(self.js)
        return self._incidents

    async def list_incidents(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "viewer")
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await incidents.list_incidents(request, self._incidents_store(), who)

    async def get_incident(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "viewer")
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await incidents.get_incident(request, self._incidents_store(), who)

    async def ack_incident(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "operator")
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await incidents.change(request, self._incidents_store(), who, "incident_ack")

    async def resolve_incident(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "operator")
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await incidents.change(request, self._incidents_store(), who,
                                      "incident_resolve")


class _Forbidden(Exception):
    pass
