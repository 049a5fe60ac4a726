"""Every endpoint by every kind of caller: who gets in, who gets 401/403/404, who sees what.

Tenants ``acme`` (A) and ``globex`` (B) each run tasks and confess; tokens of every role
are made with :func:`vigil.auth.add_token`. The gateway runs as a real process (so its
log is the real one) against in-process scheduler, executor and auditor.

Rules under test (service.py's docstring): no or a bad token → 401 with a challenge; a
role too low → 403; another tenant's task → 404, exactly like a missing one, whatever the
caller's role, and never in a list, an event stream or a log; the right token → 2xx. Ids
are per tenant: both tenants have a task ``matrix-twin``, and each sees only its own.
Incidents: an agent's are its tenant's own; the platform's span tenants. A tenant's token,
whatever its role, sees only incidents that touched its tenant, narrowed to it (another
tenant's incident → 404). Cross-tenant access is a separate kind of token (``platform``):
it sees every incident whole, and no tenant's tasks (403).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from support import (
    Platform,
    as_user,
    assert_no_violations,
    eventually,
    shipped_server,
    start_platform,
)
from vigil import auth, subjects
from vigil.environments import EnvironmentSpec, EnvironmentStore, Snapshot, configured
from vigil.messages import utcnow
from vigil.secrets import Keyring, SecretStore, new_key_line

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

A, B = "acme", "globex"
IDLE_POOL = "nobody-runs-this-pool"
ROLES: tuple[auth.Role, ...] = ("viewer", "submitter", "operator")
SECRETS_KEY = new_key_line("matrix")


@dataclass
class World:
    url: str
    tokens_file: Path
    log_file: Path
    platform: Platform
    tokens: dict[str, str] = field(default_factory=dict)  # "acme-viewer" -> token
    ids: dict[str, str] = field(default_factory=dict)  # "A-done" -> task/incident id

    def token(self, tenant: str, role: str) -> str:
        return self.tokens[f"{tenant}-{role}"]


def confess(summary: str) -> str:
    line = json.dumps({"summary": summary, "severity": "error", "category": "matrix"})
    return f"echo '::vigil::confess {line}'"


async def _incident_ids(platform: Platform) -> dict[str, dict[str, Any]]:
    kv = await platform.js.key_value(subjects.KV_INCIDENTS)
    try:
        keys = await kv.keys()
    except Exception:  # nats-py raises NoKeysError on an empty bucket
        return {}
    return {k: json.loads((await kv.get(k)).value) for k in keys}


class GatewayProcess:
    """``python -m vigil_gateway`` with a JSON log at debug level."""

    def __init__(self, workdir: Path, nats_url: str, tokens_file: Path) -> None:
        self.log_file = workdir / "gateway.log"
        self.env = {**os.environ, "VIGIL_NATS_URL": as_user(nats_url, "gateway"),
                    "VIGIL_HTTP_PORT": "0",
                    "VIGIL_TOKENS_FILE": str(tokens_file), "VIGIL_LOG_FORMAT": "json",
                    "VIGIL_LOG_LEVEL": "debug", "VIGIL_SSE_KEEPALIVE_S": "0.5",
                    "VIGIL_SECRETS_KEY": SECRETS_KEY}
        self.process: subprocess.Popen[bytes] | None = None

    def log(self) -> list[dict[str, Any]]:
        lines = self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def start(self) -> GatewayProcess:
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vigil_gateway"], env=self.env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    async def url(self) -> str:
        async def started() -> int | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited:\n{self.log_file.read_text()}")
            events = {e.get("event"): e for e in self.log()}
            if "gateway_started" in events:
                return int(events["http_listening"]["port"])
            return None

        port = await eventually(started, timeout=30, what="the gateway to start")
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)

        async def exited() -> bool:
            assert self.process is not None
            return self.process.poll() is not None

        try:
            await eventually(exited, timeout=20, what="the gateway to exit")
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    workdir = tmp_path_factory.mktemp("auth-matrix")
    server = shipped_server(workdir / "nats", sync_always=False)
    await server.start()
    platform = await start_platform(server.url)
    gateway: GatewayProcess | None = None
    try:
        await platform.scheduler()
        await platform.executor(node_id="matrix-node")
        await platform.auditor()
        tokens_file = workdir / "tokens.json"
        tokens = {f"{t}-{r}": auth.add_token(tokens_file, f"{t}-{r}", t, r)
                  for t in (A, B) for r in ROLES}
        tokens["platform-operator"] = auth.add_token(tokens_file, "platform-operator", None,
                                                     "operator", "platform")
        gateway = GatewayProcess(workdir, server.url, tokens_file)
        url = await gateway.start().url()
        w = World(url=url, tokens_file=tokens_file, log_file=gateway.log_file,
                  platform=platform, tokens=tokens)
        await _seed(w)
        yield w
    finally:
        if gateway is not None:
            await gateway.stop()
        await platform.stop()
        await platform.nc.close()
        await server.stop()
    assert_no_violations(server)


async def _seed(w: World) -> None:
    p = w.platform
    specs = {
        "A-done": (A, {"command": ["sh", "-c", "echo acme-private-output; "
                                   + confess("acme only: ledger locked")]}),
        "A-done-2": (A, {"command": ["sh", "-c", confess("acme only: vault sealed")]}),
        "A-queued": (A, {"command": ["true"], "pool": IDLE_POOL}),
        "B-done": (B, {"command": ["sh", "-c", "echo globex-private-output; "
                                   + confess("globex only: printer on fire")]}),
        # The same complaint from both tenants' agents: each tenant's own incident.
        "A-shared": (A, {"command": ["sh", "-c", confess("shared disk full")]}),
        "B-shared": (B, {"command": ["sh", "-c", confess("shared disk full")]}),
    }
    for name, (tenant, spec) in specs.items():
        task_id = f"matrix-{name.lower()}"
        w.ids[name] = task_id
        await p.publish_spec({"id": task_id, **spec}, tenant=tenant)
    # One id, two tenants: two tasks that never meet.
    for tenant in (A, B):
        await p.publish_spec({"id": "matrix-twin",
                              "command": ["sh", "-c", f"echo twin of {tenant}"]},
                             tenant=tenant)
    # Secrets of A, to read and to remove (set as the gateway would: sealed).
    store, ring = SecretStore(p.js), Keyring.parse(SECRETS_KEY, "matrix")
    for name, secret in (("A-secret", "matrix-secret"), ("A-secret-2", "matrix-secret-2")):
        w.ids[name] = secret
        await store.put(A, secret, ring.seal(A, secret, "matrix-value"), None)
    # Environments of A, to read, restore (a revision its history keeps) and delete.
    envs, now = await EnvironmentStore.open(p.js), utcnow()
    kept = Snapshot(revision=1, name="acme/matrix-env/r1-matrix-a1", size=10,
                    digest="sha256:0", committed_at=now, task_id="matrix", attempt=1)
    for name, env_name in (("A-env", "matrix-env"), ("A-env-2", "matrix-env-2")):
        w.ids[name] = env_name
        await envs.create(msgspec.structs.replace(
            configured(None, A, env_name, EnvironmentSpec(), now), revision=1, snapshot=kept,
            history=[kept]))
    for name in specs:
        if name != "A-queued":
            await p.final_state(w.ids[name], tenant=specs[name][0])
    for tenant in (A, B):
        await p.final_state("matrix-twin", tenant=tenant)
    # The platform's own complaint about a node, naming one task of each tenant: one
    # shared incident, which each tenant sees narrowed to itself.
    for tenant, name in ((A, "A-shared"), (B, "B-shared")):
        body = {"summary": "node matrix-node lost its disk", "severity": "error",
                "category": "matrix", "task_id": w.ids[name], "tenant": tenant,
                "node": "matrix-node"}
        await p.js.publish(subjects.issue("executor", "error"), json.dumps(body).encode())

    async def incidents() -> dict[str, str] | None:
        found = await _incident_ids(p)
        by_title = {(i["title"], i.get("tenant")): k for k, i in found.items()}
        wanted = {"inc-A": ("acme only: ledger locked", A),
                  "inc-A-2": ("acme only: vault sealed", A),
                  "inc-B": ("globex only: printer on fire", B),
                  "inc-A-same": ("shared disk full", A), "inc-B-same": ("shared disk full", B),
                  "inc-shared": ("node <node> lost its disk", None)}
        if not all(t in by_title for t in wanted.values()):
            return None
        shared = found[by_title[wanted["inc-shared"]]]
        if sorted(shared["tenants"]) != [A, B]:
            return None
        return {name: by_title[title] for name, title in wanted.items()}

    w.ids.update(await eventually(incidents, timeout=30, what="the seeded incidents"))


# The matrix -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    method: str
    path: str  # {task} / {incident} name a seeded id
    role: str  # the least role that may call it
    owned: str | None  # "task", "incident", ...: another tenant's gets 404; None: a list
    body: bytes | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


ROUTES = [
    Route("GET", "/v1/tasks", "viewer", None),
    Route("POST", "/v1/tasks", "submitter", None, b'{"command": ["true"]}'),
    Route("GET", "/v1/tasks/{A-done}", "viewer", "task"),
    Route("POST", "/v1/tasks/{A-queued}/cancel", "submitter", "task", b'{"reason": "matrix"}'),
    Route("GET", "/v1/tasks/{A-done}/events", "viewer", "task"),
    Route("GET", "/v1/tasks/{A-done}/logs", "viewer", "task"),
    Route("GET", "/v1/executors", "viewer", None),
    Route("GET", "/v1/incidents", "viewer", None),
    Route("GET", "/v1/incidents/{inc-A}", "viewer", "incident"),
    Route("POST", "/v1/incidents/{inc-A}/ack", "operator", "incident"),
    Route("POST", "/v1/incidents/{inc-A-2}/resolve", "operator", "incident"),
    Route("GET", "/v1/secrets", "operator", None),
    Route("PUT", "/v1/secrets/matrix-new", "operator", None, b'{"value": "matrix-value"}'),
    Route("GET", "/v1/secrets/{A-secret}", "operator", "secret"),
    Route("DELETE", "/v1/secrets/{A-secret-2}", "operator", "secret"),
    Route("GET", "/v1/environments", "viewer", None),
    Route("PUT", "/v1/environments/matrix-env-new", "submitter", None, b'{"policy": "fail"}'),
    Route("GET", "/v1/environments/{A-env}", "viewer", "environment"),
    Route("GET", "/v1/environments/{A-env}/history", "viewer", "environment"),
    Route("POST", "/v1/environments/{A-env}/restore", "submitter", "environment",
          b'{"revision": 1}'),
    Route("DELETE", "/v1/environments/{A-env-2}", "operator", "environment"),
]
PUBLIC = ["/healthz", "/metrics", "/openapi.json"]


def url_of(w: World, route: Route) -> str:
    path = route.path
    for name, value in w.ids.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, path
    return w.url + path


async def call(w: World, route: Route, token: str | None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http, \
            http.request(route.method, url_of(w, route), data=route.body, headers=sent) as r:
        return r.status, dict(r.headers), await r.read()


def error_code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


@pytest.mark.parametrize("route", ROUTES, ids=str)
@pytest.mark.parametrize("token", [None, "vgl_not-a-real-token", "Basic dXNlcjpwdw=="],
                         ids=["no-token", "unknown-token", "not-bearer"])
async def test_no_valid_token_is_401_with_a_challenge(
    world: World, route: Route, token: str | None
) -> None:
    headers = {}
    if token is not None and token.startswith("Basic"):
        headers, token = {"Authorization": token}, None
    status, got, body = await call(world, route, token, headers)
    assert status == 401, body
    assert got["WWW-Authenticate"].startswith("Bearer")
    assert error_code(body) == "unauthenticated"


@pytest.mark.parametrize("route", [r for r in ROUTES if r.role != "viewer"], ids=str)
async def test_a_role_too_low_is_403(world: World, route: Route) -> None:
    below = ROLES[ROLES.index(route.role) - 1]
    status, _, body = await call(world, route, world.token(A, below))
    assert status == 403, body
    assert error_code(body) == "forbidden"


def wrong_tenant_cases() -> list[tuple[Route, str]]:
    """(route, role of a tenant-B token) pairs that must get 404 for A's resource."""
    cases = []
    for route in ROUTES:
        for role in ROLES[ROLES.index(route.role):]:  # a lower role gets 403 first
            if route.owned is not None:  # a role never widens a token beyond its tenant
                cases.append((route, role))
    return cases


