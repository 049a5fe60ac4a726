"""A task's resources at admission: each field the task leaves out takes the tenant's
default, and no field may exceed the tenant's maximum. Pure (no I/O); the executor
enforces the result (cgroups where the host delegates them, else its watchdog).

Settings (see :mod:`vigil_scheduler.settings`): ``VIGIL_RESOURCES_DEFAULT`` and
``VIGIL_RESOURCES_MAX`` (JSON objects shaped like a task's ``resources``) for every
tenant, ``resources_default``/``resources_max`` per tenant in ``VIGIL_TENANT_LIMITS``.
Unlike egress rules (a list, replaced whole), these merge field by field: a tenant's
``{"memory_mb": 8192}`` maximum raises that one field and keeps the fleet's others. A
field without a maximum is not bounded here (the executor's node settings still apply
where the task's resources leave a field unset).
"""

from __future__ import annotations

import functools

import msgspec

from vigil.errors import InvalidTask
from vigil.messages import Resources

FIELDS = tuple(Resources.__struct_fields__)
UNITS = {"memory_mb": "MiB", "disk_mb": "MiB", "output_mb": "MiB", "pids": "", "cpus": ""}
NONE = Resources()


def merged(base: Resources, over: Resources | None) -> Resources:
    """``base`` with each field ``over`` sets replaced by it."""
    if over is None:
        return base
    return msgspec.structs.replace(base, **{
        f: getattr(over, f) for f in FIELDS if getattr(over, f) is not None})


def effective(spec_resources: Resources | None, tenant: str, default: Resources,
              maximum: Resources) -> Resources | None:
    """The resources the task runs with (None when neither the task nor the defaults set
    any: the executor's node settings apply), or raise InvalidTask naming the first field
    over the tenant's maximum."""
    resources = merged(default, spec_resources)
    for name in FIELDS:
        value, most = getattr(resources, name), getattr(maximum, name)
        if value is not None and most is not None and value > most:
            field = f"$.resources.{name}"
            given = spec_resources is not None and getattr(spec_resources, name) is not None
            source = "" if given else " (the tenant's default)"
            raise InvalidTask(
                f"invalid task spec: resources.{name} {_show(name, value)}{source} is over "
                f"tenant {tenant!r}'s maximum of {_show(name, most)}; ask for at most that, "
                "or ask an operator to raise it (resources_max in VIGIL_TENANT_LIMITS) "
                f"(at {field})", field=field)
    return None if resources == NONE else resources


def check_settings(default: Resources, maximum: Resources, *, default_name: str,
                   max_name: str) -> None:
    """Raise ValueError (naming the setting) if a default is over its maximum: such a
    default would refuse every task that takes it."""
    for name in FIELDS:
        value, most = getattr(default, name), getattr(maximum, name)
        if value is not None and most is not None and value > most:
            raise ValueError(f"{default_name}: {name} {_show(name, value)} is over "
                             f"{max_name}'s {_show(name, most)}")


@functools.lru_cache(maxsize=8)  # read on every admission: parse each setting once
def parse(text: str, setting: str) -> Resources:
    """A ``VIGIL_RESOURCES_*`` value: a JSON object shaped like a task's ``resources``;
    empty means none set."""
    if not text.strip():
        return NONE
    try:
        return msgspec.json.decode(text.encode(), type=Resources)
    except msgspec.DecodeError as exc:
        raise ValueError(f"{setting}: {exc}") from None


def _show(name: str, value: float) -> str:
    unit = UNITS.get(name, "")
    return f"{value:g} {unit}" if unit else f"{value:g}"
