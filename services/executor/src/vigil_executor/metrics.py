"""The executor's Prometheus metrics, on its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.tasks = Counter(
            "vigil_tasks_total", "Task outcomes and transitions written, by status",
            ["status"], registry=r,
        )
        self.duration = Histogram(
            "vigil_task_duration_seconds", "Agent run time, container start to exit",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400),
            registry=r,
        )
        self.container_start = Histogram(
            "vigil_container_start_seconds", "Time to create, attach and start a container",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10), registry=r,
        )
        self.running = Gauge("vigil_executor_running", "Agents running now", registry=r)
        self.slots = Gauge("vigil_executor_slots", "Configured slots", registry=r)
        self.log_lines = Counter(
            "vigil_log_lines_total", "Agent output lines forwarded", ["stream"], registry=r,
        )
        self.confessions = Counter(
            "vigil_confessions_published_total", "Confessions published, by source/severity",
            ["source", "severity"], registry=r,
        )
        self.leases_lost = Counter(
            "vigil_leases_lost_total", "Tasks whose lease this executor lost", registry=r,
        )
        self.retries = Counter(
            "vigil_task_retries_total", "Agent failures sent back for another attempt",
            registry=r,
        )
        self.handed_back = Counter(
            "vigil_tasks_handed_back_total", "Tasks naked back (drain, runtime trouble)",
            ["reason"], registry=r,
        )
        self.egress_connections = Counter(
            "vigil_executor_egress_connections_total",
            "Connections agents asked the egress proxy for, by outcome: allowed, refused "
            "(the rules, a non-public address), failed (resolution, connect), invalid "
            "(a malformed request)", ["outcome"], registry=r,
        )
        self.egress_bytes = Counter(
            "vigil_executor_egress_bytes_total",
            "Bytes relayed by the egress proxy: out (agent to host), in (host to agent)",
            ["direction"], registry=r,
        )
        self.egress_events_dropped = Counter(
            "vigil_executor_egress_events_dropped_total",
            "Egress connections past an attempt's event cap (VIGIL_EGRESS_MAX_EVENTS): "
            "counted here, not recorded as events", registry=r,
        )
