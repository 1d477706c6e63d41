"""What the support console's search reads (`jobs_app.services.console`): a user found by
their email's lower case, exactly or by a prefix (a `text_pattern_ops` index serves both,
and the accounts service's case-insensitive lookup too); a job found by its workflow run
id, on the job or on any of its dispatches; and the jobs failed lately, newest first.
Partial indexes: only rows that have the value, so the write path's HOT updates
(heartbeats) are untouched."""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine.finder import engine_finder

ID = "2026-12-03T07:10:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "support console: lookup indexes"

FORWARDS = [
    "CREATE INDEX users_email_lower ON users (lower(email) text_pattern_ops)",
    """CREATE INDEX provisioning_jobs_workflow_run ON provisioning_jobs (workflow_run_id)
        WHERE workflow_run_id IS NOT NULL""",
    """CREATE INDEX dispatches_workflow_run ON dispatches (workflow_run_id)
        WHERE workflow_run_id IS NOT NULL""",
    """CREATE INDEX provisioning_jobs_failed_recently ON provisioning_jobs (completed_at DESC)
        WHERE status = 'failed'""",
]

BACKWARDS = [
    "DROP INDEX provisioning_jobs_failed_recently",
    "DROP INDEX dispatches_workflow_run",
    "DROP INDEX provisioning_jobs_workflow_run",
    "DROP INDEX users_email_lower",
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
