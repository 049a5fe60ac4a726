"""Every subject, stream, bucket and consumer name Vigil uses, in one place.

These names are public contracts (see DESIGN.md): raw NATS clients publish to them and
operators filter on them. Services never spell a subject literally; they call these.
"""

from __future__ import annotations

# Subject prefixes -------------------------------------------------------------------------
SUBMIT = "vigil.submit"  # vigil.submit.<tenant>            task specs from users
WORK = "vigil.work"  # vigil.work.<pool>                  work items for executors
EVENTS = "vigil.events"  # vigil.events.<tenant>.<task_id>.<kind>  a task's timeline
ISSUES = "vigil.issues"  # vigil.issues.<source>.<severity>   confessions
ALERTS = "vigil.alerts"  # vigil.alerts.<severity>            escalations (auditor)
CONTROL = "vigil.control"  # vigil.control.<verb>.<tenant>   cancel / redrive requests
CANCEL = "vigil.cancel"  # vigil.cancel.<tenant>.<task_id>  core NATS: "stop it now" to executors
QUEUE = "vigil.queue"  # vigil.queue.<pool>.<tenant>.<priority>  admitted, not yet dispatched
TIMERS = "vigil.timer"  # vigil.timer.<kind>.<tenant>.<task_id>   not_before, queue timeouts

# Streams, buckets, object stores ------------------------------------------------------------
STREAM_SUBMIT = "VIGIL_SUBMIT"
STREAM_WORK = "VIGIL_WORK"
STREAM_EVENTS = "VIGIL_EVENTS"  # a task's lifecycle events (every kind but OUTPUT_KINDS)
STREAM_OUTPUT = "VIGIL_OUTPUT"  # its output events (OUTPUT_KINDS), bounded in bytes
STREAM_ISSUES = "VIGIL_ISSUES"
STREAM_ADVISORIES = "VIGIL_ADVISORIES"
STREAM_ALERTS = "VIGIL_ALERTS"
STREAM_CONTROL = "VIGIL_CONTROL"
STREAM_QUEUE = "VIGIL_QUEUE"
STREAM_TIMERS = "VIGIL_TIMERS"
KV_REPLAYS = "vigil-replays"
KV_EXECUTORS = "vigil-executors"
KV_LEASES = "vigil-leases"
KV_INCIDENTS = "vigil-incidents"
KV_DELIVERIES = "vigil-deliveries"
KV_TASKS = "vigil-tasks"
KV_CONFESSIONS = "vigil-confessions"
OBJ_CHECKPOINTS = "vigil-checkpoints"
KV_SECRETS = "vigil-secrets"  # <tenant>.<name>: a tenant's secret, encrypted (vigil.secrets)
KV_ENVIRONMENTS = "vigil-environments"  # <tenant>.<name>: a persistent environment
OBJ_ENVIRONMENTS = "vigil-env-snapshots"  # environments' workspace snapshots
OBJ_IMAGES = "vigil-images"  # image archives pushed by operators (vigil image push)

# Event kinds, by the stream that stores them. Both streams hold ``vigil.events.>`` subjects
# (which kind goes where is not visible to publishers or live subscribers). The lifecycle
# kinds are what a task's state is rebuilt from and what its timeline is made of: nothing
# but age removes them. The output kinds are bulk: VIGIL_OUTPUT drops its oldest when full.
# A new kind must be added to one of these, or its publishes find no stream.
OUTPUT_KINDS: tuple[str, ...] = ("log", "progress", "egress")
LIFECYCLE_KINDS: tuple[str, ...] = (
    "accepted", "scheduled", "started", "checkpoint", "confession", "retrying", "cancelling",
    "rejected", "environment", "finished",
)


def events_stream(kind: str) -> str:
    """The stream that stores events of ``kind``."""
    return STREAM_OUTPUT if kind in OUTPUT_KINDS else STREAM_EVENTS


# Durable consumers ----------------------------------------------------------------------------
CONSUMER_SCHEDULER = "scheduler"
CONSUMER_AUDITOR = "auditor"
CONSUMER_DEAD_LETTERS = "scheduler-max-deliveries"
CONSUMER_NOTIFIER = "auditor-notifier"
CONSUMER_CONTROL = "scheduler-control"
CONSUMER_TIMERS = "scheduler-timers"

# The server's advisory when a work message reached the consumer's max deliveries.
MAX_DELIVERIES_ADVISORY = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STREAM_WORK}"


