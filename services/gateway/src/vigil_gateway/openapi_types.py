"""Response bodies the gateway sends that have no type in :mod:`vigil.api` yet.

They exist so ``/openapi.json`` can describe ``/healthz`` and the incident routes from
types rather than hand-written JSON Schema. The incident itself is
:class:`vigil.messages.Incident`, the auditor's own type.
"""

from __future__ import annotations

import msgspec

from vigil.messages import Incident


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /healthz``: 200 when ready, 503 (same body) when not."""

    ok: bool
    nats: bool
    """Whether the gateway's NATS connection is up."""


class IncidentAnswer(Incident, frozen=True, kw_only=True):
    """An incident as the gateway answers with it."""

    note: str | None = None
    """Set on a 202 answer to ack/resolve: the action is recorded but not applied yet."""


class IncidentList(msgspec.Struct, frozen=True, kw_only=True):
    incidents: list[IncidentAnswer]
    """Most recently seen first."""
