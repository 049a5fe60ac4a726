"""Schemathesis fuzzes a live gateway against the ``/openapi.json`` it serves.

The stack is real: a nats-server process, the scheduler, the auditor, two executors and
the gateway with token auth. Schemathesis' requests are blocking, so the stack runs on
its own event loop in a thread while the fuzzer drives it from the test's thread.

Generated submissions run on the ``null`` runtime (nothing is executed: a fuzzer must not
run arbitrary commands on this host). A few seeded tasks run real shell commands on the
``process`` runtime in a pool whose name the fuzzer cannot guess, so logs, confessions
and incidents exist; the fuzzer's path ids are drawn from those seeded ids half the time,
so it reaches past the 404s. Every check runs (no 5xx, documented status codes, content
types, headers and bodies, negative data and unknown parameters rejected, auth enforced,
405s for undeclared methods), then the stateful phase follows the document's links
(submit, then get, cancel, logs of that task). Streams last until their task ends, so
event streams are fuzzed on finished tasks only, ``logs?follow=1`` is dropped from
generated queries, and a test below checks both on a finished task. Generation is
derandomized and bounded (MAX_EXAMPLES per operation, STATEFUL_EXAMPLES sequences).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis
import msgspec
import pytest
import schemathesis
from hypothesis import strategies as st
from hypothesis.stateful import get_state_machine_test
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS
from schemathesis.core.failures import FailureGroup
from schemathesis.core.parameters import ParameterLocation

from support import (
    Platform,
    assert_no_violations,
    eventually,
    session_node_id,
    shipped_server,
    start_platform,
)
from vigil import auth, subjects
from vigil.environments import EnvironmentSpec, EnvironmentStore, configured
from vigil.messages import NOT_BEFORE_MAX_AHEAD_DAYS, utcnow
from vigil.secrets import Keyring, SecretStore, new_key_line
from vigil_gateway import openapi

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

TENANT = "acme"
SEED_POOL = f"seed-{secrets.token_hex(6)}"  # the only pool that runs real commands
IDLE_POOL = f"idle-{secrets.token_hex(6)}"  # no executor: tasks stay queued
SEED_ENVIRONMENT = "seed-env"  # the environment generated tasks name (see before_call)
MAX_EXAMPLES = 60
STATEFUL_EXAMPLES = 40  # sequences
STATEFUL_STEPS = 6  # calls per sequence, at most
# Known before collection: schemathesis builds some cases (and asks for auth) then.
TOKEN = auth.new_token()
SECRETS_KEY = new_key_line("fuzz")
# Tasks' `secrets` name this one (a generated name would be a 422 for a schema-valid
# spec); generated paths never target it. SEED_SECRET is what paths are drawn from.
TASK_SECRET = f"fuzz-task-secret-{secrets.token_hex(6)}"
SEED_SECRET = "seed-secret"


@dataclass
class Seeds:
    tasks: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    incidents: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)


SEEDS = Seeds()


class LiveStack:
    """The platform on a private event loop in a thread, for blocking HTTP clients."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.url = ""
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="vigil-stack", daemon=True)

    def __enter__(self) -> LiveStack:
        self._thread.start()
        if not self._started.wait(timeout=120):
            raise AssertionError("the stack did not start within 120 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the stack did not stop within 60 s"
        if self._error is not None:  # e.g. a permission violation found at its teardown
            raise self._error

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = shipped_server(self.workdir / "nats", sync_always=False)
        await server.start()
        platform: Platform | None = None
        try:
            platform = await start_platform(server.url)
            tokens = self.workdir / "tokens.json"
            entry = auth.TokenEntry(name="fuzzer", tenant=TENANT, role="operator",
                                    sha256=auth.digest(TOKEN))
            tokens.write_bytes(msgspec.json.encode(auth.TokensFile(tokens=[entry])))
            await platform.scheduler()
            await platform.auditor()
            await platform.executor(runtime="null", node_id=session_node_id(), slots=8,
                                    secrets_key=SECRETS_KEY)
            await platform.executor(runtime="process", pool=SEED_POOL, node_id=session_node_id())
            gateway = await platform.gateway(auth="tokens", tokens_file=str(tokens),
                                             rate_limit_rps=0, sse_keepalive_s=0.5,
                                             secrets_key=SECRETS_KEY)
            self.url = f"http://127.0.0.1:{gateway.http_port}"
            await _seed(platform)
            self._started.set()
            await self._stop.wait()
        finally:
            if platform is not None:
                await platform.stop()
                await platform.nc.close()
            await server.stop()
        assert_no_violations(server)


async def _seed(platform: Platform) -> None:
    """Tasks in every interesting state, an incident and secrets, for the fuzzer to find."""
    store, ring = SecretStore(platform.js), Keyring.parse(SECRETS_KEY, "fuzz")
    for name in (TASK_SECRET, SEED_SECRET):
        await store.put(TENANT, name, ring.seal(TENANT, name, "fuzz-value"), None)
    SEEDS.secrets[:] = [SEED_SECRET]
    confess = json.dumps({"summary": "fuzz seed: cache unreachable", "severity": "error",
                          "category": "seed"})
    script = f"echo out-1; echo err-1 >&2; echo '::vigil::confess {confess}'; echo out-2"
    specs = {
        "seed-done": {"command": ["sh", "-c", script], "pool": SEED_POOL,
                      "labels": {"kind": "seed"}, "env": {"SECRET": "s3cret"}},
        "seed-failed": {"command": ["sh", "-c", "echo bad; exit 3"], "pool": SEED_POOL,
                        "max_attempts": 1},
        "seed-queued": {"command": ["true"], "pool": IDLE_POOL},
        "seed-queued-2": {"command": ["true"], "pool": IDLE_POOL},
        "seed-null": {"command": ["true"]},
    }
    environments = await EnvironmentStore.open(platform.js)
    await environments.create(configured(None, TENANT, SEED_ENVIRONMENT,
                                         EnvironmentSpec(policy="fail"), utcnow()))
    for task_id, spec in specs.items():
        await platform.publish_spec({"id": task_id, **spec}, tenant=TENANT)
    SEEDS.finished[:] = ["seed-done", "seed-failed", "seed-null"]
    for task_id in SEEDS.finished:
        await platform.final_state(task_id)
    SEEDS.tasks[:] = list(specs)

    async def incident() -> list[str] | None:
        kv = await platform.js.key_value(subjects.KV_INCIDENTS)
        try:
            return list(await kv.keys()) or None
        except Exception:  # nats-py raises NoKeysError on an empty bucket
            return None

    SEEDS.incidents[:] = await eventually(incident, timeout=30, what="the seeded incident")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    with LiveStack(tmp_path_factory.mktemp("openapi")) as live:
        yield live


def flatmap_case(ctx: Any, case: Any) -> Any:
    """Make cases reach further than a fuzzer alone can.

    - half of them get a seeded id instead of a random one (which is all 404s), unless
      the id is what a negative case made invalid; an event stream only a finished
      task's (it lasts as long as its task);
    - in positive cases, a random ``cursor`` is never one the server issued (always
      400): dropped; and a ``not_before`` more than a year after now is refused (422),
      as its description says, but JSON Schema cannot say "after now": such a time is
      moved into the year.
    """
    meta = case.meta
    if meta is None:
        return st.just(case)
    if "name" in (case.path_parameters or {}) and not meta.is_negative_at(
            ParameterLocation.PATH):
        def named(secret: str) -> Any:
            case.path_parameters = {**case.path_parameters, "name": secret}
            return case

        return st.one_of(st.just(case), st.sampled_from(SEEDS.secrets).map(named))
    if meta.generation.mode is GenerationMode.POSITIVE:
        if case.query and "cursor" in case.query:
            case.query = {k: v for k, v in case.query.items() if k != "cursor"}
        if isinstance(case.body, dict) and isinstance(case.body.get("not_before"), str):
            latest = datetime.now(UTC) + timedelta(days=NOT_BEFORE_MAX_AHEAD_DAYS - 1)
            with contextlib.suppress(ValueError):
                if datetime.fromisoformat(case.body["not_before"]) > latest:
                    case.body = {**case.body, "not_before": latest.isoformat()}
    if "id" not in (case.path_parameters or {}) or meta.is_negative_at(ParameterLocation.PATH):
        return st.just(case)
    if case.path.startswith("/v1/incidents"):
        known = SEEDS.incidents
    elif case.path.endswith("/events"):
        known = SEEDS.finished
    else:
        known = SEEDS.tasks

    def seeded(task_or_incident: str) -> Any:
        case.path_parameters = {**case.path_parameters, "id": task_or_incident}
        return case

    return st.one_of(st.just(case), st.sampled_from(known).map(seeded))


def map_query(ctx: Any, query: dict[str, Any] | None) -> dict[str, Any] | None:
    """``follow=1`` streams until the task ends (a queued one never does): dropped here,
    covered on finished tasks by the test below."""
    if query and ctx.operation is not None and ctx.operation.path.endswith("/logs") \
            and str(query.get("follow")) in ("1", "true"):
        query = {k: v for k, v in query.items() if k != "follow"}
    return query


def before_call(ctx: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Every phase (the coverage phase applies no flatmap hook): a positive submission
    names the seeded secret, since one its tenant lacks is refused (422, documented), and
    drops a secret whose env name ``env`` sets too (refused: a rule JSON Schema cannot
    say); that secret is never removed. Likewise its ``environment`` is the seeded one,
    which is never deleted either."""
    if case.method == "DELETE" and (case.path_parameters or {}).get("name") == TASK_SECRET:
        # The stateful phase finds the name in GET /v1/secrets and follows it to DELETE.
        case.path_parameters = {**case.path_parameters, "name": SEED_SECRET}
    if case.method == "DELETE" and case.path == "/v1/environments/{name}" and (
            case.path_parameters or {}).get("name") == SEED_ENVIRONMENT:
        case.path_parameters = {**case.path_parameters, "name": f"{SEED_ENVIRONMENT}-spare"}
    positive = case.meta is None or case.meta.generation.mode is GenerationMode.POSITIVE
    body = case.body
    if positive and (case.method, case.path) == ("POST", "/v1/tasks") \
            and isinstance(body, dict) and isinstance(body.get("secrets"), dict):
        env = body.get("env") if isinstance(body.get("env"), dict) else {}
        case.body = body = {**body, "secrets": {k: TASK_SECRET for k in body["secrets"]
                                                if k not in env}}
    if positive and (case.method, case.path) == ("POST", "/v1/tasks") \
            and isinstance(body, dict) and isinstance(body.get("environment"), str):
        case.body = {**body, "environment": SEED_ENVIRONMENT}
    if positive and (case.method, case.path) == ("PUT", "/v1/environments/{name}") \
            and isinstance(body, dict) and isinstance(body.get("secrets"), dict):
        case.body = {**body, "secrets": dict.fromkeys(body["secrets"], TASK_SECRET)}


class Bearer:
    """The fuzzer's operator token. Given as auth (not as a plain header) so schemathesis
    knows it is one: it also checks that requests without it, or with a bad one, get 401."""

    def get(self, case: Any, ctx: Any) -> str:
        return TOKEN

    def set(self, case: Any, data: str, ctx: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


# The generated document; a unit test checks the server serves exactly this one.
schema = schemathesis.openapi.from_dict(openapi.document())
schema.config.generation.update(max_examples=MAX_EXAMPLES, with_security_parameters=False,
                                deterministic=True, database="none")
schema.config.checks.update(included_check_names=["all"])
# A body past the gateway's size limit is refused with 413 whatever it holds (the limit
# is a setting, not part of the schema): a right answer to valid and invalid bodies alike.
for check in (schema.config.checks.negative_data_rejection,
              schema.config.checks.positive_data_acceptance):
    check.expected_statuses = [*check.expected_statuses, "413"]
schema.hook(flatmap_case)
schema.hook(map_query)
schemathesis.hook(before_call)  # a global hook (no schema scope): it checks the route
schema.auth()(Bearer)


SETTINGS = hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                               database=None, suppress_health_check=list(hypothesis.HealthCheck))


@schema.parametrize()
@SETTINGS
def test_gateway_conforms_to_its_openapi(case: Any, stack: LiveStack) -> None:
    case.call_and_validate(base_url=stack.url, timeout=30)


def test_every_check_is_enabled() -> None:
    enabled = {name for name in CHECKS.get_all_names()
               if schema.config.checks.get_by_name(name=name).enabled}
    assert enabled == set(CHECKS.get_all_names()) and len(enabled) >= 14
    assert schema.config.phases.stateful.enabled


def test_stateful_sequences_conform(stack: LiveStack) -> None:
    """Random sequences that follow the document's links (submit, then get, cancel, logs
    of that task; incident and task links schemathesis infers), every check after each
    step. Event streams are left out: one lasts as long as its task, and a generated
    task may wait forever in a pool no executor serves (the test above covers them).

    A live server is no replayable input (the second identical submission is a 409, an
    incident list grows): Hypothesis may call a run flaky, and schemathesis' own runner
    then starts another. So does this test, with the next seed, until STATEFUL_EXAMPLES
    sequences have run; failures are collected as they happen, so none is lost to that.
    """
    machine = schema.exclude(method="GET", path="/v1/tasks/{id}/events").as_state_machine()
    failures: list[str] = []
    sequences: list[int] = []
    linked: list[str] = []

    class Sequences(machine):  # type: ignore[valid-type,misc]
        def setup(self) -> None:
            sequences.append(0)

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": stack.url, "timeout": 30}

        def step(self, input: Any) -> Any:
            if input.transition is not None and input.applied_parameters \
                    and not input.transition.is_inferred:
                linked.append(input.transition.id)  # one of the document's own links
            return super().step(input)

        def validate_response(self, response: Any, case: Any, *args: Any, **kwargs: Any
                              ) -> None:
            try:
                super().validate_response(response, case, *args, **kwargs)
            except FailureGroup as exc:
                failures.append(f"{case.method} {case.formatted_path} -> "
                                f"{response.status_code}: {exc}")

    settings = hypothesis.settings(SETTINGS, derandomize=False, max_examples=STATEFUL_EXAMPLES,
                                   stateful_step_count=STATEFUL_STEPS,
                                   phases=[hypothesis.Phase.generate])
    for seed in range(20):
        if len(sequences) >= STATEFUL_EXAMPLES:
            break
        with contextlib.suppress(hypothesis.errors.Flaky):
            hypothesis.seed(seed)(get_state_machine_test(Sequences, settings=settings))()
    assert not failures, "\n\n".join(failures)
    assert len(sequences) >= STATEFUL_EXAMPLES, f"only {len(sequences)} sequences ran"
    assert linked, "no sequence followed a link of the document"


@pytest.mark.parametrize(("path", "query", "expect"), [
    ("/v1/tasks/{id}/events", {}, "event: finished"),
    ("/v1/tasks/{id}/events", {"last_event_id": "1"}, "event: finished"),
    ("/v1/tasks/{id}/logs", {"follow": "1"}, "out-1\nout-2\n"),
    ("/v1/tasks/{id}/logs", {"stream": "stderr"}, "err-1\n"),
])
def test_streams_of_a_finished_task_conform_and_end(
    stack: LiveStack, path: str, query: dict[str, str], expect: str
) -> None:
    """The streaming routes the fuzzer leaves out, on a task whose stream ends."""
    case = schema[path]["GET"].Case(path_parameters={"id": "seed-done"}, query=query)
    response = case.call_and_validate(base_url=stack.url, timeout=30,
                                      headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert expect in response.text



@pytest.mark.parametrize(("path", "query", "headers", "status"), [
    # str.isdigit() is true for "²", which int() refuses: must be a 400, not a 500.
    ("/v1/tasks", {"limit": "²"}, {}, 400),
    ("/v1/tasks/{id}/events", {}, {"Last-Event-ID": "²"}, 400),
    ("/v1/tasks/{id}/events", {"last_event_id": "²"}, {}, 400),
    # RFC 3339 allows a lower-case "z" (section 5.6); an empty value is no filter.
    ("/v1/tasks", {"created_after": "2000-01-01T00:00:00z"}, {}, 200),
    ("/v1/tasks", {"created_before": "", "status": ""}, {}, 200),
], ids=["limit-superscript", "last-event-id-header", "last-event-id-query", "lower-z",
        "empty-time"])
def test_awkward_inputs_get_the_documented_answer(
    stack: LiveStack, path: str, query: dict[str, str], headers: dict[str, str], status: int
) -> None:
    params = {"id": "seed-done"} if "{id}" in path else {}
    case = schema[path]["GET"].Case(path_parameters=params, query=query, headers=headers)
    response = case.call(base_url=stack.url, timeout=30,
                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == status, response.text
    case.validate_response(response)
