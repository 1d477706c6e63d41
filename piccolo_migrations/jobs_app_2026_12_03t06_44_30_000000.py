"""What Piccolo can't declare for workflow steps: the kinds of history row and their
shapes, the shape of a job's step states, and the two partial indexes the ETA's medians
read (the last 50 durations of a step, the last 50 waits before provisioning), so a
job's estimate costs a few index pages whatever the history's size."""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine.finder import engine_finder

ID = "2026-12-03T06:44:30:000000"
VERSION = "1.38.0"
DESCRIPTION = "workflow steps: checks and the ETA's indexes"

FORWARDS = [
    """ALTER TABLE job_events
        ADD CONSTRAINT job_events_kind_check CHECK (kind IN ('transition', 'step')),
        ADD CONSTRAINT job_events_step_state_check
            CHECK (step_state IN ('started', 'succeeded', 'failed')),
        ADD CONSTRAINT job_events_step_shape_check
            CHECK ((kind = 'step') = (step IS NOT NULL AND step_state IS NOT NULL)),
        ADD CONSTRAINT job_events_step_name_check CHECK (step ~ '^[a-z0-9_]{1,40}$'),
        ADD CONSTRAINT job_events_detail_check CHECK (length(detail) <= 500)""",
    """ALTER TABLE provisioning_jobs
        ADD CONSTRAINT provisioning_jobs_heartbeat_count_check CHECK (heartbeat_count >= 0),
        ADD CONSTRAINT provisioning_jobs_steps_check CHECK (jsonb_typeof(steps) = 'object')""",
    """CREATE INDEX job_events_step_durations ON job_events (step, id DESC) INCLUDE (seconds)
        WHERE kind = 'step' AND step_state = 'succeeded'""",
    """CREATE INDEX job_events_waits ON job_events (id DESC) INCLUDE (seconds)
        WHERE kind = 'transition' AND to_status = 'provisioning'""",
]

BACKWARDS = [
    "DROP INDEX job_events_waits",
    "DROP INDEX job_events_step_durations",
    """ALTER TABLE provisioning_jobs
        DROP CONSTRAINT provisioning_jobs_steps_check,
        DROP CONSTRAINT provisioning_jobs_heartbeat_count_check""",
    """ALTER TABLE job_events
        DROP CONSTRAINT job_events_detail_check,
        DROP CONSTRAINT job_events_step_name_check,
        DROP CONSTRAINT job_events_step_shape_check,
        DROP CONSTRAINT job_events_step_state_check,
        DROP CONSTRAINT job_events_kind_check""",
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
