"""``GET /v1/tasks/{id}/events``: a task's timeline as Server-Sent Events.

A task's events are in two streams (its lifecycle in ``VIGIL_EVENTS``, its output in
``VIGIL_OUTPUT``), so each event's SSE ``id`` is the reader's position in both,
``<events seq>.<output seq>``: a client that reconnects with ``Last-Event-ID`` resumes
exactly after the last event it saw (an ordered consumer per stream, each starting after
its sequence). Comment lines keep idle connections alive. The stream
ends after the final ``finished`` event, or when the task has been terminal for two
keep-alives without one (its recorder died before publishing it).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
from aiohttp import web
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from vigil import codec, subjects
from vigil.api import LAST_EVENT_ID_MAX
from vigil.jetstream import TaskStore, read_stored
from vigil.messages import ExecutorInfo, TaskState

QUIET_TICKS = 2


@dataclass(frozen=True)
class Position:
    """Where a reader of a task's events is: the last sequence it has seen in each of the
    two streams that hold them (lifecycle in VIGIL_EVENTS, output in VIGIL_OUTPUT). As an
    SSE id it reads ``<events seq>.<output seq>``. A bare ``<seq>`` (an id of a gateway
    from before VIGIL_OUTPUT, when VIGIL_EVENTS held everything) resumes the lifecycle
    after it and sends the output again from its start."""

    events: int = 0
    output: int = 0

    def __str__(self) -> str:
        return f"{self.events}.{self.output}"

    @classmethod
    def parse(cls, text: str) -> Position | None:
        match = POSITION_RE.fullmatch(text)
        if match is None:
            return None
        events, output = int(match[1]), int(match[2] or 0)
        if max(events, output) > LAST_EVENT_ID_MAX:
            return None
        return cls(events, output)

    def after(self, stream: str, seq: int) -> Position:
        if stream == subjects.STREAM_OUTPUT:
            return Position(self.events, max(self.output, seq))
        return Position(max(self.events, seq), self.output)

    def of(self, stream: str) -> int:
        return self.output if stream == subjects.STREAM_OUTPUT else self.events


# Each part a stream sequence up to LAST_EVENT_ID_MAX ([0-9], not \d: that would take
# other scripts' digits). The schema says 18 digits, which every value it allows is.
POSITION_RE = re.compile(r"([0-9]{1,19})(?:\.([0-9]{1,19}))?")
POSITION_PATTERN = r"^[0-9]{1,18}(\.[0-9]{1,18})?$"
TASK_STREAMS = (subjects.STREAM_EVENTS, subjects.STREAM_OUTPUT)


async def follow_task(
    js: JetStreamContext,
    store: TaskStore,
    tenant: str,
    task_id: str,
    *,
    tick_s: float,
    stopping: asyncio.Event,
    after: Position = Position(),
    follow: bool = True,
) -> AsyncIterator[tuple[Msg, Position] | None]:
    """A task's events after ``after``, each with the position after it; ``None`` on each
    idle tick (an SSE answer writes a keep-alive then). Each stream's events come in its
    order, the two interleaved as they arrive. It ends with the final ``finished``, sent
    once the output stored before it has been (the executor stores an attempt's output
    before its outcome); when the task is terminal and quiet for QUIET_TICKS ticks
    (its recorder died before publishing ``finished``: no client may wait forever); and
    without ``follow`` once caught up with what is stored."""
    queue: asyncio.Queue[tuple[str, Msg]] = asyncio.Queue()
    subs = []
    caught_up: set[str] = set()
    position = after
    try:
        for stream in TASK_STREAMS:
            config = ConsumerConfig(inactive_threshold=60.0)
            if after.of(stream) > 0:
                config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
                config.opt_start_seq = after.of(stream) + 1

            async def put(msg: Msg, stream: str = stream) -> None:
                queue.put_nowait((stream, msg))

            subs.append(await js.subscribe(subjects.task_events(tenant, task_id), stream=stream,
                                           ordered_consumer=True, config=config, cb=put))
        # The final finished, held back until the output stored before it has been sent
        # (the streams are read side by side: it may arrive first), so that a client
        # stopping at it misses nothing; and the last output sequence that is.
        final: tuple[Msg, int] | None = None
        quiet = 0
        while not stopping.is_set():
            if final is not None and position.output >= final[1]:
                yield final[0], position.after(subjects.STREAM_EVENTS,
                                               final[0].metadata.sequence.stream)
                return
            try:
                stream, msg = await asyncio.wait_for(queue.get(), tick_s)
            except TimeoutError:
                if final is not None:  # output that went (VIGIL_OUTPUT dropped its oldest)
                    position = Position(position.events, final[1])
                    continue
                if not follow:
                    return
                yield None
                current = await store.get(tenant, task_id)
                if current is None or current[0].terminal:
                    quiet += 1
                    if quiet >= QUIET_TICKS:
                        return
                continue
            if (final is None and msg.subject.endswith(".finished")
                    and _is_final(msg.data)):
                final = msg, await _last_output(js, tenant, task_id)
                continue
            if final is not None and stream == subjects.STREAM_EVENTS:
                continue  # nothing after the final finished is the task's
            position = position.after(stream, msg.metadata.sequence.stream)
            yield msg, position
            if not follow and msg.metadata.num_pending == 0:
                caught_up.add(stream)
                if caught_up == set(TASK_STREAMS) or await _nothing_in(js, tenant, task_id,
                                                                        caught_up):
                    return
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def _last_output(js: JetStreamContext, tenant: str, task_id: str) -> int:
    """The sequence of the task's newest output event in VIGIL_OUTPUT (0: none)."""
    last = 0
    for kind in subjects.OUTPUT_KINDS:
        with contextlib.suppress(NotFoundError):
            msg = await js.get_last_msg(subjects.STREAM_OUTPUT, subjects.event(tenant, task_id,
                                                                               kind))
            last = max(last, msg.seq or 0)
    return last


async def _nothing_in(js: JetStreamContext, tenant: str, task_id: str, seen: set[str]) -> bool:
    """Whether every stream not in ``seen`` holds none of the task's events."""
    for stream in set(TASK_STREAMS) - seen:
        info = await js.stream_info(stream, subjects_filter=subjects.task_events(tenant, task_id))
        if info.state.subjects:
            return False
    return True


async def stream_events(
    request: web.Request,
    js: JetStreamContext,
    store: TaskStore,
    state: TaskState,
    after: Position,
    keepalive_s: float,
    stopping: asyncio.Event,
) -> web.StreamResponse:
    response = await open_stream(request, "text/event-stream")
    # A cancelled handler (the server shutting down) ends cancelled: swallowing it
    # would leave whoever cancelled it waiting on a task that claims to have finished.
    with contextlib.suppress(ConnectionResetError):
        await response.write(b": vigil event stream for task " + state.id.encode() + b"\n\n")
        async for item in follow_task(js, store, state.tenant, state.id, tick_s=keepalive_s,
                                      stopping=stopping, after=after):
            if item is None:
                await response.write(b": keep-alive\n\n")
                continue
            msg, position = item
            kind = msg.subject.rsplit(".", 1)[-1]
            data = msg.data.replace(b"\n", b" ")
            await response.write(b"id: %s\nevent: %s\ndata: %s\n\n"
                                 % (str(position).encode(), kind.encode(), data))
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
