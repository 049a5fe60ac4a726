"""The scheduler's Prometheus metrics, on its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.submissions = Counter(
            "vigil_scheduler_submissions_total",
            "Submissions handled, by outcome (scheduled, duplicate, rejected, retried)",
            ["outcome"],
            registry=self.registry,
        )
        self.tasks = Counter(
            "vigil_tasks_total",
            "Task state transitions written, by status",
            ["status"],
            registry=self.registry,
        )
        self.control = Counter(
            "vigil_scheduler_control_total",
            "Cancel and redrive requests handled, by verb and outcome",
            ["verb", "outcome"],
            registry=self.registry,
        )
        self.dispatched = Counter(
            "vigil_scheduler_dispatched_total",
            "Queued tasks released to executors by the dispatcher (fair order)",
            registry=self.registry,
        )
        self.admission_seconds = Histogram(
            "vigil_scheduler_admission_seconds",
            "Time from receiving a submission to the work item being durable",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5),
            registry=self.registry,
        )
