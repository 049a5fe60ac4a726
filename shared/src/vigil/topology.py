"""Streams, consumers, buckets and object stores, declared as data, and ``ensure_topology``.

Every service calls :func:`ensure_topology` at start. It creates what is missing and
updates what differs (e.g. a longer max age), so it is safe to run concurrently and
repeatedly. A change the server cannot apply in place (retention policy, storage type)
raises :class:`~vigil.errors.TopologyError` naming the stream and what to do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError, ServerError

from vigil import subjects
from vigil.errors import TopologyError

log = structlog.get_logger("vigil.topology")

DAY = 86_400.0
STREAM_IN_USE = 10058  # JetStream: "stream name already in use with a different configuration"


@dataclass(frozen=True)
class Stream:
    name: str
    subjects: tuple[str, ...]
    retention: RetentionPolicy
    max_age_s: float = 0.0
    duplicate_window_s: float = 120.0
    max_bytes: int = -1
    max_msgs: int = -1
    discard: DiscardPolicy = DiscardPolicy.OLD
    max_msg_size: int = 1024 * 1024
    description: str = ""

    def config(self, replicas: int) -> StreamConfig:
        return StreamConfig(
            name=self.name,
            description=self.description,
            subjects=list(self.subjects),
            retention=self.retention,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=self.max_age_s,
            duplicate_window=self.duplicate_window_s,
            max_bytes=self.max_bytes,
            max_msgs=self.max_msgs,
            discard=self.discard,
            max_msg_size=self.max_msg_size,
        )


@dataclass(frozen=True)
class Bucket:
    name: str
    history: int = 1
    ttl_s: float = 0.0
    max_value_size: int = 1024 * 1024
    max_bytes: int = -1
    description: str = ""
    # Direct gets ($JS.API.DIRECT.GET.<stream>.<subject>): the read whose subject names the
    # key, so a subject permission can scope it (a tenant's user reads its own tasks).
    # Services still read the leader (vigil.jetstream.TaskStore): a replica answering a
    # direct get may lag a write, and their compare-and-set flows need the newest value.
    direct: bool = False

    def config(self, replicas: int) -> KeyValueConfig:
        return KeyValueConfig(
            bucket=self.name,
            description=self.description,
            history=self.history,
            ttl=self.ttl_s or None,
            max_value_size=self.max_value_size,
            max_bytes=self.max_bytes,
            storage=StorageType.FILE,
            replicas=replicas,
            direct=self.direct,
        )

    @property
    def stream(self) -> str:
        return f"KV_{self.name}"

    def limits(self, replicas: int) -> dict[str, object]:
        """What the bucket's stream must say, as nats-py's ``create_key_value`` maps it
        (the duplicate window is two minutes, or the TTL when that is shorter)."""
        return {
            "description": self.description,
            "max_age": self.ttl_s,
            "max_msgs_per_subject": self.history,
            "max_msg_size": self.max_value_size,
            "max_bytes": self.max_bytes,
            "duplicate_window": min(self.ttl_s, 120.0) if self.ttl_s else 120.0,
            "num_replicas": replicas,
            "allow_direct": self.direct,
        }


@dataclass(frozen=True)
class ObjectStore:
    name: str
    ttl_s: float = 0.0
    max_bytes: int = -1
    description: str = ""

    def config(self, replicas: int) -> ObjectStoreConfig:
        return ObjectStoreConfig(
            bucket=self.name,
            description=self.description,
            ttl=self.ttl_s or None,
            max_bytes=self.max_bytes,
            storage=StorageType.FILE,
            replicas=replicas,
        )

    @property
    def stream(self) -> str:
        return f"OBJ_{self.name}"

    def limits(self, replicas: int) -> dict[str, object]:
        """What the store's stream must say, as nats-py's ``create_object_store`` maps it."""
        return {
            "description": self.description,
            "max_age": self.ttl_s,
            "max_bytes": self.max_bytes,
            "num_replicas": replicas,
        }


# JetStream's duplicate window is stream-wide, not per tenant: within it, tenant B's
# publish with a Nats-Msg-Id that tenant A just used would be dropped, and B's PubAck
# would say "duplicate" — one tenant squatting, and learning of, another's submission. So
# the streams tenants publish to keep the shortest window the server allows (100 ms), and
# idempotency comes from the task id instead: the scheduler never creates a task whose id
# exists in its tenant (ADR 3).
TENANT_DUPLICATE_WINDOW_S = 0.1
# Submissions are kept (limits retention) so they can be replayed.
SUBMIT = Stream(
    name=subjects.STREAM_SUBMIT,
    subjects=(f"{subjects.SUBMIT}.>",),
    retention=RetentionPolicy.LIMITS,
    max_age_s=7 * DAY,
    duplicate_window_s=TENANT_DUPLICATE_WINDOW_S,
    max_msg_size=256 * 1024,  # a task spec; its state (spec + history) must fit the KV
    description="Task submissions, kept 7 days for replay",
)
# Work items leave the stream when an executor acks them. Discard-new: when full, a
# publish fails loudly (the scheduler retries and confesses) instead of dropping work.
WORK = Stream(
    name=subjects.STREAM_WORK,
    subjects=(f"{subjects.WORK}.>",),
    retention=RetentionPolicy.WORK_QUEUE,
    discard=DiscardPolicy.NEW,
    max_msgs=1_000_000,
    duplicate_window_s=600.0,
    description="Work items, one per task attempt, removed when acked",
)
# A task's lifecycle: a few events per attempt (its output is in OUTPUT), so bounded by
# the tasks admitted in its max age. No byte limit, on purpose: discard-old could remove a
# task's finished event, discard-new would refuse it (ADR 16).
EVENTS = Stream(
    name=subjects.STREAM_EVENTS,
    subjects=tuple(subjects.events_of_kind(kind) for kind in subjects.LIFECYCLE_KINDS),
    retention=RetentionPolicy.LIMITS,
    max_age_s=7 * DAY,
    description="Task lifecycles: accepted, started, checkpoint, confession, finished ...",
)
OUTPUT_MAX_BYTES = 10 * 1024**3
"""VIGIL_OUTPUT's default size (``VIGIL_OUTPUT_STREAM_MB`` sets it)."""


