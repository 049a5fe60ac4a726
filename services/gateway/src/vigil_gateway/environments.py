"""``/v1/environments``: a tenant's persistent environments (docs/decisions/0015).

The records live in ``vigil-environments`` under ``<tenant>.<name>``: the key holds the
token's tenant, so another tenant's environment of the same name is never even read (it
looks exactly like a missing one). Every change is a compare-and-set on the record, read
again when an executor wrote in between (renewing a task's hold on it).

Roles: a viewer reads; a submitter creates, changes and restores (an environment's
defaults are what a submitter may put on each task anyway; a restore is a new revision,
and the history keeps what it replaced); an operator deletes (the snapshots go with it,
for good). A ``wait`` environment that a task holds is neither restored nor deleted under
it (409): the task's commit would be refused, or lost.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import msgspec
import structlog
from aiohttp import web
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectNotFoundError

from vigil import codec, ids, subjects
from vigil.api import EnvironmentHistory, EnvironmentList, RestoreBody
from vigil.auth import Principal
from vigil.environments import (
    Environment,
    EnvironmentSpec,
    EnvironmentStore,
    configured,
    restored,
    unreferenced,
)
from vigil.jetstream import retrying
from vigil.messages import utcnow
from vigil.secrets import SecretStore
from vigil_gateway import secrets
from vigil_gateway.errors import error

log = structlog.get_logger("vigil.gateway.environments")

CAS_TRIES = 10
_spec_decoder = msgspec.json.Decoder(EnvironmentSpec)
_restore_decoder = msgspec.json.Decoder(RestoreBody)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=codec.encode(body), status=status, headers=headers,
                        content_type="application/json")


def _not_found(name: str) -> web.Response:
    return error(404, "not_found", f"no environment {name!r}")


def _held(env: Environment, what: str) -> web.Response | None:
    """409 when a task holds ``env`` (a ``wait`` environment, a live hold)."""
    held = env.holder
    if env.policy != "wait" or held is None or held.expires_at <= utcnow():
        return None
    return error(409, "held", f"task {held.task_id} (attempt {held.attempt}) holds "
                 f"environment {env.name}; {what} once it has ended (or cancel it)")


def _body(raw: bytes, decoder: msgspec.json.Decoder[Any]) -> Any:
    """The decoded body, or the 400/422 answer naming the field."""
    try:
        return codec.decode_body(raw, decoder)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        message, field = codec.error_field(exc)
        malformed = isinstance(exc, msgspec.DecodeError) and not isinstance(
            exc, msgspec.ValidationError)
        return error(400 if malformed else 422, "invalid_json" if malformed else
                     "invalid_field", message, field="$" if malformed else field)


async def put(request: web.Request, store: EnvironmentStore, secret_store: SecretStore,
              who: Principal) -> web.Response:
    name = request.match_info["name"]
    if not ids.is_valid_id(name):
        return error(400, "invalid_path", "an environment's name is 1-64 of "
                     "[A-Za-z0-9_-]", field="name")
    spec = _body(await request.read(), _spec_decoder)
    if isinstance(spec, web.Response):
        return spec
    if spec.secrets and (refused := await secrets.missing(secret_store, who.tenant, spec)):
        return refused  # as a task naming it is told
    for _ in range(CAS_TRIES):
        got = await store.get(who.tenant, name)
        env = configured(got[0] if got else None, who.tenant, name, spec, utcnow())
        if got is None:
            if await store.create(env) is not None:
                log.info("environment_created", tenant=who.tenant, environment=name,
                         by=who.name)
                return _json(env, 201, {"Location": f"/v1/environments/{name}"})
        elif await store.cas(env, got[1]) is not None:
            log.info("environment_changed", tenant=who.tenant, environment=name, by=who.name)
            return _json(env)
    return _busy(name)


def _busy(name: str) -> web.Response:
    return error(503, "unavailable", f"environment {name} kept changing; retry",
                 headers={"Retry-After": "1"})


async def listing(store: EnvironmentStore, who: Principal) -> web.Response:
    return _json(EnvironmentList(environments=await store.list(who.tenant)))


async def get(request: web.Request, store: EnvironmentStore, who: Principal) -> web.Response:
    name = request.match_info["name"]
    got = await store.get(who.tenant, name) if ids.is_valid_id(name) else None
    return _json(got[0]) if got is not None else _not_found(name)


async def history(request: web.Request, store: EnvironmentStore,
                  who: Principal) -> web.Response:
    name = request.match_info["name"]
    got = await store.get(who.tenant, name) if ids.is_valid_id(name) else None
    if got is None:
        return _not_found(name)
    env = got[0]
    return _json(EnvironmentHistory(name=env.name, revision=env.revision, history=env.history))


async def restore(request: web.Request, store: EnvironmentStore, snapshots: Snapshots,
                  who: Principal) -> web.Response:
    name = request.match_info["name"]
    got = await store.get(who.tenant, name) if ids.is_valid_id(name) else None
    if got is None:
        return _not_found(name)
    body = _body(await request.read(), _restore_decoder)
    if isinstance(body, web.Response):
        return body
    for _ in range(CAS_TRIES):
        if got is None:
            return _not_found(name)
        env, rev = got
        if (busy := _held(env, "restore it")) is not None:
            return busy
        try:
            updated, dropped = restored(env, body.revision, utcnow())
        except ValueError as exc:  # a revision it does not keep (now): the state's, not the body's
            return error(409, "not_kept", str(exc), field="$.revision")
        if await store.cas(updated, rev) is not None:
            snapshots.delete_quietly(dropped)
            log.info("environment_restored", tenant=who.tenant, environment=name,
                     revision=updated.revision, restored_from=body.revision, by=who.name)
            return _json(updated)
        got = await store.get(who.tenant, name)
    return _busy(name)


async def delete(request: web.Request, store: EnvironmentStore, snapshots: Snapshots,
                 who: Principal) -> web.Response:
    name = request.match_info["name"]
    for _ in range(CAS_TRIES):
        got = await store.get(who.tenant, name) if ids.is_valid_id(name) else None
        if got is None:
            return _not_found(name)
        env, rev = got
        if (busy := _held(env, "delete it")) is not None:
            return busy
        if await store.delete(env, rev):
            await snapshots.delete(unreferenced(env.history, []))
            log.info("environment_deleted", tenant=who.tenant, environment=name,
                     snapshots=len(env.history), by=who.name)
            return web.Response(status=204)
    return _busy(name)


class Snapshots:
    """The snapshots of environments (vigil-env-snapshots), which the gateway only
    deletes: those of a deleted environment, and those a restore pushed off its history."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._background: set[asyncio.Task[None]] = set()

    async def delete(self, names: list[str]) -> None:
        """Best effort: a leftover object harms nobody (its name is logged)."""
        if not names:
            return
        store = await retrying("open the snapshot store",
                               lambda: self._js.object_store(subjects.OBJ_ENVIRONMENTS))
        for name in names:
            try:
                await retrying(f"delete snapshot {name}", functools.partial(store.delete, name))
            except (ObjectNotFoundError, NotFoundError):
                continue
            except Exception as exc:
                log.warning("snapshot_delete_failed", snapshot=name, error=str(exc))

    def delete_quietly(self, names: list[str]) -> None:
        """:meth:`delete` off the request's path."""
        if names:
            task = asyncio.create_task(self.delete(names))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
