"""``GET /v1/tasks/{id}/events``: a task's timeline as Server-Sent Events.

Each event's SSE ``id`` is its sequence in the events stream, so a client that reconnects
with ``Last-Event-ID`` resumes exactly after the last event it saw (an ordered consumer
starting at that sequence + 1). Comment lines keep idle connections alive. The stream
ends after the final ``finished`` event, or when the task has been terminal for two
keep-alives without one (its recorder died before publishing it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import nats.errors
from aiohttp import web
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from vigil import codec, subjects
from vigil.jetstream import TaskStore, read_stored
from vigil.messages import ExecutorInfo, TaskState

QUIET_TICKS = 2


async def follow_task(
    js: JetStreamContext,
    store: TaskStore,
    tenant: str,
    task_id: str,
    *,
    tick_s: float,
    stopping: asyncio.Event,
    after: int = 0,
    follow: bool = True,
) -> AsyncIterator[Msg | None]:
    """A task's events in stream order, from sequence ``after`` + 1; ``None`` on each idle
    tick (an SSE answer writes a keep-alive then). It ends after the final ``finished``;
    when the task is terminal and quiet for QUIET_TICKS ticks (its recorder died before
    publishing ``finished``: no client may wait forever); and without ``follow`` once
    caught up with what is stored."""
    config = ConsumerConfig(inactive_threshold=60.0)
    if after > 0:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = after + 1
    sub = await js.subscribe(subjects.task_events(tenant, task_id), stream=subjects.STREAM_EVENTS,
                             ordered_consumer=True, config=config)
    quiet = 0
    try:
        while not stopping.is_set():
            try:
                msg = await sub.next_msg(timeout=tick_s)
            except nats.errors.TimeoutError:
                if not follow:
                    return
                yield None
                current = await store.get(tenant, task_id)
                if current is None or current[0].terminal:
                    quiet += 1
                    if quiet >= QUIET_TICKS:
                        return
                continue
            yield msg
            if msg.subject.endswith(".finished") and _is_final(msg.data):
                return
            if not follow and msg.metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def stream_events(
    request: web.Request,
    js: JetStreamContext,
    store: TaskStore,
    state: TaskState,
    after: int,
    keepalive_s: float,
    stopping: asyncio.Event,
) -> web.StreamResponse:
    response = await open_stream(request, "text/event-stream")
    with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
        await response.write(b": vigil event stream for task " + state.id.encode() + b"\n\n")
        async for msg in follow_task(js, store, state.tenant, state.id, tick_s=keepalive_s,
                                     stopping=stopping, after=after):
            if msg is None:
                await response.write(b": keep-alive\n\n")
                continue
            kind = msg.subject.rsplit(".", 1)[-1]
            data = msg.data.replace(b"\n", b" ")
            await response.write(b"id: %d\nevent: %s\ndata: %s\n\n"
                                 % (msg.metadata.sequence.stream, kind.encode(), data))
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response


async def open_stream(request: web.Request, content_type: str) -> web.StreamResponse:
    """A prepared, unbuffered streaming answer (no proxy may hold its lines back)."""
    response = web.StreamResponse(headers={
        "Content-Type": content_type,
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    await response.prepare(request)
    return response


def _is_final(data: bytes) -> bool:
    try:
        event = codec.any_decoder.decode(data)
    except Exception:
        return True
    return not isinstance(event, dict) or event.get("final", True) is not False


async def task_confessions(js: JetStreamContext, tenant: str, task_id: str
                           ) -> list[dict[str, object]]:
    """The confessions on a task's timeline (agent's and platform's), oldest first."""
    stored = await read_stored(js, subjects.STREAM_EVENTS,
                               subjects.event(tenant, task_id, "confession"),
                               limit=200, idle_s=0.5)
    events = [codec.any_decoder.decode(data) for data in stored]
    return [e for e in events if isinstance(e, dict)]


async def read_executors(js: JetStreamContext) -> list[ExecutorInfo]:
    """Every live executor's entry in ``vigil-executors``, by pool then node."""
    bucket = await js.stream_info(f"KV_{subjects.KV_EXECUTORS}")
    if bucket.state.messages == 0:
        return []
    stored = await read_stored(js, f"KV_{subjects.KV_EXECUTORS}",
                               f"$KV.{subjects.KV_EXECUTORS}.>", limit=10_000, idle_s=0.5,
                               last_per_subject=True)
    infos: dict[str, ExecutorInfo] = {}
    for data in stored:
        if not data:
            continue  # a deleted entry (the executor stopped)
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            info = _executor_decoder.decode(data)
            infos[info.node] = info
    return sorted(infos.values(), key=lambda i: (i.pool, i.node))


_executor_decoder = msgspec.json.Decoder(ExecutorInfo)