def output_stream(max_bytes: int = OUTPUT_MAX_BYTES) -> Stream:
    """Tasks' output (log, progress, egress): bounded in bytes, its oldest dropped when
    full, so that no amount of output can fill the disk; each attempt's own share is
    bounded first by its ``output_mb`` (the executor's)."""
    return Stream(
        name=subjects.STREAM_OUTPUT,
        subjects=tuple(subjects.events_of_kind(kind) for kind in subjects.OUTPUT_KINDS),
        retention=RetentionPolicy.LIMITS,
        max_age_s=7 * DAY,
        max_bytes=max_bytes,
        discard=DiscardPolicy.OLD,
        description="Task output: log, progress, egress (oldest dropped when full)",
    )


OUTPUT = output_stream()
ISSUES = Stream(
    name=subjects.STREAM_ISSUES,
    subjects=(f"{subjects.ISSUES}.>",),
    retention=RetentionPolicy.LIMITS,
    max_age_s=30 * DAY,
    description="Confessions from agents and the platform",
)
# The server's max-deliveries advisories for work messages, captured durably: a core
# subscription would miss one fired while the scheduler restarts, and its task would wait
# forever. The scheduler turns each into a dead task.
ADVISORIES = Stream(
    name=subjects.STREAM_ADVISORIES,
    subjects=(f"{subjects.MAX_DELIVERIES_ADVISORY}.>",),
    retention=RetentionPolicy.WORK_QUEUE,
    max_age_s=30 * DAY,
    description="Work messages that reached their max deliveries",
)
ALERTS = Stream(
    name=subjects.STREAM_ALERTS,
    subjects=(f"{subjects.ALERTS}.>",),
    retention=RetentionPolicy.LIMITS,
    max_age_s=30 * DAY,
    duplicate_window_s=3600.0,  # an alert re-published after a crash is the same alert
    description="Incident alerts from the auditor (also sent to webhooks)",
)
# Cancel and redrive requests (from the gateway, `vigil replay redrive`, raw clients), kept
# like submissions so an operator can see who asked for what.
CONTROL = Stream(
    name=subjects.STREAM_CONTROL,
    subjects=(f"{subjects.CONTROL}.>",),
    retention=RetentionPolicy.LIMITS,
    max_age_s=7 * DAY,
    duplicate_window_s=TENANT_DUPLICATE_WINDOW_S,  # tenants publish here too (see SUBMIT)
    max_msg_size=16 * 1024,
    description="Cancel and redrive requests for the scheduler",
)
# The backlog: admitted tasks waiting for capacity, one subject per pool, tenant and
# priority, so the dispatcher sees per-tenant depths in one stream-info call and takes
# the head of whichever tenant's turn it is. Entries are deleted once dispatched.
# Discard-new: when full, admission says so instead of dropping work.
QUEUE = Stream(
    name=subjects.STREAM_QUEUE,
    subjects=(f"{subjects.QUEUE}.>",),
    retention=RetentionPolicy.LIMITS,
    discard=DiscardPolicy.NEW,
    max_msgs=5_000_000,
    # No age limit: an entry leaves when it is dispatched (or found stale), never by
    # expiring under a task that still waits.
    duplicate_window_s=600.0,
    max_msg_size=256 * 1024 + 4096,
    description="Admitted tasks waiting for executor capacity (fair dispatch)",
)
# Durable timers (not_before, queue timeouts): the scheduler naks each until it is due.
TIMERS = Stream(
    name=subjects.STREAM_TIMERS,
    subjects=(f"{subjects.TIMERS}.>",),
    retention=RetentionPolicy.WORK_QUEUE,
    # No age limit: a timer leaves when it fires (a nak does not reset a message's age,
    # so any limit would silently drop timers set further ahead than it).
    duplicate_window_s=600.0,
    max_msg_size=4096,
    description="Scheduler timers: delayed starts and queue timeouts",
)
# EVENTS before OUTPUT: a deployment from before OUTPUT has EVENTS on vigil.events.>, and
# OUTPUT's subjects can only be taken once EVENTS has let go of them.
STREAMS: tuple[Stream, ...] = (SUBMIT, WORK, EVENTS, OUTPUT, ISSUES, ADVISORIES, ALERTS,
                               CONTROL, QUEUE, TIMERS)

