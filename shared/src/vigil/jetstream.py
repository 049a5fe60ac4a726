"""Thin, typed plumbing over nats-py JetStream: publishes with retries, the task store.

Every JetStream call here has a bounded wait. Transient failures (timeouts, no responders
while a server restarts) are retried with the same ``Nats-Msg-Id`` until a deadline, so a
retry never duplicates; then :class:`~vigil.errors.NatsUnavailable` is raised.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, PubAck
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from vigil import codec, subjects
from vigil.errors import NatsUnavailable
from vigil.messages import TAIL_LINE_CHARS, TAIL_LINES, Confession, Event, Log, TaskState

log = structlog.get_logger("vigil.jetstream")

T = TypeVar("T")

TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    asyncio.TimeoutError,
    NoStreamResponseError,
    ServiceUnavailableError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
)


async def retrying(
    what: str,
    call: Callable[[], Awaitable[T]],
    *,
    deadline_s: float = 30.0,
) -> T:
    """Run ``call`` until it succeeds or ``deadline_s`` passes on transient NATS errors."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    delay = 0.05
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except TRANSIENT as exc:
            if loop.time() + delay >= deadline:
                raise NatsUnavailable(
                    f"{what}: NATS did not answer for {deadline_s:.0f}s ({type(exc).__name__})"
                ) from exc
            if attempt == 2:
                log.warning("nats_retrying", what=what, error=type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        except APIError as exc:
            # 503 from the JS API while a stream leader is being elected is transient too.
            if getattr(exc, "code", None) == 503 and loop.time() + delay < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            raise


async def publish(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    msg_id: str,
    *,
    timeout: float = 2.0,
    deadline_s: float = 30.0,
) -> PubAck:
    """Publish with ``Nats-Msg-Id`` and wait for the ack, retrying transient failures."""
    headers = {subjects.MSG_ID: msg_id}

    async def once() -> PubAck:
        return await js.publish(subject, payload, timeout=timeout, headers=headers)

    return await retrying(f"publish {subject}", once, deadline_s=deadline_s)


_STATE_FIELDS = frozenset(TaskState.__struct_fields__)
_EXTRAS_KEPT = 4096  # task versions with fields this version does not know, remembered


def unknown_fields(raw: bytes, state: TaskState) -> dict[str, object]:
    """Top-level fields of a stored state (``raw``) that ``TaskState`` does not have: a
    newer service wrote them. Cheap when there are none: the value then re-encodes to
    the same bytes, and only otherwise is it parsed again."""
    if codec.encode(state) == raw:
        return {}
    data = codec.any_decoder.decode(raw)
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if k not in _STATE_FIELDS}


class TaskStore:
    """Typed access to the ``vigil-tasks`` bucket with compare-and-set writes.

    Rolling upgrades: a state a newer service wrote may hold fields this version does
    not know. Decoding drops them, so a rewrite by this version would erase them (and
    with them what the newer services recorded). The store remembers them per task
    version it read (or wrote), and a compare-and-set on that version writes them back
    unchanged beside the fields it knows.
    """

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._extras: collections.OrderedDict[tuple[str, int], dict[str, object]] = (
            collections.OrderedDict())

    @classmethod
    async def open(cls, js: JetStreamContext) -> TaskStore:
        await js.key_value(subjects.KV_TASKS)  # it exists (or a clear error)
        # Reads go to the stream's leader (STREAM.MSG.GET), not a direct get that any
        # replica may answer with a value a write behind: every decision here is a
        # compare-and-set on the newest revision (see topology.TASKS).
        return cls(KeyValue(name=subjects.KV_TASKS, stream=f"KV_{subjects.KV_TASKS}",
                            pre=f"$KV.{subjects.KV_TASKS}.", js=js, direct=False))

    async def get(self, tenant: str, task_id: str) -> tuple[TaskState, int] | None:
        """Tenant ``tenant``'s task ``task_id`` and its revision; None if there is none."""
        key = subjects.task_key(tenant, task_id)

        read = await kv_read(self._kv, key, f"get task {key}")
        if read is None:
            return None
        state = codec.state_decoder.decode(read[0])
        extras = unknown_fields(read[0], state)
        if extras:
            self._remember(key, read[1], extras)
        return state, read[1]

    async def get_state(self, state: TaskState) -> tuple[TaskState, int] | None:
        """The current state and revision of the task ``state`` is a version of."""
        return await self.get(state.tenant, state.id)

    async def create(self, state: TaskState) -> int | None:
        """Create the task's key; None if it already exists (and is not our own write)."""
        return await self._write(state, None)

    async def cas(self, state: TaskState, revision: int) -> int | None:
        """Write ``state`` if the key is still at ``revision``; None if someone else wrote."""
        return await self._write(state, revision)

    async def _write(self, state: TaskState, revision: int | None) -> int | None:
        data = codec.encode(state)
        extras = self._extras.get((state.key, revision)) if revision is not None else None
        if extras:
            # Fields a newer service wrote at that version, kept beside ours.
            merged = codec.any_decoder.decode(data)
            merged.update({k: v for k, v in extras.items() if k not in merged})
            data = codec.encode(merged)
        new = await kv_write(self._kv, state.key, data, revision, f"write task {state.key}")
        if new is not None and extras:
            self._remember(state.key, new, extras)
        return new

    def _remember(self, key: str, revision: int, extras: dict[str, object]) -> None:
        self._extras[(key, revision)] = extras
        self._extras.move_to_end((key, revision))
        while len(self._extras) > _EXTRAS_KEPT:
            self._extras.popitem(last=False)