@pytest.mark.parametrize(("route", "role"), wrong_tenant_cases(),
                         ids=[f"{r}-{role}" for r, role in wrong_tenant_cases()])
async def test_another_tenants_resource_is_404_like_a_missing_one(
    world: World, route: Route, role: str
) -> None:
    before = await world.platform.state(world.ids["A-queued"])
    status, _, body = await call(world, route, world.token(B, role))
    assert status == 404, body
    assert await world.platform.state(world.ids["A-queued"]) == before  # nothing changed
    # Exactly what a missing id answers (apart from the id itself).
    missing = Route(route.method, route.path.replace("{A-done}", "no-such-task")
                    .replace("{A-queued}", "no-such-task").replace("{inc-A}", "no-such-inc")
                    .replace("{A-secret}", "no-such-secret")
                    .replace("{A-secret-2}", "no-such-secret")
                    .replace("{A-env-2}", "no-such-env").replace("{A-env}", "no-such-env"),
                    route.role, route.owned, route.body)
    status_missing, _, body_missing = await call(world, missing, world.token(B, role))
    assert status_missing == 404
    assert error_code(body) == error_code(body_missing) == "not_found"


@pytest.mark.parametrize("route", ROUTES, ids=str)
async def test_the_right_token_gets_2xx(world: World, route: Route) -> None:
    tenant_token = world.token(A, route.role)
    status, _, body = await call(world, route, tenant_token)
    assert 200 <= status < 300, body


