"""Admission: turn a raw submission into a task, or into a precise rejection.

Pure logic (no I/O) so that every rule is unit-tested. The id rule is the public one in
:mod:`vigil.ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import msgspec

from vigil import codec, ids, subjects
from vigil.errors import InvalidTask
from vigil.messages import TaskState, WorkItem
from vigil_scheduler import egress_policy, environments, resources
from vigil_scheduler.settings import SchedulerSettings


@dataclass(frozen=True)
class Admit:
    state: TaskState
    work: WorkItem


@dataclass(frozen=True)
class Reject:
    """A submission that can never run. ``task_id`` is where the failure is recorded."""

    task_id: str | None
    tenant: str | None
    error: str
    field: str | None = None


def tenant_of(subject: str) -> str | None:
    """``vigil.submit.<tenant>`` (or the gateway's ``vigil.submit.<tenant>.gateway``) ->
    tenant, or None when the subject is malformed."""
    parts = subject.split(".")
    if len(parts) not in (3, 4) or f"{parts[0]}.{parts[1]}" != subjects.SUBMIT:
        return None
    if len(parts) == 4 and parts[3] != subjects.GATEWAY_ORIGIN:
        return None
    return parts[2] if ids.is_valid_id(parts[2]) else None


def via_gateway(subject: str) -> bool:
    """Published by the gateway (only its NATS user may publish on that subject): its
    spec ids are ones the platform made (see :mod:`vigil.ids`)."""
    parts = subject.split(".")
    return len(parts) == 4 and parts[3] == subjects.GATEWAY_ORIGIN


def admit(
    data: bytes,
    subject: str,
    msg_id: str | None,
    seq: int,
    now: datetime,
    conf: SchedulerSettings,
    found: environments.Found | None = None,
) -> Admit | Reject:
    """``found``: the environments the submission may name (see
    :func:`vigil_scheduler.environments.lookup`)."""
    tenant = tenant_of(subject)
    fallback_id = ids.task_id_for(None, msg_id, seq)
    if tenant is None:
        return Reject(
            task_id=None,
            tenant=None,
            error=f"subject {subject!r} is not {subjects.SUBMIT}.<tenant> with a tenant "
            "matching [A-Za-z0-9_-]{1,64}",
            field="subject",
        )
    try:
        spec = codec.decode_spec(data, now=now)
    except InvalidTask as exc:
        return Reject(
            # Not JSON (invalid UTF-8 is not JSON either): there is no spec id to salvage.
            task_id=(None if exc.malformed else _salvage_id(data)) or fallback_id,
            tenant=tenant,
            error=str(exc),
            field=exc.field,
        )
    if spec.id is not None and ids.is_platform_id(spec.id) and not via_gateway(subject):
        return Reject(task_id=fallback_id, tenant=tenant,
                      error=f"invalid task spec: {ids.reserved_id_error(spec.id)} (at $.id)",
                      field="$.id")
    task_id = ids.task_id_for(spec.id, msg_id, seq)
    # The environment's defaults first: the tenant's egress limits judge what the task
    # will run with, its environment's egress included.
    merged = environments.apply(spec, tenant, found or {})
    if isinstance(merged, str):
        return Reject(task_id=task_id, tenant=tenant, error=merged, field="$.environment")
    limits = conf.limits_for(tenant)
    try:
        egress = egress_policy.effective(merged, tenant, limits.egress_default,
                                         limits.egress_max)
        wanted = resources.effective(merged.resources, tenant, limits.resources_default,
                                     limits.resources_max)
    except InvalidTask as exc:  # a valid spec the tenant's limits refuse: its id is known
        return Reject(task_id=task_id, tenant=tenant, error=str(exc), field=exc.field)
    resolved = msgspec.structs.replace(
        merged,
        id=task_id,
        image=merged.image or conf.default_image,
        timeout_s=spec.timeout_s or conf.default_timeout_s,
        max_attempts=spec.max_attempts or conf.default_max_attempts,
        egress=egress,
        resources=wanted,
    )
    state = TaskState(
        id=task_id,
        tenant=tenant,
        status="queued",
        created_at=now,
        updated_at=now,
        spec=resolved,
        submit_seq=seq,
        spec_digest=codec.spec_digest(spec),
    )
    work = WorkItem(
        task_id=task_id, tenant=tenant, spec=resolved, submitted_at=now, submit_seq=seq,
        spec_digest=state.spec_digest,
    )
    return Admit(state=state, work=work)


def unreadable(subject: str, msg_id: str | None, seq: int, exc: Exception) -> Reject:
    """A submission :func:`admit` itself failed on: a bug of ours, and a deterministic one
    (admission is pure), so the same submission would fail again on every delivery. It
    is refused at once, recorded as for any invalid submission."""
    tenant = tenant_of(subject)
    return Reject(
        task_id=ids.task_id_for(None, msg_id, seq) if tenant is not None else None,
        tenant=tenant,
        error=f"the scheduler could not read this submission ({exc!r}); this is a bug in "
        "Vigil, please report it with the submission",
    )


def _salvage_id(data: bytes) -> str | None:
    """The spec's own ``id`` when the rest of it is invalid but the id itself is fine."""
    try:
        raw = codec.any_decoder.decode(data)
    except msgspec.DecodeError:
        return None
    if isinstance(raw, dict):
        value = raw.get("id")
        if isinstance(value, str) and ids.is_valid_id(value) and not ids.is_platform_id(value):
            return value
    return None


def failed_state(reject: Reject, seq: int, now: datetime) -> TaskState | None:
    if reject.task_id is None or reject.tenant is None:
        return None
    return TaskState(
        id=reject.task_id,
        tenant=reject.tenant,
        status="failed",
        error=reject.error,
        error_field=reject.field,
        created_at=now,
        updated_at=now,
        finished_at=now,
        submit_seq=seq,
    )

