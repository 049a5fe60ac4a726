"""Persistent environments: a tenant's named image, default egress and secrets, and a
workspace that outlives tasks (docs/decisions/0015).

The record lives in ``vigil-environments`` under ``<tenant>.<name>``; its workspace
snapshots (tar archives, as checkpoints) in the object store ``vigil-env-snapshots``. A
task that names an environment starts from its current snapshot and, when it succeeds,
commits its workspace as the next ``revision`` by compare-and-set, and only if the
environment is still at the revision the task started from. What a second task gets while
a first runs is the environment's ``policy``:

- ``wait`` (the default): tasks take turns. A task starts only once it holds the
  environment (``holder``: a lease renewed while it runs, expiring if its node dies); one
  that cannot is handed back, spending no attempt, and tries again later.
- ``fail``: tasks run side by side; the first to succeed commits, and a later one whose
  environment moved on meanwhile fails, saying so, its workspace not committed.

Either way no commit overwrites another. The rules are the pure functions here; the
executor, the scheduler and the gateway do the I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Literal

import msgspec
from msgspec import Meta
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from vigil import subjects
from vigil.jetstream import kv_read, kv_write, retrying
from vigil.messages import (
    RESERVED_ENV_PREFIX,
    Egress,
    EnvName,
    ImageRef,
    SecretName,
    TaskSpec,
    _member,
)

Policy = Literal["wait", "fail"]
POLICIES: tuple[str, ...] = ("wait", "fail")
HISTORY_KEPT = 10
"""Snapshots an environment keeps (the current one first); older ones are deleted."""


class EnvironmentSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True,
                      forbid_unknown_fields=True):
    """What a user sets on an environment (``PUT /v1/environments/{name}``): the defaults
    of the tasks that name it, and what a second concurrent task gets."""

    image: ImageRef | None = None
    """The image of its tasks that name none (the platform default otherwise)."""
    egress: Egress | None = None
    """The egress of its tasks that set none."""
    secrets: Annotated[dict[EnvName, SecretName], Meta(max_length=64)] = {}
    """Secrets by reference, ``{ENV_NAME: secret name}``, merged under each task's own."""
    policy: Policy = "wait"
    """``wait``: tasks on it take turns (the default); ``fail``: they run side by side, and
    one whose environment moved on while it ran fails instead of committing."""

    def __post_init__(self) -> None:
        for name in self.secrets:
            if name.startswith(RESERVED_ENV_PREFIX):
                raise ValueError(
                    f"env name {name!r} is reserved (the platform sets VIGIL_* inside the "
                    f"container) - at `{_member('$.secrets', name)}`")


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One revision of an environment's workspace: a tar archive in vigil-env-snapshots."""

    revision: int
    name: str
    """The object's name in vigil-env-snapshots."""
    size: int
    digest: str
    """``sha256:<hex>`` of the archive."""
    committed_at: datetime
    task_id: str | None = None
    """The task whose success committed it; None for a restore."""
    attempt: int = 0
    restored_from: int | None = None
    """Set by a restore: the revision whose snapshot this one made current again."""


class Holder(msgspec.Struct, frozen=True, kw_only=True):
    """The task that holds a ``wait`` environment, until ``expires_at`` unless renewed."""

    task_id: str
    attempt: int
    executor: str
    expires_at: datetime


class Environment(msgspec.Struct, frozen=True, kw_only=True):
    """An environment: the value of ``<tenant>.<name>`` in ``vigil-environments``.

    ``revision`` counts commits (and restores) of its workspace, from 0 (empty: no
    snapshot). ``history`` holds its snapshots newest first, the current one
    (``snapshot``) at its head, at most HISTORY_KEPT. Written with compare-and-set on
    the KV revision, like a task's state.
    """

    name: str
    tenant: str
    image: str | None = None
    egress: Egress | None = None
    secrets: dict[str, str] = {}
    policy: Policy = "wait"
    revision: int = 0
    snapshot: Snapshot | None = None
    history: list[Snapshot] = []
    holder: Holder | None = None
    created_at: datetime
    updated_at: datetime

    @property
    def key(self) -> str:
        return subjects.environment_key(self.tenant, self.name)

    def spec(self) -> EnvironmentSpec:
        return EnvironmentSpec(image=self.image, egress=self.egress, secrets=self.secrets,
                               policy=self.policy)


environment_decoder = msgspec.json.Decoder(Environment)
spec_decoder = msgspec.json.Decoder(EnvironmentSpec)
_encode = msgspec.json.Encoder().encode


