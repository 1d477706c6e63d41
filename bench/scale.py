"""Section 5: latency with a small and a large job table.

Two databases, seeded alike but for the number of terminal jobs in history (1,000
and --scale-rows): the same 100 jobs in flight, users with ~10 jobs each, spare
users to enqueue for. Rounds alternate between them (the service layer's pool is
moved from one to the other), and each round times sequential calls; p50 and p99
are taken per round, reported as medians over the rounds, and the large/small
ratio is the median of the per-round ratios (pooled percentiles are in the JSON).

The sweep finds nothing stale (the jobs in flight are fresh): what it costs is
finding that out, which must not grow with the history. Each history job has its wait
and its three steps in `job_events` (4 rows a job), so reading the ETA's medians
(what each process does every JOBS_ETA_REFRESH_SECONDS) reads the same few index pages
however long the history: its plan is printed for both sizes.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from bench import dbs, seed
from bench.context import Context
from bench.measure import median, paired_ratio, percentile
from jobs_app.db import connector
from jobs_app.services import dispatches, jobs, progress

SCALE_TARGET = 1.5
SMALL = 1_000
IN_FLIGHT = 100
OPERATIONS = ("enqueue", "get_job_by_agent_id", "get_job", "heartbeat", "sweep_stale_jobs")


async def scale(ctx: Context) -> dict[str, Any]:
    samples = 30 if ctx.quick else 200
    rounds = ctx.budget.rounds
    sizes = {"small": SMALL, "large": ctx.scale_rows}
    urls: dict[str, str] = {}
    populations: dict[str, seed.Population] = {}
    seconds: dict[str, float] = {}
    plans: dict[str, dict[str, Any]] = {}
    eta_plans: dict[str, dict[str, Any]] = {}
    try:
        for name, jobs_count in sizes.items():
            urls[name] = await dbs.create(ctx.server_url, f"{dbs.name_of(ctx.url)}_{name}")
            await _use(urls[name], migrate=True)
            conn = await asyncpg.connect(urls[name])
            try:
                started = time.perf_counter()
                populations[name] = await seed.population(
                    conn,
                    "scale",
                    total_jobs=jobs_count,
                    in_flight=IN_FLIGHT,
                    spare_users=(samples + 3) * rounds + 16,
                    with_history_events=True,
                )
                seconds[name] = time.perf_counter() - started
                count = await conn.fetchval("SELECT count(*) FROM provisioning_jobs")
                plans[name] = await _claim_plan(conn)
                eta_plans[name] = await _eta_plan(conn)
            finally:
                await conn.close()
            print(f"  seeded {count:,} jobs in {seconds[name]:.1f} s", flush=True)
            print(f"  the dispatch claim reads {plans[name]}", flush=True)
            print(f"  the ETA's medians read {eta_plans[name]}", flush=True)

        # timings[size][operation]: one list of call durations per round
        timings: dict[str, dict[str, list[list[float]]]] = {
            name: {op: [] for op in OPERATIONS} for name in sizes
        }
        spare = {name: iter(populations[name].spare_user_numbers) for name in sizes}
        rng = random.Random(5)
        for r in range(rounds):
            order = list(sizes) if r % 2 == 0 else list(reversed(sizes))
            for name in order:
                await _use(urls[name])
                pop = populations[name]
                calls = _calls(pop, spare[name], rng)
                for op in OPERATIONS:
                    call = calls[op]
                    for _ in range(3):  # warm-up: statements prepared
                        await call()
                    timings[name][op].append([await _timed(call) for _ in range(samples)])
    finally:
        await _use(ctx.url)
        for url in urls.values():
            await dbs.drop(ctx.server_url, dbs.name_of(url))

    rows = []
    for op in OPERATIONS:
        small, large = timings["small"][op], timings["large"][op]
        row: dict[str, Any] = {"operation": op}
        for q in (50, 99):
            # Per round, then the median over rounds: one noisy round (the machine is
            # shared) moves a pooled p99 a lot, the median of nine hardly.
            small_q = [percentile(r, q) * 1000 for r in small]
            large_q = [percentile(r, q) * 1000 for r in large]
            row[f"small_p{q}_ms"] = median(small_q)
            row[f"large_p{q}_ms"] = median(large_q)
            row[f"p{q}_ratio"] = paired_ratio(large_q, small_q)
            row[f"pooled_small_p{q}_ms"] = percentile(list(itertools.chain(*small)), q) * 1000
            row[f"pooled_large_p{q}_ms"] = percentile(list(itertools.chain(*large)), q) * 1000
        row["samples_per_round"] = samples
        row["rounds"] = rounds
        row["met"] = row["p50_ratio"] <= SCALE_TARGET and row["p99_ratio"] <= SCALE_TARGET
        rows.append(row)
        print(
            f"  {op:<22} p50 {row['small_p50_ms']:.2f} -> {row['large_p50_ms']:.2f} ms"
            f" (x{row['p50_ratio']:.2f})  p99 {row['small_p99_ms']:.2f} ->"
            f" {row['large_p99_ms']:.2f} ms (x{row['p99_ratio']:.2f})",
            flush=True,
        )
    return {
        "small_jobs": SMALL,
        "large_jobs": ctx.scale_rows,
        "in_flight": IN_FLIGHT,
        "seed_seconds": seconds,
        "claim_plan": plans,
        "eta_plan": eta_plans,
        "target": SCALE_TARGET,
        "rows": rows,
    }


async def _claim_plan(conn: asyncpg.Connection) -> dict[str, Any]:
    """Which indexes the dispatcher's claim reads, and whether it scans the jobs table."""
    statement = dispatches.CLAIM
    values = {"owner": "bench", "provisioner": "github", "lease": 60.0, "batch": 20}
    raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + statement.sql, *statement.args(values))
    nodes, todo = [], [json.loads(raw)[0]["Plan"]]
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo.extend(node.get("Plans", []))
    return {
        "indexes": sorted({n["Index Name"] for n in nodes if "Index Name" in n}),
        "seq_scan_on_jobs": any(
            n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "provisioning_jobs"
            for n in nodes
        ),
    }


