"""The distinct-count sketch behind an incident's ``tasks_total``."""

from __future__ import annotations

import pytest

from vigil.sketch import Distinct


def test_a_key_seen_before_never_changes_the_sketch() -> None:
    sketch = Distinct()
    assert sketch.add("acme.t1") is True
    before = sketch.encode()
    for _ in range(100):
        assert sketch.add("acme.t1") is False
    assert sketch.encode() == before and sketch.estimate() == 1


@pytest.mark.parametrize("n", [101, 150, 1_000, 20_000, 200_000])
def test_the_estimate_is_within_a_few_percent(n: int) -> None:
    sketch = Distinct()
    for i in range(n):
        sketch.add(f"tenant-{i % 7}.task-{i}")
    for i in range(0, n, 3):  # repeats count nothing
        sketch.add(f"tenant-{i % 7}.task-{i}")
    error = abs(sketch.estimate() - n) / n
    assert error < 0.07, (n, sketch.estimate())  # 3 standard errors (2.3%)


def test_it_survives_being_stored_and_a_damaged_one_starts_empty() -> None:
    sketch = Distinct()
    for i in range(500):
        sketch.add(str(i))
    again = Distinct(sketch.encode())
    assert again.registers == sketch.registers and again.estimate() == sketch.estimate()
    assert Distinct("not base64!").estimate() == 0
    assert Distinct("AAAA").estimate() == 0  # the wrong size
