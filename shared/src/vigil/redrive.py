"""Choose finished tasks and ask the scheduler to run them again (``vigil replay redrive``).

A redrive is a :class:`~vigil.messages.RedriveRequest` on ``vigil.control.redrive.<tenant>``
carrying the KV revision the operator saw; the scheduler acts only if the task is still at
that revision and finished, so a repeated request (or one that raced another change) does
nothing. Its ``Nats-Msg-Id`` is ``redrive:<tenant>.<task>:<revision>`` for the same reason.
Ids are per tenant: an id that more than one tenant has needs ``--tenant``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO

import msgspec
from nats.js import JetStreamContext

from vigil import codec, subjects, transitions
from vigil.jetstream import publish
from vigil.messages import RedriveRequest, TaskState
from vigil.progress import paced
from vigil.replay import read_bucket

REDRIVABLE = transitions.REDRIVABLE
REQUESTED_BY = "vigil replay"


@dataclass(frozen=True)
class Selection:
    """Which tasks: explicit ids (any redrivable status unless ``statuses`` is given), or
    every task in ``statuses`` (default ``dead``) matching tenant, labels and ``since``."""

    ids: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    tenant: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    since: datetime | None = None

    def wanted_statuses(self) -> tuple[str, ...]:
        return self.statuses or (REDRIVABLE if self.ids else ("dead",))

    def matches(self, state: TaskState) -> bool:
        if self.ids and state.id not in self.ids:
            return False
        if state.status not in self.wanted_statuses() or state.status not in REDRIVABLE:
            return False
        if self.tenant is not None and state.tenant != self.tenant:
            return False
        labels = state.spec.labels if state.spec is not None else {}
        if any(labels.get(k) != v for k, v in self.labels.items()):
            return False
        finished = state.finished_at or state.updated_at
        return self.since is None or finished >= self.since


@dataclass(frozen=True)
class Candidate:
    state: TaskState
    revision: int


@dataclass
class Chosen:
    tasks: list[Candidate]
    # Explicit ids that cannot be redriven, with why (missing, still running, no spec).
    refused: dict[str, str]


def choose(states: Iterable[tuple[TaskState, int]], sel: Selection) -> Chosen:
    """Pure: the candidates in ``states`` that ``sel`` picks, oldest finish first."""
    by_key: dict[str, tuple[TaskState, int]] = {}
    by_id: dict[str, list[tuple[TaskState, int]]] = {}
    for s, rev in states:
        by_key[s.key] = (s, rev)
        if sel.tenant is None or s.tenant == sel.tenant:
            by_id.setdefault(s.id, []).append((s, rev))
    refused: dict[str, str] = {}
    for task_id in sel.ids:
        found = by_id.get(task_id, [])
        got = found[0] if len(found) == 1 else None
        if len(found) > 1:
            tenants = ", ".join(sorted(s.tenant for s, _ in found))
            refused[task_id] = f"tenants {tenants} each have a task of that id; choose one " \
                               "with --tenant"
        elif got is None:
            refused[task_id] = "no such task in vigil-tasks"
        elif got[0].status not in REDRIVABLE:
            refused[task_id] = f"it is {got[0].status}; only {', '.join(REDRIVABLE)} tasks " \
                               "can be redriven"
        elif got[0].spec is None:
            refused[task_id] = "it has no spec (refused at admission): submit it again, fixed"
        elif not sel.matches(got[0]):
            refused[task_id] = f"it is {got[0].status}, not {'/'.join(sel.wanted_statuses())}"
    chosen = [Candidate(s, rev) for s, rev in by_key.values()
              if s.id not in refused and s.spec is not None and sel.matches(s)]
    chosen.sort(key=lambda c: (c.state.finished_at or c.state.updated_at, c.state.id))
    return Chosen(chosen, refused)


async def load_states(js: JetStreamContext) -> list[tuple[TaskState, int]]:
    out: list[tuple[TaskState, int]] = []
    for value, rev in (await read_bucket(js, subjects.KV_TASKS)).values():
        try:
            out.append((codec.state_decoder.decode(value), rev))
        except msgspec.DecodeError:
            continue  # not a task state; nothing to redrive there
    return out


def redrive_msg_id(tenant: str, task_id: str, revision: int) -> str:
    return f"redrive:{tenant}.{task_id}:{revision}"


@dataclass
class Sent:
    published: int = 0
    duplicates: int = 0  # the same request was already in VIGIL_CONTROL


async def send(js: JetStreamContext, tasks: list[Candidate], *, reason: str | None,
               rate: float, err: TextIO) -> Sent:
    sent = Sent()
    async for c in paced(tasks, "redrive", rate, err):
        request = RedriveRequest(task_id=c.state.id, reason=reason,
                                 requested_by=REQUESTED_BY, expect_revision=c.revision)
        ack = await publish(js, subjects.redrive_request(c.state.tenant),
                            codec.encode(request),
                            redrive_msg_id(c.state.tenant, c.state.id, c.revision))
        if ack.duplicate:
            sent.duplicates += 1
        else:
            sent.published += 1
    return sent


async def wait_for(js: JetStreamContext, tasks: list[Candidate], timeout_s: float
                   ) -> dict[str, TaskState | None]:
    """Each task's state once it ended again after the redrive (None: not in time), by
    its key (``<tenant>.<id>``)."""
    kv = await js.key_value(subjects.KV_TASKS)
    pending = {c.state.key: c for c in tasks}
    done: dict[str, TaskState | None] = {}
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while pending and time.monotonic() < deadline:
        for key, c in list(pending.items()):
            entry = await kv.get(key)
            if not entry.value or int(entry.revision or 0) <= c.revision:
                continue
            state = codec.state_decoder.decode(entry.value)
            # Past the chosen revision the redrive made it scheduled: terminal again = done.
            if state.terminal:
                done[key] = state
                del pending[key]
        if pending:
            await asyncio.sleep(delay)  # polling the KV: a watch per task costs more
            delay = min(delay * 2, 1.0)
    done.update({task_id: None for task_id in pending})
    return done
