"""Every statement of the service layer runs on its generic plan, and that plan finds its
rows by index, even when it is made while the tables are still empty.

asyncpg prepares each statement once per connection. The pool's sessions force generic
plans (`plan_cache_mode`): left to choose, PostgreSQL planned the batch statements anew
on every call (their arrays look one row long to a custom plan and a hundred to a generic
one), ~2 ms of planning for a transition that runs in ~1 ms. A generic plan is kept until
the next ANALYZE of a table it reads: one made on a new deployment's empty tables that
scans a whole table costs nothing then, and one whole-table scan per statement once the
table has grown (measured: enqueue and transitions a third slower after a few thousand
jobs). So each statement's generic plan, made on empty tables, must not scan any of the
tables that grow.
"""

from __future__ import annotations

import importlib
import re

import asyncpg
import pytest

from jobs_app.db import connector
from jobs_app.db.statement import Statement
from jobs_app.services import jobs
from tests.conftest import TABLES
from tests.test_migrations import empty_database, piccolo

__all__ = ["empty_database"]  # the fixture, used here

pytestmark = pytest.mark.asyncio

SERVICES = ("accounts", "console", "dispatches", "jobs", "live", "progress")
GROWING = frozenset(table.strip() for table in TABLES.split(","))


def _statements() -> list[tuple[str, Statement]]:
    found = []
    for name in SERVICES:
        module = importlib.import_module(f"jobs_app.services.{name}")
        for attr, value in vars(module).items():
            if isinstance(value, Statement):
                found.append((f"{name}.{attr}", value))
    # The job listing's statements, one per combination of filters.
    filters = ("user_id", "agent_id", "status", "cursor")
    for mask in range(2 ** len(filters)):
        chosen = tuple(f for i, f in enumerate(filters) if mask & (1 << i))
        found.append((f"jobs.list_statement{chosen}", jobs.list_statement(chosen)))
    return found


async def _generic_plan(conn: asyncpg.Connection, statement: Statement) -> str:
    await conn.execute(f"PREPARE checked_statement AS {statement.sql}")
    try:
        nulls = ", ".join(["NULL"] * len(statement.names))
        arguments = f"({nulls})" if nulls else ""
        rows = await conn.fetch(f"EXPLAIN EXECUTE checked_statement{arguments}")
    finally:
        await conn.execute("DEALLOCATE checked_statement")
    return "\n".join(row[0] for row in rows)


async def test_no_statement_scans_a_growing_table_in_its_generic_plan(empty_database) -> None:
    statements = _statements()
    assert len(statements) >= 46  # the services' statements, all found
    # A new deployment's database: migrated, its tables empty and never analyzed (the
    # shared test database's tables keep the statistics of earlier tests' rows).
    await piccolo("migrations", "forwards", "all", url=empty_database)
    generic = {"plan_cache_mode": "force_generic_plan"}
    conn = await asyncpg.connect(empty_database, server_settings=generic)
    try:
        scans = {}
        for name, statement in statements:
            plan = await _generic_plan(conn, statement)
            scanned = set(re.findall(r"Seq Scan on (\w+)", plan)) & GROWING
            if scanned:
                scans[name] = sorted(scanned)
    finally:
        await conn.close()
    assert scans == {}


MEDIANS_INDEXES = ("job_events_step_durations", "job_events_waits")


async def test_only_the_medians_read_and_the_console_read_the_medians(empty_database) -> None:
    """The ETA's medians are read by their own statement (each process, when its copy is
    stale) and by the support console: no other statement's plan holds that read, which its
    executor would set up on every call even when it reads nothing."""
    await piccolo("migrations", "forwards", "all", url=empty_database)
    generic = {"plan_cache_mode": "force_generic_plan"}
    conn = await asyncpg.connect(empty_database, server_settings=generic)
    try:
        reading = set()
        for name, statement in _statements():
            plan = await _generic_plan(conn, statement)
            if any(index in plan for index in MEDIANS_INDEXES):
                reading.add(name)
    finally:
        await conn.close()
    assert reading == {"progress.READ_MEDIANS", "console.ATTENTION", "console.JOB_PAGE"}


async def _plan_counts(watched: dict[str, str]) -> dict[tuple[int, str], list[int]]:
    """[generic, custom] executions of each watched statement, per pooled backend."""
    pool = connector.get_engine().pool
    assert pool is not None
    held = [await pool.acquire() for _ in range(pool.get_max_size())]  # every connection
    counts = {}
    try:
        for conn in held:
            rows = await conn.fetch(
                "SELECT pg_backend_pid() AS pid, statement, generic_plans, custom_plans"
                " FROM pg_prepared_statements"
            )
            for row in rows:
                if row["statement"] in watched:
                    key = (row["pid"], watched[row["statement"]])
                    counts[key] = [row["generic_plans"], row["custom_plans"]]
    finally:
        for conn in held:
            await pool.release(conn)
    return counts


async def test_pooled_sessions_never_plan_a_statement_per_call(user_agent) -> None:
    """A lone caller's enqueue and transitions, each run many times: every execution on
    every pooled connection used the cached generic plan, none was planned for its call."""
    user_id, agent_id = user_agent
    watched = {jobs.ENQUEUE.sql: "enqueue", jobs.TRANSITION.sql: "transitions"}
    before = await _plan_counts(watched)  # earlier tests ran them on these connections too
    for n in range(8):
        enqueued = await jobs.enqueue_provisioning_job(
            user_id=user_id, agent_id=agent_id, stripe_event_id=f"evt_generic_{n}"
        )
        await jobs.update_job_status(enqueued.job.id, status="provisioning", attempt=1)
        await jobs.update_job_status(enqueued.job.id, status="running", attempt=1)
    plans = {name: [0, 0] for name in watched.values()}
    for key, (generic, custom) in (await _plan_counts(watched)).items():
        was = before.get(key, [0, 0])
        plans[key[1]][0] += generic - was[0]
        plans[key[1]][1] += custom - was[1]
    assert plans == {"enqueue": [8, 0], "transitions": [16, 0]}
