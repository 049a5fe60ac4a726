"""Response bodies the gateway sends that have no type in :mod:`vigil.api` yet.

They exist so ``/openapi.json`` can describe the incident routes and ``/healthz`` from
types rather than hand-written JSON Schema. The gateway cannot import the auditor (no
service imports another), so :class:`Incident` mirrors ``vigil_auditor.triage.Incident``
field for field; ``services/gateway/tests/test_openapi_doc.py`` fails when they drift.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from vigil.messages import Severity

IncidentStatus = Literal["open", "acknowledged", "resolved"]


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /healthz``: 200 when ready, 503 (same body) when not."""

    ok: bool
    nats: bool
    """Whether the gateway's NATS connection is up."""


class IncidentSample(msgspec.Struct, frozen=True, kw_only=True):
    """One confession kept as an example of an incident."""

    confession_id: str
    summary: str
    task_id: str | None = None
    tenant: str | None = None
    time: datetime


class Incident(msgspec.Struct, frozen=True, kw_only=True):
    """One problem, however many confessions reported it (kept by the auditor).

    A token that is not an operator's sees only incidents that touched its tenant, with
    ``tenants``, ``tasks`` and the samples narrowed to that tenant and no ``tasks_total``.
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
    """All tasks ever hit (``tasks`` keeps the first 100); operators only."""
    tenants: list[str] = []
    first_samples: list[IncidentSample] = []
    last_samples: list[IncidentSample] = []
    alerted: list[str] = []
    reopened: int = 0
    acknowledged_by: str | None = None
    resolved_by: str | None = None
    last_seq: int = 0
    note: str | None = None
    """Set on a 202 answer to ack/resolve: the action is recorded but not applied yet."""


class IncidentList(msgspec.Struct, frozen=True, kw_only=True):
    incidents: list[Incident]
    """Most recently seen first."""
