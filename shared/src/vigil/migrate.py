"""``vigil replay migrate-keys``: move ``vigil-tasks`` to the per-tenant key layout of 0.2.

Before 0.2 a task's key was its id (ids were global); since, it is ``<tenant>.<id>`` (ids
are per tenant, and a tenant's NATS user may read only keys under its tenant). This moves
every old-layout key — one without a dot, whose value is a task state — to its new key:
create the new key (never overwriting one that exists), then delete the old one at the
revision that was read (so a write in between is not lost: that key is left, reported, and
moved by the next run). Dry run first; idempotent; rate-limited with progress.

What it does not move, by design (see README "Upgrading to 0.2"): events stay on their
old subjects ``vigil.events.<id>.<kind>`` (``vigil replay stream VIGIL_EVENTS --subject
'vigil.events.<id>.>'`` still reads them), and timers and work items of the old layout —
drain the platform (let tasks finish, or cancel them) before upgrading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TextIO

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from vigil import codec, subjects
from vigil.jetstream import retrying
from vigil.messages import TaskState
from vigil.progress import paced
from vigil.replay import read_bucket


@dataclass(frozen=True)
class OldKey:
    key: str
    revision: int
    state: TaskState

    @property
    def new_key(self) -> str:
        return subjects.task_key(self.state.tenant, self.state.id)


@dataclass
class Plan:
    moves: list[OldKey] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # old key -> why not


@dataclass
class Result:
    moved: int = 0
    already: int = 0  # the new key existed (an earlier, interrupted run): old one deleted
    changed: list[str] = field(default_factory=list)  # written meanwhile: left for a rerun


async def plan(js: JetStreamContext) -> Plan:
    out = Plan()
    for key, (value, rev) in sorted((await read_bucket(js, subjects.KV_TASKS)).items()):
        if "." in key:
            continue  # the new layout already
        try:
            state = codec.state_decoder.decode(value)
        except msgspec.DecodeError as exc:
            out.skipped[key] = f"not a task state ({exc})"
            continue
        if state.id != key:
            out.skipped[key] = f"its value is task {state.id!r}, not {key!r}"
            continue
        out.moves.append(OldKey(key, rev, state))
    return out


async def run(js: JetStreamContext, moves: list[OldKey], *, rate: float,
              err: TextIO) -> Result:
    kv = await js.key_value(subjects.KV_TASKS)
    result = Result()
    async for m in paced(moves, "migrate", rate, err):
        outcome = await _move(kv, m)
        if outcome == "changed":
            result.changed.append(m.key)
        elif outcome == "moved":
            result.moved += 1
        else:
            result.already += 1
    return result


async def _move(kv: KeyValue, m: OldKey) -> str:
    """``moved``, ``already`` (an earlier run created the new key) or ``changed``."""
    data = codec.encode(m.state)
    try:
        await retrying(f"create {m.new_key}", lambda: kv.create(m.new_key, data))
        fresh = True
    except KeyWrongLastSequenceError:
        fresh = False  # moved by an earlier run that stopped before the delete
    try:
        await retrying(f"delete {m.key}", lambda: kv.delete(m.key, last=m.revision))
    except KeyWrongLastSequenceError:
        return "changed"
    return "moved" if fresh else "already"
