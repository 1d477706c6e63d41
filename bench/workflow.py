"""Section 3: full lifecycles through the service layer, next to the machine's commit limit.

A lifecycle is six calls, each its own statement and commit, as a workflow makes
them: enqueue, provisioning, three heartbeats, running. The limit is the simplest
write PostgreSQL can commit: a single-row UPDATE in autocommit, from 16 asyncpg
connections each updating its own row of a two-column table.

Two more sides say where a gap comes from: the same six statements sent raw on a
plain pool (the cost of the service layer), and a plain single-row UPDATE of the
jobs table (the cost of the table: its width, indexes and constraints).
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
from bench.service import raw_pool
from jobs_app.core.lifecycle import Actor, JobStatus
from jobs_app.core.settings import get_settings
from jobs_app.services import jobs

LIFECYCLE_TARGET = 0.5
STEPS = 6  # enqueue, provisioning, 3 heartbeats, running


async def lifecycle(ctx: Context) -> dict[str, Any]:
    budget = ctx.budget
    tasks = budget.concurrency
    tag = ctx.tag("wf")
    await seed.users(ctx.conn, tag, 1, tasks)
    owners = [(seed.user_id(tag, i), seed.agent_id(tag, i)) for i in range(1, tasks + 1)]
    serial = itertools.count()

    async def service_lifecycle(user_id: Any, agent_id: Any) -> None:
        enqueued = await jobs.enqueue_provisioning_job(
            user_id=user_id, agent_id=agent_id, stripe_event_id=f"evt_{tag}_{next(serial)}"
        )
        job = enqueued.job
        await jobs.update_job_status(
            job.id, status=JobStatus.PROVISIONING, attempt=job.attempt, workflow_run_id="wf"
        )
        for _ in range(3):
            await jobs.record_heartbeat(job.id, attempt=job.attempt)
        await jobs.update_job_status(job.id, status=JobStatus.RUNNING, attempt=job.attempt)

    pool = await raw_pool(ctx.url)
    transition, heartbeat = jobs.TRANSITION, jobs.HEARTBEAT

    def lone(statement: Any, **values: Any) -> list[Any]:
        """A statement's arguments for one call (the service's statement for a batch of
        one: scalar parameters)."""
        return statement.args(values)

    moved = {"attempt": 1, "actor": Actor.WORKFLOW, "dispatch_id": None}
    moved |= {"error": None, "failed_step": None, "failure_reason": None}

    async def raw_lifecycle(user_id: Any, agent_id: Any) -> None:
        """The same six statements on a plain pool of the same size, one call at a time."""
        evt = f"evt_{tag}_{next(serial)}"
        row = await pool.fetchrow(
            jobs.ENQUEUE.sql,
            *lone(
                jobs.ENQUEUE,
                agent_id=agent_id,
                user_id=user_id,
                stripe_event_id=evt,
                region="us-east",
                max_retries=3,
                actor=Actor.API,
            ),
        )
        assert row is not None
        job_id = row["id"]
        await pool.fetchrow(
            transition.sql,
            *lone(
                transition,
                job_id=job_id,
                to_status=JobStatus.PROVISIONING,
                workflow_run_id="wf",
                **moved,
            ),
        )
        for _ in range(3):
            await pool.fetchrow(
                heartbeat.sql,
                *lone(heartbeat, job_id=job_id, attempt=1, dispatch_id=None, workflow_run_id=None),
            )
        await pool.fetchrow(
            transition.sql,
            *lone(
                transition,
                job_id=job_id,
                to_status=JobStatus.RUNNING,
                workflow_run_id=None,
                **moved,
            ),
        )

    await ctx.conn.execute(
        "CREATE TABLE IF NOT EXISTS bench_commit_limit (id int PRIMARY KEY, n bigint NOT NULL)"
    )
    await ctx.conn.execute(
        "INSERT INTO bench_commit_limit SELECT g, 0 FROM generate_series(1, $1::int) g"
        " ON CONFLICT DO NOTHING",
        tasks,
    )
    # Provisioning jobs for the plain UPDATE of the jobs table, one per connection.
    rows_tag = ctx.tag("wfu")
    await seed.users(ctx.conn, rows_tag, 1, tasks)
    await seed.jobs(
        ctx.conn,
        rows_tag,
        first=1,
        count=tasks,
        owners=tasks,
        first_owner=1,
        status="provisioning",
    )
    connections = [await asyncpg.connect(ctx.url) for _ in range(tasks)]

    async def limit_update(conn: asyncpg.Connection, row: int) -> None:
        await conn.execute("UPDATE bench_commit_limit SET n = n + 1 WHERE id = $1", row)

    async def jobs_update(conn: asyncpg.Connection, job_id: Any) -> None:
        await conn.execute(
            "UPDATE provisioning_jobs SET last_heartbeat_at = now(), updated_at = now()"
            " WHERE id = $1",
            job_id,
        )

    async def timed(workers: list[Any], units_per_call: int, max_calls: int | None) -> float:
        """Calls per second x units, from concurrent workers, for the duration or count."""
        loop = asyncio.get_running_loop()
        deadline = float("inf")
        if budget.ops is None and budget.duration is not None:
            deadline = loop.time() + budget.duration
        remaining = max_calls if max_calls is not None else float("inf")
        done = 0

        async def run(worker: Any) -> None:
            # The deadline is checked after each call (as in measure.drive): a process kept
            # off the CPU past a short duration still measures something.
            nonlocal done, remaining
            while remaining > 0:
                remaining -= 1
                await worker()
                done += 1
                if loop.time() >= deadline:
                    return

        start = time.perf_counter()
        await asyncio.gather(*(run(w) for w in workers))
        return done * units_per_call / (time.perf_counter() - start)

    service_workers = [(lambda u=u, a=a: service_lifecycle(u, a)) for u, a in owners]
    raw_workers = [(lambda u=u, a=a: raw_lifecycle(u, a)) for u, a in owners]
    limit_workers = [
        (lambda c=c, i=i: limit_update(c, i)) for i, c in enumerate(connections, start=1)
    ]
    job_ids = [seed.job_id(rows_tag, i) for i in range(1, tasks + 1)]
    jobs_workers = [
        (lambda c=c, j=j: jobs_update(c, j)) for c, j in zip(connections, job_ids, strict=True)
    ]
    calls = None if budget.ops is None else max(budget.ops // STEPS, tasks)
    sides = {
        "lifecycle": lambda: timed(service_workers, STEPS, calls),
        "limit": lambda: timed(limit_workers, 1, budget.ops),
        "raw_lifecycle": lambda: timed(raw_workers, STEPS, calls),
        "jobs_update": lambda: timed(jobs_workers, 1, budget.ops),
    }
    try:
        # Warm-up: statements prepared on every connection.
        await timed(service_workers, STEPS, 2 * tasks)
        await timed(raw_workers, STEPS, 2 * tasks)
        await timed(limit_workers, 1, 8 * tasks)
        await timed(jobs_workers, 1, 8 * tasks)
        samples = await interleave(list(sides.items()), budget.rounds)
    finally:
        for conn in connections:
            await conn.close()
        await pool.close()
    steps, limit = median(samples["lifecycle"]), median(samples["limit"])
    r = paired_ratio(samples["lifecycle"], samples["limit"])
    result = {
        "concurrency": tasks,
        "pool_size": get_settings().pool_max_size,
        "steps_per_lifecycle": STEPS,
        "lifecycle_steps_s": steps,
        "lifecycles_s": steps / STEPS,
        "limit_commits_s": limit,
        "ratio": r,
        "target": LIFECYCLE_TARGET,
        "met": r >= LIFECYCLE_TARGET,
        # Where the gap is: the same statements without the service layer, and the
        # plainest write to the jobs table (a heartbeat's SET, no CTE, no RETURNING).
        "raw_lifecycle_steps_s": median(samples["raw_lifecycle"]),
        "ratio_to_raw_lifecycle": paired_ratio(samples["lifecycle"], samples["raw_lifecycle"]),
        "jobs_update_commits_s": median(samples["jobs_update"]),
        "jobs_update_ratio_to_limit": paired_ratio(samples["jobs_update"], samples["limit"]),
        **{f"{side}_samples": samples[side] for side in sides},
    }
    print(
        f"  lifecycle steps {steps:>8.0f}/s  ({steps / STEPS:.0f} lifecycles/s)"
        f"  limit {limit:>8.0f} commits/s  ratio {r:.2f}"
        f"  (raw SQL lifecycle {result['raw_lifecycle_steps_s']:.0f}/s;"
        f" plain jobs UPDATE {result['jobs_update_commits_s']:.0f}/s)",
        flush=True,
    )
    return result