async def kv_read(kv: KeyValue, key: str, what: str) -> tuple[bytes, int] | None:
    """``key``'s value and revision; None when it has none (never written, deleted).
    Retried through passing NATS trouble (:func:`retrying`)."""

    async def once() -> tuple[bytes, int] | None:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return entry.value, int(entry.revision or 0)

    return await retrying(what, once)


async def kv_write(kv: KeyValue, key: str, data: bytes, revision: int | None,
                   what: str) -> int | None:
    """Create ``key`` (``revision`` None) or replace it if still at ``revision``: the new
    revision, or None when someone else wrote first. Retried through passing NATS trouble
    (:func:`retrying`); a retry after a lost reply that finds exactly ``data`` there knows
    the first try landed, and answers its revision."""
    tries = 0

    async def once() -> int | None:
        nonlocal tries
        tries += 1
        try:
            if revision is None:
                return int(await kv.create(key, data))
            return int(await kv.update(key, data, last=revision))
        except KeyWrongLastSequenceError:
            if tries == 1:
                return None
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                return None
            return int(entry.revision or 0) if entry.value == data else None

    return await retrying(what, once)


def event_kind(event: Event) -> str:
    return str(type(event).__struct_config__.tag)


def event_msg_id(tenant: str, event: Event, n: int | str | None = None) -> str:
    """``<tenant>.<task>:<attempt>:<kind>[:<n>]``: what the event means, so a re-publish
    dedupes (the tenant is part of it: two tenants' tasks may share an id).

    ``n`` numbers repeated events of one kind within an attempt (log batches by their first
    line, progress and confessions by their order in the agent's output).
    """
    base = f"{tenant}.{event.task_id}:{event.attempt}:{event_kind(event)}"
    return base if n is None else f"{base}:{n}"


async def publish_event(
    js: JetStreamContext, tenant: str, event: Event, n: int | str | None = None, *,
    deadline_s: float = 30.0
) -> PubAck:
    return await publish(
        js,
        subjects.event(tenant, event.task_id, event_kind(event)),
        codec.encode(event),
        event_msg_id(tenant, event, n),
        deadline_s=deadline_s,
    )


async def publish_confession(
    js: JetStreamContext, confession: Confession, *, deadline_s: float = 30.0
) -> PubAck:
    """Publish on ``vigil.issues.<source>.<severity>``; ``id`` and ``source`` are required."""
    if not confession.id or not confession.source:
        raise ValueError("a platform confession needs an id and a source")
    return await publish(
        js,
        subjects.issue(confession.source, confession.severity),
        codec.encode(confession),
        confession.id,
        deadline_s=deadline_s,
    )


async def read_stored(js: JetStreamContext, stream: str, subject: str, *, limit: int = 10_000,
                      idle_s: float = 1.0, last_per_subject: bool = False) -> list[bytes]:
    """The payloads a stream holds on ``subject``, oldest first (an ordered consumer read
    until nothing is pending); with ``last_per_subject`` only the newest of each subject
    (a KV bucket's current values). Creating the consumer is retried: right after a
    cluster node dies it can time out while the stream's leadership moves."""
    policy = DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else DeliverPolicy.ALL
    config = ConsumerConfig(deliver_policy=policy, inactive_threshold=10.0)
    found = await _read_ordered(js, stream, subject, config, limit=limit, idle_s=idle_s)
    return [m.data for m in found]


