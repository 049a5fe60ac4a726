"""The auditor's Prometheus metrics.

The incident gauges are not counted up and down by whichever auditor happened to triage a
confession (that would be wrong with several auditors, and after a gateway ack or
resolve): every auditor watches ``vigil-incidents`` and :class:`IncidentTally` counts what
the bucket holds, by status and severity, at scrape time.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

import msgspec
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vigil.messages import SEVERITIES

STATUSES = ("open", "acknowledged", "resolved")


class _State(msgspec.Struct):
    """The two fields of an incident the gauges need (the rest is not decoded)."""

    status: str = "open"
    severity: str = "warning"


_state = msgspec.json.Decoder(_State)


class IncidentTally(Collector):
    """Status and severity of every incident in ``vigil-incidents``, fed by a KV watch.

    Nothing is exported until the watch has read what the bucket held when it started: a
    gauge of 0 during start-up would be a lie.
    """

    def __init__(self) -> None:
        self._by_key: dict[str, tuple[str, str]] = {}
        self.synced = False

    def put(self, key: str, value: bytes) -> None:
        try:
            state = _state.decode(value)
        except msgspec.DecodeError:
            self._by_key.pop(key, None)  # not an incident we can read: not counted
            return
        self._by_key[key] = (state.status, state.severity)

    def delete(self, key: str) -> None:
        self._by_key.pop(key, None)

    def reset(self) -> None:
        self._by_key.clear()
        self.synced = False

    def counts(self) -> Tally[tuple[str, str]]:
        return Tally(self._by_key.values())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self.synced:
            return
        counts = self.counts()
        open_now = GaugeMetricFamily(
            "vigil_incidents_open", "Incidents open now (not acknowledged or resolved), as "
            "vigil-incidents holds them")
        open_now.add_metric([], sum(n for (status, _), n in counts.items() if status == "open"))
        yield open_now
        every = GaugeMetricFamily(
            "vigil_incidents", "Incidents in vigil-incidents, by status and severity",
            labels=["status", "severity"])
        for status in STATUSES:
            for severity in SEVERITIES:
                every.add_metric([status, severity], counts.get((status, severity), 0))
        yield every


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.confessions = Counter(
            "vigil_confessions_total", "Confessions recorded, by source and severity (each "
            "counted once, when first recorded: not its redeliveries, repeats or replays)",
            ["source", "severity"], registry=r,
        )
        self.alerts = Counter(
            "vigil_alerts_total", "Alerts published, by severity and reason (a replay "
            "publishes none again)", ["severity", "reason"], registry=r,
        )
        self.opened = Counter(
            "vigil_incidents_opened_total", "Incidents opened or reopened, by severity",
            ["severity"], registry=r,
        )
        self.invalid = Counter(
            "vigil_confessions_invalid_total", "Messages on the issues stream that were not "
            "valid confessions (recorded with their error)", registry=r,
        )
        self.triage_failed = Counter(
            "vigil_confessions_triage_failed_total", "Confessions recorded but given up on "
            "by triage (confessed by the auditor)", registry=r,
        )
        self.incidents = IncidentTally()
        r.register(self.incidents)
