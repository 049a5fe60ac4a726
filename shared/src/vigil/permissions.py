"""Least-privilege NATS users, as data: what each service may publish and subscribe to.

The embedded stack (``vigil up``) and the test suite run nats-server with exactly these
users, so a service that reaches beyond its role fails in tests, not in production (the
tests fail on any ``Permissions Violation`` in the server's log). Production deployments
render the same table into their server config (``vigil nats-config``).

Besides the services there are two kinds of people's users: ``operator`` (``vigil
replay``: every tenant, by design) and one user per tenant (:func:`tenant_permissions`,
made by ``vigil nats-user add --tenant T``): it may submit and cancel as its tenant, read
its tenant's task states (``vigil-tasks`` keys are ``<tenant>.<id>``) and follow its
tenant's events, nothing else. Each has its own reply-inbox prefix, so nobody reads
another's replies.

``vigil-secrets`` (sealed values, see :mod:`vigil.secrets`) is the gateway's to write and
the executors' to read; no tenant's user can read it at all, and the operator's (which
reads every stream by design) sees only ciphertext: ``vigil secret rotate`` re-seals it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from vigil import subjects, topology
from vigil.natsserver import User
from vigil.natsusers import TenantUser

INBOX = "_INBOX.>"


def _owned_streams() -> list[str]:
    names = [s.name for s in topology.STREAMS]
    names += [f"KV_{b.name}" for b in topology.BUCKETS]
    names += [f"OBJ_{o.name}" for o in topology.OBJECT_STORES]
    return names


def _topology() -> list[str]:
    """Enough to run ensure_topology(): create/update/inspect Vigil's own streams only."""
    allow = ["$JS.API.INFO"]
    for name in _owned_streams():
        allow += [
            f"$JS.API.STREAM.CREATE.{name}",
            f"$JS.API.STREAM.UPDATE.{name}",
            f"$JS.API.STREAM.INFO.{name}",
        ]
    return allow


def _read(stream: str) -> list[str]:
    return [
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
    ]


def _kv(bucket: str, write: bool) -> list[str]:
    allow = _read(f"KV_{bucket}")
    if write:
        allow.append(f"$KV.{bucket}.>")
    return allow


def _pull(stream: str, durable: str) -> list[str]:
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
        f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    ]


def _ordered(stream: str) -> list[str]:
    """Ephemeral ordered push consumers (SSE streams, timelines)."""
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _objects(bucket: str, *, write: bool) -> list[str]:
    """An object store, read (metadata, and chunks through ordered consumers on its named
    stream: see vigil_executor.checkpoint.CheckpointStore.load) and maybe written (chunks,
    metadata, and the purge of an object's chunks that a put or delete ends with)."""
    stream = f"OBJ_{bucket}"
    allow = [*_read(stream), *_ordered(stream)]
    if write:
        allow += [f"$O.{bucket}.>", f"$JS.API.STREAM.PURGE.{stream}"]
    return allow


def tenant_permissions(tenant: str) -> tuple[list[str], list[str]]:
    """(publish allow, subscribe allow) of tenant ``tenant``'s raw NATS user.

    Reads are a direct get by subject (``$JS.API.DIRECT.GET.<stream>.<subject>``), the one
    form a subject permission can scope to the tenant's keys; no stream info, no consumers
    (a consumer's filter is not in its create subject for ordered consumers), so nothing
    of other tenants — not even how many tasks there are — can be read.
    """
    return (
        [
            subjects.submit(tenant),
            subjects.cancel_request(tenant),
            f"$JS.API.DIRECT.GET.KV_{subjects.KV_TASKS}.{subjects.task_kv_subject(tenant)}",
        ],
        [f"{subjects.tenant_inbox(tenant)}.>", f"{subjects.EVENTS}.{tenant}.>"],
    )


