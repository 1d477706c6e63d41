"""The job_events trigger stays silent for the service layer.

The service layer now announces what it commits itself, after the commit and once per
round (jobs_app/loops/listener.py): a transition's commit no longer takes PostgreSQL's
instance-wide NOTIFY lock. Its pool's connections carry the session setting
`jobs_app.writer = 'service'`; every other writer (an operator's hand-written SQL, a
migration, a script) is still announced by this trigger, in its own transaction.
"""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine.finder import engine_finder

ID = "2026-12-02T19:30:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "job_events trigger silent for the service layer"

_FUNCTION = """CREATE OR REPLACE FUNCTION job_events_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
        first_id bigint;
        last_id bigint;
        any_queued boolean;
        payload text;
    BEGIN
        {skip}
        SELECT min(id), max(id), bool_or(to_status = 'queued')
          INTO first_id, last_id, any_queued FROM new_events;
        IF first_id IS NULL THEN
            RETURN NULL;
        END IF;
        SELECT json_build_object(
                   'first', first_id, 'last', last_id, 'queued', any_queued,
                   'jobs', (SELECT json_agg(DISTINCT job_id) FROM new_events),
                   'users', (SELECT json_agg(DISTINCT j.user_id)
                             FROM provisioning_jobs j
                             WHERE j.id IN (SELECT job_id FROM new_events)))::text
          INTO payload;
        IF octet_length(payload) > 7900 THEN
            payload := json_build_object(
                'first', first_id, 'last', last_id, 'queued', any_queued)::text;
        END IF;
        PERFORM pg_notify('job_events', payload);
        RETURN NULL;
    END
    $$"""

FORWARDS = [
    _FUNCTION.format(
        skip="""-- The service layer announces its own writes, after their commit.
        IF current_setting('jobs_app.writer', true) = 'service' THEN
            RETURN NULL;
        END IF;"""
    )
]
BACKWARDS = [_FUNCTION.format(skip="")]


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