# Deliveries of one work message before the server gives up on it (every lost lease,
# hand-back and over-capacity nak counts). The scheduler then marks the task dead.
MAX_DELIVERIES = 50

TASKS = Bucket(
    name=subjects.KV_TASKS,
    history=1,
    ttl_s=30 * DAY,
    description="Task state by <tenant>.<task id> (compare-and-set on revision)",
    direct=True,
)
CONFESSIONS = Bucket(
    name=subjects.KV_CONFESSIONS,
    history=1,
    ttl_s=30 * DAY,
    description="Confessions recorded by the auditor, by confession id",
)
INCIDENTS = Bucket(
    name=subjects.KV_INCIDENTS,
    history=1,
    ttl_s=90 * DAY,
    description="Incidents triaged from confessions, by incident id",
)
DELIVERIES = Bucket(
    name=subjects.KV_DELIVERIES,
    history=1,
    ttl_s=30 * DAY,
    description="Webhook deliveries of alerts: delivered, or failed after retries",
)
# Progress of operator replays that re-publish (`vigil replay stream --to`): the highest
# source sequence done per replay id, so running a replay again publishes nothing new
# even after the target's duplicate window has passed.
REPLAYS = Bucket(
    name=subjects.KV_REPLAYS,
    history=1,
    ttl_s=90 * DAY,
    description="Operator replays: last source sequence re-published, by replay id",
)
# Executors advertise pool, labels and free slots here; an entry not refreshed within the
# TTL is a node gone. Read by the scheduler (capacity, placement) and GET /v1/executors.
EXECUTORS = Bucket(
    name=subjects.KV_EXECUTORS,
    history=1,
    ttl_s=15.0,
    description="Live executors by node id (heartbeat with TTL)",
)
# Leases for singleton roles (the scheduler's dispatcher): whoever holds the key runs it;
# a holder that stops renewing loses it when the TTL expires.
LEASES = Bucket(
    name=subjects.KV_LEASES,
    history=1,
    ttl_s=5.0,
    description="Leader leases for singleton roles",
)
# A tenant's secrets, each value encrypted by vigil.secrets before it is written (the
# operator's key never reaches NATS). No TTL: a secret lives until it is removed.
SECRETS = Bucket(
    name=subjects.KV_SECRETS,
    history=1,
    max_value_size=128 * 1024,
    description="Tenants' secrets by <tenant>.<name>, encrypted (AES-GCM, operator's key)",
)
# Persistent environments: image, default egress and secrets, and the revision of the
# workspace snapshot tasks start from (compare-and-set on commit; vigil.environments).
ENVIRONMENTS = Bucket(
    name=subjects.KV_ENVIRONMENTS,
    history=1,
    description="Persistent environments by <tenant>.<name> (compare-and-set on revision)",
)
BUCKETS: tuple[Bucket, ...] = (TASKS, CONFESSIONS, INCIDENTS, DELIVERIES, REPLAYS, EXECUTORS,
                               LEASES, SECRETS, ENVIRONMENTS)

