"""Logs, request ids and traces (README: "Logs and traces").

from jobs_app.observability import get_logger, job_context, round_span

log = get_logger("jobs_app.dispatch")
with round_span("dispatch.round"):
    with job_context(job.id, job.attempt, dispatch_id=dispatch_id):
        log.info("dispatched", workflow_run_id=run_id)
"""

from jobs_app.observability.logs import (
    bind_job,
    configure_logging,
    get_logger,
    job_context,
    structlog_plugin,
)
from jobs_app.observability.requests import RequestContextMiddleware
from jobs_app.observability.tracing import (
    configure_tracing,
    current_trace_ids,
    round_span,
    shutdown_tracing,
)

__all__ = [
    "RequestContextMiddleware",
    "bind_job",
    "configure_logging",
    "configure_tracing",
    "current_trace_ids",
    "get_logger",
    "job_context",
    "round_span",
    "shutdown_tracing",
    "structlog_plugin",
]
