"""The periodic sweep that fails stale jobs, run inside each app process.

Every replica runs one; `sweep_stale_jobs` locks with SKIP LOCKED and re-checks
on the latest row, so N replicas reach the same outcome as one.
"""

from __future__ import annotations

import asyncio
import random

from jobs_app.core.logs import get_logger, job_context
from jobs_app.core.tracing import round_span
from jobs_app.services import jobs

log = get_logger("jobs_app.sweeper")


async def sweep_once() -> int:
    """One round, in a span of its own: fail what is stale, log each job it failed."""
    with round_span("sweeper.round") as span:
        try:
            failed = await jobs.sweep_stale_jobs()
        except Exception:  # the next round tries again, e.g. once the database is back
            log.warning("sweep failed", exc_info=True)
            return 0
        if span is not None:
            span.set_attribute("jobs_app.failed_jobs", len(failed))
        for job in failed:
            with job_context(
                job.id,
                job.attempt,
                dispatch_id=job.dispatch_id,
                workflow_run_id=job.workflow_run_id,
            ):
                log.info("stale job failed", reason=job.failure_reason, error=job.error)
        return len(failed)


async def run_forever(interval: float) -> None:
    while True:
        # Jitter keeps replicas started together from sweeping in lockstep.
        await asyncio.sleep(interval * random.uniform(0.8, 1.2))
        await sweep_once()
