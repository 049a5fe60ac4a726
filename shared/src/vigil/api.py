"""The gateway's HTTP response bodies, as msgspec types.

The gateway encodes its answers with these, the SDK decodes them, and ``/openapi.json``
is generated from them: one definition, so the document cannot drift from the server.
Request bodies are :class:`vigil.messages.TaskSpecStrict` (submit) and
:class:`CancelBody`; a task's full state is :class:`vigil.messages.TaskState`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta

from vigil.environments import Environment, Snapshot
from vigil.messages import ExecutorInfo, Status, TaskState

LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 500
LAST_EVENT_ID_MAX = 2**63 - 1
"""The largest ``Last-Event-ID`` taken: a stream sequence, and one past it still a
JetStream start sequence (64 bits, unsigned)."""


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    """Stable machine-readable reason, e.g. ``invalid_field``, ``not_found``."""
    message: str
    """What went wrong and what to do next, for a human."""
    field: str | None = None
    """The request field at fault (a JSON path such as ``$.command``, a query parameter
    or a header name), when there is one."""


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    error: ErrorDetail


class TaskLinks(msgspec.Struct, frozen=True, kw_only=True):
    self: str
    events: str
    logs: str
    cancel: str


def task_links(task_id: str) -> TaskLinks:
    base = f"/v1/tasks/{task_id}"
    return TaskLinks(self=base, events=f"{base}/events", logs=f"{base}/logs",
                     cancel=f"{base}/cancel")


class SubmitResponse(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant: str
    status: Status | None
    """The task's status when the answer was made; null if the scheduler has not
    recorded it yet (the submission is durable all the same)."""
    links: TaskLinks
    note: str | None = None


class TaskSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One row of ``GET /v1/tasks``: the state without spec, history and output tail."""

    id: str
    tenant: str
    status: Status
    attempt: int = 0
    executor: str | None = None
    exit_code: int | None = None
    error: str | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    pool: str = "default"
    image: str | None = None
    labels: dict[str, str] = {}
    cancel_requested_at: datetime | None = None

    @classmethod
    def of(cls, state: TaskState) -> TaskSummary:
        spec = state.spec
        return cls(**{name: getattr(state, name) for name in _SUMMARY_FROM_STATE},
                   pool=spec.pool if spec else "default",
                   image=spec.image if spec else None,
                   labels=dict(spec.labels) if spec else {})


# The fields are listed above, not derived, because they are the documented shape of
# ``GET /v1/tasks`` (their order is the JSON's). Those TaskState has too are copied from it
# as they are; the rest come from its spec.
_SUMMARY_FROM_STATE = tuple(
    name for name in TaskSummary.__struct_fields__ if name in TaskState.__struct_fields__)


class TaskList(msgspec.Struct, frozen=True, kw_only=True):
    tasks: list[TaskSummary]
    """Newest first (by creation time, then id)."""
    next_cursor: str | None = None
    """Pass as ``cursor`` for the next page; null on the last page."""


class CancelBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Optional body of ``POST /v1/tasks/{id}/cancel``."""

    reason: Annotated[str, Meta(max_length=500)] | None = None


class CancelResponse(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: Status
    """``cancelled`` once done; else the task's status while its executor stops it."""
    cancel_requested_at: datetime | None = None
    links: TaskLinks
    note: str | None = None


class ExecutorView(msgspec.Struct, frozen=True, kw_only=True):
    """One live executor, as ``GET /v1/executors`` shows it."""

    node: str
    pool: str
    labels: dict[str, str] = {}
    slots: int
    running: int
    free: int
    draining: bool = False
    runtime: str
    version: str = ""
    started_at: datetime
    seen_at: datetime
    tenants: dict[str, int] = {}
    """Running tasks by tenant; a tenant's token sees only its own tenant's count, a
    platform token every tenant's."""
    enforcement: dict[str, str] = {}
    """How the node enforces each of a task's ``resources``: ``cgroup`` (the kernel),
    ``watchdog`` (the executor measures the agent and stops it past a limit) or ``none``."""

    @classmethod
    def of(cls, info: ExecutorInfo, tenant: str | None) -> ExecutorView:
        """The view for a token of ``tenant`` (None: a platform token)."""
        if tenant is None:
            mine = dict(info.tenants)
        else:
            mine = {tenant: info.tenants[tenant]} if tenant in info.tenants else {}
        return cls(node=info.node, pool=info.pool, labels=dict(info.labels), slots=info.slots,
                   running=info.running, free=info.free, draining=info.draining,
                   runtime=info.runtime, version=info.version, started_at=info.started_at,
                   seen_at=info.seen_at, tenants=mine, enforcement=dict(info.enforcement))


class ExecutorList(msgspec.Struct, frozen=True, kw_only=True):
    executors: list[ExecutorView]
    """Live executors (an entry not refreshed for 15 s has expired), by pool then node."""


class EnvironmentList(msgspec.Struct, frozen=True, kw_only=True):
    environments: list[Environment]
    """The tenant's environments, by name."""


class EnvironmentHistory(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    revision: int
    """The current revision (0: never committed)."""
    history: list[Snapshot]
    """The snapshots kept, newest (the current one) first."""


class RestoreBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/environments/{name}/restore``."""

    revision: Annotated[int, Meta(ge=1)]
    """A revision the environment's history keeps: its snapshot becomes current again, as
    a new revision (what came between stays in the history)."""


class SecretBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of ``PUT /v1/secrets/{name}``: the value, write-only (no answer ever holds it).
    At most 65,536 bytes of UTF-8, no NUL byte (it reaches a process's environment)."""

    value: Annotated[str, Meta(min_length=1, max_length=65_536,
                               extra_json_schema={"pattern": "^[^\\x00]*$"})]


class SecretInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A secret as the API shows it: its metadata, never its value."""

    name: str
    size: int
    """The value's length in bytes."""
    key_id: str
    """The operator's key that sealed it (``vigil secret rotate`` moves all to the current
    one)."""
    created_at: datetime
    updated_at: datetime
    """When the value was last set."""


class SecretList(msgspec.Struct, frozen=True, kw_only=True):
    secrets: list[SecretInfo]
    """The tenant's secrets, by name."""
