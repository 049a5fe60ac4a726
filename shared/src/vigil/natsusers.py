"""Tenants' raw NATS users: who may submit, cancel and read task states as a tenant.

A users file (``.vigil/nats-users.json`` for ``vigil up``, 0600: it holds passwords) lists
one entry per user::

    {"users": [{"name": "tenant-acme", "tenant": "acme", "password": "..."}]}

``vigil nats-user add --tenant acme`` appends one and prints its URL once; a running
``vigil up`` notices the change within a second and reloads nats-server, so the new user
works without a restart. ``vigil nats-config --users-file F`` renders the same users into
a production server's config. Each user gets :func:`vigil.permissions.tenant_permissions`
and must connect with its tenant's inbox prefix (:func:`vigil.subjects.tenant_inbox`).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from vigil.errors import SettingsError
from vigil.messages import ID_PATTERN

# Names the platform's own users have: a tenant's user can never be one of them.
RESERVED = frozenset({"admin", "operator", "scheduler", "executor", "auditor", "gateway",
                      "submit", "pytest"})


class TenantUser(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")]
    tenant: Annotated[str, Meta(pattern=ID_PATTERN)]
    password: Annotated[str, Meta(min_length=16)]


class UsersFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    users: list[TenantUser] = []


def default_name(tenant: str) -> str:
    return f"tenant-{tenant}"


def load(path: Path) -> list[TenantUser]:
    if not path.exists():
        return []
    try:
        return msgspec.json.decode(path.read_bytes(), type=UsersFile).users
    except msgspec.DecodeError as exc:
        raise SettingsError(f"{path}: {exc}") from None


def save(path: Path, users: list[TenantUser]) -> None:
    body = json.dumps({"users": [msgspec.to_builtins(u) for u in users]}, indent=2) + "\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(body)
    tmp.replace(path)


def add(path: Path, tenant: str, name: str | None = None) -> TenantUser:
    """Add a user for ``tenant`` (a fresh random password) and return it."""
    name = name or default_name(tenant)
    if name in RESERVED:
        raise SettingsError(f"user name {name!r} belongs to the platform; choose another")
    users = load(path)
    if any(u.name == name for u in users):
        raise SettingsError(f"a NATS user {name!r} exists already in {path}; remove it first "
                            "(`vigil nats-user remove`) or choose another --name")
    try:  # convert, not the constructor: it checks the patterns
        user = msgspec.convert({"name": name, "tenant": tenant,
                                "password": secrets.token_urlsafe(24)}, TenantUser)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid NATS user: {exc}") from None
    save(path, [*users, user])
    return user


def ensure(path: Path, tenant: str) -> TenantUser:
    """The default user of ``tenant``, added if missing (``vigil up`` for its tenant)."""
    for u in load(path):
        if u.name == default_name(tenant):
            return u
    return add(path, tenant)


def remove(path: Path, name: str) -> bool:
    users = load(path)
    kept = [u for u in users if u.name != name]
    if len(kept) == len(users):
        return False
    save(path, kept)
    return True
