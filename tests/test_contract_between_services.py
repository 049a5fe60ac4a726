"""Where two services must agree on data, check that they do (pure logic, no processes)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from vigil.transitions import claim_first as first_running_state
from vigil_scheduler.admission import Admit, admit
from vigil_scheduler.settings import SchedulerSettings

pytestmark = pytest.mark.unit


def test_executor_rebuilds_the_scheduled_state_from_the_work_item() -> None:
    """The executor's one-round-trip claim writes a state built from the work item; it must
    keep every field the scheduler recorded, or a fresh claim would lose data."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    result = admit(b'{"command": ["true"], "env": {"A": "1"}, "labels": {"k": "v"}}',
                   "vigil.submit.acme", "m-1", 42, now, SchedulerSettings())
    assert isinstance(result, Admit)
    later = now + timedelta(seconds=1)
    rebuilt = first_running_state(result.work, "node-a", later, work_seq=7)
    expected = msgspec.structs.replace(
        result.state, status="running", attempt=1, executor="node-a", updated_at=later,
        started_at=later, work_seq=7, delivery=1,
    )
    assert rebuilt == expected


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"command": ["echo", 1]}', "$.command[1]"),
        (b'{"env": {}}', "$.command"),
        (b"not json", "$"),
    ],
)
def test_a_recorded_rejection_names_its_field(body: bytes, field: str) -> None:
    """The gateway names the field of a spec the scheduler refused from the state's
    typed ``error_field``, never by reading the error's text."""
    from vigil_scheduler.admission import Reject, failed_state, unreadable

    now = datetime(2026, 1, 1, tzinfo=UTC)
    reject = admit(body, "vigil.submit.acme", "m-1", 7, now, SchedulerSettings())
    assert isinstance(reject, Reject)
    state = failed_state(reject, 7, now)
    assert state is not None and state.error_field == field
    bug = failed_state(unreadable("vigil.submit.acme", "m-2", 8, KeyError("x")), 8, now)
    assert bug is not None and bug.error_field is None  # a refusal of the whole task
