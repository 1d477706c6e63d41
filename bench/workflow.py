"""Section 3: full lifecycles through the service layer, next to the machine's commit limit.

A lifecycle is six calls, each its own statement and commit, as a workflow makes
them: enqueue, provisioning, three heartbeats, running. The limit is the simplest
write PostgreSQL can commit: a single-row UPDATE in autocommit, from 16 asyncpg
connections each updating its own row.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import asyncpg

from bench import seed
from bench.context import Context
from bench.measure import interleave, median, paired_ratio
from jobs_app import queue
from jobs_app.lifecycle import JobStatus
from jobs_app.settings import get_settings

LIFECYCLE_TARGET = 0.5
STEPS = 6  # enqueue, provisioning, 3 heartbeats, running


async def lifecycle(ctx: Context) -> dict[str, Any]:
    budget = ctx.budget
    tasks = budget.concurrency
    tag = ctx.tag("wf")
    await seed.users(ctx.conn, tag, 1, tasks)
    owners = [(seed.user_id(tag, i), seed.agent_id(tag, i)) for i in range(1, tasks + 1)]
    serial = itertools.count()

    async def one_lifecycle(user_id: Any, agent_id: Any) -> None:
        enqueued = await queue.enqueue_provisioning_job(
            user_id=user_id, agent_id=agent_id, stripe_event_id=f"evt_{tag}_{next(serial)}"
        )
        job = enqueued.job
        await queue.update_job_status(
            job.id, status=JobStatus.PROVISIONING, attempt=job.attempt, workflow_run_id="wf"
        )
        for _ in range(3):
            await queue.record_heartbeat(job.id, attempt=job.attempt)
        await queue.update_job_status(job.id, status=JobStatus.RUNNING, attempt=job.attempt)

    await ctx.conn.execute(
        "CREATE TABLE IF NOT EXISTS bench_commit_limit (id int PRIMARY KEY, n bigint NOT NULL)"
    )
    await ctx.conn.execute(
        "INSERT INTO bench_commit_limit SELECT g, 0 FROM generate_series(1, $1::int) g"
        " ON CONFLICT DO NOTHING",
        tasks,
    )
    connections = [await asyncpg.connect(ctx.url) for _ in range(tasks)]

    async def one_update(conn: asyncpg.Connection, row: int) -> None:
        await conn.execute("UPDATE bench_commit_limit SET n = n + 1 WHERE id = $1", row)

    async def timed(workers: list[Any], units_per_call: int, max_calls: int | None) -> float:
        """Calls per second x units, from concurrent workers, for the duration or count."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget.duration if budget.ops is None else float("inf")
        remaining = max_calls if max_calls is not None else float("inf")
        done = 0

        async def run(worker: Any) -> None:
            nonlocal done, remaining
            while remaining > 0 and loop.time() < deadline:
                remaining -= 1
                await worker()
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(run(w) for w in workers))
        return done * units_per_call / (time.perf_counter() - start)

    lifecycle_workers = [(lambda u=u, a=a: one_lifecycle(u, a)) for u, a in owners]
    limit_workers = [
        (lambda c=c, i=i: one_update(c, i)) for i, c in enumerate(connections, start=1)
    ]
    lifecycle_calls = None if budget.ops is None else max(budget.ops // STEPS, tasks)

    try:
        # Warm-up: statements prepared on every connection.
        await timed(lifecycle_workers, STEPS, 2 * tasks)
        await timed(limit_workers, 1, 8 * tasks)
        samples = await interleave(
            [
                ("lifecycle", lambda: timed(lifecycle_workers, STEPS, lifecycle_calls)),
                ("limit", lambda: timed(limit_workers, 1, budget.ops)),
            ],
            budget.rounds,
        )
    finally:
        for conn in connections:
            await conn.close()
    steps, limit = median(samples["lifecycle"]), median(samples["limit"])
    r = paired_ratio(samples["lifecycle"], samples["limit"])
    print(
        f"  lifecycle steps {steps:>8.0f}/s  ({steps / STEPS:.0f} lifecycles/s)"
        f"  limit {limit:>8.0f} commits/s  ratio {r:.2f}",
        flush=True,
    )
    return {
        "concurrency": tasks,
        "pool_size": get_settings().pool_max_size,
        "steps_per_lifecycle": STEPS,
        "lifecycle_steps_s": steps,
        "lifecycles_s": steps / STEPS,
        "limit_commits_s": limit,
        "ratio": r,
        "target": LIFECYCLE_TARGET,
        "met": r >= LIFECYCLE_TARGET,
        "lifecycle_samples": samples["lifecycle"],
        "limit_samples": samples["limit"],
    }
