"""Unit tests of triage: fingerprints, counting once, escalation, lifecycle, replay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from vigil.messages import Confession, ConfessionRecord
from vigil_auditor.triage import ESCALATE_COUNT, Incident, apply, key_of, normalize

pytestmark = pytest.mark.unit
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def rec(seq: int, summary: str, *, source: str = "agent", severity: str = "warning",
        task: str | None = None, tenant: str = "acme", category: str | None = "tooling",
        data: dict | None = None) -> ConfessionRecord:
    c = Confession(summary=summary, severity=severity, task_id=task, tenant=tenant,
                   category=category, data=data or {})
    return ConfessionRecord(id=f"{source}.c{seq}", source=source, severity=severity,
                            subject=f"vigil.issues.{source}.{severity}", stream_seq=seq,
                            received_at=T0, confession=c)


def run(records: list[ConfessionRecord]) -> tuple[dict[str, Incident], list]:
    incidents: dict[str, Incident] = {}
    alerts = []
    for i, r in enumerate(records):
        key = key_of(r)
        if key is None and r.confession is not None and r.source == "operator":
            key = r.confession.data["incident_id"]
        if key is None:
            continue
        new, raised = apply(incidents.get(key), r, T0 + timedelta(seconds=i))
        if new is not None:
            incidents[key] = new
        alerts += raised
    return incidents, alerts


def test_same_problem_with_different_ids_and_numbers_is_one_incident() -> None:
    records = [rec(i + 1, f"git missing in task task-{i}: exit {100 + i} at /opt/job{i}/bin",
                   task=f"task-{i}") for i in range(50)]
    records.append(rec(51, "credentials for s3 rejected", task="task-x", category="auth"))
    incidents, _ = run(records)
    counts = sorted(i.count for i in incidents.values())
    assert counts == [1, 50]
    big = max(incidents.values(), key=lambda i: i.count)
    assert big.tasks_total == 50 and big.tenants == ["acme"]
    assert big.title == "git missing in task <task>: exit <n> at <path>"
    assert len(big.first_samples) == 3 and len(big.last_samples) == 2


def test_redelivery_counts_nothing_twice() -> None:
    r = rec(7, "disk full")
    first, _ = apply(None, r, T0)
    assert first is not None and first.count == 1
    again, alerts = apply(first, r, T0)
    assert again is None and alerts == []


def test_escalation_and_critical() -> None:
    records = [rec(i + 1, "slow disk", severity="warning") for i in range(ESCALATE_COUNT)]
    incidents, alerts = run(records)
    (inc,) = incidents.values()
    assert inc.severity == "error"
    assert [(a.reason, a.severity) for a in alerts] == [("opened", "warning"),
                                                        ("escalated", "error")]
    incidents, alerts = run([rec(1, "oom"), rec(2, "oom", severity="critical")])
    assert next(iter(incidents.values())).severity == "critical"
    assert [a.severity for a in alerts] == ["warning", "critical"]


def test_lifecycle_ack_resolve_reopen() -> None:
    first = rec(1, "tool missing")
    key = key_of(first)
    assert key is not None
    ops = [rec(2, "ack", source="operator", category="incident_ack",
               data={"incident_id": key, "by": "ana"}),
           rec(3, "resolve", source="operator", category="incident_resolve",
               data={"incident_id": key, "by": "ana"})]
    incidents, _ = run([first, *ops])
    assert incidents[key].status == "resolved" and incidents[key].resolved_by == "ana"
    incidents, alerts = run([first, *ops, rec(4, "tool missing")])
    assert incidents[key].status == "open" and incidents[key].reopened == 1
    assert alerts[-1].reason == "reopened"


def test_replay_is_deterministic() -> None:
    records = [rec(i + 1, f"problem {i % 3} in job {i}", task=f"j{i}") for i in range(30)]
    assert run(records) == run(records)


def test_normalize_keeps_words() -> None:
    assert normalize("pip install failed: No module named yaml") == \
        "pip install failed: No module named yaml"
