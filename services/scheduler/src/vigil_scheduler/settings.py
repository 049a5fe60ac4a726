"""Scheduler settings (``VIGIL_*`` environment variables)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated

import msgspec
from msgspec import Meta

from vigil.messages import ID_PATTERN, Resources
from vigil.settings import CommonSettings, default_node_id
from vigil_scheduler import egress_policy, resources


class SchedulerSettings(CommonSettings, frozen=True, kw_only=True):
    node_id: Annotated[str, Meta(pattern=ID_PATTERN)] = msgspec.field(
        default_factory=default_node_id
    )
    """This instance's name: in its confessions, and as the dispatcher lease's holder.
    Default: the hostname."""
    default_image: str = "localhost/vigil-agent:latest"
    """Image for tasks that name none."""
    default_timeout_s: Annotated[float, Meta(gt=0)] = 3600.0
    """Wall-clock limit for tasks that set no ``timeout_s``."""
    default_max_attempts: Annotated[int, Meta(ge=1, le=40)] = 3
    """Attempts for tasks that set no ``max_attempts``."""
    batch: Annotated[int, Meta(ge=1, le=4096)] = 256
    """Submissions handled concurrently (pipelines their JetStream writes)."""
    max_queued_per_tenant: Annotated[int, Meta(ge=1)] = 10_000
    """Queued (admitted, not yet started) tasks a tenant may have; more are rejected
    (429 at the gateway; a failed state, a ``rejected`` event and a confession for raw
    NATS publishers)."""
    max_running_per_tenant: Annotated[int, Meta(ge=1)] = 1_000
    """Tasks of one tenant released to executors at once; the rest wait their turn."""
    tenant_limits: str = ""
    """Per-tenant overrides as JSON, e.g. ``{"acme": {"max_queued": 500, "max_running":
    20, "egress_default": ["pypi.org", "*.pythonhosted.org:443"], "egress_max":
    ["*.pypi.org", "pypi.org", "*.pythonhosted.org:443"]}}``."""
    egress_default: str = ""
    """Egress rules, comma separated, for tasks that name no ``egress`` (a tenant's
    ``egress_default`` in VIGIL_TENANT_LIMITS replaces it). Empty: no way out."""
    egress_max: str = "*"
    """The most a task's ``egress`` may allow, comma separated (a tenant's ``egress_max``
    replaces it): a rule not within it is rejected naming ``$.egress.allow[i]``. ``*``
    allows anything, ``*:443`` any host on that port; else rules as in a task."""
    resources_default: str = ""
    """Resources for tasks, as JSON shaped like a task's ``resources`` (e.g. ``{"memory_mb":
    1024, "disk_mb": 4096, "pids": 256}``): each field a task leaves out takes this value
    (a tenant's ``resources_default`` in VIGIL_TENANT_LIMITS overrides it field by field).
    A field set nowhere is the executor's node setting (VIGIL_MEMORY_MB ...)."""
    resources_max: str = ""
    """The most a task's ``resources`` may ask for, JSON as for VIGIL_RESOURCES_DEFAULT (a
    tenant's ``resources_max`` overrides it field by field): a task over it is rejected
    naming ``$.resources.<field>`` and the maximum. A field without one is not bounded."""
    unservable_after_s: Annotated[float, Meta(ge=0, le=600)] = 6.0
    """After start, how long to wait for executors to advertise themselves before saying
    that a task's pool (or labels) has no live executor."""
    dispatch_interval_s: Annotated[float, Meta(gt=0, le=5)] = 0.05
    """How often the dispatcher looks for capacity when it has nothing else to wake it."""

    def __post_init__(self) -> None:
        # A malformed VIGIL_TENANT_LIMITS, or egress rules that could never work, fail
        # at start, naming the setting.
        fleet = self.limits_for("")
        egress_policy.check_settings(fleet.egress_default, fleet.egress_max,
                                     default_name="VIGIL_EGRESS_DEFAULT",
                                     max_name="VIGIL_EGRESS_MAX")
        resources.check_settings(fleet.resources_default, fleet.resources_max,
                                 default_name="VIGIL_RESOURCES_DEFAULT",
                                 max_name="VIGIL_RESOURCES_MAX")
        for tenant in _limits_table(self.tenant_limits):
            limits = self.limits_for(tenant)
            where = f"VIGIL_TENANT_LIMITS: tenant {tenant!r}"
            resources.check_settings(limits.resources_default, limits.resources_max,
                                     default_name=f"{where} resources_default (with "
                                     "VIGIL_RESOURCES_DEFAULT)",
                                     max_name="its resources_max (with VIGIL_RESOURCES_MAX)")
            egress_policy.check_settings(limits.egress_default, limits.egress_max,
                                         default_name=f"{where} egress_default (or "
                                         "VIGIL_EGRESS_DEFAULT)",
                                         max_name="its egress_max (or VIGIL_EGRESS_MAX)")

    def limits_for(self, tenant: str) -> Limits:
        own = _limits_table(self.tenant_limits).get(tenant)
        return Limits(
            max_queued=own.max_queued if own and own.max_queued else self.max_queued_per_tenant,
            max_running=(own.max_running if own and own.max_running
                         else self.max_running_per_tenant),
            egress_default=(tuple(own.egress_default) if own and own.egress_default is not None
                            else egress_policy.split(self.egress_default)),
            egress_max=(tuple(own.egress_max) if own and own.egress_max is not None
                        else egress_policy.split(self.egress_max)),
            resources_default=resources.merged(
                resources.parse(self.resources_default, "VIGIL_RESOURCES_DEFAULT"),
                own.resources_default if own else None),
            resources_max=resources.merged(
                resources.parse(self.resources_max, "VIGIL_RESOURCES_MAX"),
                own.resources_max if own else None),
        )


@dataclass(frozen=True)
class Limits:
    max_queued: int
    max_running: int
    egress_default: tuple[str, ...] = ()
    egress_max: tuple[str, ...] = ("*",)
    resources_default: Resources = resources.NONE
    resources_max: Resources = resources.NONE


class TenantLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_queued: Annotated[int, Meta(ge=1)] | None = None
    max_running: Annotated[int, Meta(ge=1)] | None = None
    egress_default: Annotated[list[str], Meta(max_length=64)] | None = None
    """Egress rules for the tenant's tasks that name none (replaces VIGIL_EGRESS_DEFAULT)."""
    egress_max: Annotated[list[str], Meta(max_length=256)] | None = None
    """The most the tenant's tasks may allow (replaces VIGIL_EGRESS_MAX); ``[]``: nothing."""
    resources_default: Resources | None = None
    """Resources for the tenant's tasks that leave a field out (each field it sets
    replaces VIGIL_RESOURCES_DEFAULT's)."""
    resources_max: Resources | None = None
    """The most the tenant's tasks may ask for (each field it sets replaces
    VIGIL_RESOURCES_MAX's)."""


@functools.lru_cache(maxsize=4)
def _limits_table(text: str) -> dict[str, TenantLimits]:
    if not text:
        return {}
    try:
        return msgspec.json.decode(text.encode(), type=dict[str, TenantLimits])
    except msgspec.DecodeError as exc:
        raise ValueError(f"VIGIL_TENANT_LIMITS: {exc}") from None