CHECKPOINTS = ObjectStore(
    name=subjects.OBJ_CHECKPOINTS,
    ttl_s=30 * DAY,
    description="Workspace checkpoints by task id",
)
# No TTL: a snapshot lives while its environment's history keeps it (the executor that
# commits a newer one, and the gateway that deletes the environment, delete it).
ENV_SNAPSHOTS = ObjectStore(
    name=subjects.OBJ_ENVIRONMENTS,
    description="Persistent environments' workspace snapshots, by "
    "<tenant>/<name>/r<revision>-<task>-a<attempt>",
)
# No TTL: an image archive lives until an operator removes it (vigil image rm).
IMAGES = ObjectStore(
    name=subjects.OBJ_IMAGES,
    description="Image archives pushed by operators (vigil image push), by image name",
)
OBJECT_STORES: tuple[ObjectStore, ...] = (CHECKPOINTS, ENV_SNAPSHOTS, IMAGES)


# Consumers ----------------------------------------------------------------------------------
def _durable(**config: Any) -> ConsumerConfig:
    """A durable pull consumer of all a stream holds, every message acked explicitly."""
    return ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
                          **config)


def scheduler_consumer() -> ConsumerConfig:
    return _durable(
        durable_name=subjects.CONSUMER_SCHEDULER,
        description="Scheduler: admits submissions",
        filter_subject=f"{subjects.SUBMIT}.>",
        ack_wait=30.0,
        max_ack_pending=10_000,
        max_waiting=512,
    )


def control_consumer() -> ConsumerConfig:
    return _durable(
        durable_name=subjects.CONSUMER_CONTROL,
        description="Scheduler: cancel and redrive requests",
        filter_subject=f"{subjects.CONTROL}.>",
        ack_wait=30.0,
        max_ack_pending=1_000,
        max_waiting=512,
    )


def timers_consumer() -> ConsumerConfig:
    return _durable(
        durable_name=subjects.CONSUMER_TIMERS,
        description="Scheduler: delayed starts and queue timeouts",
        filter_subject=f"{subjects.TIMERS}.>",
        ack_wait=30.0,
        # Every timer not yet due is pending on the server (naked with its delay): the
        # count is bounded by the stream, not by this client's memory.
        max_ack_pending=-1,
        max_waiting=512,
    )


def executor_consumer(pool: str, ack_wait_s: float,
                      max_deliver: int = MAX_DELIVERIES) -> ConsumerConfig:
    return _durable(
        durable_name=subjects.consumer_executor(pool),
        description=f"Executors of pool {pool}",
        filter_subject=subjects.work(pool),
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=-1,
        max_waiting=512,
    )


