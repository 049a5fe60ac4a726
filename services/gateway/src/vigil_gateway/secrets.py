"""``/v1/secrets``: a tenant's secrets, write-only. Operators of the tenant set, list and
remove them; no answer, log line or error message ever holds a value (the value is read
from the request body, sealed with :class:`vigil.secrets.Keyring` and dropped).

Tenants are walled apart by the key: ``<tenant>.<name>`` with the tenant from the token,
so another tenant's secret is never read, and looks exactly like a missing one (404). A
platform token manages no tenant's secrets (403).

``POST /v1/tasks`` asks :func:`missing` whether the secrets a spec names exist (a read
per name), so a typo is a 422 naming ``$.secrets.ENV_NAME`` at once rather than a task
that fails on its executor later.
"""

from __future__ import annotations

import msgspec
import structlog
from aiohttp import web

from vigil import codec
from vigil.api import SecretBody, SecretInfo, SecretList
from vigil.auth import Principal
from vigil.environments import EnvironmentSpec
from vigil.messages import TaskSpec
from vigil.secrets import (
    MAX_VALUE_BYTES,
    NAME_RE,
    SETTINGS_HINT,
    Keyring,
    SecretError,
    SecretStore,
    Stored,
)
from vigil_gateway.errors import error

log = structlog.get_logger("vigil.gateway.secrets")

_body_decoder = msgspec.json.Decoder(SecretBody)
# Writes of one secret that lose a compare-and-set to a concurrent write are retried this
# often (the last write wins, as with any PUT).
CAS_TRIES = 5


def info(stored: Stored) -> SecretInfo:
    s = stored.sealed
    return SecretInfo(name=stored.name, size=s.size, key_id=s.key_id,
                      created_at=s.created_at, updated_at=s.updated_at)


def _json(body: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=codec.encode(body), status=status,
                        content_type="application/json")


def _name(request: web.Request) -> str | None:
    name = request.match_info["name"]
    return name if NAME_RE.fullmatch(name) else None


def _not_found(name: str) -> web.Response:
    return error(404, "not_found", f"no secret {name!r} in this tenant; set it with "
                 f"`vigil secret set {name}` (or PUT /v1/secrets/{name})")


async def put(request: web.Request, store: SecretStore, keyring: Keyring | None,
              who: Principal) -> web.Response:
    name = _name(request)
    if name is None:
        return error(400, "invalid_path", "a secret name is 1-64 letters, digits, `_` or "
                     "`-`", field="name")
    if keyring is None:
        return error(503, "secrets_not_configured",
                     f"this gateway has no key to seal secrets with; {SETTINGS_HINT}")
    raw = await request.read()
    try:
        codec.check_utf8(raw)
        body = _body_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        message, field = codec.error_field(exc)
        return error(422, "invalid_field", message, field=field)
    except msgspec.DecodeError as exc:
        return error(400, "invalid_json", f"the body is not JSON: {exc}", field="$")
    size = len(body.value.encode())
    if size > MAX_VALUE_BYTES:
        return error(422, "invalid_field", f"the value is {size} bytes of UTF-8; at most "
                     f"{MAX_VALUE_BYTES}", field="$.value")
    if "\x00" in body.value:
        return error(422, "invalid_field", "a NUL byte cannot be passed to a process (the "
                     "value becomes an environment variable); encode binary values, e.g. "
                     "base64", field="$.value")
    for _ in range(CAS_TRIES):
        current = await store.get(who.tenant, name)
        sealed = keyring.seal(who.tenant, name, body.value,
                              created_at=current.sealed.created_at if current else None)
        revision = await store.put(who.tenant, name, sealed,
                                   current.revision if current else None)
        if revision is not None:
            log.info("secret_set", tenant=who.tenant, secret=name, by=who.name, size=size,
                     key_id=sealed.key_id, created=current is None)
            return _json(info(Stored(who.tenant, name, sealed, revision)),
                         201 if current is None else 200)
    return error(409, "conflict", f"secret {name!r} kept changing under this request; "
                 "try again")


async def list_secrets(request: web.Request, store: SecretStore,
                       who: Principal) -> web.Response:
    return _json(SecretList(secrets=[info(s) for s in await store.all(who.tenant)]))


async def get(request: web.Request, store: SecretStore, who: Principal) -> web.Response:
    name = _name(request)
    found = await store.get(who.tenant, name) if name is not None else None
    if found is None:
        return _not_found(request.match_info["name"])
    return _json(info(found))


async def delete(request: web.Request, store: SecretStore, who: Principal) -> web.Response:
    name = _name(request)
    found = await store.get(who.tenant, name) if name is not None else None
    if found is None or name is None:
        return _not_found(request.match_info["name"])
    await store.delete(who.tenant, name)
    log.info("secret_removed", tenant=who.tenant, secret=name, by=who.name)
    return web.Response(status=204)


async def missing(store: SecretStore, tenant: str, spec: TaskSpec | EnvironmentSpec
                  ) -> web.Response | None:
    """A 422 naming the first secret ``spec`` (a task's, or an environment's defaults)
    refers to that ``tenant`` does not have."""
    for env_name, name in spec.secrets.items():
        try:
            found = await store.get(tenant, name)
        except SecretError:  # there, if unreadable: the executor fails the task saying so
            continue
        if found is None:
            return error(422, "invalid_field",
                         f"secret {name!r} (for ${env_name}) does not exist in this tenant; "
                         f"set it first: `vigil secret set {name}`",
                         field=f"$.secrets.{env_name}")  # an EnvName: a plain key
    return None
