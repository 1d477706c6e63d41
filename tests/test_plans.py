"""Every statement of the service layer finds its rows by index, even in the plan a pooled
connection caches while the tables are still empty.

asyncpg prepares each statement once per connection, and PostgreSQL soon settles on a
generic plan for it, which it keeps until the next ANALYZE of a table it reads. A plan
made on a new deployment's empty tables that scans a whole table costs nothing then, and
one whole-table scan per statement once the table has grown: measured on the write path,
enqueue and transitions a third slower after a few thousand jobs. So each statement's
generic plan, made on empty tables, must not scan any of the tables that grow.
"""

from __future__ import annotations

import importlib
import re

import asyncpg
import pytest

from jobs_app.db.statement import Statement
from tests.conftest import TABLES
from tests.test_migrations import empty_database, piccolo

__all__ = ["empty_database"]  # the fixture, used here

pytestmark = pytest.mark.asyncio

SERVICES = ("accounts", "console", "dispatches", "jobs", "live")
GROWING = frozenset(table.strip() for table in TABLES.split(","))


def _statements() -> list[tuple[str, Statement]]:
    found = []
    for name in SERVICES:
        module = importlib.import_module(f"jobs_app.services.{name}")
        for attr, value in vars(module).items():
            if isinstance(value, Statement):
                found.append((f"{name}.{attr}", value))
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
    assert len(statements) >= 30  # the services' statements, all found
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
