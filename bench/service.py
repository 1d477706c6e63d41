"""Sections 1 and 2: the service layer against raw asyncpg, and round trips per operation."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg

from bench.context import Context
from bench.counting import CountingConnection, start_tally, stop_tally
from bench.measure import drive, interleave, median, paired_ratio
from bench.operations import OPERATIONS, Inputs, Operation, Step, Values, raw_call
from jobs_app.core.lifecycle import JobStatus
from jobs_app.core.settings import get_settings
from jobs_app.db import connector
from jobs_app.services import jobs

SERVICE_TARGET = 0.8


async def _noop_reset(conn: asyncpg.Connection) -> None:
    """Like the service pool's: no RESET round trip on release."""


async def raw_pool(url: str, **options: Any) -> asyncpg.Pool:
    """A plain asyncpg pool with the service's size and session settings, minus its reset
    round trip (the service skips it too), so the raw side is the best case."""
    settings = get_settings()
    pool = await asyncpg.create_pool(
        url,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        reset=_noop_reset,
        server_settings=connector.PLANNING,
        **options,
    )
    assert pool is not None
    return pool


async def service_vs_raw(ctx: Context) -> dict[str, Any]:
    budget = ctx.budget
    inputs = Inputs(ctx)
    await inputs.setup()
    timeout = get_settings().db_timeout_seconds
    pool = await raw_pool(ctx.url)
    # The service bounds every acquire and statement by db_timeout_seconds; this raw
    # pool does the same, to show what those bounds cost apart from the layer itself.
    bounded = await raw_pool(ctx.url, command_timeout=timeout)
    rows = []
    try:
        for op in OPERATIONS.values():
            rows.append(await _compare(ctx, op, inputs, pool, bounded, timeout))
            _progress(rows[-1])
    finally:
        await pool.close()
        await bounded.close()
    return {
        "concurrency": budget.concurrency,
        "pool_size": get_settings().pool_max_size,
        "rounds": budget.rounds,
        "duration_s": budget.duration,
        "ops": budget.ops,
        "target": SERVICE_TARGET,
        "rows": rows,
    }


def _progress(row: dict[str, Any]) -> None:
    print(
        f"  {row['operation']:<28} service {row['service_ops_s']:>8.0f}/s"
        f"  raw {row['raw_ops_s']:>8.0f}/s  ratio {row['ratio']:.2f}"
        f"  (raw with timeouts {row['raw_timeouts_ops_s']:>8.0f}/s)",
        flush=True,
    )


async def _compare(
    ctx: Context,
    op: Operation,
    inputs: Inputs,
    pool: asyncpg.Pool,
    bounded: asyncpg.Pool,
    bound: float,
) -> dict[str, Any]:
    budget = ctx.budget

    async def service(values: Values) -> None:
        await op.service(values)

    async def raw(steps: list[Step]) -> None:
        await raw_call(pool, steps)

    async def raw_timeouts(steps: list[Step]) -> None:
        for sql, args in steps:
            async with bounded.acquire(timeout=bound) as conn:
                await conn.fetchrow(sql, *args)

    functions: dict[str, Callable[[Any], Awaitable[None]]] = {
        "service": service,
        "raw": raw,
        "raw_timeouts": raw_timeouts,
    }
    cycles: dict[str, Iterator[Any]] = {}
    if not op.single_use:
        fixed = inputs.fixed(op.name)
        steps = [op.raw_steps(v) for v in fixed]
        cycles["service"] = itertools.cycle(fixed)
        cycles["raw"] = itertools.cycle(steps)
        cycles["raw_timeouts"] = itertools.cycle(steps)

    async def items(side: str, count: int) -> Iterator[Any]:
        if not op.single_use:
            return cycles[side]
        values = await inputs.single_use(op.name, count)
        if side == "service":
            return iter(values)
        return iter([op.raw_steps(v) for v in values])

    # Warm up both sides (every pooled connection prepares the statement) and
    # estimate the rate, to size single-use inputs.
    estimate = 0.0
    warmup = (2 if ctx.quick else 8) * budget.concurrency
    for side, fn in functions.items():
        rate = await drive(
            fn, await items(side, warmup), concurrency=budget.concurrency, ops=warmup
        )
        estimate = max(estimate, rate.per_second)

    def measurement(side: str) -> Any:
        fn = functions[side]

        async def measure() -> float:
            nonlocal estimate
            supply = await items(side, budget.supply(estimate))
            rate = await drive(
                fn,
                supply,
                concurrency=budget.concurrency,
                duration=budget.duration if budget.ops is None else None,
                ops=budget.ops,
            )
            estimate = max(estimate, rate.per_second)
            return rate.per_second

        return measure

    samples = await interleave([(side, measurement(side)) for side in functions], budget.rounds)
    r = paired_ratio(samples["service"], samples["raw"])
    return {
        "operation": op.name,
        "service_ops_s": median(samples["service"]),
        "raw_ops_s": median(samples["raw"]),
        "ratio": r,
        "met": r >= SERVICE_TARGET,
        "raw_timeouts_ops_s": median(samples["raw_timeouts"]),
        "ratio_to_raw_timeouts": paired_ratio(samples["service"], samples["raw_timeouts"]),
        **{f"{side}_samples": samples[side] for side in functions},
    }


