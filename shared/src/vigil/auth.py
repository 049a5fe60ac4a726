"""Gateway API tokens: stored hashed, looked up by digest, mapped to a tenant and a role.

A tokens file is JSON::

    {"tokens": [{"name": "ci", "tenant": "acme", "role": "submitter",
                 "sha256": "<hex digest of the token>"},
                {"name": "oncall", "scope": "platform", "role": "operator",
                 "sha256": "<hex digest>"}]}

Only digests are stored; :func:`new_token` makes a token and its entry. Roles:
``viewer`` reads, ``submitter`` also submits and cancels, ``operator`` also acknowledges
and resolves incidents. A role never widens a token beyond its tenant: a ``tenant`` token
(the default scope) sees and acts on its own tenant only, whatever its role. Cross-tenant
access is its own kind of token: ``scope: "platform"`` has no tenant, sees every tenant's
incidents and executors, acknowledges and resolves platform incidents, and reads no task
(tasks belong to tenants; a platform operator uses ``vigil replay`` on NATS for those).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from vigil.errors import SettingsError
from vigil.messages import ID_PATTERN

Role = Literal["viewer", "submitter", "operator"]
ROLES: tuple[str, ...] = ("viewer", "submitter", "operator")
Scope = Literal["tenant", "platform"]
PLATFORM_TENANT = "*"  # a platform principal's tenant: matches no tenant's name
TOKEN_PREFIX = "vgl_"  # noqa: S105 - a prefix that makes leaked tokens greppable


class TokenEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                 omit_defaults=True):
    name: str
    tenant: Annotated[str, Meta(pattern=ID_PATTERN)] | None = None
    role: Role
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
    scope: Scope = "tenant"

    def __post_init__(self) -> None:
        if self.scope == "tenant" and self.tenant is None:
            raise ValueError(f"token {self.name!r} needs a tenant (or scope \"platform\")")
        if self.scope == "platform" and self.tenant is not None:
            raise ValueError(f"platform token {self.name!r} must not name a tenant")


class TokensFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tokens: list[TokenEntry] = []


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    tenant: str  # PLATFORM_TENANT for a platform token
    role: Role
    scope: Scope = "tenant"

    @property
    def platform(self) -> bool:
        return self.scope == "platform"

    def can(self, role: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class TokenBook:
    def __init__(self, entries: list[TokenEntry]) -> None:
        self._by_digest = {e.sha256: e for e in entries}

    @classmethod
    def load(cls, path: str | Path) -> TokenBook:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SettingsError(f"VIGIL_TOKENS_FILE: cannot read {path}: {exc.strerror}") from None
        try:
            parsed = msgspec.json.decode(data, type=TokensFile)
        except msgspec.DecodeError as exc:
            raise SettingsError(f"VIGIL_TOKENS_FILE: {path}: {exc}") from None
        return cls(parsed.tokens)

    @classmethod
    def parse(cls, text: str, where: str = "VIGIL_TOKENS") -> TokenBook:
        """Entries from tokens-file JSON held in a string (e.g. an env variable)."""
        try:
            parsed = msgspec.json.decode(text.encode(), type=TokensFile)
        except msgspec.DecodeError as exc:
            raise SettingsError(f"{where}: {exc}") from None
        return cls(parsed.tokens)

    def merged(self, other: TokenBook) -> TokenBook:
        return TokenBook([*self._by_digest.values(), *other._by_digest.values()])

    def __len__(self) -> int:
        return len(self._by_digest)

    def verify(self, token: str) -> Principal | None:
        d = digest(token)
        entry = self._by_digest.get(d)
        # The dict lookup is by digest (a token's digest reveals nothing usable); compare
        # in constant time anyway so no code path depends on secret bytes.
        if entry is None or not hmac.compare_digest(entry.sha256, d):
            return None
        return Principal(name=entry.name, tenant=entry.tenant or PLATFORM_TENANT,
                         role=entry.role, scope=entry.scope)


def add_token(path: str | Path, name: str, tenant: str | None, role: Role,
              scope: Scope = "tenant") -> str:
    """Create a token, append its digest to ``path`` (created 0600), return the token.
    A ``platform`` token has no tenant; a ``tenant`` one must have one."""
    p = Path(path)
    existing = TokenBook.load(p)._by_digest.values() if p.exists() else []
    token = new_token()
    try:
        entry = TokenEntry(name=name, tenant=tenant, role=role, sha256=digest(token),
                           scope=scope)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    entries = [*existing, entry]
    body = json.dumps({"tokens": [msgspec.to_builtins(e) for e in entries]}, indent=2)
    tmp = p.with_suffix(p.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(body + "\n")
    tmp.replace(p)
    return token
