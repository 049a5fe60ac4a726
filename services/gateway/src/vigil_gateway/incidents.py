"""``/v1/incidents``: the auditor's incidents, read from ``vigil-incidents``; ack and
resolve are published as operator confessions (the auditor applies them in order, so the
issues stream stays the single source of truth and a replay rebuilds the same state).

Tenant isolation: a platform incident can span tenants. A tenant's token — whatever its
role — sees only incidents that touched its tenant, with samples, tenants and tasks
narrowed to its own: its tasks are the incident's ``tenant_tasks`` entry for that tenant
(every task of the tenant it hit, up to the auditor's bound), never other tenants' tasks
or the overall ``tasks_total``. Its operators acknowledge and resolve only its tenant's
own incidents (what its agents confessed); the platform's incidents are acted on by
platform tokens, which see every incident whole (see vigil.auth).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from vigil import codec, ids, subjects
from vigil.auth import Principal
from vigil.jetstream import publish, retrying
from vigil.messages import SEVERITIES, Confession, utcnow

STATUSES = ("open", "acknowledged", "resolved")
WAIT_S = 5.0


# What a tenant's view of an incident drops: they describe every tenant's activity (how
# often, when, the stream position, the escalation window), where the view shows the
# tenant's own (from tenant_stats).
_PLATFORM_WIDE = ("tasks_total", "tenant_tasks", "tenant_stats", "window_start",
                  "window_count", "last_seq", "alerted")
_INTERNAL = ("tasks_sketch",)  # the auditor's bookkeeping: nobody's view


def visible(incident: dict[str, Any], who: Principal) -> dict[str, Any] | None:
    """``incident`` as ``who`` may see it, or None when it is none of its business."""
    incident = {k: v for k, v in incident.items() if k not in _INTERNAL}
    return _visible(incident, who)


def _visible(incident: dict[str, Any], who: Principal) -> dict[str, Any] | None:
    if who.platform:
        return incident
    stats = incident.get("tenant_stats") or {}
    mine = stats.get(who.tenant) if isinstance(stats, dict) else None
    if who.tenant not in incident.get("tenants", []) and mine is None:
        return None
    narrowed = dict(incident)
    narrowed["tenants"] = [who.tenant]
    for key in ("first_samples", "last_samples"):
        narrowed[key] = [s for s in incident.get(key, []) if s.get("tenant") == who.tenant]
    per_tenant = incident.get("tenant_tasks")
    tasks = list(per_tenant.get(who.tenant, [])) if isinstance(per_tenant, dict) else []
    # An incident written before tasks were kept per tenant knows some only from samples.
    sampled = {s["task_id"] for k in ("first_samples", "last_samples") for s in narrowed[k]
               if s.get("task_id")}
    narrowed["tasks"] = tasks + sorted(sampled - set(tasks))
    if isinstance(mine, dict):
        narrowed["count"] = mine.get("count", 0)
        narrowed["first_seen"] = mine.get("first_seen", incident.get("first_seen"))
        narrowed["last_seen"] = mine.get("last_seen", incident.get("last_seen"))
    else:  # written before counts were kept per tenant: what the tenant's tasks tell
        narrowed["count"] = len(narrowed["tasks"])
    if incident.get("tenant") != who.tenant:
        narrowed.pop("reopened", None)  # a shared incident's lifecycle is the platform's
    for key in _PLATFORM_WIDE:
        narrowed.pop(key, None)
    narrowed["window_start"] = narrowed["first_seen"]  # required by the type; the tenant's
    return narrowed


class Incidents:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(subjects.KV_INCIDENTS)
        return self._kv

    async def get(self, incident_id: str) -> dict[str, Any] | None:
        if not ids.is_valid_id(incident_id):
            return None
        kv = await self.kv()
        try:
            entry = await retrying("read incident", lambda: kv.get(incident_id))
        except KeyNotFoundError:
            return None
        data: dict[str, Any] = codec.any_decoder.decode(entry.value or b"{}")
        return data

    async def all(self) -> list[dict[str, Any]]:
        kv = await self.kv()
        try:
            keys = await retrying("list incidents", kv.keys)
        except NoKeysError:
            return []
        found = await asyncio.gather(*[self.get(k) for k in keys])
        return [i for i in found if i is not None]

    async def act(self, incident_id: str, action: str, who: Principal) -> None:
        """Publish the operator's action; the auditor applies it in stream order."""
        now = utcnow()
        confession = Confession(
            id=f"operator-{action}-{incident_id}-{int(now.timestamp() * 1000)}",
            summary=f"{who.name} {action.split('_', 1)[1]}d incident {incident_id}",
            severity="info", category=action, source="operator", component="gateway",
            time=now, data={"incident_id": incident_id, "by": who.name},
        )
        await publish(self._js, subjects.issue("operator", "info"), codec.encode(confession),
                      confession.id or "")