# --------------------------------------------------------------------------- round trips

ROUND_TRIP_TARGET = 1
_MUST_BE_ONE = {"enqueue", "claim", "heartbeat", "complete", "fail", "retry"}


async def round_trips(ctx: Context) -> dict[str, Any]:
    """Statements each service call sends, counted on the wire by the pool's
    connection class: steady state (statement cached) and on a fresh connection."""
    await connector.close_pool()
    await connector.start_pool(connection_class=CountingConnection)
    try:
        rows = [await _count(ctx, name, call) for name, call in _round_trip_calls(ctx)]
    finally:
        await connector.close_pool()
        await connector.start_pool()
    for row in rows:
        print(
            f"  {row['operation']:<28} {row['round_trips']:.2f} round trips ({row['statements']})",
            flush=True,
        )
    return {"target": ROUND_TRIP_TARGET, "rows": rows}


def _round_trip_calls(ctx: Context) -> list[tuple[str, Any]]:
    """(name, factory) pairs; a factory seeds what one call needs and returns the call."""
    inputs = Inputs(ctx)

    def single(op_name: str, status: JobStatus | None = None) -> Any:
        async def factory() -> Any:
            (values,) = await inputs.single_use(op_name, 1)
            op = OPERATIONS[op_name]
            return lambda: op.service(values)

        return factory

    async def provisioning() -> Any:
        (values,) = await inputs.single_use("complete", 1)
        return lambda: jobs.record_heartbeat(values["job_id"], attempt=1)

    async def fail() -> Any:
        (values,) = await inputs.single_use("claim", 1)
        return lambda: jobs.update_job_status(
            values["job_id"], status=JobStatus.FAILED, attempt=1, error="bench"
        )

    async def retry() -> Any:
        (values,) = await inputs.single_use("claim", 1)
        await jobs.update_job_status(
            values["job_id"], status=JobStatus.FAILED, attempt=1, error="bench"
        )
        return lambda: jobs.retry_job(values["job_id"])

    async def enqueued() -> Any:
        (values,) = await inputs.single_use("enqueue", 1)
        job = (await OPERATIONS["enqueue"].service(values)).job  # type: ignore[attr-defined]
        return job

    async def get_job() -> Any:
        job = await enqueued()
        return lambda: jobs.get_job(job.id)

    async def by_agent() -> Any:
        job = await enqueued()
        return lambda: jobs.get_job_by_agent_id(job.agent_id)

    async def by_stripe() -> Any:
        job = await enqueued()
        return lambda: jobs.get_job_by_stripe_event_id(job.stripe_event_id)

    async def list_jobs() -> Any:
        job = await enqueued()
        return lambda: jobs.list_jobs(user_id=job.user_id)

    async def events() -> Any:
        job = await enqueued()
        return lambda: jobs.list_job_events(job.id)

    async def sweep() -> Any:
        return lambda: jobs.sweep_stale_jobs()

    async def replay() -> Any:
        (values,) = await inputs.single_use("enqueue", 1)
        await OPERATIONS["enqueue"].service(values)
        return lambda: OPERATIONS["enqueue"].service(values)

    return [
        ("enqueue", single("enqueue")),
        ("enqueue (replay)", replay),
        ("claim", single("claim")),
        ("heartbeat", provisioning),
        ("complete", single("complete")),
        ("fail", fail),
        ("retry", retry),
        ("get_job", get_job),
        ("get_job_by_agent_id", by_agent),
        ("get_job_by_stripe_event_id", by_stripe),
        ("list_jobs (by user)", list_jobs),
        ("list_job_events", events),
        ("sweep_stale_jobs", sweep),
    ]


async def _count(ctx: Context, name: str, factory: Any, calls: int = 5) -> dict[str, Any]:
    """Average over `calls` calls after a first one (which may prepare the statement)."""
    counts = []
    first = None
    statements: list[str] = []
    for i in range(calls + 1):
        call = await factory()
        tally = start_tally()
        try:
            await call()
        finally:
            stop_tally()
        if i == 0:
            first = tally
        else:
            counts.append(tally)
            statements = tally.statements
    assert first is not None
    n = len(counts)
    executes = sum(t.executes for t in counts) / n
    prepares = sum(t.prepares for t in counts) / n
    simple = sum(t.simple_queries for t in counts) / n
    total = executes + prepares + simple
    row: dict[str, Any] = {
        "operation": name,
        "round_trips": total,
        "executes": executes,
        "prepares": prepares,
        "simple_queries": simple,
        "first_call_round_trips": first.round_trips,
        "statements": "; ".join(statements),
    }
    if name in _MUST_BE_ONE:
        row["target"] = ROUND_TRIP_TARGET
        row["met"] = total == ROUND_TRIP_TARGET
    return row
