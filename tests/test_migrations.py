"""Migrations, run the way operators run them: Piccolo's CLI (and `migrate()`) in
subprocesses, against brand-new empty databases created here and dropped after."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from jobs_app.db.connector import MIGRATION_LOCK_KEY
from tests.conftest import with_database

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = ROOT / "piccolo_migrations"
RAW_MIGRATION_ID = "2026-11-28T15:47:22:780809"
HOT_MIGRATION_ID = "2026-11-28T16:49:37:971669"
# Every migration module's ID, read from the files (`ID = "..."`), so a new one is expected too.
JOBS_APP_MIGRATIONS = {
    line.split('"')[1]
    for path in MIGRATIONS_DIR.glob("jobs_app_*.py")
    for line in path.read_text().splitlines()
    if line.startswith("ID = ")
}
assert {RAW_MIGRATION_ID, HOT_MIGRATION_ID} <= JOBS_APP_MIGRATIONS
TABLES = {
    "users",
    "agents",
    "provisioning_jobs",
    "job_events",
    "dispatches",
    "dispatch_tries",
    "run_cancellations",
}
TIMEOUT = 180
NOTIFY_MIGRATION_ID = "2026-11-28T19:29:45:710321"
NOTIFY_TRIGGER_COUNT = "SELECT count(*) FROM pg_trigger WHERE tgname = 'job_events_notify'"
TRIGGER_COUNT = (
    "SELECT count(*) FROM pg_trigger WHERE tgname = 'provisioning_jobs_guard_transition'"
)


def url_for(name: str) -> str:
    return with_database(os.environ["DATABASE_URL"], name)


@pytest.fixture
async def empty_database() -> AsyncIterator[str]:
    name = f"jobs_app_migrations_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(url_for("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield url_for(name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def start(*args: str, url: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *args,
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str]:
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(errors="replace")


async def piccolo(*args: str, url: str) -> str:
    """Run `piccolo <args>`; its output, after asserting it exited 0."""
    code, output = await finish(await start(sys.executable, "-m", "piccolo.main", *args, url=url))
    assert code == 0, output
    return output


MIGRATE = "import asyncio; from jobs_app.db.connector import migrate; asyncio.run(migrate())"


async def schema(url: str) -> dict[str, list[tuple[object, ...]]]:
    """What a migration run leaves: tables, columns, indexes, constraints, triggers."""
    conn = await asyncpg.connect(url)
    try:
        columns = await conn.fetch(
            """SELECT table_name, column_name, data_type, character_maximum_length,
                      is_nullable, column_default, is_generated, generation_expression
               FROM information_schema.columns WHERE table_schema = 'public'
               ORDER BY 1, 2"""
        )
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
        )
        constraints = await conn.fetch(
            """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
               FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"""
        )
        triggers = await conn.fetch(
            "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger "
            "WHERE NOT tgisinternal ORDER BY 1"
        )
        return {
            "columns": [tuple(r) for r in columns],
            "indexes": [tuple(r) for r in indexes],
            "constraints": [tuple(r) for r in constraints],
            "triggers": [tuple(r) for r in triggers],
        }
    finally:
        await conn.close()


async def applied(url: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(url)
    try:
        if await conn.fetchval("SELECT to_regclass('migration')") is None:
            return []
        rows = await conn.fetch("SELECT app_name, name FROM migration ORDER BY app_name, name")
        return [tuple(r) for r in rows]
    finally:
        await conn.close()


async def has_index(conn: asyncpg.Connection, name: str) -> bool:
    return await conn.fetchval("SELECT to_regclass($1)", name) is not None


async def test_forwards_on_empty_database_builds_the_full_schema(empty_database, database) -> None:
    assert await applied(empty_database) == []
    await piccolo("migrations", "forwards", "all", url=empty_database)

    built = await schema(empty_database)
    tables = {c[0] for c in built["columns"]}
    assert tables >= TABLES
    job_columns = {c[1] for c in built["columns"] if c[0] == "provisioning_jobs"}
    assert job_columns == {
        "id",
        "agent_id",
        "user_id",
        "stripe_event_id",
        "status",
        "region",
        "workflow_run_id",
        "attempt",
        "retry_count",
        "max_retries",
        "error",
        "failed_step",
        "failure_reason",
        "queued_at",
        "claimed_at",
        "last_heartbeat_at",
        "completed_at",
        "created_at",
        "updated_at",
        "dispatch_id",
        "first_heartbeat_at",
        "heartbeat_count",
        "steps",
    }
    index_names = {i[0] for i in built["indexes"]}
    assert {
        "provisioning_jobs_one_active_per_user",
        "provisioning_jobs_stripe_event_id_key",
        "provisioning_jobs_agent_newest",
        "provisioning_jobs_in_flight",
        "job_events_job_id",
        "dispatches_one_live_per_attempt",
        "dispatches_working",
    } <= index_names
    [partial] = [i[1] for i in built["indexes"] if i[0] == "provisioning_jobs_one_active_per_user"]
    assert "UNIQUE" in partial and "WHERE" in partial
    assert {t[0] for t in built["triggers"]} == {
        "provisioning_jobs_guard_transition",
        "job_events_notify",
    }
    jobs_app_rows = {name for app, name in await applied(empty_database) if app == "jobs_app"}
    assert jobs_app_rows == JOBS_APP_MIGRATIONS

    # The same schema as the one `migrate()` built for this test run.
    assert built == await schema(database)
    assert await applied(empty_database) == await applied(database)


async def test_no_drift_between_tables_and_migrations(database) -> None:
    before = set(MIGRATIONS_DIR.iterdir())
    try:
        output = await piccolo("migrations", "new", "jobs_app", "--auto", url=database)
    finally:
        created = set(MIGRATIONS_DIR.iterdir()) - before
        for path in created:
            path.unlink()
    assert not created, f"`--auto` wrote {sorted(p.name for p in created)}:\n{output}"
    assert "No changes detected" in output, output


async def test_backwards_undoes_the_raw_migration_and_forwards_restores_it(
    empty_database,
) -> None:
    await piccolo("migrations", "forwards", "all", url=empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        user_id = await conn.fetchval("INSERT INTO users (email) VALUES ('m@x.io') RETURNING id")
        agent_id = await conn.fetchval(
            "INSERT INTO agents (user_id, name) VALUES ($1, 'a') RETURNING id", user_id
        )
        job_id = await conn.fetchval(
            "INSERT INTO provisioning_jobs (agent_id, user_id, retry_count) "
            "VALUES ($1, $2, 1) RETURNING id",
            agent_id,
            user_id,
        )
        assert await has_index(conn, "provisioning_jobs_one_active_per_user")

        reloptions = "SELECT reloptions FROM pg_class WHERE relname = 'provisioning_jobs'"
        assert await conn.fetchval(reloptions) == ["fillfactor=80"]
        # Back to (and including) the raw constraints migration: every later one goes first.
        output = await piccolo(
            "migrations",
            "backwards",
            "jobs_app",
            RAW_MIGRATION_ID,
            "--auto_agree",
            url=empty_database,
        )
        assert RAW_MIGRATION_ID in output
        assert HOT_MIGRATION_ID in output
        assert NOTIFY_MIGRATION_ID in output
        assert not await conn.fetchval(NOTIFY_TRIGGER_COUNT)
        assert await conn.fetchval(reloptions) is None
        for index in ("provisioning_jobs_one_active_per_user", "provisioning_jobs_agent_newest"):
            assert not await has_index(conn, index)
        assert not await conn.fetchval(TRIGGER_COUNT)
        assert not await conn.fetchval(
            "SELECT count(*) FROM pg_constraint WHERE conname LIKE 'provisioning_jobs_%_check'"
        )
        generated = await conn.fetchval(
            "SELECT is_generated FROM information_schema.columns "
            "WHERE table_name = 'provisioning_jobs' AND column_name = 'attempt'"
        )
        assert generated == "NEVER"
        # The auto-generated migration stays: tables and data are kept.
        assert (
            await conn.fetchval("SELECT attempt FROM provisioning_jobs WHERE id = $1", job_id) == 2
        )
        remaining = {name for app, name in await applied(empty_database) if app == "jobs_app"}
        # Only the first (auto-generated) one stays: backwards undoes every later one too.
        assert remaining == {min(JOBS_APP_MIGRATIONS)}

        await piccolo("migrations", "forwards", "jobs_app", url=empty_database)
        assert await has_index(conn, "provisioning_jobs_one_active_per_user")
        assert await conn.fetchval(reloptions) == ["fillfactor=80"]
        assert await conn.fetchval(TRIGGER_COUNT) == 1
        assert await conn.fetchval(NOTIFY_TRIGGER_COUNT) == 1
        generated = await conn.fetchval(
            "SELECT is_generated FROM information_schema.columns "
            "WHERE table_name = 'provisioning_jobs' AND column_name = 'attempt'"
        )
        assert generated == "ALWAYS"
        assert (
            await conn.fetchval("SELECT attempt FROM provisioning_jobs WHERE id = $1", job_id) == 2
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO provisioning_jobs (agent_id, user_id) VALUES ($1, $2)",
                agent_id,
                user_id,
            )
        restored = {name for app, name in await applied(empty_database) if app == "jobs_app"}
        assert restored == JOBS_APP_MIGRATIONS
    finally:
        await conn.close()


async def test_concurrent_migrate_on_one_empty_database(empty_database, database) -> None:
    processes = [await start(sys.executable, "-c", MIGRATE, url=empty_database) for _ in range(4)]
    results = await asyncio.gather(*(finish(p) for p in processes))
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    rows = await applied(empty_database)
    assert len(rows) == len(set(rows)), rows  # exactly one row per migration
    assert rows == await applied(database)
    assert {name for app, name in rows if app == "jobs_app"} == JOBS_APP_MIGRATIONS
    assert await schema(empty_database) == await schema(database)


async def test_migrate_waits_for_the_advisory_lock(empty_database) -> None:
    holder = await asyncpg.connect(empty_database)
    process = None
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        process = await start(sys.executable, "-c", MIGRATE, url=empty_database)
        # Wait (on a condition, not a clock) until the migration is queued behind the lock.
        async with asyncio.timeout(TIMEOUT):
            while not await holder.fetchval(
                """SELECT count(*) FROM pg_locks
                   WHERE locktype = 'advisory' AND NOT granted AND objid = $1""",
                MIGRATION_LOCK_KEY & 0xFFFFFFFF,
            ):
                assert process.returncode is None
                await asyncio.sleep(0.02)
        assert await holder.fetchval("SELECT to_regclass('migration')") is None
        assert await holder.fetchval("SELECT to_regclass('provisioning_jobs')") is None
    finally:
        await holder.execute("SELECT pg_advisory_unlock_all()")
        await holder.close()
    assert process is not None
    code, output = await finish(process)
    assert code == 0, output
    assert {name for app, name in await applied(empty_database) if app == "jobs_app"} == (
        JOBS_APP_MIGRATIONS
    )