@pytest.mark.parametrize("path", PUBLIC)
async def test_public_routes_need_no_token(world: World, path: str) -> None:
    route = Route("GET", path, "viewer", None)
    status, _, _ = await call(world, route, None)
    assert status == 200


# Isolation in lists and streams ---------------------------------------------------------
async def get_json(w: World, path: str, token: str) -> tuple[int, Any]:
    status, _, body = await call(w, Route("GET", path, "viewer", None), token)
    return status, json.loads(body)


@pytest.mark.parametrize("role", ROLES)
async def test_task_lists_hold_only_the_callers_tenant(world: World, role: str) -> None:
    status, page = await get_json(world, "/v1/tasks?limit=500", world.token(B, role))
    assert status == 200
    listed = {t["id"] for t in page["tasks"]}
    assert world.ids["B-done"] in listed and world.ids["B-shared"] in listed
    assert {t["tenant"] for t in page["tasks"]} == {B}
    for filters in ("status=succeeded", "label=kind%3Dx", "created_after=2000-01-01T00:00:00Z",
                    f"tenant={B}"):
        status, page = await get_json(world, f"/v1/tasks?{filters}", world.token(B, role))
        assert status == 200 and {t["tenant"] for t in page["tasks"]} <= {B}, filters
    # Naming the other tenant is refused outright rather than answered with an empty page.
    status, body = await get_json(world, f"/v1/tasks?tenant={A}", world.token(B, role))
    assert status == 403 and body["error"]["field"] == "tenant"


