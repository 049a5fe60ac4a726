"""The timeline's order: store time, with an attempt's output never before its start."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from vigil import subjects
from vigil.timeline import Entry, _order_key

T0 = datetime(2026, 12, 2, 19, 7, 40, tzinfo=UTC)


def entry(ms: int, stream: str, seq: int, kind: str, **data: object) -> Entry:
    return Entry(T0 + timedelta(milliseconds=ms), stream, seq, "s", kind, kind, dict(data))


def test_output_stored_before_its_started_event_sorts_after_it() -> None:
    # As CI saw it: the first log line of attempt 1 stored 1 ms before its started event
    # (VIGIL_OUTPUT and VIGIL_EVENTS each stamp their own time).
    entries = [
        entry(0, subjects.STREAM_EVENTS, 1, "accepted"),
        entry(2, subjects.STREAM_OUTPUT, 1, "log", attempt=1),
        entry(3, subjects.STREAM_EVENTS, 2, "started", attempt=1),
        entry(5, subjects.STREAM_EVENTS, 3, "retrying", attempt=1),
        entry(900, subjects.STREAM_OUTPUT, 2, "log", attempt=2),
        entry(901, subjects.STREAM_EVENTS, 4, "started", attempt=2),
        entry(950, subjects.STREAM_EVENTS, 5, "finished", attempt=2),
    ]
    ordered = sorted(entries, key=_order_key(entries))
    assert [(e.kind, e.data.get("attempt")) for e in ordered] == [
        ("accepted", None), ("started", 1), ("log", 1), ("retrying", 1),
        ("started", 2), ("log", 2), ("finished", 2)]


def test_output_of_an_attempt_without_a_started_event_keeps_its_time() -> None:
    entries = [entry(5, subjects.STREAM_OUTPUT, 1, "log", attempt=1),
               entry(1, subjects.STREAM_EVENTS, 1, "accepted")]
    assert [e.kind for e in sorted(entries, key=_order_key(entries))] == ["accepted", "log"]