# Rules ---------------------------------------------------------------------------------------
def configured(env: Environment | None, tenant: str, name: str, spec: EnvironmentSpec,
               now: datetime) -> Environment:
    """``env`` (or a new, empty one) with the settings of ``spec``; its workspace is
    untouched."""
    if env is None:
        return Environment(name=name, tenant=tenant, image=spec.image, egress=spec.egress,
                           secrets=dict(spec.secrets), policy=spec.policy, created_at=now,
                           updated_at=now)
    return msgspec.structs.replace(env, image=spec.image, egress=spec.egress,
                                   secrets=dict(spec.secrets), policy=spec.policy,
                                   updated_at=now)


def with_defaults(spec: TaskSpec, env: Environment) -> TaskSpec:
    """The task ``spec`` with ``env``'s defaults filled in: its image and egress where the
    task names none, and its secrets merged under the task's own (an environment secret
    whose name the task sets in ``env`` or ``secrets`` is the task's to decide)."""
    own = set(spec.env) | set(spec.secrets)
    secrets = {**{k: v for k, v in env.secrets.items() if k not in own}, **spec.secrets}
    return msgspec.structs.replace(
        spec, image=spec.image or env.image,
        egress=spec.egress if spec.egress is not None else env.egress, secrets=secrets)


@dataclass(frozen=True)
class Busy:
    """Another task holds a ``wait`` environment: wait for it."""

    holder: Holder

    def reason(self, name: str) -> str:
        return (f"waiting for environment {name}: task {self.holder.task_id} (attempt "
                f"{self.holder.attempt}, on {self.holder.executor}) holds it")


def take(env: Environment, task_id: str, attempt: int, executor: str, now: datetime,
         lease_s: float) -> Environment | Busy:
    """``env`` held by this attempt for ``lease_s``, or Busy. An earlier attempt of the
    same task hands its hold on to the next one (a drain, a lost node, a retry: the task
    goes on, and nothing was committed in between); an expired hold is anyone's. A
    ``fail`` environment is never held: ``env`` as it is."""
    if env.policy != "wait":
        return env
    held = env.holder
    if held is not None and held.task_id != task_id and held.expires_at > now:
        return Busy(held)
    holder = Holder(task_id=task_id, attempt=attempt, executor=executor,
                    expires_at=now + timedelta(seconds=lease_s))
    return msgspec.structs.replace(env, holder=holder)


def renewed(env: Environment, task_id: str, attempt: int, now: datetime,
            lease_s: float) -> Environment | None:
    """``env`` with this attempt's hold extended; None when it does not hold it (any
    more: it expired and another task took it, or the policy changed)."""
    held = env.holder
    if held is None or (held.task_id, held.attempt) != (task_id, attempt):
        return None
    return msgspec.structs.replace(
        env, holder=msgspec.structs.replace(held, expires_at=now + timedelta(seconds=lease_s)))


def released(env: Environment, task_id: str) -> Environment | None:
    """``env`` no longer held by task ``task_id``; None when it does not hold it."""
    if env.holder is None or env.holder.task_id != task_id:
        return None
    return msgspec.structs.replace(env, holder=None)


def conflict(env: Environment, base_revision: int, task_id: str, attempt: int) -> str | None:
    """Why this attempt may not commit its workspace to ``env`` (None: it may).

    The environment must still be at the revision the task's workspace started from; a
    ``wait`` environment held by another task is that task's to commit (this attempt lost
    its hold: its node stalled past the lease)."""
    if env.revision != base_revision:
        return (f"environment {env.name} moved from revision {base_revision} to "
                f"{env.revision} while this task ran")
    held = env.holder
    if env.policy == "wait" and held is not None and held.task_id != task_id:
        return (f"environment {env.name} is held by task {held.task_id} (attempt "
                f"{held.attempt}): this attempt ({attempt}) lost its hold on it")
    return None


def committed(env: Environment, snapshot: Snapshot, now: datetime
              ) -> tuple[Environment, list[str]]:
    """``env`` at ``snapshot`` (whose ``revision`` is the next one), its hold released,
    and the snapshot objects no revision it keeps refers to any more (to delete)."""
    history = [snapshot, *env.history]
    kept, dropped = history[:HISTORY_KEPT], history[HISTORY_KEPT:]
    holder = env.holder
    if holder is not None and holder.task_id == snapshot.task_id:
        holder = None
    updated = msgspec.structs.replace(env, revision=snapshot.revision, snapshot=snapshot,
                                      history=kept, holder=holder, updated_at=now)
    return updated, unreferenced(dropped, kept)


def restored(env: Environment, revision: int, now: datetime
             ) -> tuple[Environment, list[str]]:
    """``env`` with the snapshot of ``revision`` current again, as a new revision (history
    keeps what came between). Raises ValueError when ``revision`` is not kept."""
    old = next((s for s in env.history if s.revision == revision), None)
    if old is None:
        kept = ", ".join(str(s.revision) for s in env.history) or "none"
        raise ValueError(f"environment {env.name} keeps no snapshot of revision {revision} "
                         f"(kept: {kept})")
    again = Snapshot(revision=env.revision + 1, name=old.name, size=old.size,
                     digest=old.digest, committed_at=now, restored_from=revision)
    return committed(env, again, now)


