"""A task's egress at admission: the tenant's default when it names none, within the
tenant's maximum when it does. Pure (no I/O); the rules' meaning is
:mod:`vigil.egress`'s, the executor's proxy enforces the result.

Settings (see :mod:`vigil_scheduler.settings`): ``VIGIL_EGRESS_DEFAULT`` and
``VIGIL_EGRESS_MAX`` for every tenant, ``egress_default``/``egress_max`` per tenant in
``VIGIL_TENANT_LIMITS``. The maximum ``*`` allows anything; a tenant's default must be
within its maximum (checked at start).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from vigil.egress import PROXY_ENV, Rule, parse_rule
from vigil.errors import InvalidTask
from vigil.messages import Egress, TaskSpec


def effective(spec: TaskSpec, tenant: str, default: Sequence[str],
              maximum: Sequence[str]) -> Egress | None:
    """The egress the task runs with, or raise InvalidTask naming the field that is not
    allowed. ``egress`` left out takes the tenant's ``default``; ``{"allow": []}`` is
    an explicit "no way out"."""
    if spec.egress is None:
        egress = Egress(allow=list(default)) if default else None
    else:
        egress = spec.egress
        allowed = _maximum(tuple(maximum))
        for i, text in enumerate(egress.allow):
            field = f"$.egress.allow[{i}]"
            try:
                rule = parse_rule(text)
            except ValueError as exc:
                raise _invalid(str(exc), field) from None
            if not within(rule, allowed):
                raise _invalid(f"egress rule {text!r} is not within tenant {tenant!r}'s egress "
                               f"maximum {list(maximum)}; ask an operator to widen it "
                               "(egress_max in VIGIL_TENANT_LIMITS)", field)
    if egress is not None and egress.allow:
        for name in PROXY_ENV:
            if name in spec.env:
                field = f"$.env.{name}"
                raise _invalid(f"{name} is set by the platform when the task has egress (its "
                               "proxy); leave it out", field)
    return egress


def within(rule: Rule, maximum: Sequence[Rule]) -> bool:
    """Whether every host and port ``rule`` allows is allowed by some rule of ``maximum``
    (each port may be covered by a different one)."""
    assert rule.ports is not None  # a task's rule always names its ports
    return all(any(_host_within(rule, m) and (m.ports is None or port in m.ports)
                   for m in maximum) for port in rule.ports)


def _host_within(rule: Rule, outer: Rule) -> bool:
    """Whether every host ``rule`` names is one ``outer`` names."""
    if outer.any_host:
        return True
    if outer.address or rule.address:
        return outer.address and rule.address and outer.host == rule.host
    if not outer.wildcard:
        return not rule.wildcard and rule.host == outer.host
    # *.d covers x.d, *.d itself, and *.e for any e under d.
    return rule.host.endswith("." + outer.host) or (rule.wildcard and rule.host == outer.host)


def check_settings(default: Sequence[str], maximum: Sequence[str], *, default_name: str,
                   max_name: str) -> None:
    """Raise ValueError (naming the setting) unless every rule parses and the default is
    within the maximum: a default the maximum refuses would refuse every task taking it."""
    try:
        allowed = _maximum(tuple(maximum))
    except ValueError as exc:
        raise ValueError(f"{max_name}: {exc}") from None
    for text in default:
        try:
            rule = parse_rule(text)
        except ValueError as exc:
            raise ValueError(f"{default_name}: {exc}") from None
        if not within(rule, allowed):
            raise ValueError(f"{default_name}: {text!r} is not within {max_name} "
                             f"{list(maximum)}")


def split(text: str) -> tuple[str, ...]:
    """A comma-separated rule list (the ``VIGIL_EGRESS_*`` variables)."""
    return tuple(filter(None, (part.strip() for part in text.split(","))))


@functools.lru_cache(maxsize=64)
def _maximum(texts: tuple[str, ...]) -> tuple[Rule, ...]:
    return tuple(parse_rule(t, maximum=True) for t in texts)


def _invalid(message: str, field: str) -> InvalidTask:
    # The shape decode_spec gives: the gateway names the field from "(at <path>)".
    return InvalidTask(f"invalid task spec: {message} (at {field})", field=field)
