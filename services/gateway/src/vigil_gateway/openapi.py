"""``GET /openapi.json``: the OpenAPI 3.1 document, generated from the msgspec types.

Bodies are described by the very types the gateway decodes and encodes (``vigil.api``,
``vigil.messages``, :mod:`vigil_gateway.openapi_types`), turned into JSON Schema 2020-12
by msgspec, which OpenAPI 3.1 embeds as is. Only what no type can say is written here:
routes, parameters, status codes and headers. ``tests/test_openapi.py`` fuzzes a live
gateway against this document, so a route that answers differently fails a test.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import msgspec

from vigil import api, ids
from vigil.environments import Environment, EnvironmentSpec
from vigil.messages import (
    ID_PATTERN,
    RESERVED_ENV_PREFIX,
    SEVERITIES,
    STATUSES,
    AnyEvent,
    ConfessionEvent,
    TaskSpecStrict,
    TaskState,
)
from vigil_gateway import openapi_types
from vigil_gateway.events import POSITION_PATTERN
from vigil_gateway.incidents import STATUSES as INCIDENT_STATUSES

Json = dict[str, Any]

VERSION = "1"
SCHEMAS = "#/components/schemas/{name}"
PLATFORM_ID_RE = ids.PLATFORM_ID_RE
MAX_LABELS = 64  # TaskSpec.__post_init__; not expressible as a msgspec constraint

_TYPES: tuple[Any, ...] = (
    TaskSpecStrict,
    api.SubmitResponse,
    TaskState,
    api.TaskList,
    api.CancelBody,
    api.CancelResponse,
    api.ErrorBody,
    api.ExecutorList,
    ConfessionEvent,
    AnyEvent,  # named "Event" below (a union has no name of its own)
    openapi_types.Health,
    openapi_types.IncidentAnswer,
    openapi_types.IncidentList,
    EnvironmentSpec,
    Environment,
    api.EnvironmentList,
    api.EnvironmentHistory,
    api.RestoreBody,
    api.SecretBody,
    api.SecretInfo,
    api.SecretList,
)


def _ref(name: str) -> Json:
    return {"$ref": SCHEMAS.format(name=name)}


def _json(schema: Json, description: str, headers: Json | None = None,
          links: Json | None = None) -> Json:
    response: Json = {"description": description,
                      "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    if links:
        response["links"] = links
    return response


def _text(media_type: str, description: str) -> Json:
    return {"description": description,
            "content": {media_type: {"schema": {"type": "string"}}}}


def _event_kinds() -> list[str]:
    union = msgspec.inspect.type_info(AnyEvent)
    assert isinstance(union, msgspec.inspect.UnionType)
    return [str(t.tag) for t in union.types if isinstance(t, msgspec.inspect.StructType)]


def _sse_event() -> Json:
    """Each SSE event (OpenAPI before 3.2: the schema of an event stream is per event)."""
    return {
        "type": "object",
        "required": ["id", "event", "data"],
        "properties": {
            "id": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+$",
                   "description": "Where the stream is after this event: `<sequence in "
                                  "VIGIL_EVENTS>.<sequence in VIGIL_OUTPUT>`; send it back "
                                  "as Last-Event-ID to resume after it."},
            "event": {"type": "string", "enum": _event_kinds()},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": _ref("Event")},
        },
    }


def _problem(name: str) -> Json:
    return {"$ref": f"#/components/responses/{name}"}


def _schemas() -> Json:
    schemas, components = msgspec.json.schema_components(_TYPES, ref_template=SCHEMAS)
    components["Event"] = {
        "description": "One task event, tagged by `kind` (the SSE event name).",
        **schemas[_TYPES.index(AnyEvent)],
    }
    # Rules enforced in TaskSpec.__post_init__ (msgspec reports them as validation errors,
    # so 422), written into the schema so that a client validating locally agrees.
    for name in ("TaskSpecStrict", "TaskSpec"):
        props = components[name]["properties"]
        props["env"]["propertyNames"]["not"] = {"pattern": f"^{RESERVED_ENV_PREFIX}"}
        props["secrets"]["propertyNames"]["not"] = {"pattern": f"^{RESERVED_ENV_PREFIX}"}
        props["labels"]["maxProperties"] = MAX_LABELS
    secrets = components["EnvironmentSpec"]["properties"]["secrets"]
    secrets["propertyNames"]["not"] = {"pattern": f"^{RESERVED_ENV_PREFIX}"}
    # Ids of the shapes the platform makes are not the user's to choose (vigil.ids).
    for option in components["TaskSpecStrict"]["properties"]["id"]["anyOf"]:
        if option.get("type") == "string":
            option["not"] = {"pattern": PLATFORM_ID_RE.pattern}
    _mark_datetimes(components)
    return dict(sorted(components.items()))


def _mark_datetimes(components: Json) -> None:
    """msgspec writes a datetime as a bare string; say it is RFC 3339 (it encodes it so)."""
    seen: set[type] = set()
    todo = list(msgspec.inspect.multi_type_info(_TYPES))
    while todo:
        info = todo.pop()
        if isinstance(info, msgspec.inspect.UnionType):
            todo += info.types
        elif isinstance(info, msgspec.inspect.ListType | msgspec.inspect.DictType):
            todo += [info.value_type] if isinstance(info, msgspec.inspect.DictType) \
                else [info.item_type]
        elif isinstance(info, msgspec.inspect.StructType) and info.cls not in seen:
            seen.add(info.cls)
            props = components[info.cls.__name__]["properties"]
            for field in info.fields:
                todo.append(field.type)
                kinds = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) \
                    else (field.type,)
                kinds = tuple(k.type if isinstance(k, msgspec.inspect.Metadata) else k
                              for k in kinds)
                if any(isinstance(k, msgspec.inspect.DateTimeType) for k in kinds):
                    schema = props[field.encode_name]
                    for branch in schema.get("anyOf", [schema]):
                        if branch.get("type") == "string":
                            branch["format"] = "date-time"


_RETRY_AFTER = {
    "description": "Seconds to wait before retrying.",
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}
_ERROR = _ref("ErrorBody")

_RESPONSES: Json = {
    "BadRequest": _json(_ERROR, "A malformed request: `error.field` names the parameter, "
                        "header or JSON path at fault."),
    "Unauthorized": _json(_ERROR, "No bearer token, or an unknown or revoked one.", {
        "WWW-Authenticate": {"description": "The `Bearer` challenge.",
                             "schema": {"type": "string"}},
    }),
    "Forbidden": _json(_ERROR, "The token's role may not do this (roles: viewer < "
                       "submitter < operator)."),
    "NotFound": _json(_ERROR, "No such resource for this token's tenant (another "
                      "tenant's resource looks exactly like a missing one)."),
    "RateLimited": _json(_ERROR, "Too many requests for this token (`rate_limited`).",
                         {"Retry-After": _RETRY_AFTER}),
    "Unavailable": _json(_ERROR, "NATS is unreachable (`unavailable`); retry shortly.",
                         {"Retry-After": _RETRY_AFTER}),
}

_ID_PARAM: Json = {
    "name": "id", "in": "path", "required": True,
    "schema": {"type": "string", "pattern": ID_PATTERN},
}


def _links(source: str, *operation_ids: str) -> Json:
    """OpenAPI links: the answer's ``source`` (a JSON pointer into its body) is the ``id``
    of each of these operations (what a client, or schemathesis' stateful phase, does
    next with it)."""
    return {f"{op[0].upper()}{op[1:]}": {
        "operationId": op, "parameters": {"id": f"$response.body#{source}"}}
        for op in operation_ids}


def _op(operation_id: str, summary: str, responses: Json, *, public: bool = False,
        roles: str = "viewer", parameters: list[Json] | None = None,
        body: Json | None = None, tags: tuple[str, ...] = (), description: str = "") -> Json:
    """One operation; the errors every authenticated route can answer are added here."""
    op: Json = {"operationId": operation_id, "summary": summary}
    if tags:
        op["tags"] = list(tags)
    if public:
        op["security"] = []
    else:
        description = f"Needs a token with the {roles} role or above. {description}"
    if description:
        op["description"] = description.strip()
        # 400: every /v1 route refuses a query parameter it does not declare; 403: a role
        # too low, or a token of the wrong kind (a platform token on a tenant's tasks; a
        # tenant naming another tenant).
        responses = {"400": _problem("BadRequest"), "403": _problem("Forbidden"),
                     "401": _problem("Unauthorized"), "429": _problem("RateLimited"),
                     "503": _problem("Unavailable"), **responses}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
    op["responses"] = dict(sorted(responses.items()))
    return op


def _task_paths() -> Json:
    task_view = {"allOf": [_ref("TaskState"), {
        "type": "object",
        "properties": {"confessions": {
            "type": "array", "items": _ref("ConfessionEvent"),
            "description": "Present with `?include=confessions`: the task's confessions, "
                           "oldest first."}},
    }]}
    location = {"Location": {"description": "The task's URL.", "schema": {"type": "string"}}}
    # (Not to the event stream: it lasts as long as its task, maybe forever.)
    task_links = _links("/id", "getTask", "cancelTask", "taskLogs")
    submit = _op(
        "submitTask", "Submit a task", tags=("tasks",), roles="submitter",
        parameters=[{
            "name": "Idempotency-Key", "in": "header", "required": False,
            "description": "The same key (per tenant) returns the same task instead of a "
                           "second one, with status 200.",
            "schema": {"type": "string", "pattern": r"^[\x21-\x7e]{1,255}$"},
        }],
        body={"required": True, "content": {"application/json": {
            "schema": _ref("TaskSpecStrict")}}},
        responses={
            "202": _json(_ref("SubmitResponse"), "Accepted: the submission is durable.",
                         location, task_links),
            "200": _json(_ref("SubmitResponse"),
                         "A repeat of an earlier request with the same Idempotency-Key.",
                         location, task_links),
            "400": _problem("BadRequest"),
            "403": _problem("Forbidden"),
            "409": _json(_ERROR, "The task id is taken (`exists`, `id_taken`)."),
            "413": _json(_ERROR, "The body is too large (`body_too_large`)."),
            "422": _json(_ERROR, "The spec is invalid (`invalid_field`; `error.field` is its "
                         "JSON path; a secret it names that the tenant does not have is "
                         "`$.secrets.ENV_NAME`) or the scheduler refused it (`rejected`)."),
        },
    )
    # An empty value is no filter (as an HTML form sends an empty field), so "" is allowed.
    statuses = {"type": "string", "enum": [*STATUSES, ""]}
    empty = {"type": "string", "maxLength": 0}
    list_tasks = _op(
        "listTasks", "List the tenant's tasks, newest first", tags=("tasks",),
        description="Unknown query parameters are refused (400); an empty value is the "
                    "same as none.",
        parameters=[
            {"name": "status", "in": "query", "style": "form", "explode": False,
             "description": "Comma-separated statuses; a task matching any is listed.",
             "schema": {"type": "array", "items": statuses}},
            {"name": "tenant", "in": "query",
             "description": "The token's own tenant (the default). A token only ever "
                            "sees its own tenant's tasks, whatever its role: naming "
                            "another tenant is refused (403).",
             "schema": {"type": "string"}},
            {"name": "label", "in": "query", "style": "form", "explode": True,
             "description": "`key=value`, repeatable; a task must carry all of them.",
             "schema": {"type": "array",
                        "items": {"type": "string", "pattern": "^[^=]+=.*$"}}},
            {"name": "created_after", "in": "query",
             "description": "RFC 3339 time with a zone; only tasks created at or after it.",
             "schema": {"anyOf": [{"type": "string", "format": "date-time"}, empty]}},
            {"name": "created_before", "in": "query",
             "description": "RFC 3339 time with a zone; only tasks created before it.",
             "schema": {"anyOf": [{"type": "string", "format": "date-time"}, empty]}},
            {"name": "limit", "in": "query",
             "schema": {"type": "integer", "minimum": 1, "maximum": api.LIST_LIMIT_MAX,
                        "default": api.LIST_LIMIT_DEFAULT}},
            {"name": "cursor", "in": "query",
             "description": "`next_cursor` of the previous page.",
             "schema": {"type": "string"}},
        ],
        responses={"200": _json(_ref("TaskList"), "A page of tasks."),
                   "400": _problem("BadRequest"),
                   "403": _problem("Forbidden")},
    )
    get_task = _op(
        "getTask", "A task's state", tags=("tasks",),
        parameters=[_ID_PARAM, {
            "name": "include", "in": "query",
            "description": "Comma-separated extras: `confessions`.",
            "schema": {"type": "string"}}],
        responses={"200": _json(task_view, "The task. A viewer token sees env values "
                                "as `<redacted>`."),
                   "404": _problem("NotFound")},
    )
    cancel = _op(
        "cancelTask", "Cancel a task", tags=("tasks",), roles="submitter",
        parameters=[_ID_PARAM],
        body={"required": False, "content": {"application/json": {
            "schema": _ref("CancelBody")}}},
        responses={
            "202": _json(_ref("CancelResponse"), "Cancellation requested; the task ends "
                         "`cancelled` once its executor has stopped it.",
                         links=_links("/id", "getTask")),
            "200": _json(_ref("CancelResponse"), "The task was already cancelled.",
                         links=_links("/id", "getTask")),
            "400": _problem("BadRequest"),
            "403": _problem("Forbidden"),
            "404": _problem("NotFound"),
            "409": _json(_ERROR, "The task has already finished (`finished`)."),
            "413": _json(_ERROR, "The body is too large (`body_too_large`)."),
            "422": _json(_ERROR, "The body is not a valid CancelBody (`invalid_field`)."),
        },
    )
    sequence = {"type": "string", "pattern": POSITION_PATTERN}
    events = _op(
        "taskEvents", "Follow a task's events (Server-Sent Events)", tags=("tasks",),
        description="Unknown query parameters, and an empty or out-of-range event id, are "
                    "refused (400).",
        parameters=[
            _ID_PARAM,
            {"name": "Last-Event-ID", "in": "header",
             "description": "Resume after this event (its `id`: `<events sequence>."
                            "<output sequence>`, in decimal digits).",
             "schema": sequence},
            {"name": "last_event_id", "in": "query",
             "description": "The same as the header, for clients that cannot set it (the "
                            "header wins when both are given).",
             "schema": sequence},
        ],
        responses={
            "200": {"description": "One SSE event per task event, oldest first; comment "
                                   "lines keep an idle stream open. The stream ends after "
                                   "the final `finished` event.",
                    "content": {"text/event-stream": {"schema": _sse_event()}}},
            "400": _problem("BadRequest"),
            "404": _problem("NotFound"),
        },
    )
    logs = _op(
        "taskLogs", "A task's output", tags=("tasks",),
        parameters=[
            _ID_PARAM,
            {"name": "follow", "in": "query",
             "description": "`1` (or `true`): keep the response open and stream new lines "
                            "until the task finishes.",
             "schema": {"type": "string", "enum": ["0", "1", "false", "true"]}},
            {"name": "stream", "in": "query", "description": "Only this stream's lines.",
             "schema": {"type": "string", "enum": ["stdout", "stderr"]}},
        ],
        responses={"200": _text("text/plain", "The output lines, one per line."),
                   "400": _problem("BadRequest"),
                   "404": _problem("NotFound")},
    )
    return {
        "/v1/tasks": {"get": list_tasks, "post": submit},
        "/v1/tasks/{id}": {"get": get_task},
        "/v1/tasks/{id}/cancel": {"post": cancel},
        "/v1/tasks/{id}/events": {"get": events},
        "/v1/tasks/{id}/logs": {"get": logs},
    }


def _incident_paths() -> Json:
    incident = _ref("IncidentAnswer")
    listing = _op(
        "listIncidents", "Incidents, most recently seen first", tags=("incidents",),
        parameters=[
            {"name": "status", "in": "query",
             "schema": {"type": "string", "enum": list(INCIDENT_STATUSES)}},
            {"name": "severity", "in": "query",
             "schema": {"type": "string", "enum": list(SEVERITIES)}},
            {"name": "tenant", "in": "query", "description": "Only incidents that touched "
             "this tenant (a tenant's token may name only its own: 403).",
             "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}},
        ],
        responses={"200": _json(_ref("IncidentList"), "The incidents this token may see."),
                   "400": _problem("BadRequest")},
    )
    one = _op("getIncident", "One incident", tags=("incidents",), parameters=[_ID_PARAM],
              responses={"200": _json(incident, "The incident."),
                         "404": _problem("NotFound")})

    def action(verb: str, target: str, conflict: bool) -> Json:
        responses = {
            "200": _json(incident, f"The incident, now {target}."),
            "202": _json(incident, "Recorded, but the auditor has not applied it yet "
                         "(see `note`)."),
            "403": _problem("Forbidden"),
            "404": _problem("NotFound"),
        }
        if conflict:
            responses["409"] = _json(_ERROR, "A resolved incident cannot be acknowledged "
                                     "(`conflict`).")
        return _op(f"{verb}Incident", f"Mark an incident {target}", tags=("incidents",),
                   roles="operator", parameters=[_ID_PARAM], responses=responses)

    return {
        "/v1/incidents": {"get": listing},
        "/v1/incidents/{id}": {"get": one},
        "/v1/incidents/{id}/ack": {"post": action("ack", "acknowledged", True)},
        "/v1/incidents/{id}/resolve": {"post": action("resolve", "resolved", False)},
    }


def _executor_paths() -> Json:
    listing = _op(
        "listExecutors", "Live executors: pool, labels, slots, what runs", tags=("executors",),
        description="Each executor refreshes its entry every few seconds; one not seen for "
                    "15 s is gone. `tenants` shows only the caller's own tenant.",
        responses={"200": _json(_ref("ExecutorList"), "Live executors by pool, then node.")},
    )
    return {"/v1/executors": {"get": listing}}


_NAME_PARAM: Json = {
    "name": "name", "in": "path", "required": True,
    "schema": {"type": "string", "pattern": ID_PATTERN},
}


def _environment_paths() -> Json:
    env = _ref("Environment")
    links = {f"{op[0].upper()}{op[1:]}": {
        "operationId": op, "parameters": {"name": "$response.body#/name"}}
        for op in ("getEnvironment", "environmentHistory")}
    too_large = _json(_ERROR, "The body is too large (`body_too_large`).")
    listing = _op(
        "listEnvironments", "The tenant's persistent environments, by name",
        tags=("environments",),
        responses={"200": _json(_ref("EnvironmentList"), "The environments.")})
    one = _op("getEnvironment", "One environment: its settings, revision, current "
              "snapshot and the task that holds it", tags=("environments",),
              parameters=[_NAME_PARAM],
              responses={"200": _json(env, "The environment."), "404": _problem("NotFound")})
    put = _op(
        "putEnvironment", "Create an environment, or change its settings",
        tags=("environments",), roles="submitter", parameters=[_NAME_PARAM],
        description="Its workspace (revision, snapshots) is kept when its settings change.",
        body={"required": True, "content": {"application/json": {
            "schema": _ref("EnvironmentSpec")}}},
        responses={
            "201": _json(env, "Created.", {"Location": {
                "description": "The environment's URL.", "schema": {"type": "string"}}},
                links),
            "200": _json(env, "Its settings changed.", links=links),
            "400": _problem("BadRequest"), "403": _problem("Forbidden"), "413": too_large,
            "422": _json(_ERROR, "The body is invalid (`invalid_field`; `error.field` is "
                         "its JSON path), or names a secret the tenant does not have "
                         "(`$.secrets.ENV_NAME`)."),
        })
    history = _op(
        "environmentHistory", "The snapshots an environment keeps, newest first",
        tags=("environments",), parameters=[_NAME_PARAM],
        responses={"200": _json(_ref("EnvironmentHistory"), "Its history."),
                   "404": _problem("NotFound")})
    restore = _op(
        "restoreEnvironment", "Make a kept revision's snapshot current again",
        tags=("environments",), roles="submitter", parameters=[_NAME_PARAM],
        description="As a new revision: the history keeps what it replaced.",
        body={"required": True, "content": {"application/json": {
            "schema": _ref("RestoreBody")}}},
        responses={
            "200": _json(env, "Restored: the environment at its new revision."),
            "400": _problem("BadRequest"), "403": _problem("Forbidden"),
            "404": _problem("NotFound"), "413": too_large,
            "409": _json(_ERROR, "A task holds the environment (`held`), or its history "
                         "does not keep that revision (`not_kept`, `$.revision`)."),
            "422": _json(_ERROR, "The body is invalid (`invalid_field`)."),
        })
    delete = _op(
        "deleteEnvironment", "Delete an environment and its snapshots",
        tags=("environments",), roles="operator", parameters=[_NAME_PARAM],
        responses={"204": {"description": "Deleted, with its snapshots."},
                   "403": _problem("Forbidden"), "404": _problem("NotFound"),
                   "409": _json(_ERROR, "A task holds the environment (`held`).")})
    return {
        "/v1/environments": {"get": listing},
        "/v1/environments/{name}": {"get": one, "put": put, "delete": delete},
        "/v1/environments/{name}/history": {"get": history},
        "/v1/environments/{name}/restore": {"post": restore},
    }


def _secret_paths() -> Json:
    name_param: Json = {
        "name": "name", "in": "path", "required": True,
        "description": "The secret's name, as tasks name it in `secrets`.",
        "schema": {"type": "string", "pattern": ID_PATTERN},
    }
    unavailable = _json(_ERROR, "NATS is unreachable (`unavailable`, with Retry-After), or "
                        "(PUT) this gateway has no key to seal secrets with "
                        "(`secrets_not_configured`: set VIGIL_SECRETS_KEY_FILE).",
                        {"Retry-After": _RETRY_AFTER})
    about = ("Secrets belong to the token's tenant; a platform token manages none (403). "
             "No answer ever holds a value.")
    listing = _op(
        "listSecrets", "The tenant's secrets (names and metadata, never values)",
        tags=("secrets",), roles="operator", description=about,
        responses={"200": _json(_ref("SecretList"), "The tenant's secrets, by name.")},
    )
    one = _op(
        "getSecret", "One secret's metadata (never its value)", tags=("secrets",),
        roles="operator", description=about, parameters=[name_param],
        responses={"200": _json(_ref("SecretInfo"), "The secret's metadata."),
                   "404": _problem("NotFound")},
    )
    links = _links("/name", "getSecret", "deleteSecret")
    links = {k: {**v, "parameters": {"name": "$response.body#/name"}} for k, v in links.items()}
    put = _op(
        "putSecret", "Set a secret (create or replace)", tags=("secrets",), roles="operator",
        description=about + " The value is sealed (AES-256-GCM under the operator's key) "
        "before it is stored; executors hand it to the agents of tasks that name it.",
        parameters=[name_param],
        body={"required": True, "content": {"application/json": {
            "schema": _ref("SecretBody")}}},
        responses={
            "201": _json(_ref("SecretInfo"), "Created.", links=links),
            "200": _json(_ref("SecretInfo"), "Replaced.", links=links),
            "409": _json(_ERROR, "Concurrent writes kept changing it (`conflict`); retry."),
            "413": _json(_ERROR, "The body is too large (`body_too_large`)."),
            "422": _json(_ERROR, "The body is not a valid SecretBody (`invalid_field`)."),
            "503": unavailable,
        },
    )
    remove = _op(
        "deleteSecret", "Remove a secret", tags=("secrets",), roles="operator",
        description=about + " A task naming it afterwards fails at its start.",
        parameters=[name_param],
        responses={"204": {"description": "Removed."}, "404": _problem("NotFound")},
    )
    return {"/v1/secrets": {"get": listing},
            "/v1/secrets/{name}": {"get": one, "put": put, "delete": remove}}


def _ops_paths() -> Json:
    health = _ref("Health")
    return {
        "/healthz": {"get": _op(
            "health", "Readiness", public=True, tags=("ops",),
            responses={"200": _json(health, "Ready."),
                       "503": _json(health, "Not ready (NATS unreachable or starting).")})},
        "/metrics": {"get": _op(
            "metrics", "Prometheus metrics", public=True, tags=("ops",),
            responses={"200": _text("text/plain", "Prometheus text exposition format.")})},
        "/openapi.json": {"get": _op(
            "openapi", "This document", public=True, tags=("ops",),
            responses={"200": {"description": "OpenAPI 3.1.",
                               "content": {"application/json": {"schema": {
                                   "type": "object"}}}}})},
    }


@functools.cache
def _document() -> Json:
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "Vigil gateway",
            "version": VERSION,
            "description": "Run long-lived AI agents: submit tasks, follow them, cancel "
                           "them, and see the incidents their confessions raised. Errors "
                           "are always `{\"error\": {\"code\", \"message\", \"field\"}}`. "
                           "A query parameter a route does not declare is refused (400).",
        },
        "tags": [{"name": "tasks"}, {"name": "environments"}, {"name": "incidents"},
                 {"name": "executors"}, {"name": "secrets"}, {"name": "ops"}],
        "security": [{"bearer": []}],
        "paths": {**_ops_paths(), **_task_paths(), **_environment_paths(),
                  **_incident_paths(), **_executor_paths(), **_secret_paths()},
        "components": {
            "schemas": _schemas(),
            "responses": _RESPONSES,
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "A token from `vigil token create`, mapped to a tenant and "
                               "a role (viewer, submitter, operator)."}},
        },
    }


def document() -> dict[str, Any]:
    """The API description (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())


@functools.cache
def query_parameters() -> dict[tuple[str, str], frozenset[str]]:
    """(method, path template) -> the query parameters the document declares for it:
    what the gateway takes, so that an unknown one is refused, not silently ignored."""
    return {(method.upper(), path): frozenset(p["name"] for p in op.get("parameters", [])
                                              if p["in"] == "query")
            for path, ops in _document()["paths"].items() for method, op in ops.items()}
