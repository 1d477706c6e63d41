"""Announce every job_events insert on the `job_events` channel, from PostgreSQL itself.

A statement-level AFTER INSERT trigger with a transition table: whoever writes history
(the service layer, the admin, the sweeper, a hand-written statement) is announced
exactly once per statement, inside its own transaction, so a rolled-back transition
announces nothing and a commit delivers the notification after the rows are visible.

The payload carries ids only: the statement's event id range, whether any event
entered `queued` (the dispatcher's cue), and the distinct job and user ids (what the
live streams fan out by). A bulk statement whose ids would not fit in NOTIFY's 8,000
bytes sends the range alone, which listeners read as "anything may have changed".
A statement that inserted nothing (an idempotent repeat) sends nothing.
"""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine.finder import engine_finder

ID = "2026-11-28T19:29:45:710321"
VERSION = "1.38.0"
DESCRIPTION = "notify job_events inserts"

FORWARDS = [
    """CREATE FUNCTION job_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        first_id bigint;
        last_id bigint;
        any_queued boolean;
        payload text;
    BEGIN
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
    $$""",
    """CREATE TRIGGER job_events_notify
        AFTER INSERT ON job_events
        REFERENCING NEW TABLE AS new_events
        FOR EACH STATEMENT EXECUTE FUNCTION job_events_notify()""",
]

BACKWARDS = [
    "DROP TRIGGER job_events_notify ON job_events",
    "DROP FUNCTION job_events_notify()",
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
