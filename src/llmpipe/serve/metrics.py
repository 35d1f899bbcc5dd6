"""Prometheus metrics of the router, per version and role (stable/canary)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class RouterMetrics:
    """One registry per router, so several routers (tests) never share counters."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmpipe_router_requests_total",
                                "Backend requests by version, role and outcome (ok/error)",
                                ["version", "role", "outcome"], registry=r)
        self.latency = Histogram("llmpipe_router_backend_latency_seconds",
                                 "Backend latency of successful requests",
                                 ["version", "role"], buckets=LATENCY_BUCKETS, registry=r)
        self.compliance = Counter("llmpipe_router_format_total",
                                  "Scored replies by version, role and result (compliant/malformed)",
                                  ["version", "role", "result"], registry=r)
        self.retries = Counter("llmpipe_router_canary_retries_total",
                               "Failed canary requests retried on stable", ["version"], registry=r)
        self.client_failures = Counter("llmpipe_router_client_failures_total",
                                       "Requests whose final answer to the client was a router-made error",
                                       registry=r)
        self.weight = Gauge("llmpipe_router_canary_weight", "Share of traffic sent to the canary",
                            registry=r)
        self.info = Gauge("llmpipe_router_backend_info", "1 for each configured backend",
                          ["version", "role"], registry=r)

    def observe(self, version: str, role: str, ok: bool, latency_s: float, compliant: bool | None) -> None:
        self.requests.labels(version, role, "ok" if ok else "error").inc()
        if ok:
            self.latency.labels(version, role).observe(latency_s)
        if compliant is not None:
            self.compliance.labels(version, role, "compliant" if compliant else "malformed").inc()

    def set_backends(self, backends: dict[str, str]) -> None:
        self.info.clear()
        for role, version in backends.items():
            self.info.labels(version, role).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
