"""Triage: from confessions to incidents, as pure functions (the service adds I/O).

**Fingerprint** — two confessions are "the same problem" when they come from the same
source, in the same category, about the same image (and, for an agent's confession, of the
same tenant: what a tenant's agents complain of is that tenant's incident, which its own
operators manage; the platform's confessions make incidents shared by the tenants they
hit, which only platform operators act on), and their summaries are equal once
everything that varies between occurrences is masked: first the ids the confession names
itself — its task id (``<task>``) and its node (``<node>``), each only as a whole token
(not inside a longer word or id: letters, digits, ``_`` and ``-`` do not border it) and
only when at least 3 characters long (a shorter id is too likely to be an ordinary word)
— then Vigil ids, UUIDs, long hex strings, paths and numbers. So "task t_abc failed after 3
tries at /tmp/x/1" and "task t_xyz failed after 5 tries at /tmp/y/2" are one incident, and
so are "limits not enforceable on node vm-3fd" and the same from node vm-7ab.

**Incidents** count occurrences, remember first/last seen, the tasks and tenants they
hit (the tasks also per tenant, for a tenant's own view) and a few sample confessions.
Severity is the highest seen, raised one level when ``ESCALATE_COUNT`` occurrences land
within ``ESCALATE_WINDOW_S``; any ``critical`` confession makes the incident critical.
Each new severity level (and each reopening) is an alert, with an id derived from the
incident and that transition, so the same transition always yields the same alert.

**Lifecycle** — ``open`` → ``acknowledged`` → ``resolved``; a recurrence reopens a
resolved incident. Operators act by publishing confessions too (source ``operator``,
category ``incident_ack``/``incident_resolve``), so the issues stream holds everything
and replaying it from the start rebuilds identical incidents.

Every timestamp comes from the messages (their stream time), never from the clock.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta
from typing import cast

import msgspec

from vigil.messages import (
    SEVERITIES,
    Confession,
    ConfessionRecord,
    Incident,
    IncidentSample,
    Severity,
    TenantStat,
)
from vigil.sketch import Distinct

ESCALATE_COUNT = 10
ESCALATE_WINDOW_S = 600.0
MAX_TASKS = 100
MAX_TENANTS = 50
MAX_TENANT_STATS = 1_000  # tenants whose own count a shared incident keeps (bounded size)
FIRST_SAMPLES = 3
LAST_SAMPLES = 2
OPERATOR = "operator"
ACK, RESOLVE = "incident_ack", "incident_resolve"
MIN_MASKED_ID = 3  # a task or node id this short is left alone: it may well be a word

_MASKS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I),
     "<uuid>"),
    (re.compile(r"\b[tk]_[a-z2-7]{26}\b"), "<id>"),
    (re.compile(r"\b[0-9a-f]{12,}\b", re.I), "<hex>"),
    (re.compile(r"(?<![\w<])(?:/[\w.\-]+)+/?"), "<path>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),
]
_SPACE = re.compile(r"\s+")


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One notification: published on vigil.alerts.<severity> and sent to webhooks."""

    id: str  # incident + what happened: a re-run of triage yields the same id
    incident_id: str
    severity: str
    reason: str  # opened | escalated | reopened
    title: str
    count: int
    source: str
    category: str | None = None
    tasks: list[str] = []
    tenants: list[str] = []
    time: datetime


def _mask_id(text: str, ident: str | None, mask: str) -> str:
    if not ident or len(ident) < MIN_MASKED_ID:
        return text
    return re.sub(rf"(?<![\w-]){re.escape(ident)}(?![\w-])", mask, text)


def normalize(summary: str, task_id: str | None = None, node: str | None = None) -> str:
    """The summary with what varies between occurrences masked (see the module doc)."""
    text = _mask_id(summary, task_id, "<task>")
    text = _mask_id(text, node, "<node>")
    for pattern, mask in _MASKS:
        text = pattern.sub(mask, text)
    return _SPACE.sub(" ", text).strip()


