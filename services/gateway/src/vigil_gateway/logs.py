"""``GET /v1/tasks/{id}/logs``: a task's output as plain text, optionally followed.

The lines come from the task's ``log`` events (every attempt's, in order). Without
``follow`` the answer ends at the newest stored line; with ``follow=1`` it streams until
the final ``finished`` event (or the task is terminal and quiet: a recorder that died
before publishing ``finished`` must not hold the client forever).
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import nats.errors
from aiohttp import web
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from vigil import codec, subjects
from vigil.jetstream import TaskStore
from vigil.messages import Finished, Log, TaskState

QUIET_TICKS = 2


async def stream_logs(
    request: web.Request,
    js: JetStreamContext,
    store: TaskStore,
    state: TaskState,
    *,
    follow: bool,
    only: str | None,
    tick_s: float,
    stopping: asyncio.Event,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/plain; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    await response.prepare(request)
    if not follow:
        # Nothing stored yet: answer at once instead of waiting out a tick.
        info = await js.stream_info(subjects.STREAM_EVENTS,
                                    subjects_filter=subjects.event(state.id, "log"))
        if not info.state.subjects:
            await response.write_eof()
            return response
    sub = await js.subscribe(
        subjects.task_events(state.id), stream=subjects.STREAM_EVENTS,
        ordered_consumer=True, config=ConsumerConfig(inactive_threshold=60.0),
    )
    quiet = 0
    try:
        while not stopping.is_set():
            try:
                msg = await sub.next_msg(timeout=tick_s if follow else min(tick_s, 2.0))
            except nats.errors.TimeoutError:
                if not follow:
                    break
                current = await store.get(state.id)
                if current is None or current[0].terminal:
                    quiet += 1
                    if quiet >= QUIET_TICKS:
                        break
                continue
            try:
                event = codec.event_decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if isinstance(event, Log) and (only is None or event.stream == only):
                await response.write("".join(f"{line}\n" for line in event.lines).encode())
            elif follow and isinstance(event, Finished) and event.final:
                break
            if not follow and msg.metadata.num_pending == 0:
                break
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response
