"""How a task gets its id — a public rule, so a raw NATS publisher always knows it.

Ids are per tenant: a task is known by (tenant, id), its key in ``vigil-tasks`` is
``<tenant>.<id>``, and two tenants may use the same id without ever learning of each
other. For a spec published on ``vigil.submit.<tenant>``, the task id is, in order:

1. the spec's ``id`` field, when present;
2. else the ``Nats-Msg-Id`` header, when present and a valid user id;
3. else ``s<seq>``, where ``<seq>`` is the stream sequence in the publisher's PubAck.

Ids the platform makes — ``s<digits>`` (rule 3), and the gateway's ``t_`` + 26 and
``k_`` + 26 base32 characters (a random id; one derived from an ``Idempotency-Key``) —
come from a space user-chosen ids cannot enter: a spec ``id`` of one of those shapes is
refused unless the gateway sent it, and a ``Nats-Msg-Id`` of one of those shapes is not
taken as the id. A repeat of an existing id by its tenant is a duplicate that runs nothing.
"""

from __future__ import annotations

import hashlib
import secrets

from vigil import messages
from vigil.messages import ID_RE

_B32 = "abcdefghijklmnopqrstuvwxyz234567"
PLATFORM_ID_RE = messages.PLATFORM_ID_RE  # the shapes of platform-made ids (see above)


def is_valid_id(value: str | None) -> bool:
    return value is not None and ID_RE.fullmatch(value) is not None


def is_platform_id(value: str) -> bool:
    """Whether ``value`` has the shape of an id the platform makes (reserved to it)."""
    return PLATFORM_ID_RE.fullmatch(value) is not None


reserved_id_error = messages.platform_id_error


def task_id_for(spec_id: str | None, msg_id: str | None, stream_seq: int) -> str:
    """Apply the rule above. ``spec_id`` must already be validated (and, from a tenant,
    checked against :func:`is_platform_id`) by the caller."""
    if spec_id:
        return spec_id
    if msg_id is not None and is_valid_id(msg_id) and not is_platform_id(msg_id):
        return msg_id
    return f"s{stream_seq}"


def _b32(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = []
    for _ in range((len(data) * 8 + 4) // 5):
        out.append(_B32[number & 31])
        number >>= 5
    return "".join(reversed(out))


def new_task_id() -> str:
    """A random id for a submission that brings none: ``t_`` + 26 base32 chars (130 bits)."""
    return "t_" + _b32(secrets.token_bytes(16))


def idempotent_task_id(tenant: str, key: str) -> str:
    """The id the gateway derives from an ``Idempotency-Key``: stable, tenant-scoped."""
    digest = hashlib.sha256(f"{tenant}\x00{key}".encode()).digest()
    return "k_" + _b32(digest[:16])