async def ensure_executor_consumer(js: JetStreamContext, pool: str, ack_wait_s: float
                                   ) -> float:
    """The pool's work consumer, shared by every executor of the pool, made or updated
    with an ack wait of at least ``ack_wait_s``; returns the ack wait it has.

    The ack wait is the pool's lease: the server redelivers a task whose executor has not
    renewed it for that long, whichever executor it was. It only ever grows here: an
    executor setting a shorter one would make the server redeliver the tasks of another
    executor that times its lease by a longer one, while that one still runs them (two
    runs of one task). Each executor gives its lease up at its own ``VIGIL_ACK_WAIT_S``
    (never later than the server's), so a pool with mixed settings is safe, and a dead
    node's tasks come back after the longest. Lowering a pool's lease is an operator's
    act: lower every executor's setting, then edit the consumer (``nats consumer edit
    VIGIL_WORK <consumer> --wait``). Executors starting together converge: each checks
    what the server kept after it wrote."""
    name = subjects.consumer_executor(pool)
    for _ in range(5):
        try:
            existing = float((await js.consumer_info(subjects.STREAM_WORK, name)).config
                             .ack_wait or 0)
        except NotFoundError:
            existing = 0.0
        wanted = max(existing, ack_wait_s)
        await ensure_consumer(js, subjects.STREAM_WORK, executor_consumer(pool, wanted))
        kept = float((await js.consumer_info(subjects.STREAM_WORK, name)).config
                     .ack_wait or 0)
        if kept >= ack_wait_s:
            if kept > ack_wait_s:
                log.warning("pool_ack_wait_longer", pool=pool, pool_ack_wait_s=kept,
                            own_ack_wait_s=ack_wait_s,
                            note="another executor of the pool set a longer lease; this one "
                            "gives its leases up at its own (safe), and a dead node's tasks "
                            "come back after the pool's")
            return kept
    raise TopologyError(f"the ack wait of consumer {name} kept changing under this executor "
                        f"(wanted at least {ack_wait_s:g}s); check the pool's executors' "
                        "VIGIL_ACK_WAIT_S")


def dead_letter_consumer() -> ConsumerConfig:
    return _durable(
        durable_name=subjects.CONSUMER_DEAD_LETTERS,
        description="Scheduler: tasks whose work message reached its max deliveries",
        ack_wait=30.0,
        max_waiting=64,
    )


def notifier_consumer() -> ConsumerConfig:
    return _durable(
        durable_name=subjects.CONSUMER_NOTIFIER,
        description="Auditor: sends alerts to webhooks, with retries",
        filter_subject=f"{subjects.ALERTS}.>",
        ack_wait=60.0,
        # Unlimited: the notifier itself gives up after ``max_attempts`` deliveries by
        # recording the failure (and confessing it), and terminates (and confesses) an
        # alert it cannot decode; a delivery that failed on a NATS error is retried until
        # NATS answers, so no server limit can drop an alert.
        max_deliver=-1,
        max_waiting=64,
    )


def auditor_consumer() -> ConsumerConfig:
    return _durable(
        durable_name=subjects.CONSUMER_AUDITOR,
        description="Auditor: records and triages confessions",
        filter_subject=f"{subjects.ISSUES}.>",
        # One confession in flight across all auditors: an incident applies confessions in
        # stream order and skips what it has seen, so a message held by an auditor that
        # died must come back before anything newer is handed to another one. The auditor
        # keeps the lease with in-progress acks while it works (a NATS call alone may retry
        # for longer than this), so only a dead or cut-off auditor lets the ack wait expire.
        ack_wait=10.0,
        # Unlimited: the auditor bounds its own tries (VIGIL_TRIAGE_ATTEMPTS, then it gives
        # the confession up, records and confesses that), and NATS being unavailable spends
        # none; a server limit would drop a confession with no one told.
        max_deliver=-1,
        max_ack_pending=1,
        max_waiting=512,
    )


# Ensure ------------------------------------------------------------------------------------
async def ensure_stream(js: JetStreamContext, stream: Stream, replicas: int = 1) -> None:
    config = stream.config(replicas)
    try:
        await js.add_stream(config=config)
        return
    except BadRequestError as exc:
        if exc.err_code != STREAM_IN_USE:
            raise TopologyError(f"cannot create stream {stream.name}: {exc.description}") from exc
    current = (await js.stream_info(stream.name)).config
    config.num_replicas = _replicas(stream.name, current.num_replicas, replicas)
    try:
        await js.update_stream(config=config)
        log.info("stream_updated", stream=stream.name)
    except (BadRequestError, ServerError) as exc:  # (a retention change is a 500)
        raise TopologyError(
            f"stream {stream.name} exists with a configuration that cannot be changed in "
            f"place ({exc.description}); back it up and delete it, or fix the declaration"
        ) from exc


