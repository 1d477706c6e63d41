"""The job_events trigger stays silent for the service layer.

The service layer now announces what it commits itself, after the commit and once per
round (jobs_app/loops/listener.py): a transition's commit no longer takes PostgreSQL's
instance-wide NOTIFY lock. Its pool's connections carry the session setting
`jobs_app.writer = 'service'`, and the trigger fires only when it is not set: every other
writer (an operator's hand-written SQL, a migration, a script) is still announced, in
its own transaction, by the same function as before.
"""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine.finder import engine_finder

ID = "2026-12-02T19:30:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "job_events trigger silent for the service layer"

_CREATE_TRIGGER = """CREATE TRIGGER job_events_notify
        AFTER INSERT ON job_events
        REFERENCING NEW TABLE AS new_events
        FOR EACH STATEMENT {when} EXECUTE FUNCTION job_events_notify()"""

FORWARDS = [
    "DROP TRIGGER job_events_notify ON job_events",
    # The condition is checked before the function is called: the service layer's
    # statements pay no plpgsql call.
    _CREATE_TRIGGER.format(
        when="WHEN (current_setting('jobs_app.writer', true) IS DISTINCT FROM 'service')"
    ),
]
BACKWARDS = [
    "DROP TRIGGER job_events_notify ON job_events",
    _CREATE_TRIGGER.format(when=""),
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
