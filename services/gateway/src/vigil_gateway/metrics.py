"""The gateway's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "vigil_http_requests_total", "HTTP requests, by route and status",
            ["route", "status"], registry=r,
        )
        self.latency = Histogram(
            "vigil_http_request_seconds", "HTTP request latency, by route", ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.submissions = Counter(
            "vigil_gateway_submissions_total", "Tasks submitted over HTTP, by outcome",
            ["outcome"], registry=r,
        )
        self.streams = Gauge("vigil_gateway_event_streams",
                             "Open streaming answers (SSE events, followed logs)", registry=r)
        self.cancels = Counter("vigil_gateway_cancels_total", "Cancel requests published",
                               registry=r)
        self.rate_limited = Counter("vigil_gateway_rate_limited_total",
                                    "Requests refused with 429 (per-token rate limit)",
                                    registry=r)