async def test_task_list_pages_do_not_leak_across_tenants(world: World) -> None:
    seen: list[str] = []
    cursor = ""
    for _ in range(20):
        status, page = await get_json(world, f"/v1/tasks?limit=1{cursor}",
                                      world.token(B, "viewer"))
        assert status == 200
        seen += [t["id"] for t in page["tasks"]]
        assert all(t["tenant"] == B for t in page["tasks"])
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert len(seen) == len(set(seen)) and world.ids["B-done"] in seen
    assert not any(i.startswith("matrix-a-") for i in seen)


async def test_operators_too_list_only_their_tenants_tasks(world: World) -> None:
    status, page = await get_json(world, "/v1/tasks?limit=500", world.token(B, "operator"))
    assert status == 200
    assert world.ids["B-done"] in {t["id"] for t in page["tasks"]}
    assert {t["tenant"] for t in page["tasks"]} == {B}
    status, _ = await get_json(world, f"/v1/tasks?tenant={A}", world.token(B, "operator"))
    assert status == 403


async def test_only_a_platform_token_sees_every_incident_whole(world: World) -> None:
    status, body = await get_json(world, "/v1/incidents", world.tokens["platform-operator"])
    assert status == 200
    by_id = {i["id"]: i for i in body["incidents"]}
    assert {world.ids[k] for k in ("inc-A", "inc-B", "inc-shared", "inc-A-same",
                                   "inc-B-same")} <= set(by_id)
    assert sorted(by_id[world.ids["inc-shared"]]["tenants"]) == [A, B]
    assert by_id[world.ids["inc-shared"]]["tasks_total"] == 2
    # ... and acts on the platform's incidents, which a tenant's operator may not.
    route = Route("POST", "/v1/incidents/{inc-shared}/ack", "operator", "incident")
    status, _, body_ = await call(world, route, world.token(B, "operator"))
    assert status == 403 and error_code(body_) == "forbidden"
    status, _, body_ = await call(world, route, world.tokens["platform-operator"])
    assert status == 200, body_


