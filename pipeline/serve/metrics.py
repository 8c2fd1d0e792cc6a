"""Prometheus metrics of one app: requests by route and status, a latency histogram by route, and the
requests the guard refused before any route saw them, by reason."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """A registry of its own, so two apps in one process (tests, Ray Serve replicas) never collide."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "icar_requests", "HTTP requests served", ["route", "status"], registry=self.registry
        )
        self.errors = Counter(
            "icar_request_errors", "requests answered with a 5xx status", ["route"], registry=self.registry
        )
        self.latency = Histogram(
            "icar_request_seconds",
            "time from request to response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.refusals = Counter(
            "icar_refused_requests",
            "requests refused before reaching a route (host, token, busy, size, timeout)",
            ["reason"],
            registry=self.registry,
        )

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 500:
            self.errors.labels(route).inc()

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
