"""An in-memory index of task summaries for ``GET /v1/tasks``, fed by a watch of ``vigil-tasks``.

A KV bucket can only be listed by reading every key, which is O(all tasks) per request.
The gateway instead follows the bucket's change stream (an ordered consumer, last value
per key first, then every update) and keeps, per tenant, the task ids sorted by creation
time. A page is a walk down that order from the cursor, filtering as it goes. Each
gateway builds its own index, so gateways stay stateless and interchangeable; the index
trails the bucket by the time one update takes to arrive (milliseconds), which is why a
task just submitted may appear in a list a moment after ``POST`` returns.

Memory is one small summary per task the bucket holds: it expires tasks after its TTL,
and the index drops those (checked hourly).

Cursors are opaque to clients: ``base64url("<created_at ns>:<task id>")`` of the last
task on the page; the next page starts strictly after it, so pages neither skip nor
repeat tasks created meanwhile (new tasks sort before the first page).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from vigil import codec, subjects, topology
from vigil.api import TaskSummary
from vigil.messages import TaskState

log = structlog.get_logger("vigil.gateway")

Key = tuple[int, str]  # (created_at in ns since the epoch, task id)
PRUNE_EVERY_S = 3600.0


class BadCursor(ValueError):
    pass


def _key(state: TaskState | TaskSummary) -> Key:
    return (_ns(state.created_at), state.id)


def _ns(t: datetime) -> int:
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1_000


def encode_cursor(key: Key) -> str:
    raw = f"{key[0]}:{key[1]}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> Key:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ns, _, task_id = raw.partition(":")
        if not task_id:
            raise ValueError(cursor)
        return (int(ns), task_id)
    except (ValueError, UnicodeDecodeError):
        raise BadCursor("cursor is not one this API returned; start without it") from None


@dataclass(frozen=True)
class Query:
    tenant: str
    statuses: frozenset[str] = frozenset()
    labels: tuple[tuple[str, str], ...] = ()
    created_after: datetime | None = None
    created_before: datetime | None = None
    limit: int = 50
    cursor: Key | None = None

    def matches(self, s: TaskSummary) -> bool:
        if self.statuses and s.status not in self.statuses:
            return False
        return all(s.labels.get(k) == v for k, v in self.labels)


@dataclass
class TaskIndex:
    """Summaries by task key (``<tenant>.<id>``: ids are per tenant), and per tenant the
    (creation time, id) keys in creation order."""

    by_key: dict[str, TaskSummary] = field(default_factory=dict)
    by_tenant: dict[str, list[Key]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.by_key)

    def get(self, tenant: str, task_id: str) -> TaskSummary | None:
        return self.by_key.get(subjects.task_key(tenant, task_id))

    def put(self, state: TaskState) -> TaskSummary:
        summary = TaskSummary.of(state)
        old = self.by_key.get(state.key)
        if old is not None and _key(old) != _key(summary):
            self.remove(state.key)
            old = None
        self.by_key[state.key] = summary
        if old is None:
            bisect.insort(self.by_tenant.setdefault(summary.tenant, []), _key(summary))
        return summary

    def remove(self, task_key: str) -> None:
        old = self.by_key.pop(task_key, None)
        if old is None:
            return
        key = _key(old)
        keys = self.by_tenant.get(old.tenant, [])
        i = bisect.bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            del keys[i]

    def prune(self, older_than: datetime) -> int:
        """Drop tasks not updated since ``older_than``: the bucket's TTL has expired them,
        and an expiry sends watchers no delete marker."""
        gone = [k for k, t in self.by_key.items() if t.updated_at < older_than]
        for task_key in gone:
            self.remove(task_key)
        return len(gone)

    def query(self, q: Query) -> tuple[list[TaskSummary], Key | None]:
        """Up to ``q.limit`` matches, newest first, and the cursor of the next page."""
        keys = self.by_tenant.get(q.tenant, [])
        out: list[TaskSummary] = []
        for key in self._walk(keys, q):
            summary = self.get(q.tenant, key[1])
            if summary is None or not q.matches(summary):
                continue
            if len(out) == q.limit:
                return out, _key(out[-1])
            out.append(summary)
        return out, None

    @staticmethod
    def _walk(keys: list[Key], q: Query) -> Iterator[Key]:
        end = len(keys)
        if q.cursor is not None:
            end = bisect.bisect_left(keys, q.cursor)
        if q.created_before is not None:
            end = min(end, bisect.bisect_left(keys, (_ns(q.created_before), "")))
        floor = (_ns(q.created_after), "") if q.created_after is not None else None
        for i in range(end - 1, -1, -1):
            if floor is not None and keys[i] < floor:
                return
            yield keys[i]


class IndexWatcher:
    """Keeps a :class:`TaskIndex` current from the bucket's change stream."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.index = TaskIndex()
        self.ready = asyncio.Event()
        self._waiters: dict[str, list[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._pruned_at = time.monotonic()

    async def start(self) -> None:
        stream = f"KV_{subjects.KV_TASKS}"
        info = await self.js.stream_info(stream)
        if info.state.messages == 0:
            self.ready.set()
        self._sub = await self.js.subscribe(
            f"$KV.{subjects.KV_TASKS}.>", stream=stream, ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                                  inactive_threshold=60.0),
            cb=self._on_msg,
        )

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        task_key = msg.subject[len(f"$KV.{subjects.KV_TASKS}."):]
        op = msg.headers.get("KV-Operation") if msg.headers else None
        if op in ("DEL", "PURGE"):
            self.index.remove(task_key)
        else:
            try:
                state = codec.state_decoder.decode(msg.data)
                if state.key == task_key:  # a value under another key is not a task's
                    self.index.put(state)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("index_undecodable_state", key=task_key, error=str(exc))
        now = time.monotonic()
        if now - self._pruned_at > PRUNE_EVERY_S:
            self._pruned_at = now
            cutoff = datetime.now(UTC) - timedelta(seconds=topology.TASKS.ttl_s)
            if dropped := self.index.prune(cutoff):
                log.info("task_index_pruned", expired=dropped)
        if not self.ready.is_set() and msg.metadata.num_pending == 0:
            log.info("task_index_ready", tasks=len(self.index))
            self.ready.set()
        for event in self._waiters.pop(task_key, []):
            event.set()

    async def wait_for(self, tenant: str, task_id: str, done: Callable[[TaskSummary], bool],
                       timeout_s: float) -> TaskSummary | None:
        """Wait until the task's summary satisfies ``done``; the last one seen on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        task_key = subjects.task_key(tenant, task_id)
        while True:
            current = self.index.by_key.get(task_key)
            if current is not None and done(current):
                return current
            left = deadline - loop.time()
            if left <= 0:
                return current
            event = asyncio.Event()
            waiting = self._waiters.setdefault(task_key, [])
            waiting.append(event)
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                with contextlib.suppress(ValueError):
                    waiting.remove(event)
                if not waiting:
                    self._waiters.pop(task_key, None)