def service_permissions(pool: str | None = None) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (publish allow, subscribe allow). The executor user may pull work of every
    pool, or of ``pool`` only (a pool is a placement, not a security boundary; a separate
    executor user per pool is for operators who want one)."""
    common = _topology()
    return {
        "scheduler": (
            [
                *common,
                *_pull(subjects.STREAM_SUBMIT, subjects.CONSUMER_SCHEDULER),
                *_pull(subjects.STREAM_ADVISORIES, subjects.CONSUMER_DEAD_LETTERS),
                *_pull(subjects.STREAM_CONTROL, subjects.CONSUMER_CONTROL),
                *_pull(subjects.STREAM_TIMERS, subjects.CONSUMER_TIMERS),
                f"{subjects.TIMERS}.>",
                f"{subjects.QUEUE}.>",
                f"$JS.API.STREAM.MSG.GET.{subjects.STREAM_QUEUE}",
                f"$JS.API.STREAM.MSG.DELETE.{subjects.STREAM_QUEUE}",
                f"$JS.API.CONSUMER.INFO.{subjects.STREAM_WORK}.>",  # pool capacity
                *_ordered(f"KV_{subjects.KV_EXECUTORS}"),
                *_kv(subjects.KV_EXECUTORS, write=False),
                *_kv(subjects.KV_LEASES, write=True),
                *_kv(subjects.KV_ENVIRONMENTS, write=False),  # a task's environment defaults
                *_read(subjects.STREAM_SUBMIT),  # a redriven task's original spec
                f"{subjects.CANCEL}.*.*",
                f"$JS.API.STREAM.MSG.GET.{subjects.STREAM_WORK}",
                f"$JS.API.STREAM.MSG.DELETE.{subjects.STREAM_WORK}",
                *_kv(subjects.KV_TASKS, write=True),
                f"{subjects.WORK}.>",
                f"{subjects.EVENTS}.>",
                *_ordered(subjects.STREAM_OUTPUT),  # a dead task's last log lines
                f"{subjects.ISSUES}.scheduler.>",
            ],
            [f"{subjects.inbox('scheduler')}.>", subjects.events_of_kind("finished"),
             subjects.events_of_kind("retrying")],  # wake the dispatcher when slots free up
        ),
        "executor": (
            [
                *common,
                *_pull(subjects.STREAM_WORK,
                       "*" if pool is None else subjects.consumer_executor(pool)),
                *_kv(subjects.KV_TASKS, write=True),
                *_kv(subjects.KV_EXECUTORS, write=True),
                *_kv(subjects.KV_SECRETS, write=False),  # resolved at an attempt's start
                f"$O.{subjects.OBJ_CHECKPOINTS}.>",
                *_read(f"OBJ_{subjects.OBJ_CHECKPOINTS}"),
                f"$JS.API.STREAM.PURGE.OBJ_{subjects.OBJ_CHECKPOINTS}",
                *_ordered(f"OBJ_{subjects.OBJ_CHECKPOINTS}"),
                # Environments: the hold (wait policy) and the commit are compare-and-set
                # writes; snapshots are restored and committed; pushed images only read.
                *_kv(subjects.KV_ENVIRONMENTS, write=True),
                *_objects(subjects.OBJ_ENVIRONMENTS, write=True),
                *_objects(subjects.OBJ_IMAGES, write=False),
                f"{subjects.EVENTS}.>",
                *_ordered(subjects.STREAM_OUTPUT),  # a dead task's last log lines
                f"{subjects.ISSUES}.executor.>",
                f"{subjects.ISSUES}.agent.>",
            ],
            [f"{subjects.inbox('executor')}.>", f"{subjects.CANCEL}.*.*"],
        ),
        "auditor": (
            [
                *common,
                *_pull(subjects.STREAM_ISSUES, subjects.CONSUMER_AUDITOR),
                *_pull(subjects.STREAM_ALERTS, subjects.CONSUMER_NOTIFIER),
                *_kv(subjects.KV_CONFESSIONS, write=True),
                *_kv(subjects.KV_INCIDENTS, write=True),
                *_ordered(f"KV_{subjects.KV_INCIDENTS}"),  # counting open ones at start
                *_kv(subjects.KV_DELIVERIES, write=True),
                *_kv(subjects.KV_TASKS, write=False),
                f"{subjects.ALERTS}.>",
                f"{subjects.ISSUES}.auditor.>",
            ],
            [f"{subjects.inbox('auditor')}.>"],
        ),
        "gateway": (
            [
                *common,
                *_kv(subjects.KV_TASKS, write=False),
                *_ordered(f"KV_{subjects.KV_TASKS}"),  # the task index for lists
                *_kv(subjects.KV_EXECUTORS, write=False),
                *_ordered(f"KV_{subjects.KV_EXECUTORS}"),  # GET /v1/executors
                *_kv(subjects.KV_CONFESSIONS, write=False),
                *_kv(subjects.KV_INCIDENTS, write=False),
                *_ordered(f"KV_{subjects.KV_INCIDENTS}"),  # listing keys is a watch
                *_kv(subjects.KV_DELIVERIES, write=False),
                *_kv(subjects.KV_SECRETS, write=True),  # /v1/secrets (sealed values only)
                *_ordered(subjects.STREAM_EVENTS),  # SSE, confessions
                *_ordered(subjects.STREAM_OUTPUT),  # SSE, logs
                *_read(subjects.STREAM_OUTPUT),  # where a finished task's output ends
                # /v1/environments: create, change, restore, delete (and a deleted one's
                # snapshots: their metadata and chunks, never another object store's).
                *_kv(subjects.KV_ENVIRONMENTS, write=True),
                *_read(f"OBJ_{subjects.OBJ_ENVIRONMENTS}"),
                f"$O.{subjects.OBJ_ENVIRONMENTS}.M.>",
                f"$JS.API.STREAM.PURGE.OBJ_{subjects.OBJ_ENVIRONMENTS}",
                subjects.submit_via_gateway("*"),  # only it may: see vigil.ids
                f"{subjects.CONTROL}.cancel.>",
                f"{subjects.ISSUES}.operator.>",  # incident ack/resolve are confessions
            ],
            [f"{subjects.inbox('gateway')}.>", subjects.events_of_kind("accepted"),
             subjects.events_of_kind("finished")],
        ),
        # `vigil replay`: an operator's tool reads every stream, re-publishes ranges, sends
        # redrives and builds scratch buckets; `vigil image push` writes the image store.
        # Broad by nature, but no $SYS and no impersonation of services' inboxes.
        "operator": (
            ["$JS.API.>", "$JS.FC.>", "$JS.ACK.>", "$KV.>", "vigil.>",
             f"$O.{subjects.OBJ_IMAGES}.>"],
            [f"{subjects.inbox('operator')}.>"],
        ),
    }


SERVICES = ("scheduler", "executor", "auditor", "gateway", "operator")


def random_passwords() -> dict[str, str]:
    """A fresh password for ``admin`` and each of :data:`SERVICES` (a throwaway server:
    benchmarks; ``vigil up`` keeps its own in ``secrets.json``)."""
    import secrets

    return {name: secrets.token_urlsafe(24) for name in ("admin", *SERVICES)}


def shipped_users(passwords: Mapping[str, str], tenants: Iterable[TenantUser] = (), *,
                  pool: str | None = None, admin: bool = True) -> list[User]:
    """Every NATS user as Vigil ships them: ``admin`` (unrestricted: for the people who run
    NATS itself, used by no service), one per service and ``operator`` (``passwords`` has
    one per name), and one per tenant user. ``vigil up``, ``vigil nats-config`` and the
    test suite all build their servers from this."""
    users = [User("admin", passwords["admin"])] if admin else []
    for name, (pub, sub) in service_permissions(pool).items():
        users.append(User(name, passwords[name], publish=pub, subscribe=sub))
    for t in tenants:
        pub, sub = tenant_permissions(t.tenant)
        users.append(User(t.name, t.password, publish=pub, subscribe=sub))
    return users