@pytest.mark.parametrize("route", [r for r in ROUTES if r.path.startswith(
    ("/v1/tasks", "/v1/secrets", "/v1/environments"))], ids=str)
async def test_a_platform_token_reads_no_tenants_tasks(world: World, route: Route) -> None:
    """Nor any tenant's secrets or environments."""
    status, _, body = await call(world, route, world.tokens["platform-operator"])
    assert status == 403 and error_code(body) == "forbidden", body


@pytest.mark.parametrize("role", ROLES)
async def test_the_same_id_in_two_tenants_is_two_tasks(world: World, role: str) -> None:
    for tenant in (A, B):
        status, state = await get_json(world, "/v1/tasks/matrix-twin", world.token(tenant, role))
        assert status == 200 and state["tenant"] == tenant
        status, _, logs = await call(
            world, Route("GET", "/v1/tasks/matrix-twin/logs", "viewer", None),
            world.token(tenant, role))
        assert status == 200 and logs == f"twin of {tenant}\n".encode()
        status, page = await get_json(world, "/v1/tasks?limit=500", world.token(tenant, role))
        assert [t["tenant"] for t in page["tasks"] if t["id"] == "matrix-twin"] == [tenant]


@pytest.mark.parametrize("role", ROLES)
async def test_incident_lists_hold_only_the_callers_tenant(world: World, role: str) -> None:
    status, body = await get_json(world, "/v1/incidents", world.token(B, role))
    assert status == 200
    by_id = {i["id"]: i for i in body["incidents"]}
    assert world.ids["inc-B"] in by_id and world.ids["inc-shared"] in by_id
    assert world.ids["inc-B-same"] in by_id
    for theirs in ("inc-A", "inc-A-2", "inc-A-same"):
        assert world.ids[theirs] not in by_id
    text = json.dumps(body)
    assert A not in text and "matrix-a-" not in text and "acme only" not in text
    shared = by_id[world.ids["inc-shared"]]
    assert shared["tenants"] == [B]
    assert shared["tasks"] == [world.ids["B-shared"]]
    assert "tasks_total" not in shared  # counts other tenants' tasks
    status, one = await get_json(world, f"/v1/incidents/{world.ids['inc-shared']}",
                                 world.token(B, role))
    assert status == 200 and A not in json.dumps(one)


