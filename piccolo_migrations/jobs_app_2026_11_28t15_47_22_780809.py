"""What Piccolo can't declare: the status sets as CHECKs, the one-active-job-per-user
partial unique index, the agent-belongs-to-user composite key, `attempt` as a
column generated from `retry_count`, the lookup indexes, and a trigger that refuses
illegal status changes from any writer (defence in depth behind queue.py)."""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine.finder import engine_finder

ID = "2026-11-28T15:47:22:780809"
VERSION = "1.38.0"
DESCRIPTION = "constraints piccolo cannot declare"

FORWARDS = [
    """ALTER TABLE provisioning_jobs
        ADD CONSTRAINT provisioning_jobs_status_check
            CHECK (status IN ('queued', 'provisioning', 'running', 'failed')),
        ADD CONSTRAINT provisioning_jobs_failure_reason_check
            CHECK (failure_reason IN ('workflow_error', 'heartbeat_timeout',
                                      'deadline_exceeded', 'queue_timeout', 'operator')),
        ADD CONSTRAINT provisioning_jobs_failed_has_reason_check
            CHECK ((status = 'failed') = (failure_reason IS NOT NULL)),
        ADD CONSTRAINT provisioning_jobs_retry_count_check
            CHECK (retry_count >= 0 AND retry_count <= max_retries)""",
    # The attempt number is derived, so it can never disagree with retry_count.
    "ALTER TABLE provisioning_jobs DROP COLUMN attempt",
    """ALTER TABLE provisioning_jobs
        ADD COLUMN attempt integer GENERATED ALWAYS AS (retry_count + 1) STORED""",
    """ALTER TABLE job_events
        ADD CONSTRAINT job_events_to_status_check
            CHECK (to_status IN ('queued', 'provisioning', 'running', 'failed')),
        ADD CONSTRAINT job_events_from_status_check
            CHECK (from_status IN ('queued', 'provisioning', 'running', 'failed')),
        ADD CONSTRAINT job_events_actor_check
            CHECK (actor IN ('system', 'workflow', 'api')
                   OR (actor LIKE 'operator:_%' AND length(actor) <= 200))""",
    # One job in flight per user. Enqueue and retry rely on this to decide races.
    """CREATE UNIQUE INDEX provisioning_jobs_one_active_per_user
        ON provisioning_jobs (user_id) WHERE status IN ('queued', 'provisioning')""",
    # A job's agent must belong to the job's user.
    "ALTER TABLE agents ADD CONSTRAINT agents_id_user_id_key UNIQUE (id, user_id)",
    """ALTER TABLE provisioning_jobs
        ADD CONSTRAINT provisioning_jobs_agent_owner_fkey FOREIGN KEY (agent_id, user_id)
            REFERENCES agents (id, user_id) ON DELETE CASCADE""",
    "CREATE INDEX agents_user_id ON agents (user_id)",
    """CREATE INDEX provisioning_jobs_agent_newest
        ON provisioning_jobs (agent_id, created_at DESC, id DESC)""",
    """CREATE INDEX provisioning_jobs_user_newest
        ON provisioning_jobs (user_id, created_at DESC, id DESC)""",
    "CREATE INDEX provisioning_jobs_newest ON provisioning_jobs (created_at DESC, id DESC)",
    """CREATE INDEX provisioning_jobs_status_newest
        ON provisioning_jobs (status, created_at DESC, id DESC)""",
    # The sweeper's scan: only jobs in flight, a small set however large the table grows.
    """CREATE INDEX provisioning_jobs_in_flight
        ON provisioning_jobs (status, updated_at) WHERE status IN ('queued', 'provisioning')""",
    "CREATE INDEX job_events_job_id ON job_events (job_id, id)",
    """CREATE FUNCTION provisioning_jobs_guard_transition() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NOT ((OLD.status = 'queued' AND NEW.status IN ('provisioning', 'failed'))
                 OR (OLD.status = 'provisioning' AND NEW.status IN ('running', 'failed'))
                 OR (OLD.status = 'failed' AND NEW.status = 'queued')) THEN
                RAISE EXCEPTION 'illegal job transition: % -> %', OLD.status, NEW.status
                    USING ERRCODE = 'check_violation',
                          CONSTRAINT = 'provisioning_jobs_transition_check';
            END IF;
            RETURN NEW;
        END
        $$""",
    """CREATE TRIGGER provisioning_jobs_guard_transition
        BEFORE UPDATE OF status ON provisioning_jobs
        FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
        EXECUTE FUNCTION provisioning_jobs_guard_transition()""",
]

BACKWARDS = [
    "DROP TRIGGER provisioning_jobs_guard_transition ON provisioning_jobs",
    "DROP FUNCTION provisioning_jobs_guard_transition()",
    "DROP INDEX job_events_job_id",
    "DROP INDEX provisioning_jobs_in_flight",
    "DROP INDEX provisioning_jobs_status_newest",
    "DROP INDEX provisioning_jobs_newest",
    "DROP INDEX provisioning_jobs_user_newest",
    "DROP INDEX provisioning_jobs_agent_newest",
    "DROP INDEX agents_user_id",
    "ALTER TABLE provisioning_jobs DROP CONSTRAINT provisioning_jobs_agent_owner_fkey",
    "ALTER TABLE agents DROP CONSTRAINT agents_id_user_id_key",
    "DROP INDEX provisioning_jobs_one_active_per_user",
    """ALTER TABLE job_events
        DROP CONSTRAINT job_events_actor_check,
        DROP CONSTRAINT job_events_from_status_check,
        DROP CONSTRAINT job_events_to_status_check""",
    "ALTER TABLE provisioning_jobs DROP COLUMN attempt",
    "ALTER TABLE provisioning_jobs ADD COLUMN attempt integer NOT NULL DEFAULT 1",
    "UPDATE provisioning_jobs SET attempt = retry_count + 1",
    """ALTER TABLE provisioning_jobs
        DROP CONSTRAINT provisioning_jobs_retry_count_check,
        DROP CONSTRAINT provisioning_jobs_failed_has_reason_check,
        DROP CONSTRAINT provisioning_jobs_failure_reason_check,
        DROP CONSTRAINT provisioning_jobs_status_check""",
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
