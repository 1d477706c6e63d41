"""The periodic sweep that fails stale jobs, run inside each app process.

Every replica runs one; `sweep_stale_jobs` locks with SKIP LOCKED and re-checks
on the latest row, so N replicas reach the same outcome as one.
"""

from __future__ import annotations

import asyncio
import logging
import random

from jobs_app import queue

log = logging.getLogger("jobs_app.sweeper")


async def run_forever(interval: float) -> None:
    while True:
        # Jitter keeps replicas started together from sweeping in lockstep.
        await asyncio.sleep(interval * random.uniform(0.8, 1.2))
        try:
            failed = await queue.sweep_stale_jobs()
        except Exception:  # the next round tries again, e.g. once the database is back
            log.warning("sweep failed", exc_info=True)
            continue
        for job in failed:
            log.info("failed stale job %s: %s", job.id, job.error)