async def tenants_of(js: JetStreamContext, task_id: str) -> list[str]:
    """The tenants that have a task ``task_id`` (ids are per tenant), sorted: how an
    operator's cross-tenant tool (``vigil replay``) finds a task by its id alone."""
    config = ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                            inactive_threshold=10.0)
    keys = await _read_ordered(js, f"KV_{subjects.KV_TASKS}",
                               subjects.task_kv_subject("*", task_id), config,
                               limit=1_000_000, idle_s=0.5)
    # $KV.vigil-tasks.<tenant>.<id>; a deleted key's marker has no value.
    return sorted({tenant for m in keys
                   if m.data and (tenant := subjects.token(m.subject, 2)) is not None})


async def _read_ordered(js: JetStreamContext, stream: str, subject: str,
                        config: ConsumerConfig, *, limit: int, idle_s: float
                        ) -> list[Msg]:
    """The messages an ordered consumer reads until nothing is pending, ``limit`` are
    read, or nothing comes for ``idle_s``."""
    sub = await retrying(f"read {subject}", lambda: js.subscribe(
        subject, stream=stream, ordered_consumer=True, config=config))
    found: list[Msg] = []
    try:
        while len(found) < limit:
            try:
                msg = await sub.next_msg(timeout=idle_s)
            except nats.errors.TimeoutError:
                break
            found.append(msg)
            if msg.metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return found


async def log_tail(js: JetStreamContext, tenant: str, task_id: str, attempt: int, *,
                   lines: int = TAIL_LINES, line_chars: int = TAIL_LINE_CHARS,
                   idle_s: float = 1.0) -> list[str]:
    """The last ``lines`` output lines attempt ``attempt`` of ``task_id`` published, oldest
    first, read from its ``log`` events: the evidence a task that dies keeps (its
    ``tail``) when the executor that ran the attempt is gone and cannot say.

    Reads back from the newest log event in growing windows of stream sequence, so a
    long-running task's whole log is not read for its last lines. [] when there are none.
    """
    subject = subjects.event(tenant, task_id, "log")
    newest = await _events_from(js, subject, DeliverPolicy.LAST, idle_s=idle_s)
    if not newest:
        return []
    last_seq = newest[0][0]
    window = 1_024
    while True:
        start = max(1, last_seq - window)
        found: collections.deque[str] = collections.deque(maxlen=lines)
        older = False  # an earlier attempt's lines: nothing before them is ours
        for _, data in await _events_from(js, subject, DeliverPolicy.BY_START_SEQUENCE,
                                          start_seq=start, idle_s=idle_s):
            try:
                event = codec.event_decoder.decode(data)
            except msgspec.DecodeError:
                continue  # not ours to judge here: anyone may publish on vigil.events
            if not isinstance(event, Log) or event.attempt > attempt:
                continue
            if event.attempt < attempt:
                older = True
                continue
            found.extend(line[:line_chars] for line in event.lines)
        if len(found) >= lines or older or start == 1:
            return list(found)
        window *= 16


async def _events_from(js: JetStreamContext, subject: str, policy: DeliverPolicy, *,
                       start_seq: int | None = None, idle_s: float
                       ) -> list[tuple[int, bytes]]:
    """(stream sequence, payload) of the events on ``subject`` from ``policy`` on."""
    config = ConsumerConfig(deliver_policy=policy, opt_start_seq=start_seq,
                            inactive_threshold=10.0)
    found = await _read_ordered(js, subjects.events_stream("log"), subject, config,
                                limit=1_000_000, idle_s=idle_s)
    return [(m.metadata.sequence.stream, m.data) for m in found]


async def delete_msg(nc: NATS, stream: str, seq: int, *, timeout_s: float = 5.0) -> bool:
    """Delete one message without the secure erase nats-py always asks for (an erase
    overwrites and fsyncs each deletion; nothing here is secret, and a copy lives in the
    submissions stream anyway). True if deleted, False if it was already gone."""
    body = b'{"seq":%d,"no_erase":true}' % seq
    try:
        reply = await nc.request(f"$JS.API.STREAM.MSG.DELETE.{stream}", body,
                                 timeout=timeout_s)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise NatsUnavailable(f"cannot delete {stream} #{seq}: {exc}") from exc
    answer = codec.any_decoder.decode(reply.data)
    if isinstance(answer, dict) and answer.get("success"):
        return True
    error = answer.get("error", {}) if isinstance(answer, dict) else {}
    if error.get("err_code") == 10037:  # no message found
        return False
    raise NatsUnavailable(f"cannot delete {stream} #{seq}: {error.get('description', answer)}")
