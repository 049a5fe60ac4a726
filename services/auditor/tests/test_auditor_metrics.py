"""Unit tests: the incident gauges are what the bucket holds, and backoffs stay short."""

from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest

from vigil_auditor.metrics import Metrics
from vigil_auditor.service import retry_delay

pytestmark = pytest.mark.unit


def scrape(metrics: Metrics) -> dict[str, float]:
    out = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("vigil_incidents") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def incident(status: str, severity: str) -> bytes:
    return json.dumps({"id": "x", "status": status, "severity": severity,
                       "title": "t", "count": 3}).encode()


def test_incident_gauges_follow_the_bucket() -> None:
    m = Metrics()
    m.incidents.put("a", incident("open", "error"))
    assert "vigil_incidents_open" not in scrape(m)  # not until the watch has caught up
    m.incidents.synced = True
    m.incidents.put("b", incident("open", "critical"))
    m.incidents.put("c", incident("resolved", "warning"))
    got = scrape(m)
    assert got["vigil_incidents_open"] == 2
    assert got['vigil_incidents{severity="error",status="open"}'] == 1
    assert got['vigil_incidents{severity="warning",status="resolved"}'] == 1
    m.incidents.put("a", incident("acknowledged", "error"))  # acked by the gateway
    m.incidents.delete("b")
    m.incidents.put("d", b"not json")
    got = scrape(m)
    assert got["vigil_incidents_open"] == 0
    assert got['vigil_incidents{severity="error",status="acknowledged"}'] == 1


def test_triage_retries_are_short() -> None:
    assert [retry_delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]
