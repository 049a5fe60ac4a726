"""How a task gets its id — a public rule, so a raw NATS publisher always knows it.

For a spec published on ``vigil.submit.<tenant>``, the task id is, in order:

1. the spec's ``id`` field, when present;
2. else the ``Nats-Msg-Id`` header, when present and a valid id (``[A-Za-z0-9_-]{1,64}``);
3. else ``s<seq>``, where ``<seq>`` is the stream sequence in the publisher's PubAck.

Ids are global (they are keys of ``vigil-tasks``), so a submission whose id is already
taken by another tenant is refused, and a repeat by the same tenant is a duplicate that
runs nothing.
"""

from __future__ import annotations

import hashlib
import secrets

from vigil.messages import ID_RE

_B32 = "abcdefghijklmnopqrstuvwxyz234567"


def is_valid_id(value: str | None) -> bool:
    return value is not None and ID_RE.fullmatch(value) is not None


def task_id_for(spec_id: str | None, msg_id: str | None, stream_seq: int) -> str:
    """Apply the rule above. ``spec_id`` must already be validated by the spec decoder."""
    if spec_id:
        return spec_id
    if is_valid_id(msg_id):
        assert msg_id is not None
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
