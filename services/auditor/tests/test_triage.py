"""Unit tests of triage: fingerprints, counting once, escalation, lifecycle, replay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from vigil.messages import Confession, ConfessionRecord
from vigil_auditor.triage import (
    ESCALATE_COUNT,
    MAX_TASKS,
    MIN_MASKED_ID,
    Incident,
    apply,
    key_of,
    normalize,
)

pytestmark = pytest.mark.unit
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def rec(seq: int, summary: str, *, source: str = "agent", severity: str = "warning",
        task: str | None = None, tenant: str = "acme", category: str | None = "tooling",
        data: dict | None = None, node: str | None = None) -> ConfessionRecord:
    c = Confession(summary=summary, severity=severity, task_id=task, tenant=tenant,
                   category=category, data=data or {}, node=node)
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


def test_task_id_is_masked_only_as_a_whole_token() -> None:
    # A one-letter task id would otherwise eat every "t" of the summary.
    assert normalize("git not found", "t") == "git not found"
    assert normalize("git not found", "not") == "git <task> found"
    assert normalize("job-1 failed, job-10 did not", "job-1") == \
        "<task> failed, job-<n> did not"
    assert normalize("see my-job-1/log and xjob-1", "job-1") == "see my-job-<n>/log and xjob-<n>"
    assert normalize("(job-1): failed.", "job-1") == "(<task>): failed."
    assert normalize("a.b+c failed", "a.b+c") == "<task> failed"  # ids are not patterns


def test_very_short_ids_are_left_alone() -> None:
    assert MIN_MASKED_ID == 3
    assert normalize("task ab failed in ab", "ab") == "task ab failed in ab"
    assert normalize("task abc failed", "abc") == "task <task> failed"


def test_node_named_by_the_confession_is_masked() -> None:
    assert normalize("limits not enforceable on node vm-3fd", node="vm-3fd") == \
        "limits not enforceable on node <node>"
    records = [rec(i + 1, f"limits not enforceable on node {node}", source="executor",
                   category="limits_unenforced", node=node)
               for i, node in enumerate(["vm-3fd", "vm-7ab", "node-x9", "vm-3fd"])]
    incidents, alerts = run(records)
    (inc,) = incidents.values()  # one incident, not one per node
    assert inc.count == 4 and inc.title == "limits not enforceable on node <node>"
    assert len(alerts) == 1


def test_agents_incidents_are_their_tenants_own() -> None:
    # The same complaint from two tenants' agents: two incidents, each its tenant's.
    records = [rec(1, "registry unreachable", task="a-1", tenant="acme"),
               rec(2, "registry unreachable", task="g-1", tenant="globex"),
               rec(3, "registry unreachable", task="a-2", tenant="acme")]
    incidents, _ = run(records)
    owners = {inc.tenant: (inc.tenants, inc.tasks) for inc in incidents.values()}
    # Tasks are listed by key (<tenant>.<id>): ids are per tenant.
    assert owners == {"acme": (["acme"], ["acme.a-1", "acme.a-2"]),
                      "globex": (["globex"], ["globex.g-1"])}
    stats = {inc.tenant: inc.tenant_stats for inc in incidents.values()}
    assert stats["acme"]["acme"].count == 2 and stats["globex"]["globex"].count == 1


def test_two_tenants_tasks_of_one_id_are_two_tasks_and_each_tenant_counts_its_own() -> None:
    shared, _ = run([rec(1, "node disk full", source="executor", task="job1", tenant="acme"),
                     rec(2, "node disk full", source="executor", task="job1",
                         tenant="globex"),
                     rec(3, "node disk full", source="executor", task="job1", tenant="acme")])
    (inc,) = shared.values()
    assert inc.tasks == ["acme.job1", "globex.job1"] and inc.tasks_total == 2
    assert {t: (s.count, s.first_seen <= s.last_seen) for t, s in inc.tenant_stats.items()} \
        == {"acme": (2, True), "globex": (1, True)}
    # The platform's own confession about the same two tenants' tasks: one shared incident.
    shared, _ = run([rec(1, "registry unreachable", source="executor", task="a-1"),
                     rec(2, "registry unreachable", source="executor", task="g-1",
                         tenant="globex")])
    (inc,) = shared.values()
    assert inc.tenant is None and inc.tenants == ["acme", "globex"]


def test_each_tenants_tasks_are_kept_whole() -> None:
    # A platform incident (here an executor's) that hits many tenants' tasks.
    records = [rec(i + 1, "registry unreachable", task=f"{tenant}-{i}", tenant=tenant,
                   source="executor")
               for i, tenant in enumerate(["acme", "globex"] * 6)]
    records.append(rec(13, "registry unreachable", task="acme-0", tenant="acme",
                       source="executor"))  # again
    records.append(rec(14, "registry unreachable", task=None, tenant="acme",
                       source="executor"))
    incidents, _ = run(records)
    (inc,) = incidents.values()
    assert inc.tenants == ["acme", "globex"]
    assert inc.tenant_tasks == {"acme": [f"acme-{i}" for i in range(0, 12, 2)],
                                "globex": [f"globex-{i}" for i in range(1, 12, 2)]}
    assert len(inc.first_samples) + len(inc.last_samples) == 5  # fewer than the tasks
    big = [rec(i + 1, "x", task=f"t{i:04d}") for i in range(MAX_TASKS + 5)]
    (inc,) = run(big)[0].values()
    assert len(inc.tenant_tasks["acme"]) == MAX_TASKS
    assert MAX_TASKS < inc.tasks_total <= MAX_TASKS + 8  # past the named: an estimate


def test_tasks_past_the_named_count_once_however_often_they_confess() -> None:
    n = MAX_TASKS + 50
    once = [rec(i + 1, "x", task=f"t{i:04d}") for i in range(n)]
    (first,) = run(once)[0].values()
    again = once + [rec(n + i + 1, "x", task=f"t{i:04d}") for i in range(n)]
    (second,) = run(again)[0].values()
    assert second.count == 2 * n
    assert second.tasks_total == first.tasks_total  # repeats move nothing
    assert abs(first.tasks_total - n) <= n * 0.05
    # Exact while every task is named.
    (small,) = run(once[:MAX_TASKS] + once[:MAX_TASKS])[0].values()
    assert small.tasks_total == MAX_TASKS and not small.tasks_sketch


def test_incidents_without_tenant_tasks_still_decode() -> None:
    old = msgspec.json.encode({"id": "inc_x", "fingerprint": "f", "source": "agent",
                               "title": "t", "severity": "error", "first_seen": T0,
                               "last_seen": T0, "window_start": T0})
    inc = msgspec.json.decode(old, type=Incident)
    assert inc.tenant_tasks == {}
    new, _ = apply(inc, rec(1, "t", task="job-9"), T0)
    assert new is not None and new.tenant_tasks == {"acme": ["job-9"]}
