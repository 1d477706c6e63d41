"""Prometheus metrics. Under `jobs-app serve --workers N`, PROMETHEUS_MULTIPROC_DIR is
set before any worker starts, and /metrics sums every worker's files."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["CONTENT_TYPE_LATEST", "render"]

REQUESTS = Counter(
    "jobs_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
LATENCY = Histogram(
    "jobs_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
TRANSITIONS = Counter("jobs_transitions_total", "Job status transitions", ["to_status"])
STALE_FAILED = Counter("jobs_stale_failed_total", "Stale jobs failed by timeout", ["reason"])
DISPATCH_OUTCOMES = Counter(
    "jobs_dispatch_outcomes_total",
    "Answers the provisioner gave, by request kind (dispatch, reconcile, cancel)",
    ["kind", "outcome"],
)
DISPATCH_PAUSES = Counter(
    "jobs_dispatch_pauses_total",
    "Times a dispatcher paused: rate_limited, or misconfigured (credentials, repository)",
    ["reason"],
)
STEP_REPORTS = Counter(
    "jobs_step_reports_total", "Workflow step reports recorded, by state", ["state"]
)
STEP_DURATION = Histogram(
    "jobs_step_duration_seconds",
    "How long each workflow step took (reported succeeded, from its start)",
    ["step"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
BATCH_SIZE = Histogram(
    "jobs_batch_size",
    "Requests coalesced into one statement and one commit (group commit), by operation",
    ["operation"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
ANNOUNCEMENTS = Counter(
    "jobs_announcements_total",
    "Live-update announcements: sent (one NOTIFY per round), caught_up (found by the "
    "catch-up read, not announced)",
    ["kind"],
)
OPEN_STREAMS = Gauge("jobs_sse_open_streams", "Open event streams", multiprocess_mode="livesum")
STREAMS_CUT_OFF = Counter(
    "jobs_sse_streams_cut_off_total", "Event streams ended because the client stopped reading"
)
WEBHOOK_REJECTED = Counter(
    "jobs_stripe_webhook_rejected_total", "Validly signed Stripe events refused", ["reason"]
)


def render() -> bytes:
    """The exposition text: this process's registry, or all workers' in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