def unreferenced(dropped: list[Snapshot], kept: list[Snapshot]) -> list[str]:
    """Object names of ``dropped`` snapshots that no ``kept`` one shares (a restore makes
    two revisions of one object)."""
    live = {s.name for s in kept}
    return sorted({s.name for s in dropped} - live)


def snapshot_name(tenant: str, name: str, revision: int, task_id: str, attempt: int) -> str:
    """``<tenant>/<name>/r<revision>-<task>-a<attempt>``: unique per committing attempt,
    so two tasks racing for one revision never write the same object."""
    return f"{tenant}/{name}/r{revision}-{task_id}-a{attempt}"


WAIT_FIRST_S = 1.0
WAIT_MAX_S = 30.0


def wait_delay(delivery: int) -> float:
    """Hand-back delay of a task waiting for a held environment: 1 s, doubling with the
    work message's deliveries, at most 30 s."""
    return min(WAIT_MAX_S, WAIT_FIRST_S * 2.0 ** min(max(delivery, 1) - 1, 16))


# Store ---------------------------------------------------------------------------------------
class EnvironmentStore:
    """Typed access to ``vigil-environments``, compare-and-set writes, leader reads."""

    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self._js = js
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> EnvironmentStore:
        # As vigil.jetstream.TaskStore: reads go to the stream's leader, since every
        # decision here is a compare-and-set on the newest revision.
        return cls(js, KeyValue(name=subjects.KV_ENVIRONMENTS,
                                stream=f"KV_{subjects.KV_ENVIRONMENTS}",
                                pre=f"$KV.{subjects.KV_ENVIRONMENTS}.", js=js, direct=False))

    async def get(self, tenant: str, name: str) -> tuple[Environment, int] | None:
        """Tenant ``tenant``'s environment ``name`` and its KV revision; None if none."""
        key = subjects.environment_key(tenant, name)

        read = await kv_read(self._kv, key, f"get environment {key}")
        return None if read is None else (environment_decoder.decode(read[0]), read[1])

    async def create(self, env: Environment) -> int | None:
        """Create its key; None if it exists."""
        return await self._write(env, None)

    async def cas(self, env: Environment, revision: int) -> int | None:
        """Write ``env`` if its key is still at ``revision``; None if someone else wrote."""
        return await self._write(env, revision)

    async def _write(self, env: Environment, revision: int | None) -> int | None:
        return await kv_write(self._kv, env.key, _encode(env), revision,
                              f"write environment {env.key}")

    async def change(self, tenant: str, name: str,
                     edit: Callable[[Environment], Environment | None], *, tries: int = 10,
                     ) -> tuple[Environment, int] | None:
        """Read, ``edit``, compare-and-set, again if someone wrote in between (an executor
        renewing its hold). The written environment and revision; None when there is no
        environment, or ``edit`` returned None (nothing to write)."""
        for _ in range(tries):
            got = await self.get(tenant, name)
            if got is None:
                return None
            updated = edit(got[0])
            if updated is None:
                return None
            rev = await self.cas(updated, got[1])
            if rev is not None:
                return updated, rev
        raise EnvironmentBusy(f"environment {name} kept changing ({tries} tries); retry")

    async def delete(self, env: Environment, revision: int) -> bool:
        """Delete ``env``'s key if it is still at ``revision``."""
        async def once() -> bool:
            try:
                await self._kv.delete(env.key, last=revision)
            except KeyWrongLastSequenceError:
                return False
            except Exception as exc:  # nats-py raises the server's APIError as it is
                if getattr(exc, "err_code", None) in (10071, 10164):
                    return False
                raise
            return True

        return await retrying(f"delete environment {env.key}", once)

    async def list(self, tenant: str) -> list[Environment]:
        """Tenant ``tenant``'s environments, by name. The stream's per-subject counts name
        the keys (no consumer), then each is read."""
        stream = f"KV_{subjects.KV_ENVIRONMENTS}"
        filter_ = subjects.environment_kv_subject(tenant)
        try:
            info = await retrying("list environments",
                                  lambda: self._js.stream_info(stream, subjects_filter=filter_))
        except NotFoundError:
            return []
        prefix = subjects.environment_kv_subject(tenant, "")
        names = sorted(s.removeprefix(prefix) for s in (info.state.subjects or {}))
        found = []
        for name in names:
            got = await self.get(tenant, name)
            if got is not None:
                found.append(got[0])
        return found


class EnvironmentBusy(Exception):
    """An environment kept changing under a read-modify-write: retry later."""

