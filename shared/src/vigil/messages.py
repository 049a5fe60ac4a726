"""Wire messages: what travels on Vigil's subjects and sits in its buckets.

All are frozen, keyword-only msgspec Structs. Unknown fields are ignored when decoding so
that older services read newer messages; every field added later must have a default.
The ``*Strict`` variants forbid unknown fields and are used at the user-facing doors,
where a typo such as ``timeout`` for ``timeout_s`` should be an error, not silently lost.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# Identifiers: safe as a single NATS subject token and as a KV key.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ID_RE = re.compile(ID_PATTERN)
# Ids the platform makes (vigil.ids): s<stream seq>, and the gateway's t_/k_ ids.
PLATFORM_ID_RE = re.compile(r"^(?:s[0-9]+|[tk]_[a-z2-7]{26})$")


def platform_id_error(value: str) -> str:
    """Why ``value``, of the shape of an id the platform makes, is refused as a user's."""
    return (f"task id {value!r} has the shape of an id the platform makes (s<digits>, "
            "t_/k_ + 26 base32 characters); choose another id")
TaskId = Annotated[str, Meta(pattern=ID_PATTERN, description="[A-Za-z0-9_-]{1,64}")]
Name = Annotated[str, Meta(pattern=ID_PATTERN)]
ImageRef = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$", description="image reference")
]
# A NUL byte cannot reach a process (argv and the environment are C strings) nor a
# container label: a string that may carry one is refused at the door, never at run time.
NO_NUL = r"^[^\x00]*$"
EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
# Env and label values are checked for NUL in TaskSpec.__post_init__, so that the error
# names the key (`$.env.FOO`; msgspec's own path for a map value is `$.env[...]`); the
# schema says so too.
EnvValue = Annotated[str, Meta(max_length=32_768, extra_json_schema={"pattern": NO_NUL})]
LabelKey = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")]
LabelValue = Annotated[str, Meta(max_length=256, extra_json_schema={"pattern": NO_NUL})]
Arg = Annotated[str, Meta(min_length=1, max_length=65_536, pattern=NO_NUL)]
Command = Annotated[list[Arg], Meta(min_length=1, max_length=1_024)]
# Egress: one host a task's agent may reach through the executor's proxy: ``host``,
# ``*.domain`` (any name under it, not the domain itself) or either with ``:port`` (without
# one: 80 and 443). Names are matched case-insensitively; an IPv4 literal is a host too.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# 1-65535 without leading zeros, so that the schema says what __post_init__ accepts.
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
EGRESS_RULE_PATTERN = rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})*(?::{_PORT})?$"
EgressRule = Annotated[str, Meta(
    pattern=EGRESS_RULE_PATTERN, max_length=259,
    description="host, *.domain, or either with :port (default ports 80 and 443)")]
SecretName = Annotated[str, Meta(pattern=ID_PATTERN, description="a secret of the tenant")]
ExitCode = Annotated[int, Meta(ge=0, le=255)]
"""What a process exit status can be (a signal shows as 128 + its number)."""

Status = Literal[
    "queued", "scheduled", "running", "succeeded", "failed", "cancelled", "timed_out", "dead"
]
STATUSES: tuple[str, ...] = (
    "queued", "scheduled", "running", "succeeded", "failed", "cancelled", "timed_out", "dead",
)
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "timed_out", "dead"})

Severity = Literal["info", "warning", "error", "critical"]
SEVERITIES: tuple[str, ...] = ("info", "warning", "error", "critical")

# Env names the platform sets inside the container; a task may not override them.
RESERVED_ENV_PREFIX = "VIGIL_"


