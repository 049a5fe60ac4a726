"""A task's full timeline across streams, for ``vigil replay timeline``.

Merged by time: the submission (``VIGIL_SUBMIT`` at the task's ``submit_seq``), every event
(``vigil.events.<id>.>``, including the confessions about it: its lifecycle from
``VIGIL_EVENTS``, its output from ``VIGIL_OUTPUT``), the cancel and redrive
requests naming it (``VIGIL_CONTROL``), optionally the raw confessions in ``VIGIL_ISSUES``
(a scan of the whole stream, so only on request), and the current state in ``vigil-tasks``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError

from vigil import codec, subjects
from vigil.jetstream import retrying
from vigil.messages import TaskState
from vigil.replay import RangeReader, StoredMsg, Window

SUMMARY_CHARS = 160
_ORDER = {subjects.STREAM_SUBMIT: 0, subjects.STREAM_CONTROL: 1, subjects.STREAM_EVENTS: 2,
          subjects.STREAM_OUTPUT: 3, subjects.STREAM_ISSUES: 4}


@dataclass(frozen=True)
class Entry:
    time: datetime
    stream: str
    seq: int
    subject: str
    kind: str
    summary: str
    data: Any

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "stream": self.stream, "seq": self.seq,
                "subject": self.subject, "kind": self.kind, "summary": self.summary,
                "data": self.data}


@dataclass
class Timeline:
    task_id: str
    entries: list[Entry]
    state: TaskState | None
    revision: int

    @property
    def found(self) -> bool:
        return self.state is not None or bool(self.entries)


def decode(data: bytes) -> Any:
    """JSON when it is JSON, else the text (forward compatible: nothing is dropped)."""
    try:
        return codec.any_decoder.decode(data)
    except msgspec.DecodeError:
        return data.decode("utf-8", errors="replace")


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SUMMARY_CHARS else text[:SUMMARY_CHARS - 1] + "…"


def summarize(kind: str, d: Any) -> str:
    """One readable line per entry; unknown kinds show their JSON, shortened."""
    if not isinstance(d, dict):
        return _short(str(d))
    g = d.get
    if kind == "submission":
        command = " ".join(str(a) for a in g("command") or [])
        return _short(f"{command}" + (f"  (image {g('image')})" if g("image") else ""))
    if kind == "accepted":
        return f"tenant {g('tenant')}, submission seq {g('submit_seq')}"
    if kind == "scheduled":
        return f"pool {g('pool')}"
    if kind == "started":
        resumed = ", resumed from checkpoint" if g("resumed") else ""
        return f"attempt {g('attempt')} on {g('executor')} ({g('image')}{resumed})"
    if kind == "log":
        lines = g("lines") or []
        more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
        return _short(f"{g('stream')}: {lines[0] if lines else ''}{more}")
    if kind == "progress":
        return _short(" ".join(f"{k}={v}" for k, v in (g("data") or {}).items()))
    if kind == "checkpoint":
        if g("ok") is False:
            return _short(f"{g('reason')} checkpoint failed: {g('error')}")
        return f"{g('reason')} checkpoint {g('name')} ({g('size')} bytes)"
    if kind in ("confession", "issue"):
        return _short(f"[{g('severity')}] {g('source') or ''}: {g('summary')}")
    if kind == "environment":
        snapshot = f", snapshot {g('snapshot')}" if g("snapshot") else ""
        return _short(f"environment {g('environment')} {g('step')} at revision "
                      f"{g('revision')}{snapshot}")
    if kind == "retrying":
        reason = str(g("reason"))
        delay = f" (in {g('delay_s')}s)" if g("delay_s") and " in " not in reason else ""
        return _short(f"{reason}{delay}")
    if kind == "cancelling":
        return _short(f"stop requested: {g('reason') or 'no reason given'}")
    if kind == "finished":
        code = f", exit {g('exit_code')}" if g("exit_code") is not None else ""
        error = f": {g('error')}" if g("error") else ""
        return _short(f"{g('status')} (attempt {g('attempt', 0)}{code}){error}")
    if kind in ("cancel", "redrive"):
        by = f" by {g('requested_by')}" if g("requested_by") else ""
        rev = f", at revision {g('expect_revision')}" if g("expect_revision") else ""
        return _short(f"{kind} requested{by}: {g('reason') or 'no reason given'}{rev}")
    return _short(codec.encode(d).decode())


def _entry(m: StoredMsg, kind: str) -> Entry:
    data = decode(m.data)
    return Entry(m.time, m.stream, m.seq, m.subject, kind, summarize(kind, data), data)


async def build(js: JetStreamContext, task_id: str, *, tenant: str, logs: bool = True,
                issues: bool = False) -> Timeline:
    """Tenant ``tenant``'s task ``task_id`` (see :func:`vigil.jetstream.tenants_of` to find
    the tenant of an id)."""
    state, revision = await _state(js, tenant, task_id)
    entries: list[Entry] = []
    submit_seq = state.submit_seq if state is not None else 0
    task_events = [m for stream in (subjects.STREAM_EVENTS, subjects.STREAM_OUTPUT)
                   for m in await _read(js, stream, subjects.task_events(tenant, task_id))]
    for m in task_events:
        kind = subjects.token(m.subject, 4) or "?"
        if kind == "log" and not logs:
            continue
        entry = _entry(m, kind)
        entries.append(entry)
        if kind in ("accepted", "finished") and isinstance(entry.data, dict):
            submit_seq = submit_seq or int(entry.data.get("submit_seq") or 0)
    if submit_seq:
        entries += await _submission(js, submit_seq)
    for m in await _read(js, subjects.STREAM_CONTROL, f"{subjects.CONTROL}.*.{tenant}"):
        entry = _entry(m, subjects.token(m.subject, 2) or "control")
        if isinstance(entry.data, dict) and entry.data.get("task_id") == task_id:
            entries.append(entry)
    if issues:
        for m in await _read(js, subjects.STREAM_ISSUES, f"{subjects.ISSUES}.>"):
            entry = _entry(m, "issue")
            if (isinstance(entry.data, dict) and entry.data.get("task_id") == task_id
                    and entry.data.get("tenant") in (tenant, None)):
                entries.append(entry)
    entries.sort(key=_order_key(entries))
    return Timeline(task_id, entries, state, revision)


def _order_key(entries: list[Entry]) -> Callable[[Entry], tuple[datetime, int, int]]:
    """By store time, except that an attempt's output never comes before its ``started``:
    the two live in different streams, each stamping its own time, so a line printed the
    moment the agent began can be stored a hair before the event that says it began."""
    began = {e.data.get("attempt"): e.time for e in entries
             if e.kind == "started" and isinstance(e.data, dict)}

    def key(e: Entry) -> tuple[datetime, int, int]:
        time = e.time
        if e.stream == subjects.STREAM_OUTPUT and isinstance(e.data, dict):
            time = max(time, began.get(e.data.get("attempt"), time))
        return (time, _ORDER.get(e.stream, 9), e.seq)
    return key


async def _read(js: JetStreamContext, stream: str, subject: str) -> list[StoredMsg]:
    reader = RangeReader(js, stream, Window(subject=subject))
    await reader.open()
    return [m async for m in reader]


async def _state(js: JetStreamContext, tenant: str, task_id: str
                 ) -> tuple[TaskState | None, int]:
    kv = await js.key_value(subjects.KV_TASKS)
    key = subjects.task_key(tenant, task_id)
    try:
        entry = await retrying(f"get task {key}", lambda: kv.get(key))
    except KeyNotFoundError:
        return None, 0
    if not entry.value:
        return None, 0
    return codec.state_decoder.decode(entry.value), int(entry.revision or 0)


async def _submission(js: JetStreamContext, seq: int) -> list[Entry]:
    try:
        raw = await retrying("read submission",
                             lambda: js.get_msg(subjects.STREAM_SUBMIT, seq))
    except NotFoundError:
        return []  # aged out of VIGIL_SUBMIT
    if raw.time is None or raw.subject is None:
        return []
    m = StoredMsg(subjects.STREAM_SUBMIT, seq, raw.subject, raw.time,
                  dict(raw.headers or {}), raw.data or b"")
    return [_entry(m, "submission")]