def fingerprint(source: str, category: str | None, image: str | None, title: str,
                tenant: str | None = None) -> str:
    base = f"{source}|{category or '-'}|{image or '-'}|{title}"
    return base if tenant is None else f"{base}|tenant={tenant}"


AGENT = "agent"


def owner_of(record: ConfessionRecord, c: Confession) -> str | None:
    """The tenant an incident belongs to: an agent's confession's tenant; None (a
    platform incident) for everything else."""
    return c.tenant if record.source == AGENT and c.tenant else None


def incident_id(fp: str) -> str:
    return "inc_" + hashlib.sha256(fp.encode()).hexdigest()[:20]


def _count_beyond_named(current: Incident, task_key: str) -> tuple[int, str]:
    """``tasks_total`` and ``tasks_sketch`` after ``task_key``, a task not among the
    first MAX_TASKS named, confessed into ``current``. The sketch is started from the
    named tasks when the first unnamed one comes (an incident written before sketches
    restarts its count there: its old total counted repeats), so it holds every task
    the incident ever hit; a task seen before never moves the total."""
    sketch = Distinct(current.tasks_sketch)
    if not current.tasks_sketch:
        for key in current.tasks:
            sketch.add(key)
        sketch.add(task_key)
        return max(len(current.tasks) + 1, sketch.estimate()), sketch.encode()
    if not sketch.add(task_key):
        return current.tasks_total, current.tasks_sketch
    # Never below what is known (one more than the named), never down (an estimate).
    return max(current.tasks_total, len(current.tasks) + 1, sketch.estimate()), sketch.encode()


