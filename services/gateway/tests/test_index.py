"""Unit tests of the task index behind GET /v1/tasks: order, cursors, filters, updates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from vigil.messages import TaskSpec, TaskState
from vigil_gateway.index import BadCursor, Query, TaskIndex, decode_cursor, encode_cursor

pytestmark = pytest.mark.unit
T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def state(i: int, tenant: str = "acme", status: str = "queued", same_time: bool = False,
          labels: dict[str, str] | None = None) -> TaskState:
    at = T0 if same_time else T0 + timedelta(seconds=i)
    return TaskState(id=f"t{i:03d}", tenant=tenant, status=status,  # type: ignore[arg-type]
                     created_at=at, updated_at=at,
                     spec=TaskSpec(command=["true"], labels=labels or {}))


def pages(index: TaskIndex, **query: object) -> list[list[str]]:
    out, cursor = [], None
    while True:
        tasks, after = index.query(Query(cursor=cursor, **query))  # type: ignore[arg-type]
        out.append([t.id for t in tasks])
        if after is None:
            return out
        cursor = decode_cursor(encode_cursor(after))


def test_pages_are_newest_first_without_gaps_or_repeats() -> None:
    index = TaskIndex()
    for i in range(10):
        index.put(state(i))
    assert pages(index, tenant="acme", limit=4) == [
        ["t009", "t008", "t007", "t006"], ["t005", "t004", "t003", "t002"], ["t001", "t000"]]


def test_same_creation_time_is_ordered_by_id_and_paged_exactly() -> None:
    index = TaskIndex()
    for i in range(5):
        index.put(state(i, same_time=True))
    flat = [i for page in pages(index, tenant="acme", limit=2) for i in page]
    assert flat == ["t004", "t003", "t002", "t001", "t000"]


def test_new_tasks_do_not_shift_later_pages() -> None:
    index = TaskIndex()
    for i in range(6):
        index.put(state(i))
    first, after = index.query(Query(tenant="acme", limit=3))
    index.put(state(50))  # newer than everything: belongs before page one
    second, _ = index.query(Query(tenant="acme", limit=3, cursor=after))
    assert [t.id for t in first] == ["t005", "t004", "t003"]
    assert [t.id for t in second] == ["t002", "t001", "t000"]


def test_updates_replace_deletes_remove_and_tenants_are_separate() -> None:
    index = TaskIndex()
    index.put(state(1))
    index.put(state(2, tenant="globex"))
    index.put(state(1, status="succeeded"))
    assert len(index) == 2
    assert [t.status for t in index.query(Query(tenant="acme"))[0]] == ["succeeded"]
    assert [t.id for t in index.query(Query(tenant="globex"))[0]] == ["t002"]
    index.remove("acme.t001")
    index.remove("never-there")
    assert index.query(Query(tenant="acme"))[0] == []


def test_filters_status_labels_and_time_window() -> None:
    index = TaskIndex()
    for i in range(10):
        index.put(state(i, status="failed" if i % 3 == 0 else "succeeded",
                        labels={"team": "a" if i < 5 else "b"}))
    tasks, _ = index.query(Query(tenant="acme", statuses=frozenset({"failed"}),
                                 labels=(("team", "a"),)))
    assert [t.id for t in tasks] == ["t003", "t000"]
    tasks, _ = index.query(Query(tenant="acme", created_after=T0 + timedelta(seconds=7),
                                 created_before=T0 + timedelta(seconds=9)))
    assert [t.id for t in tasks] == ["t008", "t007"]


def test_a_foreign_cursor_is_refused() -> None:
    for bad in ("%%%", "bm90LWEtY3Vyc29y", ""):
        with pytest.raises(BadCursor):
            decode_cursor(bad)


def test_prune_drops_what_the_bucket_expired() -> None:
    index = TaskIndex()
    for i in range(4):
        index.put(state(i))
    assert index.prune(T0 + timedelta(seconds=2)) == 2  # t000, t001 not updated since
    assert [t.id for t in index.query(Query(tenant="acme"))[0]] == ["t003", "t002"]
