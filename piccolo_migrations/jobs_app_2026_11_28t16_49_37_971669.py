"""Heartbeats as HOT updates: no index covers the columns a heartbeat writes
(last_heartbeat_at, updated_at), and pages keep room for the new row version, so
PostgreSQL updates the row in place without touching any of its indexes.

The sweeper's index only needs the status: the set of jobs in flight is small
however large the table grows, and the staleness test runs on those rows."""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine.finder import engine_finder

ID = "2026-11-28T16:49:37:971669"
VERSION = "1.38.0"
DESCRIPTION = "heartbeats as HOT updates"

FORWARDS = [
    "DROP INDEX provisioning_jobs_in_flight",
    """CREATE INDEX provisioning_jobs_in_flight
        ON provisioning_jobs (status) WHERE status IN ('queued', 'provisioning')""",
    # Room on each page for updated versions of its rows (HOT needs the same page).
    "ALTER TABLE provisioning_jobs SET (fillfactor = 80)",
]

BACKWARDS = [
    "ALTER TABLE provisioning_jobs RESET (fillfactor)",
    "DROP INDEX provisioning_jobs_in_flight",
    """CREATE INDEX provisioning_jobs_in_flight
        ON provisioning_jobs (status, updated_at) WHERE status IN ('queued', 'provisioning')""",
]


async def _run_all(statements: list[str]) -> None:
    engine = engine_finder()
    assert engine is not None
    for statement in statements:
        await engine.run_ddl(statement)


async def forwards() -> MigrationManager:
    manager = MigrationManager(migration_id=ID, app_name="jobs_app", description=DESCRIPTION)

    async def run() -> None:
        await _run_all(FORWARDS)

    async def run_backwards() -> None:
        await _run_all(BACKWARDS)

    manager.add_raw(run)
    manager.add_raw_backwards(run_backwards)
    return manager