def _level(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else 1


def _raise(severity: Severity) -> Severity:
    return cast(Severity, SEVERITIES[min(_level(severity) + 1, len(SEVERITIES) - 1)])


def operator_action(record: ConfessionRecord) -> tuple[str, str, str] | None:
    """(action, incident id, who) when the record is an operator's ack/resolve."""
    c = record.confession
    if record.source != OPERATOR or c is None or c.category not in (ACK, RESOLVE):
        return None
    target = c.data.get("incident_id")
    if not isinstance(target, str):
        return None
    who = c.data.get("by")
    return c.category, target, str(who) if who else "operator"


def _identify(record: ConfessionRecord, c: Confession) -> tuple[str, str | None, str]:
    """(fingerprint, image, title) of a confession."""
    image = c.data.get("image") if isinstance(c.data.get("image"), str) else None
    title = normalize(c.summary, c.task_id, c.node)
    return (fingerprint(record.source, c.category, image, title, owner_of(record, c)),
            image, title)


def key_of(record: ConfessionRecord) -> str | None:
    """The incident a confession belongs to; None for records that are not triaged."""
    c = record.confession
    if c is None or operator_action(record) is not None:
        return None
    return incident_id(_identify(record, c)[0])


def apply(current: Incident | None, record: ConfessionRecord, at: datetime
          ) -> tuple[Incident | None, list[Alert]]:
    """Fold one confession (seen at stream time ``at``) into its incident.

    Returns the new incident (None when nothing changes: a record already applied, or
    one that is not triaged) and the alerts it raises.
    """
    if current is not None and record.stream_seq <= current.last_seq:
        return None, []  # applied before (a redelivery): count nothing twice
    action = operator_action(record)
    if action is not None:
        return _act(current, action, record, at)
    c = record.confession
    if c is None:
        return None, []
    fp, image, title = _identify(record, c)
    sample = IncidentSample(confession_id=record.id, summary=c.summary[:500], task_id=c.task_id,
                    tenant=c.tenant, time=at)
    if current is None:
        current = Incident(
            id=incident_id(fp), fingerprint=fp, source=record.source, category=c.category,
            image=image, title=title, severity=c.severity, first_seen=at, last_seen=at,
            window_start=at, tenant=owner_of(record, c),
        )
    reason: str | None = None
    status = current.status
    reopened = current.reopened
    if status == "resolved":
        status, reopened, reason = "open", reopened + 1, "reopened"
    window_start, window_count = current.window_start, current.window_count
    if at - window_start > timedelta(seconds=ESCALATE_WINDOW_S):
        window_start, window_count = at, 0
    window_count += 1
    severity = max(current.severity, c.severity, key=_level)
    if c.severity == "critical":
        severity = "critical"
    elif window_count >= ESCALATE_COUNT and window_count % ESCALATE_COUNT == 0:
        severity = max(severity, _raise(current.severity), key=_level)
    tasks, tasks_total = list(current.tasks), current.tasks_total
    tasks_sketch = current.tasks_sketch
    # Tasks by key (<tenant>.<id>): ids are per tenant, two tenants' "job1" are two tasks.
    task_key = f"{c.tenant}.{c.task_id}" if c.tenant and c.task_id else c.task_id
    if task_key and task_key not in tasks:
        if len(tasks) < MAX_TASKS:
            tasks.append(task_key)
            tasks_total = len(tasks)  # exact while every task is named
        else:
            tasks_total, tasks_sketch = _count_beyond_named(current, task_key)
    tenant_stats = current.tenant_stats
    if c.tenant and (c.tenant in tenant_stats or len(tenant_stats) < MAX_TENANT_STATS):
        had = tenant_stats.get(c.tenant)
        tenant_stats = {**tenant_stats, c.tenant: TenantStat(
            count=(had.count if had else 0) + 1,
            first_seen=had.first_seen if had else at, last_seen=at)}
    tenants = list(current.tenants)
    if c.tenant and c.tenant not in tenants and len(tenants) < MAX_TENANTS:
        tenants.append(c.tenant)
    tenant_tasks = current.tenant_tasks
    if c.task_id and c.tenant and c.tenant in tenants:
        own = tenant_tasks.get(c.tenant, [])
        if c.task_id not in own and len(own) < MAX_TASKS:
            tenant_tasks = {**tenant_tasks, c.tenant: [*own, c.task_id]}
    first = list(current.first_samples)
    last = list(current.last_samples)
    if len(first) < FIRST_SAMPLES:
        first.append(sample)
    else:
        last = [*last, sample][-LAST_SAMPLES:]
    alerted = list(current.alerted)
    announce = f"{severity}#{reopened}"
    if announce not in alerted:
        alerted.append(announce)
        reason = reason or ("opened" if current.count == 0 else "escalated")
    updated = msgspec.structs.replace(
        current, severity=severity, status=status, count=current.count + 1, last_seen=at,
        window_start=window_start, window_count=window_count, tasks=tasks,
        tasks_total=tasks_total, tasks_sketch=tasks_sketch, tenants=tenants,
        tenant_tasks=tenant_tasks,
        first_samples=first, last_samples=last, tenant_stats=tenant_stats,
        alerted=alerted, reopened=reopened, last_seq=record.stream_seq,
        resolved_by=None if status == "open" else current.resolved_by,
        acknowledged_by=None if reason == "reopened" else current.acknowledged_by,
    )
    alerts = [] if reason is None else [_alert(updated, reason, at)]
    return updated, alerts


def _act(current: Incident | None, action: tuple[str, str, str], record: ConfessionRecord,
         at: datetime) -> tuple[Incident | None, list[Alert]]:
    kind, _, who = action
    if current is None:
        return None, []
    if kind == ACK and current.status == "open":
        return msgspec.structs.replace(current, status="acknowledged", acknowledged_by=who,
                                       last_seq=record.stream_seq), []
    if kind == RESOLVE and current.status != "resolved":
        return msgspec.structs.replace(current, status="resolved", resolved_by=who,
                                       last_seq=record.stream_seq), []
    return msgspec.structs.replace(current, last_seq=record.stream_seq), []


def _alert(incident: Incident, reason: str, at: datetime) -> Alert:
    return Alert(
        id=f"{incident.id}.{incident.severity}.{incident.reopened}",
        incident_id=incident.id, severity=incident.severity, reason=reason,
        title=incident.title, count=incident.count, source=incident.source,
        category=incident.category, tasks=incident.tasks[:20], tenants=incident.tenants,
        time=at,
    )
