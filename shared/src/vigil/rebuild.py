"""Rebuild the ``vigil-tasks`` KV from the event log, and diff it against the live bucket.

The fold (:class:`Fold`) reads ``VIGIL_EVENTS`` in stream order and applies, per task (the
statuses are the state machine's, :data:`vigil.transitions.STATUS_AFTER`):

- ``accepted``: a new task, ``queued``, with ``tenant``, ``created_at`` = the event's time
  and ``submit_seq`` (its spec comes from ``VIGIL_SUBMIT`` at that sequence);
- ``scheduled`` (first dispatch, or a redrive): ``scheduled``, starting afresh: no executor,
  no outcome, no cancel request;
- ``started``: ``running`` as the event's attempt on its executor, no outcome;
- ``retrying`` (a hand-back, a failed attempt to be retried, the first half of a redrive):
  ``scheduled``, no executor, no ``finished_at``; the exit code and error stay (a retried
  attempt's failure stays visible until the next attempt starts);
- ``cancelling``: ``cancel_requested_at`` = the event's time (the first request counts);
- ``finished`` with ``final``: the status, exit code, error, ``finished_at`` = the event's
  time, and its attempt when above 0; a ``cancelled`` one without an earlier request sets
  ``cancel_requested_at`` to its time (a queued task is cancelled in one step). A
  ``finished`` with no ``accepted`` before it is a submission refused at admission: it
  carries ``tenant`` and ``submit_seq`` itself, and makes a task with ``created_at`` =
  ``finished_at``. Without ``final`` (an attempt that will be retried): only the exit code,
  error and attempt;
- every other kind (log, progress, checkpoint, confession, rejected, kinds added later)
  changes none of the compared fields and is skipped.

A publish retried outside the stream's duplicate window stores an event twice. Events'
message ids say what they mean (``<task>:<attempt>:<kind>[:n]``), so the fold skips an id
it has applied already: a duplicate anywhere in the log changes nothing.

**What is compared** (:data:`COMPARED`, :data:`SPEC_COMPARED`): id, tenant, status, attempt,
executor, exit_code, error, created_at, finished_at, submit_seq, cancel_requested_at, and
the spec's command, labels and pool. **What is not, and why**: ``updated_at`` (every write
sets it, including ones that leave no event: lease renewals, checkpoint pointers);
``started_at`` (the claim's time, before the container starts and ``started`` is sent);
``history`` and ``tail`` (evidence the executor keeps in the state, not in events: lost
leases, the last output lines); ``checkpoint`` (an object-store pointer, dropped on
success); ``work_seq``/``delivery``/``redriven``/``budget_from`` (lease and budget
bookkeeping); and the spec's resolved defaults (image, timeout, max attempts: the
submission holds what the user sent, the state what the scheduler's settings made of it).

A task whose history began before the event log's oldest message (the stream's max age)
cannot be rebuilt; it is reported as aged out, not as a difference.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError

from vigil import codec, subjects, topology, transitions
from vigil.jetstream import retrying
from vigil.messages import (
    Accepted,
    Cancelling,
    Event,
    Finished,
    Retrying,
    Scheduled,
    Started,
    TaskSpec,
    TaskState,
)
from vigil.progress import ProgressBar
from vigil.replay import (
    RangeReader,
    ReplayError,
    StoredMsg,
    Window,
    read_bucket,
)

COMPARED: tuple[str, ...] = (
    "id", "tenant", "status", "attempt", "executor", "exit_code", "error", "created_at",
    "finished_at", "submit_seq", "cancel_requested_at",
)
SPEC_COMPARED: tuple[str, ...] = ("command", "labels", "pool")
# Only these kinds change compared fields; the server filters the rest out (logs are most
# of the log), so a rebuild reads a fraction of the stream.
FOLDED_KINDS: tuple[str, ...] = ("accepted", "scheduled", "started", "retrying", "cancelling",
                                 "finished")
_folded_event = msgspec.json.Decoder(Accepted | Scheduled | Started | Retrying | Cancelling
                                     | Finished)


# the fold ---------------------------------------------------------------------------------
@dataclass
class Rebuilt:
    """One task as the event log tells it. ``complete`` is False when its first event
    (``accepted``, or a refusal's ``finished``) is no longer in the log."""

    id: str
    tenant: str = ""
    status: str = transitions.STATUS_AFTER["accepted"]
    attempt: int = 0
    executor: str | None = None
    exit_code: int | None = None
    error: str | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    submit_seq: int = 0
    cancel_requested_at: datetime | None = None
    updated_at: datetime | None = None
    accepted: bool = False  # admitted (so it has a spec), not refused
    complete: bool = False
    spec: TaskSpec | None = None

    def clear_outcome(self) -> None:
        self.executor = self.exit_code = self.error = self.finished_at = None

    def to_state(self) -> TaskState:
        assert self.created_at is not None
        spec = self.spec
        if spec is not None and spec.id != self.id:
            spec = msgspec.structs.replace(spec, id=self.id)
        return TaskState(
            id=self.id, tenant=self.tenant, status=self.status,  # type: ignore[arg-type]
            attempt=self.attempt, executor=self.executor, exit_code=self.exit_code,
            error=self.error, created_at=self.created_at,
            updated_at=self.updated_at or self.created_at, finished_at=self.finished_at,
            spec=spec, submit_seq=self.submit_seq, cancel_requested_at=self.cancel_requested_at,
        )


@dataclass
class Fold:
    """Apply events in stream order; :meth:`apply` is idempotent per message id."""

    tasks: dict[str, Rebuilt] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    applied: int = 0
    skipped: int = 0  # duplicates, undecodable or unknown events
    last_seq: int = 0

    def apply(self, tenant: str, event: Event, msg_id: str | None = None) -> None:
        """Apply ``event`` of tenant ``tenant``'s task (the tenant is in the subject)."""
        seen = msg_id or _identity(tenant, event)
        if seen in self.seen:
            self.skipped += 1
            return
        self.seen.add(seen)
        self.applied += 1
        key = subjects.task_key(tenant, event.task_id)
        task = self.tasks.get(key)
        if task is None:
            task = self.tasks[key] = Rebuilt(id=event.task_id, tenant=tenant)
        if task.updated_at is None or event.time > task.updated_at:
            task.updated_at = event.time
        _RULES.get(type(event), _ignore)(task, event)

    def apply_raw(self, m: StoredMsg) -> None:
        """Decode and apply one stored message; anything undecodable is skipped."""
        self.last_seq = max(self.last_seq, m.seq)
        parts = subjects.event_parts(m.subject)
        try:
            event = _folded_event.decode(m.data)
        except msgspec.DecodeError:  # a kind this version does not know, or garbage
            self.skipped += 1
            return
        if parts is None or parts[1] != event.task_id:
            self.skipped += 1  # not where this event belongs: not ours to fold
            return
        self.apply(parts[0], event, m.headers.get(subjects.MSG_ID))

    def states(self) -> dict[str, TaskState]:
        """Rebuilt states by key (``<tenant>.<id>``, as in ``vigil-tasks``)."""
        return {key: t.to_state() for key, t in self.tasks.items() if t.complete}

    def incomplete(self) -> set[str]:
        return {key for key, t in self.tasks.items() if not t.complete}


def _identity(tenant: str, event: Event) -> str:
    # Without a message id, the event's content (and whose it is) is what it means.
    return f"sha:{tenant}:" + codec.encode(event).hex()


def _accepted(task: Rebuilt, e: Event) -> None:
    assert isinstance(e, Accepted)
    if task.accepted:
        return  # re-sent by a resumed admission under another id: nothing new
    task.created_at, task.submit_seq = e.time, e.submit_seq
    task.accepted = task.complete = True


def _scheduled(task: Rebuilt, e: Event) -> None:
    task.status = transitions.STATUS_AFTER["scheduled"]
    task.clear_outcome()
    task.cancel_requested_at = None


def _started(task: Rebuilt, e: Event) -> None:
    assert isinstance(e, Started)
    task.clear_outcome()
    task.status, task.attempt = transitions.STATUS_AFTER["started"], e.attempt
    task.executor = e.executor


def _retrying(task: Rebuilt, e: Event) -> None:
    assert isinstance(e, Retrying)
    task.status = transitions.STATUS_AFTER["retrying"]
    task.executor = task.finished_at = None
    # A failed attempt's exit code and error stay on the state until the next attempt.
    task.exit_code, task.error = e.exit_code, e.error


def _cancelling(task: Rebuilt, e: Event) -> None:
    if task.cancel_requested_at is None:
        task.cancel_requested_at = e.time


def _finished(task: Rebuilt, e: Event) -> None:
    assert isinstance(e, Finished)
    if e.attempt > 0:
        task.attempt = e.attempt
    if not e.final:
        task.exit_code, task.error = e.exit_code, e.error
        return
    if not task.complete and e.tenant:
        # Refused at admission: no accepted event; this one says when it was submitted.
        task.submit_seq, task.created_at = e.submit_seq, e.time
        task.complete = True
    task.status, task.exit_code, task.error, task.finished_at = (
        e.status, e.exit_code, e.error, e.time)
    if e.executor is not None:
        task.executor = e.executor  # also an attempt that ended before its `started`
    if e.status == "cancelled" and task.cancel_requested_at is None:
        task.cancel_requested_at = e.time


def _ignore(task: Rebuilt, e: Event) -> None:
    return


_RULES: dict[type, Any] = {Accepted: _accepted, Scheduled: _scheduled, Started: _started,
                           Retrying: _retrying, Cancelling: _cancelling, Finished: _finished}


# the diff ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldDiff:
    field: str
    live: Any
    rebuilt: Any


@dataclass
class Diff:
    equal: int = 0
    only_live: list[str] = field(default_factory=list)
    only_rebuilt: list[str] = field(default_factory=list)
    mismatched: dict[str, list[FieldDiff]] = field(default_factory=dict)
    aged_out: list[str] = field(default_factory=list)  # only live, history before the log

    @property
    def same(self) -> bool:
        return not (self.only_live or self.only_rebuilt or self.mismatched)

    def to_json(self) -> dict[str, Any]:
        return {
            "equal": self.equal, "same": self.same, "only_live": self.only_live,
            "only_rebuilt": self.only_rebuilt, "aged_out": self.aged_out,
            "mismatched": {k: [{"field": d.field, "live": d.live, "rebuilt": d.rebuilt}
                               for d in v] for k, v in self.mismatched.items()},
        }


def compare(live: TaskState, rebuilt: TaskState) -> list[FieldDiff]:
    """The compared fields (see the module docstring) that differ."""
    found = [FieldDiff(name, getattr(live, name), getattr(rebuilt, name))
             for name in COMPARED if getattr(live, name) != getattr(rebuilt, name)]
    for name in SPEC_COMPARED:
        a = getattr(live.spec, name) if live.spec is not None else None
        b = getattr(rebuilt.spec, name) if rebuilt.spec is not None else None
        if a != b:
            found.append(FieldDiff(f"spec.{name}", a, b))
    return found


def diff(live: Mapping[str, TaskState], rebuilt: Mapping[str, TaskState], *,
         incomplete: Iterable[str] = (), log_start: datetime | None = None) -> Diff:
    """Per task id: only live, only rebuilt, or which compared fields differ.

    A live task the log cannot explain because its history is older than the log
    (``incomplete``, or created before ``log_start``) is ``aged_out``, not a difference.
    """
    out = Diff()
    partial = set(incomplete)
    for task_id in sorted(set(live) | set(rebuilt)):
        a, b = live.get(task_id), rebuilt.get(task_id)
        if b is None:
            assert a is not None
            old = log_start is not None and a.created_at < log_start
            (out.aged_out if task_id in partial or old else out.only_live).append(task_id)
        elif a is None:
            out.only_rebuilt.append(task_id)
        elif fields := compare(a, b):
            out.mismatched[task_id] = fields
        else:
            out.equal += 1
    return out


# the I/O ----------------------------------------------------------------------------------
@dataclass
class RebuildRun:
    """One rebuild: the fold so far, the live snapshot, and how to read more of either."""

    js: JetStreamContext
    err: TextIO
    fold: Fold = field(default_factory=Fold)
    live: dict[str, TaskState] = field(default_factory=dict)
    live_revisions: dict[str, int] = field(default_factory=dict)
    undecodable_live: list[str] = field(default_factory=list)
    specs: dict[int, TaskSpec | None] = field(default_factory=dict)
    log_start: datetime | None = None

    async def read_live(self) -> None:
        raw = await read_bucket(self.js, subjects.KV_TASKS)
        self.live, self.live_revisions, self.undecodable_live = {}, {}, []
        for key, (value, rev) in raw.items():
            try:
                self.live[key] = codec.state_decoder.decode(value)
                self.live_revisions[key] = rev
            except msgspec.DecodeError:
                self.undecodable_live.append(key)

    async def read_events(self, *, progress: bool = True) -> int:
        """Fold the events after what was folded already; returns how many were read."""
        first_read = self.fold.last_seq == 0
        reader = RangeReader(
            self.js, subjects.STREAM_EVENTS, Window(from_seq=self.fold.last_seq + 1),
            filter_subjects=[subjects.events_of_kind(kind) for kind in FOLDED_KINDS])
        total = await reader.open()
        bar = ProgressBar("events", total, self.err) if progress and total > 1000 else None
        n = 0
        async for m in reader:
            if first_read and n == 0 and reader.first_seq > 1:
                # The stream's max age removed its oldest events: tasks older than what is
                # left cannot be rebuilt.
                self.log_start = m.time
            self.fold.apply_raw(m)
            n += 1
            if bar is not None:
                bar.advance()
        if bar is not None:
            bar.close()
        return n

    async def attach_specs(self) -> None:
        """Each admitted task's spec, from its submission (one pass over VIGIL_SUBMIT)."""
        wanted = {t.submit_seq for t in self.fold.tasks.values()
                  if t.accepted and t.submit_seq and t.submit_seq not in self.specs}
        if wanted:
            reader = RangeReader(self.js, subjects.STREAM_SUBMIT,
                                 Window(from_seq=min(wanted), to_seq=max(wanted)))
            await reader.open()
            async for m in reader:
                if m.seq in wanted:
                    try:
                        self.specs[m.seq] = codec.spec_decoder.decode(m.data)
                    except msgspec.DecodeError:
                        self.specs[m.seq] = None
        for t in self.fold.tasks.values():
            if t.accepted:
                t.spec = self.specs.get(t.submit_seq)

    def diff(self) -> Diff:
        return diff(self.live, self.fold.states(), incomplete=self.fold.incomplete(),
                    log_start=self.log_start)

    async def run(self, settle_rounds: int = 3) -> Diff:
        """Snapshot live, fold the log, compare; while tasks differ (work in flight moves
        both sides), read both again, a little later, a few times."""
        await self.read_live()
        await self.read_events()
        await self.attach_specs()
        result = self.diff()
        for _ in range(settle_rounds):
            if result.same:
                break
            await asyncio.sleep(0.5)  # let in-flight writes land before looking again
            await self.read_events(progress=False)
            await self.attach_specs()
            await self.read_live()
            result = self.diff()
        return result


def default_bucket_name(now: datetime | None = None) -> str:
    return f"{subjects.KV_TASKS}-rebuild-{(now or datetime.now(UTC)):%Y%m%dT%H%M%SZ}"


async def write_bucket(js: JetStreamContext, name: str, states: Mapping[str, TaskState],
                       err: TextIO) -> None:
    """Create ``name`` fresh (refusing an existing one) and store ``states`` in it."""
    try:
        await js.key_value(name)
    except (BucketNotFoundError, NotFoundError):
        pass
    else:
        raise ReplayError(f"bucket {name} already exists; choose another --into (or delete it "
                          "with `nats kv del`)")
    info = await retrying("tasks bucket info",
                          lambda: js.stream_info(f"KV_{subjects.KV_TASKS}"))
    # The live bucket's shape, but no TTL: the copy is for inspection, and a TTL counted
    # from the rebuild would drop keys at a moment unrelated to the tasks.
    bucket = dataclasses.replace(topology.TASKS, name=name, ttl_s=0.0,
                                 description="vigil-tasks rebuilt from the event log")
    try:
        kv = await js.create_key_value(config=bucket.config(info.config.num_replicas or 1))
    except BadRequestError as exc:
        raise ReplayError(f"cannot create bucket {name}: {exc.description}") from None
    async def put(key: str, state: TaskState) -> int:
        return int(await retrying(f"write {key}", lambda: kv.put(key, codec.encode(state))))

    bar = ProgressBar(f"write {name}", len(states), err)
    items = list(states.items())
    for start in range(0, len(items), 128):  # pipelined, a bounded number in flight
        chunk = items[start:start + 128]
        await asyncio.gather(*(put(key, state) for key, state in chunk))
        bar.advance(len(chunk))
    bar.close()


async def read_states(js: JetStreamContext, bucket: str) -> dict[str, TaskState]:
    raw = await read_bucket(js, bucket)
    return {key: codec.state_decoder.decode(value) for key, (value, _) in raw.items()}


async def delete_bucket(js: JetStreamContext, name: str) -> None:
    await retrying(f"delete bucket {name}", lambda: js.delete_key_value(name))