def consumer_executor(pool: str) -> str:
    """The durable work-queue consumer shared by every executor of ``pool``."""
    return f"executor-{pool}"


def inbox(service: str) -> str:
    """The reply-subject prefix of ``service`` (its NATS user may subscribe only there)."""
    return f"_INBOX_{service}"


def tenant_inbox(tenant: str) -> str:
    """The reply-subject prefix a tenant's raw NATS user must connect with
    (``inbox_prefix``): it may subscribe only there, so no tenant reads another's replies."""
    return f"_INBOX_T.{tenant}"


def task_key(tenant: str, task_id: str) -> str:
    """The task's key in ``vigil-tasks``: ids are per tenant, and the key's first token
    lets subject-scoped permissions give a tenant's NATS user its own tasks only."""
    return f"{tenant}.{task_id}"


def task_kv_subject(tenant: str, task_id: str = ">") -> str:
    """The subject a task's key is stored under (``>``: all of a tenant's tasks)."""
    return f"$KV.{KV_TASKS}.{tenant}.{task_id}"


def environment_key(tenant: str, name: str) -> str:
    """An environment's key in ``vigil-environments``: names are per tenant, as task ids."""
    return f"{tenant}.{name}"


def environment_kv_subject(tenant: str, name: str = "*") -> str:
    """The subject an environment's key is stored under (``*``: all of a tenant's)."""
    return f"$KV.{KV_ENVIRONMENTS}.{tenant}.{name}"


def object_metas(bucket: str) -> str:
    """The subjects of an object store's metadata records (one per object name)."""
    return f"$O.{bucket}.M.>"


# Header names -----------------------------------------------------------------------------
MSG_ID = "Nats-Msg-Id"


def submit(tenant: str) -> str:
    return f"{SUBMIT}.{tenant}"


GATEWAY_ORIGIN = "gateway"


def submit_via_gateway(tenant: str) -> str:
    """Where the gateway publishes a tenant's submissions. Only the gateway's NATS user may
    publish here, so the scheduler knows these ids were made by the platform (see
    :mod:`vigil.ids`); a tenant's own NATS user publishes on :func:`submit`."""
    return f"{SUBMIT}.{tenant}.{GATEWAY_ORIGIN}"


def cancel_request(tenant: str) -> str:
    """Where a :class:`~vigil.messages.CancelRequest` for a task of ``tenant`` goes."""
    return f"{CONTROL}.cancel.{tenant}"


def redrive_request(tenant: str) -> str:
    """Where a :class:`~vigil.messages.RedriveRequest` for a task of ``tenant`` goes."""
    return f"{CONTROL}.redrive.{tenant}"


def cancel_notice(tenant: str, task_id: str) -> str:
    """Core NATS nudge to the executor running the task (the KV state is the truth)."""
    return f"{CANCEL}.{tenant}.{task_id}"


def queue(pool: str, tenant: str, priority: int) -> str:
    return f"{QUEUE}.{pool}.{tenant}.{priority}"


def timer(kind: str, tenant: str, task_id: str) -> str:
    return f"{TIMERS}.{kind}.{tenant}.{task_id}"


def work(pool: str) -> str:
    return f"{WORK}.{pool}"


def event(tenant: str, task_id: str, kind: str) -> str:
    return f"{EVENTS}.{tenant}.{task_id}.{kind}"


def task_events(tenant: str, task_id: str) -> str:
    """Filter matching every event of one task."""
    return f"{EVENTS}.{tenant}.{task_id}.>"


def events_of_kind(kind: str) -> str:
    """Filter matching one kind of event of every task of every tenant."""
    return f"{EVENTS}.*.*.{kind}"


def event_parts(subject: str) -> tuple[str, str, str] | None:
    """(tenant, task id, kind) of an event subject, or None if it is not one."""
    parts = subject.split(".")
    if len(parts) != 5 or f"{parts[0]}.{parts[1]}" != EVENTS:
        return None
    return parts[2], parts[3], parts[4]


def issue(source: str, severity: str) -> str:
    return f"{ISSUES}.{source}.{severity}"


def alert(severity: str) -> str:
    return f"{ALERTS}.{severity}"


def token(subject: str, index: int) -> str | None:
    """The ``index``-th dot-separated token of ``subject``, or None if it has fewer."""
    parts = subject.split(".")
    return parts[index] if 0 <= index < len(parts) else None
