"""The auditor's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.confessions = Counter(
            "vigil_confessions_total", "Confessions recorded, by source and severity",
            ["source", "severity"], registry=r,
        )
        self.alerts = Counter(
            "vigil_alerts_total", "Alerts raised, by severity and reason",
            ["severity", "reason"], registry=r,
        )
        self.opened = Counter(
            "vigil_incidents_opened_total", "Incidents opened or reopened, by severity",
            ["severity"], registry=r,
        )
        self.open_incidents = Gauge(
            "vigil_incidents_open", "Incidents open now (not acknowledged or resolved)",
            registry=r,
        )
        self.invalid = Counter(
            "vigil_confessions_invalid_total", "Messages on the issues stream that were not "
            "valid confessions (recorded with their error)", registry=r,
        )