async def test_event_streams_and_logs_hold_only_the_callers_tasks(world: World) -> None:
    b = world.token(B, "viewer")
    status, _, events = await call(
        world, Route("GET", f"/v1/tasks/{world.ids['B-done']}/events", "viewer", None), b)
    assert status == 200
    assert b"event: finished" in events and world.ids["B-done"].encode() in events
    assert b"acme" not in events and b"matrix-a-" not in events
    status, _, logs = await call(
        world, Route("GET", f"/v1/tasks/{world.ids['B-done']}/logs", "viewer", None), b)
    assert status == 200 and logs == b"globex-private-output\n"
    # And A's own output is there for A (so the negative above can fail).
    status, _, logs = await call(
        world, Route("GET", f"/v1/tasks/{world.ids['A-done']}/logs", "viewer", None),
        world.token(A, "viewer"))
    assert status == 200 and logs == b"acme-private-output\n"


async def test_a_viewer_never_sees_env_values(world: World) -> None:
    task_id = "matrix-env"
    await world.platform.publish_spec(
        {"id": task_id, "command": ["true"], "env": {"API_KEY": "hunter2"}}, tenant=A)
    await world.platform.final_state(task_id)
    route = Route("GET", f"/v1/tasks/{task_id}", "viewer", None)
    _, _, as_viewer = await call(world, route, world.token(A, "viewer"))
    _, _, as_submitter = await call(world, route, world.token(A, "submitter"))
    assert b"hunter2" not in as_viewer and b"API_KEY" in as_viewer
    assert b"hunter2" in as_submitter


# Secrets at rest and in logs ---------------------------------------------------------------
async def test_the_tokens_file_holds_digests_only(world: World) -> None:
    text = world.tokens_file.read_text(encoding="utf-8")
    entries = json.loads(text)["tokens"]
    assert len(entries) == len(world.tokens)
    for token in world.tokens.values():
        assert token not in text
        assert token.removeprefix(auth.TOKEN_PREFIX) not in text
        assert auth.digest(token) in text
    assert all(set(e) == {"name", "tenant", "role", "sha256"} for e in entries
               if e["name"] != "platform-operator")
    (platform,) = [e for e in entries if e["name"] == "platform-operator"]
    assert set(platform) == {"name", "role", "sha256", "scope"}
    assert stat.S_IMODE(world.tokens_file.stat().st_mode) == 0o600


async def test_the_gateway_log_holds_no_token(world: World) -> None:
    # Every token, bad ones too, through every read route, plus failures and a submit
    # and a cancel (which the gateway does log, with the token's name).
    bad = ["vgl_" + "x" * 43, "not-even-prefixed"]
    for token in [*world.tokens.values(), *bad]:
        for route in ROUTES:
            if route.method == "GET":
                await call(world, route, token)
        await call(world, Route("POST", "/v1/tasks", "submitter", None, b"{oops"), token)
        await call(world, Route("GET", "/v1/tasks?cursor=zzz", "viewer", None), token)
    submitter = world.token(A, "submitter")
    submit = Route("POST", "/v1/tasks", "submitter", None,
                   json.dumps({"command": ["true"], "pool": IDLE_POOL}).encode())
    status, _, body = await call(world, submit, submitter)
    assert status == 202, body
    task_id = json.loads(body)["id"]
    status, _, body = await call(
        world, Route("POST", f"/v1/tasks/{task_id}/cancel", "submitter", None), submitter)
    assert status in (200, 202), body

    async def logged() -> str | None:
        text = world.log_file.read_text(encoding="utf-8", errors="replace")
        return text if task_id in text and "task_cancel_requested" in text else None

    text = await eventually(logged, timeout=10, what="the gateway to log the cancel")
    assert f"{A}-submitter" in text  # who did it is logged: the checks below could fail
    for token in [*world.tokens.values(), *bad]:
        assert token not in text
        assert token[len(auth.TOKEN_PREFIX):] not in text
    assert "Bearer" not in text and "Authorization" not in text
