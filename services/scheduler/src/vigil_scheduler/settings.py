"""Scheduler settings (``VIGIL_*`` environment variables)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated

import msgspec
from msgspec import Meta

from vigil.messages import ID_PATTERN
from vigil.settings import CommonSettings, default_node_id


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
    20}}``."""
    unservable_after_s: Annotated[float, Meta(ge=0, le=600)] = 6.0
    """After start, how long to wait for executors to advertise themselves before saying
    that a task's pool (or labels) has no live executor."""
    dispatch_interval_s: Annotated[float, Meta(gt=0, le=5)] = 0.05
    """How often the dispatcher looks for capacity when it has nothing else to wake it."""

    def __post_init__(self) -> None:
        self.limits_for("")  # a malformed VIGIL_TENANT_LIMITS fails at start

    def limits_for(self, tenant: str) -> Limits:
        own = _limits_table(self.tenant_limits).get(tenant)
        return Limits(
            max_queued=own.max_queued if own and own.max_queued else self.max_queued_per_tenant,
            max_running=(own.max_running if own and own.max_running
                         else self.max_running_per_tenant),
        )


@dataclass(frozen=True)
class Limits:
    max_queued: int
    max_running: int


class TenantLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_queued: Annotated[int, Meta(ge=1)] | None = None
    max_running: Annotated[int, Meta(ge=1)] | None = None


@functools.lru_cache(maxsize=4)
def _limits_table(text: str) -> dict[str, TenantLimits]:
    if not text:
        return {}
    try:
        return msgspec.json.decode(text.encode(), type=dict[str, TenantLimits])
    except msgspec.DecodeError as exc:
        raise ValueError(f"VIGIL_TENANT_LIMITS: {exc}") from None