async def ensure_bucket(js: JetStreamContext, bucket: Bucket, replicas: int = 1) -> None:
    try:
        await js.create_key_value(config=bucket.config(replicas))
    except BadRequestError as exc:
        if exc.err_code != STREAM_IN_USE:
            raise TopologyError(f"cannot create bucket {bucket.name}: {exc.description}") from exc
        # Exists with a different configuration (an older declaration): update its stream.
        await _update_limits(js, bucket.stream, bucket.limits(replicas), f"bucket {bucket.name}")


async def ensure_object_store(js: JetStreamContext, store: ObjectStore, replicas: int = 1) -> None:
    try:
        # nats-py overwrites config.bucket with its `bucket` argument: pass both.
        await js.create_object_store(store.name, config=store.config(replicas))
    except BadRequestError as exc:
        if exc.err_code != STREAM_IN_USE:
            raise TopologyError(f"cannot create object store {store.name}: {exc}") from exc
        await _update_limits(js, store.stream, store.limits(replicas),
                             f"object store {store.name}")


async def _update_limits(js: JetStreamContext, stream: str, wanted: Mapping[str, object],
                         what: str) -> None:
    """Update a bucket's or object store's stream in place: the limits Vigil declares
    (age, history, sizes, replicas, description) from the declaration, everything else
    (subjects, rollups, direct gets: the client library's business) as the server has it.
    Nothing is written when they already agree."""
    current = (await js.stream_info(stream)).config
    declared = wanted["num_replicas"]
    assert isinstance(declared, int)
    wanted = {**wanted, "num_replicas": _replicas(stream, current.num_replicas, declared)}
    changed = {key: value for key, value in wanted.items()
               if not _same(getattr(current, key), value)}
    if not changed:
        return
    try:
        await js.update_stream(config=current, **changed)
    except (BadRequestError, ServerError) as exc:
        raise TopologyError(
            f"{what} exists with a configuration that cannot be changed in place "
            f"({exc.description}); back it up and delete it, or fix the declaration"
        ) from exc
    log.info("stream_updated", stream=stream, changed=sorted(changed))


def _replicas(stream: str, have: int | None, want: int) -> int:
    """Replicas are only ever raised in place: one service started without
    ``VIGIL_REPLICAS`` against a cluster must not shrink R3 state to a single copy."""
    if have is not None and have > want:
        log.warning("replicas_kept", stream=stream, replicas=have, declared=want,
                    hint="set VIGIL_REPLICAS on every service of a clustered deployment")
        return have
    return want


def _same(have: object, want: object) -> bool:
    # The server reports "no limit" as 0 or -1, a missing description as None, and ages
    # in nanoseconds that come back as floats.
    if isinstance(want, str) or want is None:
        return (have or "") == (want or "")
    if isinstance(want, int | float) and isinstance(have, int | float | None):
        a = float(have or 0)
        b = float(want)
        if a <= 0 and b <= 0:
            return True
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)
    return have == want


async def ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    """Create or update a durable consumer (the server applies allowed changes in place)."""
    try:
        await js.add_consumer(stream, config=config)
    except BadRequestError as exc:
        raise TopologyError(
            f"cannot create consumer {config.durable_name} on {stream}: {exc.description}"
        ) from exc


async def ensure_topology(js: JetStreamContext, replicas: int = 1, *,
                          streams: Iterable[Stream] = STREAMS,
                          buckets: Iterable[Bucket] = BUCKETS,
                          object_stores: Iterable[ObjectStore] = OBJECT_STORES,
                          output_max_bytes: int = OUTPUT_MAX_BYTES) -> None:
    """Create or update every stream, bucket and object store Vigil uses (or those given).

    Idempotent: what exists with the declared configuration is left alone; what differs
    in a limit the server can change in place (max age or TTL, history, sizes, replicas,
    duplicate window, description, VIGIL_EVENTS' subjects narrowed to the lifecycle kinds
    when VIGIL_OUTPUT is new) is updated; anything else raises
    :class:`~vigil.errors.TopologyError`.
    """
    for stream in streams:
        if stream.name == OUTPUT.name:
            stream = output_stream(output_max_bytes)
        await ensure_stream(js, stream, replicas)
    for bucket in buckets:
        await ensure_bucket(js, bucket, replicas)
    for store in object_stores:
        await ensure_object_store(js, store, replicas)