def utcnow() -> datetime:
    return datetime.now(UTC)


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How a task whose agent fails (non-zero exit) is retried, up to ``max_attempts``.

    The n-th retry waits ``min(backoff_max_s, backoff_s * 2**(n-1))``, spread by
    ``±jitter`` (a fraction) so that a burst of failures does not retry in lockstep. An
    exit code in ``non_retryable_exit_codes`` ends the task ``failed`` at once.
    Infrastructure failures (a lost node, a missing image, a drain) never count as attempts.
    """

    backoff_s: Annotated[float, Meta(ge=0, le=3_600)] = 1.0
    backoff_max_s: Annotated[float, Meta(ge=0, le=86_400)] = 300.0
    jitter: Annotated[float, Meta(ge=0, le=1)] = 0.2
    non_retryable_exit_codes: Annotated[list[ExitCode], Meta(max_length=256)] = []


class Egress(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True,
             forbid_unknown_fields=True):
    """Where a task's agent may connect. The container has no network device; its one way
    out is the executor's HTTP(S) proxy (``HTTPS_PROXY`` in its environment), which allows
    only these hosts and ports and resolves the names itself. No ``egress``: no way out."""

    allow: Annotated[list[EgressRule], Meta(max_length=64)] = []

    def __post_init__(self) -> None:
        for i, rule in enumerate(self.allow):
            _, sep, port = rule.rpartition(":")
            if sep and not 1 <= int(port) <= 65_535:
                raise ValueError(f"port {port} is not 1-65535 - at `$.egress.allow[{i}]`")


class Resources(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True,
                forbid_unknown_fields=True):
    """What one task's agent may use. Unset fields take the tenant's defaults (scheduler
    settings), and no field may exceed the tenant's maximum. Real cgroup limits where the
    host delegates them; elsewhere the executor's watchdog measures and stops the agent.
    Crossing one ends the task ``failed`` with ``limit`` naming which and the peak."""

    memory_mb: Annotated[int, Meta(ge=16, le=1_048_576)] | None = None
    """All the agent's processes together (PSS), MiB."""
    disk_mb: Annotated[int, Meta(ge=1, le=16_777_216)] | None = None
    """The workspace's size, MiB."""
    pids: Annotated[int, Meta(ge=8, le=1_048_576)] | None = None
    """Processes and threads at once."""
    cpus: Annotated[float, Meta(gt=0, le=1_024)] | None = None
    """CPU time as cores (1.5 = one and a half), where the host can enforce it."""
    output_mb: Annotated[int, Meta(ge=1, le=65_536)] | None = None
    """stdout + stderr stored, MiB; beyond it output is dropped with a marker, the agent
    keeps running."""


LimitName = Literal["memory_limit", "disk_limit", "pids_limit", "output_limit"]


PRIORITY_DEFAULT = 5
NOT_BEFORE_MAX_AHEAD_DAYS = 365
"""How far ahead of its submission a task's ``not_before`` may be."""


class TaskSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a user submits: run ``command`` in ``image`` until it finishes.

    ``id`` is optional; see :func:`vigil.ids.task_id_for` for how a missing id is assigned.
    ``image``, ``timeout_s`` and ``max_attempts`` fall back to the platform defaults.
    """

    command: Command
    id: TaskId | None = None
    image: ImageRef | None = None
    env: dict[EnvName, EnvValue] = {}
    timeout_s: Annotated[float, Meta(gt=0, le=14 * 86_400)] | None = None
    # At most 40: every attempt, retry and hand-back is one delivery of the work message,
    # and the server gives up on a message after 50 (topology.MAX_DELIVERIES).
    max_attempts: Annotated[int, Meta(ge=1, le=40)] | None = None
    labels: dict[LabelKey, LabelValue] = {}
    pool: Name = "default"
    priority: Annotated[int, Meta(ge=0, le=9)] = PRIORITY_DEFAULT
    """0-9, higher first, among one tenant's queued tasks (tenants share fairly)."""
    node_labels: dict[LabelKey, LabelValue] = {}
    """Labels an executor of ``pool`` must advertise to run this task."""
    not_before: Annotated[datetime, Meta(
        description=f"Do not start before this time; at most {NOT_BEFORE_MAX_AHEAD_DAYS} "
        "days after the submission.")] | None = None
    """Do not start before this time (delayed start)."""
    queue_timeout_s: Annotated[float, Meta(gt=0, le=30 * 86_400)] | None = None
    """Give up (``timed_out``) if not started this long after submission (or not_before)."""
    retry: RetryPolicy | None = None
    egress: Egress | None = None
    """Hosts the agent may reach through the executor's proxy (none: no network at all)."""
    secrets: Annotated[dict[EnvName, SecretName], Meta(max_length=64)] = {}
    """Secrets by reference, ``{ENV_NAME: secret name}``: the executor resolves each at
    start and gives the agent its value as ``$ENV_NAME`` and ``/run/secrets/ENV_NAME``.
    Values never enter a stream, the task's state, a log line or an event."""
    resources: Resources | None = None
    """Per-task limits (memory, disk, processes, CPU, output); see :class:`Resources`."""
    environment: Name | None = None
    """A persistent environment of the tenant: the task starts from its latest workspace
    snapshot (and its image, egress and secrets as defaults) and commits back on success."""

    def __post_init__(self) -> None:
        # msgspec turns a ValueError here into a ValidationError for the caller.
        for name in self.env:
            if name.startswith(RESERVED_ENV_PREFIX):
                raise ValueError(
                    f"env name {name!r} is reserved (the platform sets VIGIL_* inside the "
                    "container) - at `$.env`"
                )
        for name in self.secrets:
            if name.startswith(RESERVED_ENV_PREFIX):
                raise ValueError(
                    f"env name {name!r} is reserved (the platform sets VIGIL_* inside the "
                    f"container) - at `{_member('$.secrets', name)}`"
                )
            if name in self.env:
                raise ValueError(f"{name} is set by both env and secrets; keep one - at "
                                 f"`{_member('$.secrets', name)}`")
        if len(self.labels) > 64:
            raise ValueError("at most 64 labels are allowed - at `$.labels`")
        for where, values in (("env", self.env), ("labels", self.labels),
                              ("node_labels", self.node_labels)):
            for key, value in values.items():
                if "\x00" in value:
                    raise ValueError(f"a NUL byte cannot be passed to a process or a label "
                                     f"- at `{_member(f'$.{where}', key)}`")
        if self.not_before is not None and self.not_before.tzinfo is None:
            raise ValueError("not_before needs a time zone (Z or +hh:mm) - at `$.not_before`")

    def check_at(self, now: datetime) -> None:
        """The rules that depend on when the spec is submitted, raising ValueError naming
        the field. Checked where a submission is admitted (:func:`vigil.codec.decode_spec`
        with ``now``), not on every decode: a stored spec must stay readable whatever
        another node's clock says."""
        if (self.not_before is not None
                and self.not_before - now > timedelta(days=NOT_BEFORE_MAX_AHEAD_DAYS)):
            # Also keeps every sum the scheduler makes of it (plus a queue timeout) far
            # from datetime's year-9999 ceiling.
            raise ValueError(f"not_before may be at most {NOT_BEFORE_MAX_AHEAD_DAYS} days "
                             "ahead - at `$.not_before`")


