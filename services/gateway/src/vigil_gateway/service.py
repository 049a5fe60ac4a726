"""The gateway: Vigil's HTTP API over NATS.

It owns no state: submissions are published to ``vigil.submit.<tenant>`` (the same door a
raw NATS client uses), cancels to ``vigil.control.cancel.<tenant>`` (the scheduler acts on
them), and reads come from the ``vigil-tasks`` bucket (lists from an in-memory index that
follows it, see index.py) and the events stream.

Every request is authenticated by a bearer token mapped to a tenant and a role
(viewer < submitter < operator) and rate-limited per token (429 + Retry-After). A token
sees only its own tenant's tasks, whatever its role: another tenant's task is
indistinguishable from a missing one (404), never appears in a list or a stream, and a
``tenant`` filter naming another tenant is refused (403). Cross-tenant work is for
operators on NATS (``vigil replay``); incidents, which span tenants, are the exception
(see incidents.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import msgspec
import structlog
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from vigil import codec, ids, subjects
from vigil.api import (
    LAST_EVENT_ID_MAX,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    CancelBody,
    CancelResponse,
    ExecutorList,
    ExecutorView,
    SubmitResponse,
    TaskList,
    TaskSummary,
    task_links,
)
from vigil.auth import Principal, Role, TokenBook, digest
from vigil.environments import EnvironmentStore
from vigil.errors import InvalidTask, NatsUnavailable
from vigil.jetstream import TaskStore, publish
from vigil.lifecycle import Late, Lifecycle
from vigil.messages import STATUSES, TERMINAL, CancelRequest, TaskSpec, TaskState, utcnow
from vigil.ops import HealthCheck, add_ops_routes
from vigil.secrets import Keyring, SecretStore
from vigil_gateway import environments, incidents, openapi, secrets
from vigil_gateway.acceptance import Verdict
from vigil_gateway.errors import error
from vigil_gateway.events import Position, read_executors, stream_events, task_confessions
from vigil_gateway.index import BadCursor, IndexWatcher, Query, decode_cursor, encode_cursor
from vigil_gateway.logs import stream_logs
from vigil_gateway.metrics import Metrics
from vigil_gateway.ratelimit import RateLimiter, retry_after
from vigil_gateway.settings import GatewaySettings

log = structlog.get_logger("vigil.gateway")

PRINCIPAL = web.RequestKey("principal", Principal)
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
PUBLIC = frozenset({"/healthz", "/metrics", "/openapi.json"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gateway:
    # Set at start, once connected; until then a request gets a 503 (NotStarted).
    store = Late[TaskStore]()
    envs = Late[EnvironmentStore]()
    snapshots = Late[environments.Snapshots]()
    _index = Late[IndexWatcher]()

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.tokens = _token_book(settings)
        self.limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
        self._incidents: incidents.Incidents | None = None
        self._secrets: SecretStore | None = None
        self.keyring = Keyring.load(settings.secrets_key_file, settings.secrets_key)
        self._openapi: bytes | None = None
        # The API is served on the ops port, and stops taking requests first on shutdown.
        self._life = Lifecycle("gateway", settings, self.metrics.registry, api=self._make_app)
        self._stop = self._life.stopping
        self.ready = self._life.ready
        self.app = self._life.app

    @property
    def http_port(self) -> int:
        return self._life.http_port

    @property
    def js(self) -> JetStreamContext:
        return self._life.conn.js

    @property
    def nc(self) -> NATS:
        return self._life.conn.nc

    # lifecycle ------------------------------------------------------------------------------
    async def run(self) -> None:
        s, life = self.settings, self._life
        if self.tokens is not None and len(self.tokens) == 0:
            log.warning("no_tokens", file=s.tokens_file, note="every request will get 401")
        if s.auth == "none":
            log.warning("auth_disabled", tenant=s.default_tenant,
                        note="VIGIL_AUTH=none: anyone who reaches this port is an operator")
        async with life:
            js = (await life.connect()).js
            self.store = await TaskStore.open(js)
            self.envs = await EnvironmentStore.open(js)
            self.snapshots = environments.Snapshots(js)
            self._index = index = IndexWatcher(js)
            life.on_close(index.stop)
            await index.start()
            life.started(url=f"http://{s.http_host}:{life.http_port}",
                         secrets_key=self.keyring.current_id if self.keyring else None)
            await self._stop.wait()

    async def shutdown(self) -> None:
        await self._life.shutdown()

    # app --------------------------------------------------------------------------------------
    def _make_app(self, health: HealthCheck) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.max_body_bytes,
            middlewares=[self._errors_mw, self._auth_mw, _query_mw],
        )
        add_ops_routes(app, self.metrics.registry, health)
        app.router.add_get("/openapi.json", self.openapi, name="openapi")
        app.router.add_post("/v1/tasks", self.submit, name="submit")
        app.router.add_get("/v1/tasks", self.list_tasks, name="list_tasks")
        app.router.add_get("/v1/tasks/{id}", self.get_task, name="get_task")
        app.router.add_post("/v1/tasks/{id}/cancel", self.cancel, name="cancel")
        app.router.add_get("/v1/tasks/{id}/events", self.events, name="events")
        app.router.add_get("/v1/tasks/{id}/logs", self.logs, name="logs")
        app.router.add_get("/v1/executors", self.list_executors, name="executors")
        app.router.add_get("/v1/incidents", self.list_incidents, name="incidents")
        app.router.add_get("/v1/incidents/{id}", self.get_incident, name="incident")
        app.router.add_post("/v1/incidents/{id}/ack", self.ack_incident, name="incident_ack")
        app.router.add_post("/v1/incidents/{id}/resolve", self.resolve_incident,
                            name="incident_resolve")
        app.router.add_get("/v1/environments", self.list_environments, name="environments")
        app.router.add_get("/v1/environments/{name}", self.get_environment,
                           name="environment")
        app.router.add_put("/v1/environments/{name}", self.put_environment,
                           name="environment_put")
        app.router.add_delete("/v1/environments/{name}", self.delete_environment,
                              name="environment_delete")
        app.router.add_get("/v1/environments/{name}/history", self.environment_history,
                           name="environment_history")
        app.router.add_post("/v1/environments/{name}/restore", self.restore_environment,
                            name="environment_restore")
        app.router.add_get("/v1/secrets", self.list_secrets, name="secrets")
        app.router.add_get("/v1/secrets/{name}", self.get_secret, name="secret")
        app.router.add_put("/v1/secrets/{name}", self.put_secret, name="secret_put")
        app.router.add_delete("/v1/secrets/{name}", self.delete_secret, name="secret_delete")
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
                allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
                return error(exc.status, "not_found" if exc.status == 404 else "method_not_allowed",
                             exc.reason, headers=allow)
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
        token = ""
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
        caller = digest(token.strip()) if self.tokens is not None else (request.remote or "-")
        wait = self.limiter.take(caller, time.monotonic())
        if wait > 0:
            self.metrics.rate_limited.inc()
            return error(429, "rate_limited",
                         f"too many requests for this token (limit {self.limiter.rate:g}/s, "
                         f"burst {self.limiter.burst}); retry after the Retry-After seconds",
                         headers={"Retry-After": retry_after(wait)})
        request[PRINCIPAL] = principal
        return await handler(request)

    @staticmethod
    def principal(request: web.Request, role: Role, *, tasks: bool = True) -> Principal:
        """The caller, if its token has ``role``; for ``tasks`` (a tenant's own data), a
        tenant's token: a platform token reads no tenant's tasks (see vigil.auth)."""
        p: Principal = request[PRINCIPAL]
        if not p.can(role):
            raise _Forbidden(f"this needs the {role} role; your token has {p.role}")
        if tasks and p.platform:
            raise _Forbidden("a platform token sees incidents and executors, not a tenant's "
                             "tasks or environments; use a token of that tenant (or `vigil "
                             "replay` on NATS)")
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
            spec = codec.decode_spec(body, strict=True, now=utcnow())
        except InvalidTask as exc:
            status = 400 if exc.malformed else 422
            self.metrics.submissions.labels("invalid").inc()
            return error(status, "invalid_json" if status == 400 else "invalid_field",
                         str(exc), field=exc.field)
        if spec.environment is not None and await self.envs.get(
                who.tenant, spec.environment) is None:
            self.metrics.submissions.labels("invalid").inc()
            return error(422, "invalid_field", f"tenant {who.tenant} has no environment "
                         f"{spec.environment!r}; create it first (PUT /v1/environments/"
                         f"{spec.environment}, or `vigil env create`)", field="$.environment")
        if spec.secrets and (refused := await secrets.missing(self._secret_store(), who.tenant,
                                                              spec)):
            self.metrics.submissions.labels("invalid").inc()
            return refused
        if spec.id is not None:
            task_id = spec.id
        elif key is not None:
            task_id = ids.idempotent_task_id(who.tenant, key)
        else:
            task_id = ids.new_task_id()
        digest = codec.spec_digest(spec)
        existing = await self.store.get(who.tenant, task_id)
        if existing is not None and not existing[0].refused_at_admission:
            return self._existing(existing[0], who, key, digest)
        # New, or refused at admission (a tenant limit, a spec the scheduler would not
        # take), which a later submission of the id takes over (the scheduler's rule).
        # As a plain TaskSpec: the id may now be one the platform made, which the strict
        # type (a user's request) refuses.
        spec = TaskSpec(**{**msgspec.structs.asdict(spec), "id": task_id})
        async with Verdict(self.nc, who.tenant, task_id) as verdict:
            ack = await publish(self.js, subjects.submit_via_gateway(who.tenant),
                                codec.encode(spec), f"{who.tenant}.{task_id}:{digest[7:23]}",
                                deadline_s=10.0)
            kind = await verdict.wait(self.settings.submit_wait_s)
        found = await self._wait_state(who.tenant, task_id, ack.seq, wait=kind is not None)
        if found is not None and found.submit_seq != ack.seq and found.spec_digest != digest:
            # Another submission of the id got there first (a concurrent request with the
            # same Idempotency-Key or id) with another body: ours is the duplicate.
            return self._existing(found, who, key, digest)
        # The same body under a later sequence: this very request's publish, retried after
        # a lost ack (stored twice: the stream's duplicate window is 100 ms, ADR 11), or an
        # identical concurrent request. Either way its task is this one.
        self.metrics.submissions.labels(kind or "pending").inc()
        log.info("task_submitted", task_id=task_id, tenant=who.tenant, verdict=kind)
        if found is not None and found.rejected_by is not None:
            # Over a tenant limit: try again later, unlike an invalid spec.
            return error(429, "quota_exceeded", found.error or "over a tenant limit",
                         headers={"Retry-After": "5"})
        if found is not None and found.status == "failed" and found.attempt == 0:
            # Failed before any attempt: the scheduler refused the spec itself (this
            # gateway's checks passed it: a scheduler of another version, say).
            reason = found.error or "the scheduler rejected the task"
            return error(422, "rejected", f"the scheduler rejected the task: {reason}",
                         field=found.error_field)
        return self._accepted(task_id, who, found, 202)

    async def _wait_state(self, tenant: str, task_id: str, seq: int, *,
                          wait: bool) -> TaskState | None:
        """The task's state once submission ``seq`` is recorded in it, or whatever other
        submission holds the id (not a refusal that ``seq`` retries). Without ``wait``
        (no verdict came), one look."""
        deadline = asyncio.get_running_loop().time() + (self.settings.submit_wait_s
                                                         if wait else 0.0)
        while True:
            found = await self.store.get(tenant, task_id)
            if found is not None and (found[0].submit_seq >= seq
                                      or not found[0].refused_at_admission):
                return found[0]
            if asyncio.get_running_loop().time() >= deadline:
                return None
            await asyncio.sleep(0.05)

    def _existing(self, state: TaskState, who: Principal, key: str | None,
                  digest: str) -> web.Response:
        if key is None:
            return error(409, "exists", f"task {state.id} already exists", field="$.id")
        if state.spec_digest is not None and state.spec_digest != digest:
            # Reusing a key with another body is a client bug: answering with the first
            # task would hide that its second request did not run.
            return error(409, "idempotency_key_reused",
                         f"Idempotency-Key {key!r} was already used for task {state.id} with "
                         "a different request body; use a new key for a different task",
                         field="Idempotency-Key")
        # The same Idempotency-Key and body again: the same answer, not a second task.
        return self._accepted(state.id, who, state, 200)

    def _accepted(self, task_id: str, who: Principal, state: TaskState | None,
                  status: int) -> web.Response:
        body = SubmitResponse(
            id=task_id, tenant=who.tenant, status=state.status if state else None,
            links=task_links(task_id),
            note=None if state else ("the submission is durable but the scheduler has not "
                                     "accepted it yet; poll the self link"),
        )
        return web.Response(body=codec.encode(body), status=status,
                            content_type="application/json",
                            headers={"Location": f"/v1/tasks/{task_id}"})

    async def _visible(self, request: web.Request, role: Role = "viewer"
                       ) -> tuple[TaskState, int] | web.Response:
        try:
            who = self.principal(request, role)
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        task_id = request.match_info["id"]
        if not ids.is_valid_id(task_id):
            return error(404, "not_found", f"no task {task_id!r}")
        # Ids are per tenant: the key holds the token's tenant, so another tenant's task
        # of the same id is never even read.
        found = await self.store.get(who.tenant, task_id)
        if found is None:
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
        body["confessions"] = await task_confessions(self.js, state.tenant, state.id)
        return web.json_response(body)

    async def events(self, request: web.Request) -> web.StreamResponse:
        found = await self._visible(request)
        if isinstance(found, web.Response):
            return found
        after = Position()
        # The query parameter first, so that the header wins when both are given.
        for kind, field, value in (("query", "last_event_id",
                                    request.query.get("last_event_id")),
                                   ("header", "Last-Event-ID",
                                    request.headers.get("Last-Event-ID"))):
            if value is None:
                continue
            position = Position.parse(value)
            if position is None:
                return error(400, f"invalid_{kind}", f"{field} must be an event's id: "
                             "<events sequence>.<output sequence>, each 0 to "
                             f"{LAST_EVENT_ID_MAX}",
                             field=field)
            after = position
        with self.metrics.streams.track_inprogress():
            return await stream_events(request, self.js, self.store, found[0], after,
                                       self.settings.sse_keepalive_s, self._stop)

    async def list_tasks(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "viewer")
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        query = _list_query(request, who)
        if isinstance(query, web.Response):
            return query
        watcher = self._index
        if not watcher.ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watcher.ready.wait(), self.settings.submit_wait_s)
            if not watcher.ready.is_set():
                return error(503, "warming_up", "the task index is still loading; retry "
                             "shortly", headers={"Retry-After": "2"})
        tasks, after = watcher.index.query(query)
        body = TaskList(tasks=tasks, next_cursor=encode_cursor(after) if after else None)
        return web.Response(body=codec.encode(body), content_type="application/json")

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        found = await self._visible(request, "submitter")
        if isinstance(found, web.Response):
            return found
        state = found[0]
        who: Principal = request[PRINCIPAL]
        raw = await request.read()
        try:
            codec.check_utf8(raw)
            body = (_cancel_body_decoder.decode(raw) if raw.strip() else CancelBody())
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            message, field = codec.error_field(exc)
            malformed = isinstance(exc, msgspec.DecodeError) and not isinstance(
                exc, msgspec.ValidationError)
            return error(400 if malformed else 422,
                         "invalid_json" if malformed else "invalid_field", message,
                         field="$" if malformed else field)
        if state.status == "cancelled":
            return _cancel_answer(TaskSummary.of(state), 200, "the task was already cancelled")
        if state.terminal:
            return error(409, "finished", f"task {state.id} already finished "
                         f"({state.status}); there is nothing to cancel")
        request_ = CancelRequest(task_id=state.id, reason=body.reason,
                                 requested_by=f"{who.name} ({who.role})")
        # One cancel per state revision: a second cancel after a redrive is a new request.
        await publish(self.js, subjects.cancel_request(state.tenant), codec.encode(request_),
                      f"cancel:{state.key}:{found[1]}", deadline_s=10.0)
        self.metrics.cancels.inc()
        log.info("task_cancel_requested", task_id=state.id, tenant=state.tenant,
                 by=who.name, status=state.status)
        seen = await self._index.wait_for(
            state.tenant, state.id,
            lambda t: t.status in TERMINAL or t.cancel_requested_at is not None,
            self.settings.submit_wait_s)
        if seen is not None and seen.status in TERMINAL and seen.status != "cancelled":
            return error(409, "finished", f"task {state.id} finished ({seen.status}) before "
                         "the cancel took effect")
        summary = seen or TaskSummary.of(state)
        note = None
        if summary.status != "cancelled":
            note = ("the task's executor is stopping it (grace period, then kill); follow "
                    "the events link for its `finished` event")
        return _cancel_answer(summary, 202, note)

    async def logs(self, request: web.Request) -> web.StreamResponse:
        found = await self._visible(request)
        if isinstance(found, web.Response):
            return found
        follow = request.query.get("follow", "0")
        if follow not in ("0", "1", "true", "false"):
            return error(400, "invalid_query", "follow must be 1 or 0", field="follow")
        only = request.query.get("stream")
        if only is not None and only not in ("stdout", "stderr"):
            return error(400, "invalid_query", "stream must be stdout or stderr",
                         field="stream")
        with self.metrics.streams.track_inprogress():
            return await stream_logs(request, self.js, self.store, found[0],
                                     follow=follow in ("1", "true"), only=only,
                                     tick_s=self.settings.sse_keepalive_s,
                                     stopping=self._stop)

    async def list_executors(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "viewer", tasks=False)
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        infos = await read_executors(self.js)
        tenant = None if who.platform else who.tenant
        body = ExecutorList(executors=[ExecutorView.of(i, tenant) for i in infos])
        return web.Response(body=codec.encode(body), content_type="application/json")

    # incidents -----------------------------------------------------------------------------
    def _incidents_store(self) -> incidents.Incidents:
        if self._incidents is None:
            self._incidents = incidents.Incidents(self.js)
        return self._incidents

    async def list_incidents(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "viewer", tasks=False)
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await incidents.list_incidents(request, self._incidents_store(), who)

    async def get_incident(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "viewer", tasks=False)
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await incidents.get_incident(request, self._incidents_store(), who)

    async def ack_incident(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "operator", tasks=False)
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await incidents.change(request, self._incidents_store(), who, "incident_ack")

    async def resolve_incident(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "operator", tasks=False)
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await incidents.change(request, self._incidents_store(), who,
                                      "incident_resolve")


    # environments --------------------------------------------------------------------------
    async def list_environments(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "viewer")
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await environments.listing(self.envs, who)

    async def get_environment(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "viewer")
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await environments.get(request, self.envs, who)

    async def environment_history(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "viewer")
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await environments.history(request, self.envs, who)

    async def put_environment(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "submitter")
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await environments.put(request, self.envs, self._secret_store(), who)

    async def restore_environment(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "submitter")
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await environments.restore(request, self.envs, self.snapshots, who)

    async def delete_environment(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self.principal(request, "operator")
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await environments.delete(request, self.envs, self.snapshots, who)

    # secrets --------------------------------------------------------------------------------
    def _secret_store(self) -> SecretStore:
        if self._secrets is None:
            self._secrets = SecretStore(self.js)
        return self._secrets

    def _secrets_operator(self, request: web.Request) -> Principal:
        """An operator of a tenant: secrets belong to tenants, and a platform token
        manages none (whatever its role)."""
        who = self.principal(request, "operator", tasks=False)
        if who.platform:
            raise _Forbidden("secrets belong to tenants: a platform token sets, lists and "
                             "removes none; use an operator token of that tenant")
        return who

    async def list_secrets(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self._secrets_operator(request)
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await secrets.list_secrets(request, self._secret_store(), who)

    async def get_secret(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self._secrets_operator(request)
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await secrets.get(request, self._secret_store(), who)

    async def put_secret(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self._secrets_operator(request)
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await secrets.put(request, self._secret_store(), self.keyring, who)

    async def delete_secret(self, request: web.Request) -> web.StreamResponse:
        try:
            who = self._secrets_operator(request)
        except _Forbidden as exc:
            return error(403, "forbidden", str(exc))
        return await secrets.delete(request, self._secret_store(), who)


class _Forbidden(Exception):
    pass


@web.middleware
async def _query_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a query parameter the OpenAPI document does not declare for the route: a
    misspelt filter must not silently list everything."""
    resource = request.match_info.route.resource
    if resource is not None and resource.canonical.startswith("/v1/"):
        method = "GET" if request.method == "HEAD" else request.method
        known = openapi.query_parameters().get((method, resource.canonical), frozenset())
        for name in request.query:
            if name not in known:
                listed = f"; known: {', '.join(sorted(known))}" if known else ""
                return error(400, "invalid_query",
                             f"unknown query parameter {name!r}{listed}", field=name)
    return await handler(request)


_cancel_body_decoder = msgspec.json.Decoder(CancelBody)


def _token_book(settings: GatewaySettings) -> TokenBook | None:
    if settings.auth != "tokens":
        return None
    book = TokenBook([])
    if settings.tokens_file:
        book = book.merged(TokenBook.load(settings.tokens_file))
    if settings.tokens:
        book = book.merged(TokenBook.parse(settings.tokens))
    return book


def _cancel_answer(summary: TaskSummary, status: int, note: str | None) -> web.Response:
    body = CancelResponse(id=summary.id, status=summary.status,
                          cancel_requested_at=summary.cancel_requested_at,
                          links=task_links(summary.id), note=note)
    return web.Response(body=codec.encode(body), status=status,
                        content_type="application/json")


def _list_query(request: web.Request, who: Principal) -> Query | web.Response:
    """Parse and check ``GET /v1/tasks``'s query; a 400 naming the parameter if wrong."""
    q = request.query
    statuses = frozenset(x for v in q.getall("status", []) for x in v.split(",") if x)
    if bad := sorted(statuses - set(STATUSES)):
        return error(400, "invalid_query", f"unknown status {bad[0]!r}; one of "
                     f"{', '.join(STATUSES)}", field="status")
    tenant = q.get("tenant") or who.tenant
    if tenant != who.tenant:
        return error(403, "forbidden", f"your token is for tenant {who.tenant!r}; it cannot "
                     f"list tenant {tenant!r}", field="tenant")
    labels: list[tuple[str, str]] = []
    for item in q.getall("label", []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            return error(400, "invalid_query", f"label takes key=value, not {item!r}",
                         field="label")
        labels.append((key, value))
    times: dict[str, datetime | None] = {}
    for name in ("created_after", "created_before"):
        raw = q.get(name)
        times[name] = None
        if raw:
            try:
                parsed = msgspec.convert(raw, datetime)
            except msgspec.ValidationError:
                return error(400, "invalid_query", f"{name} must be an RFC 3339 time such "
                             f"as 2026-11-26T12:00:00Z, not {raw!r}", field=name)
            if parsed.tzinfo is None:
                return error(400, "invalid_query", f"{name} needs a time zone (Z or "
                             "+hh:mm)", field=name)
            times[name] = parsed
    raw_limit = q.get("limit", str(LIST_LIMIT_DEFAULT))
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not (
            1 <= int(raw_limit) <= LIST_LIMIT_MAX):
        return error(400, "invalid_query", f"limit must be an integer from 1 to "
                     f"{LIST_LIMIT_MAX}", field="limit")
    cursor = None
    if q.get("cursor"):
        try:
            cursor = decode_cursor(q["cursor"])
        except BadCursor as exc:
            return error(400, "invalid_query", str(exc), field="cursor")
    return Query(tenant=tenant, statuses=statuses, labels=tuple(labels),
                 created_after=times["created_after"], created_before=times["created_before"],
                 limit=int(raw_limit), cursor=cursor)
