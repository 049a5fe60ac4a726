"""``GET /v1/tasks/{id}/logs``: a task's output as plain text, optionally followed.

The lines come from the task's ``log`` events (every attempt's, in order, from
``VIGIL_OUTPUT``; its ``finished`` from ``VIGIL_EVENTS`` says when a followed log ends). Without
``follow`` the answer ends at the newest stored line; with ``follow=1`` it streams until
the final ``finished`` event (or the task is terminal and quiet: a recorder that died
before publishing ``finished`` must not hold the client forever).
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from aiohttp import web
from nats.js import JetStreamContext

from vigil import subjects
from vigil.jetstream import TaskStore
from vigil.messages import Log, TaskState
from vigil_gateway.events import follow_task, open_stream


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
    response = await open_stream(request, "text/plain; charset=utf-8")
    if not follow:
        # Nothing stored yet: answer at once instead of waiting out a tick.
        info = await js.stream_info(subjects.events_stream("log"),
                                    subjects_filter=subjects.event(state.tenant, state.id, "log"))
        if not info.state.subjects:
            await response.write_eof()
            return response
    # A cancelled handler (the server shutting down) ends cancelled: swallowing it
    # would leave whoever cancelled it waiting on a task that claims to have finished.
    with contextlib.suppress(ConnectionResetError):
        async for item in follow_task(js, store, state.tenant, state.id, stopping=stopping,
                                      follow=follow,
                                      tick_s=tick_s if follow else min(tick_s, 2.0)):
            if item is None or not item[0].subject.endswith(".log"):
                continue
            msg = item[0]
            try:
                event = _log_decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if only is None or event.stream == only:
                await response.write("".join(f"{line}\n" for line in event.lines).encode())
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response


_log_decoder = msgspec.json.Decoder(Log)