class TaskSpecStrict(TaskSpec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """:class:`TaskSpec` for user-facing doors: unknown fields are errors, and an ``id``
    may not have the shape of an id the platform makes (see :mod:`vigil.ids`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.id is not None and PLATFORM_ID_RE.fullmatch(self.id):
            raise ValueError(f"{platform_id_error(self.id)} - at `$.id`")


def _member(parent: str, key: str) -> str:
    """The JSON path of ``parent[key]``: ``$.env.FOO``, or ``$.labels["a.b/c"]`` for a
    key that is not a plain name."""
    return f"{parent}.{key}" if key.isidentifier() and key.isascii() else f'{parent}["{key}"]'


class CheckpointRef(msgspec.Struct, frozen=True, kw_only=True):
    """A durable workspace checkpoint of a task (object store vigil-checkpoints)."""

    name: str
    size: int
    digest: str  # "sha256:<hex>" of the tar archive
    attempt: int
    reason: str  # the kind: agent | periodic | drain
    taken_at: datetime
    # True when nothing could have been writing the workspace: the agent asked for the
    # snapshot and waited for it, or (drain) it exited 0 by itself within its grace after
    # SIGTERM. False for a periodic snapshot, a drain that had to kill the agent, and refs
    # recorded before this field existed.
    clean: bool = False


class EnvironmentUse(msgspec.Struct, frozen=True, kw_only=True):
    """A task's use of its persistent environment (:mod:`vigil.environments`)."""

    name: str
    base_revision: int
    """The environment revision its workspace started from: set when an attempt restores
    the environment's snapshot, kept while later attempts resume from the task's own
    checkpoints. Its commit is refused once the environment has moved past it."""
    committed_revision: int | None = None
    """The revision its success made current (its workspace committed)."""


class AttemptRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One past attempt, kept as evidence: who ran it and how it ended."""

    attempt: int
    executor: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    outcome: str  # a final status, or "lost" (executor gone), "handed_back" (drain)
    error: str | None = None
    # Checkpoints by object name. ``restored``: the one its workspace was restored from
    # (None: an empty workspace, or not known: a lost attempt). ``saved``: the newest one
    # it made the task's checkpoint. ``restore_failed``: the one it could not restore
    # (handed back, or dead). ``rolled_back_from``: after this attempt failed, the task
    # gave up on that checkpoint and went back to the one before it.
    restored: str | None = None
    saved: str | None = None
    restore_failed: str | None = None
    rolled_back_from: str | None = None


SUMMARY_CHARS = 2_000  # the longest confession summary the contract takes

# What a task's state keeps as evidence, whoever writes it (an executor, or the scheduler
# burying a task whose executor is gone): the last attempts, and the newest ended
# attempt's last output lines, each cut to a length.
HISTORY_KEPT = 50
TAIL_LINES = 20
TAIL_LINE_CHARS = 1_000


class TaskState(msgspec.Struct, frozen=True, kw_only=True):
    """A task's current state: the value of its key in the ``vigil-tasks`` bucket.

    Written with compare-and-set on the KV revision, so only the current attempt can
    record progress or an outcome.
    """

    id: str
    tenant: str
    status: Status
    attempt: int = 0
    executor: str | None = None
    exit_code: int | None = None
    error: str | None = None
    # Set when the submission was refused: the JSON path of the spec's field the refusal
    # names (``$.command[0]``; ``$`` for a body that is not JSON), None for the whole task.
    error_field: str | None = None
    # The resource limit the agent was stopped for (``memory_limit`` …) and its peak.
    limit: LimitName | None = None
    peak: float | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    spec: TaskSpec | None = None
    submit_seq: int = 0
    # The checkpoint the next attempt restores; ``checkpoints`` is the short history it
    # heads (newest first, ``checkpoint`` first), kept so that a checkpoint the agent
    # keeps crashing on can be rolled back to the one before it.
    checkpoint: CheckpointRef | None = None
    checkpoints: list[CheckpointRef] = []
    # The work message the current attempt holds (stream sequence) and which delivery of
    # it: a late, older delivery (buffered in a frozen executor) must not take over.
    work_seq: int = 0
    delivery: int = 0
    history: list[AttemptRecord] = []
    tail: list[str] = []  # the last output lines of the newest attempt that ended
    # Set by the scheduler on a running task: its executor stops the agent (grace period,
    # then kill) and records ``cancelled``. A new attempt never starts once this is set.
    cancel_requested_at: datetime | None = None
    cancel_reason: str | None = None
    # Operator redrives of a finished task; attempts up to ``budget_from`` were spent
    # before the newest redrive and no longer count against ``max_attempts``.
    redriven: int = 0
    budget_from: int = 0
    # Times the scheduler took the task back from the work queue before any executor
    # claimed it (executors without its node_labels handed it back until the server's
    # max deliveries): it waits in the queue again, its deliveries start afresh.
    requeued: int = 0
    # Why a queued task is not running yet, when the scheduler knows (no executor serves
    # its pool or labels, the tenant is at its running limit, not_before is ahead).
    waiting: str | None = None
    retry_at: datetime | None = None  # a failed attempt's retry is due then
    rejected_by: str | None = None  # the tenant limit that refused it (e.g. max_queued)
    # sha256 of the submitted spec (canonical JSON, without its id): an Idempotency-Key
    # reused with a different body is told so instead of being given the first task.
    spec_digest: str | None = None
    environment: EnvironmentUse | None = None
    """Set once an attempt of a task naming an environment has started from it."""

    @property
    def key(self) -> str:
        """Its key in ``vigil-tasks``: ``<tenant>.<id>`` (ids are per tenant)."""
        return f"{self.tenant}.{self.id}"

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def refused_at_admission(self) -> bool:
        """Never ran because admission refused it (a tenant limit, or an invalid spec
        recorded under its id): a later submission of the id by its tenant is a retry
        and takes the id over (the scheduler's rule; the gateway follows it)."""
        return (self.status == "failed" and self.attempt == 0 and self.redriven == 0
                and (self.rejected_by is not None or self.spec is None))


ANY_IMAGE = "*"
"""In :attr:`ExecutorInfo.images`: the runtime needs no image (the unsafe ``process`` and
``null`` runtimes ignore it), so the node serves every image."""
MAX_ADVERTISED_IMAGES = 256
"""An executor holding more image names than this advertises ``images=None``."""


class ExecutorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An executor's advertisement in ``vigil-executors`` (key = node id), refreshed on a
    heartbeat; the bucket's TTL removes a node that stopped refreshing."""

    node: str
    pool: str
    labels: dict[str, str] = {}
    slots: int
    running: int = 0
    tenants: dict[str, int] = {}  # running attempts by tenant (operators only)
    draining: bool = False
    runtime: str = "podman"
    version: str = ""
    started_at: datetime
    seen_at: datetime
    images: list[str] | None = None
    """The image names this node holds (Podman's tags, refreshed every few seconds), or
    ``[ANY_IMAGE]``; None when unknown (an executor older than this field, or one with
    more than MAX_ADVERTISED_IMAGES names): placement then does not judge by image."""
    enforcement: dict[str, str] = {}
    """How this node enforces each of a task's ``resources`` (``memory_mb``, ``pids``,
    ``cpus``, ``disk_mb``): ``cgroup``, ``watchdog`` or ``none`` (see ``Started.resources``
    for one task's)."""

    @property
    def free(self) -> int:
        return 0 if self.draining else max(0, self.slots - self.running)


class WorkItem(msgspec.Struct, frozen=True, kw_only=True):
    """One unit of work on ``vigil.work.<pool>``; ``spec`` has the defaults resolved.

    ``revision`` is the task's KV revision when it became ``scheduled``. With it an
    executor claims a fresh task by compare-and-set alone, without reading it first; if
    anything wrote the task since (a redelivery, a hand-back), the CAS fails and the
    executor reads the state as usual. Everything a ``scheduled`` state holds is here.
    """

    task_id: str
    tenant: str
    spec: TaskSpec
    submitted_at: datetime
    submit_seq: int = 0
    revision: int = 0
    spec_digest: str | None = None  # as in TaskState


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Ask the scheduler to cancel a task: publish to ``vigil.control.cancel.<tenant>``.

    A queued or scheduled task ends ``cancelled`` without starting; a running one has its
    container stopped (grace period, then kill); a finished one is left as it is.
    """

    task_id: TaskId
    reason: Annotated[str, Meta(max_length=500)] | None = None
    requested_by: Annotated[str, Meta(max_length=200)] | None = None


class RedriveRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Ask the scheduler to run a finished (``dead``, ``failed``, ``timed_out``) task again
    as a new attempt with a fresh attempt budget: ``vigil.control.redrive.<tenant>``.

    ``expect_revision`` (the task's KV revision when the operator chose it) makes a
    repeated request a no-op: once redriven, the revision has moved on.
    """

    task_id: TaskId
    reason: Annotated[str, Meta(max_length=500)] | None = None
    requested_by: Annotated[str, Meta(max_length=200)] | None = None
    expect_revision: int = 0


ControlRequest = CancelRequest | RedriveRequest


class Confession(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A complaint on ``vigil.issues.<source>.<severity>``.

    Anyone may publish one; only ``summary`` and ``severity`` are required. ``id`` makes it
    idempotent (the auditor keys on it; without it, the message id or stream sequence).
    """

    summary: Annotated[str, Meta(min_length=1, max_length=SUMMARY_CHARS)]
    severity: Severity
    id: str | None = None
    source: str | None = None
    category: str | None = None
    detail: str | None = None
    hint: str | None = None
    task_id: str | None = None
    tenant: str | None = None
    attempt: int | None = None
    node: str | None = None
    component: str | None = None
    time: datetime | None = None
    data: dict[str, Any] = {}


class ConfessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the auditor stores per confession in ``vigil-confessions``."""

    id: str
    source: str
    severity: str
    subject: str
    stream_seq: int
    received_at: datetime
    confession: Confession | None = None
    error: str | None = None  # set when the message was not a valid confession
    raw: str | None = None
    triage_given_up_after: int | None = None
    """Set when the auditor gave up triaging it: the deliveries it took (the error says
    why). Such a confession was never counted: a re-publish of its id is."""


IncidentStatus = Literal["open", "acknowledged", "resolved"]


class IncidentSample(msgspec.Struct, frozen=True, kw_only=True):
    """One confession kept as an example of an incident."""

    confession_id: str
    summary: str
    task_id: str | None = None
    tenant: str | None = None
    time: datetime


class TenantStat(msgspec.Struct, frozen=True, kw_only=True):
    """One tenant's share of an incident: what a tenant's view shows as the incident's
    count and times, so it learns nothing of other tenants' activity."""

    count: int = 0
    first_seen: datetime
    last_seen: datetime


class Incident(msgspec.Struct, frozen=True, kw_only=True):
    """One problem, however many confessions reported it: the value of its key in
    ``vigil-incidents``, written by the auditor and served by the gateway.

    A tenant's token (whatever its role) sees only incidents that touched its tenant, with
    ``tenants``, the samples and ``tasks`` narrowed to that tenant (``tasks`` from
    ``tenant_tasks``), and no ``tasks_total`` or ``tenant_tasks``; a platform token sees
    them whole.
    """

    id: str
    fingerprint: str
    source: str
    category: str | None = None
    image: str | None = None
    title: str
    severity: Severity
    status: IncidentStatus = "open"
    count: int = 0
    first_seen: datetime
    last_seen: datetime
    window_start: datetime
    window_count: int = 0
    tasks: list[str] = []
    tasks_total: int = 0
    """All tasks ever hit (``tasks`` keeps the first 100): exact up to 100, past that an
    estimate within about 2% that never counts a task twice (``tasks_sketch``); platform
    tokens only."""
    tasks_sketch: str = ""
    """Past 100 tasks, a HyperLogLog sketch of every task's key (``vigil.sketch``, base64),
    from which ``tasks_total`` is estimated. Never served by the gateway."""
    tenants: list[str] = []
    tenant_tasks: dict[str, list[str]] = {}
    """Per tenant in ``tenants``, the tasks of that tenant it hit (the first 100 each)."""
    first_samples: list[IncidentSample] = []
    last_samples: list[IncidentSample] = []
    alerted: list[str] = []  # severities (and reopenings) already announced
    reopened: int = 0
    acknowledged_by: str | None = None
    resolved_by: str | None = None
    last_seq: int = 0  # the newest confession (stream sequence) applied
    tenant: str | None = None
    """The tenant that owns it (an agent's confessions: its operators acknowledge and
    resolve it); None for a platform incident (platform operators act on those)."""
    tenant_stats: dict[str, TenantStat] = {}
    """Per tenant it hit (the first 1,000): its own count and first/last seen."""


# Events ---------------------------------------------------------------------------------
class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of every event on ``vigil.events.<task_id>.<kind>``."""

    task_id: str
    attempt: int = 0
    time: datetime


class Accepted(Event, tag="accepted", frozen=True, kw_only=True):
    tenant: str
    submit_seq: int = 0


class Scheduled(Event, tag="scheduled", frozen=True, kw_only=True):
    pool: str


class Started(Event, tag="started", frozen=True, kw_only=True):
    executor: str
    image: str
    container: str | None = None
    resumed: bool = False
    limits_enforced: bool = True
    # The task's limits as this node applies them, and how each is enforced there:
    # {"memory_mb": {"value": 1024, "by": "cgroup" | "watchdog" | "rlimit" | "none"}, ...}
    resources: dict[str, dict[str, Any]] = {}


class Log(Event, tag="log", frozen=True, kw_only=True):
    """A batch of consecutive output lines of one stream; ``first`` numbers the first line."""

    stream: Literal["stdout", "stderr"]
    lines: list[str]
    first: int = 0


class Progress(Event, tag="progress", frozen=True, kw_only=True):
    data: dict[str, Any] = {}


class Checkpoint(Event, tag="checkpoint", frozen=True, kw_only=True):
    name: str
    size: int = 0
    digest: str | None = None
    reason: str = "agent"  # the kind: agent | periodic | drain
    note: dict[str, Any] = {}
    ok: bool = True
    error: str | None = None
    clean: bool = False  # see CheckpointRef.clean


class ConfessionEvent(Event, tag="confession", frozen=True, kw_only=True):
    confession_id: str
    summary: str
    severity: str
    source: str


class Retrying(Event, tag="retrying", frozen=True, kw_only=True):
    """The task goes back to ``scheduled`` (a failed attempt's retry, a hand-back, a
    redrive). ``exit_code``/``error`` are the failed attempt's, which its state keeps
    until the next attempt starts (None for hand-backs and redrives)."""

    reason: str
    delay_s: float = 0.0
    exit_code: int | None = None
    error: str | None = None


class Rejected(Event, tag="rejected", frozen=True, kw_only=True):
    """Admission refused the task (a tenant quota); its ``finished`` (failed) follows."""

    reason: str
    limit: str | None = None  # which limit, e.g. "max_queued"


class Cancelling(Event, tag="cancelling", frozen=True, kw_only=True):
    """A running task was asked to stop; its ``finished`` (``cancelled``) follows."""

    reason: str | None = None


class EgressEvent(Event, tag="egress", frozen=True, kw_only=True):
    """One connection the agent asked the executor's proxy for: allowed (with the bytes
    each way once it closed) or refused (with why)."""

    host: str
    port: int
    allowed: bool
    reason: str | None = None  # why it was refused (not on the list, private address ...)
    address: str | None = None  # the address the proxy connected to
    bytes_out: int = 0  # agent -> host
    bytes_in: int = 0  # host -> agent
    duration_s: float = 0.0


class EnvironmentEvent(Event, tag="environment", frozen=True, kw_only=True):
    """The task's workspace and its persistent environment: ``restored`` (the attempt
    starts from snapshot revision ``revision``), ``committed`` (its success made
    ``revision`` the environment's current one) or ``unchanged`` (it succeeded leaving
    the workspace as it was: no new revision)."""

    environment: str
    step: Literal["restored", "committed", "unchanged"]
    revision: int
    snapshot: str | None = None  # the snapshot's object name
    size: int = 0


class Finished(Event, tag="finished", frozen=True, kw_only=True):
    status: Status
    exit_code: int | None = None
    error: str | None = None
    duration_s: float | None = None
    final: bool = True
    # Set when no ``accepted`` event precedes this one (a submission refused outright), so
    # the event log alone says whose task it was.
    tenant: str | None = None
    submit_seq: int = 0
    executor: str | None = None  # the state's executor when it ended (the last one to run it)
    # A resource limit the agent crossed (it was stopped for it) and the peak measured.
    limit: LimitName | None = None
    peak: float | None = None


AnyEvent = Accepted | Scheduled | Started | Log | Progress | Checkpoint | ConfessionEvent | (
    Retrying | Cancelling | Rejected | EgressEvent | EnvironmentEvent | Finished
)