async def _eta_plan(conn: asyncpg.Connection) -> dict[str, Any]:
    """What reading the ETA's medians (each process does it every
    JOBS_ETA_REFRESH_SECONDS) costs, run for real: its indexes, shared buffers touched,
    whether it scans job_events, and its time."""
    statement = progress.READ_MEDIANS
    values = {"plan": progress.plan_names()}
    sql = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement.sql
    raw = await conn.fetchval(sql, *statement.args(values))
    top = json.loads(raw)[0]
    nodes, todo = [], [top["Plan"]]
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo.extend(node.get("Plans", []))
    return {
        "indexes": sorted({n["Index Name"] for n in nodes if "Index Name" in n}),
        "seq_scan_on_events": any(
            n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "job_events" for n in nodes
        ),
        "shared_buffers": top["Plan"].get("Shared Hit Blocks", 0)
        + top["Plan"].get("Shared Read Blocks", 0),
        "ms": round(top["Execution Time"], 3),
    }


async def _use(url: str, *, migrate: bool = False) -> None:
    """Point the service layer's engine (and pool) at another database."""
    await connector.close_pool()
    connector.get_engine().config = {"dsn": url}
    if migrate:
        with contextlib.redirect_stdout(io.StringIO()):
            await connector.migrate()
    await connector.start_pool()


async def _timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


def _calls(
    pop: seed.Population, spare: Any, rng: random.Random
) -> dict[str, Callable[[], Awaitable[object]]]:
    in_flight = [seed.job_id(pop.tag, j) for j in pop.in_flight_jobs]
    beats = iter(in_flight * 1000)

    async def enqueue() -> object:
        n = next(spare)
        return await jobs.enqueue_provisioning_job(
            user_id=seed.user_id(pop.tag, n),
            agent_id=seed.agent_id(pop.tag, n),
            stripe_event_id=f"evt_scale_new_{n}",
        )

    async def by_agent() -> object:
        # Any agent with history, at random: the large table is not all in cache.
        n = rng.randint(1, pop.history_users)
        return await jobs.get_job_by_agent_id(seed.agent_id(pop.tag, n))

    async def heartbeat() -> object:
        return await jobs.record_heartbeat(next(beats), attempt=1)

    async def get_job() -> object:
        return await jobs.get_job(rng.choice(in_flight))

    async def sweep() -> object:
        return await jobs.sweep_stale_jobs()

    return {
        "enqueue": enqueue,
        "get_job_by_agent_id": by_agent,
        "get_job": get_job,
        "heartbeat": heartbeat,
        "sweep_stale_jobs": sweep,
    }