def _problem(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if field:
        body["field"] = field
    return web.json_response({"error": body}, status=status)


async def list_incidents(request: web.Request, store: Incidents, who: Principal) -> web.Response:
    q = request.query
    status, severity, tenant = q.get("status"), q.get("severity"), q.get("tenant")
    known = {"status", "severity", "tenant"}
    for name in q:
        if name not in known:
            return _problem(400, "invalid_query", f"unknown query parameter {name!r}; known: "
                            f"{', '.join(sorted(known))}", name)
    if tenant is not None and not ids.is_valid_id(tenant):
        return _problem(400, "invalid_query", "tenant must be a tenant name "
                        "([A-Za-z0-9_-]{1,64})", "tenant")
    if tenant is not None and not who.platform and tenant != who.tenant:
        return _problem(403, "forbidden", f"your token is for tenant {who.tenant!r}; it "
                        f"cannot list tenant {tenant!r}", "tenant")
    if status is not None and status not in STATUSES:
        return _problem(400, "invalid_query", f"status must be one of {', '.join(STATUSES)}",
                        "status")
    if severity is not None and severity not in SEVERITIES:
        return _problem(400, "invalid_query",
                        f"severity must be one of {', '.join(SEVERITIES)}", "severity")
    shown = []
    for incident in await store.all():
        view = visible(incident, who)
        if view is None:
            continue
        if status and view["status"] != status:
            continue
        if severity and view["severity"] != severity:
            continue
        if tenant and tenant not in view.get("tenants", []):
            continue
        shown.append(view)
    shown.sort(key=lambda i: i["last_seen"], reverse=True)
    return web.json_response({"incidents": shown})


async def get_incident(request: web.Request, store: Incidents, who: Principal) -> web.Response:
    incident = await store.get(request.match_info["id"])
    view = visible(incident, who) if incident else None
    if view is None:
        return _problem(404, "not_found", f"no incident {request.match_info['id']!r}")
    return web.json_response(view)


async def change(request: web.Request, store: Incidents, who: Principal,
                 action: str) -> web.Response:
    incident_id = request.match_info["id"]
    incident = await store.get(incident_id)
    if incident is None or visible(incident, who) is None:
        return _problem(404, "not_found", f"no incident {incident_id!r}")
    if not who.platform and incident.get("tenant") != who.tenant:
        return _problem(403, "forbidden", "this is a platform incident (its source is "
                        f"{incident.get('source')!r}, not your agents): the platform's "
                        "operators acknowledge and resolve it")
    target = "acknowledged" if action == "incident_ack" else "resolved"
    if incident["status"] == target:
        return web.json_response(visible(incident, who))
    if action == "incident_ack" and incident["status"] == "resolved":
        return _problem(409, "conflict", "the incident is resolved; it reopens by itself if "
                        "the problem recurs")
    await store.act(incident_id, action, who)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while loop.time() < deadline:
        current = await store.get(incident_id)
        if current is not None and current["status"] == target:
            return web.json_response(visible(current, who))
        await asyncio.sleep(0.05)
    return web.json_response({**(visible(incident, who) or {}),
                              "note": "accepted; the auditor has not applied it yet"},
                             status=202)

