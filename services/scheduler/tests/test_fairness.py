"""Unit tests of the dispatch policy: round-robin across tenants, priority within one."""

from __future__ import annotations

import pytest

from vigil_scheduler.fairness import Pick, plan

pytestmark = pytest.mark.unit


def flat(picks: list[Pick]) -> list[tuple[str, int]]:
    return [(p.tenant, p.priority) for p in picks for _ in range(p.count)]


def test_a_big_backlog_does_not_starve_a_small_tenant() -> None:
    picks, last = plan({"a": {5: 1000}, "b": {5: 10}}, capacity=6, running={},
                       max_running={}, after=None)
    assert sorted(flat(picks)) == [("a", 5)] * 3 + [("b", 5)] * 3
    assert last == "b"


def test_rotation_continues_where_the_last_round_stopped() -> None:
    depths = {"a": {5: 10}, "b": {5: 10}, "c": {5: 10}}
    picks, last = plan(depths, capacity=1, running={}, max_running={}, after=None)
    assert flat(picks) == [("a", 5)] and last == "a"
    picks, last = plan(depths, capacity=1, running={}, max_running={}, after=last)
    assert flat(picks) == [("b", 5)]
    picks, last = plan(depths, capacity=2, running={}, max_running={}, after="b")
    assert [p.tenant for p in picks] == ["c", "a"]


def test_priority_first_within_a_tenant() -> None:
    picks, _ = plan({"a": {2: 5, 9: 1, 5: 2}}, capacity=4, running={}, max_running={},
                    after=None)
    assert flat(picks) == [("a", 9), ("a", 5), ("a", 5), ("a", 2)]


def test_running_limits_and_capacity() -> None:
    picks, _ = plan({"a": {5: 10}, "b": {5: 10}}, capacity=10, running={"a": 3},
                    max_running={"a": 4}, after=None)
    assert flat(picks).count(("a", 5)) == 1 and flat(picks).count(("b", 5)) == 9
    assert plan({"a": {5: 1}}, capacity=0, running={}, max_running={}, after=None)[0] == []
    picks, _ = plan({"a": {5: 2}}, capacity=10, running={}, max_running={}, after=None)
    assert flat(picks) == [("a", 5), ("a", 5)]
    assert plan({"a": {5: 0}}, capacity=3, running={}, max_running={}, after=None)[0] == []
