"""What Piccolo can't declare for dispatching: the state CHECKs, the new failure
reason, at most one live dispatch per job attempt (the partial unique index the
claim's INSERT … ON CONFLICT arbitrates on), the claim's and the cancellations'
indexes, and a bound dispatch that must be one of the job's own."""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine.finder import engine_finder

ID = "2026-11-28T19:29:30:000000"
VERSION = "1.38.0"
DESCRIPTION = "dispatch constraints piccolo cannot declare"

FORWARDS = [
    """ALTER TABLE provisioning_jobs
        DROP CONSTRAINT provisioning_jobs_failure_reason_check,
        ADD CONSTRAINT provisioning_jobs_failure_reason_check
            CHECK (failure_reason IN ('workflow_error', 'heartbeat_timeout', 'deadline_exceeded',
                                      'queue_timeout', 'operator', 'dispatch_error'))""",
    """ALTER TABLE dispatches
        ADD CONSTRAINT dispatches_state_check
            CHECK (state IN ('pending', 'unknown', 'dispatched', 'lost', 'superseded', 'failed')),
        ADD CONSTRAINT dispatches_tries_check CHECK (tries >= 0)""",
    """ALTER TABLE dispatch_tries
        ADD CONSTRAINT dispatch_tries_kind_check
            CHECK (kind IN ('dispatch', 'reconcile', 'cancel'))""",
    """ALTER TABLE run_cancellations
        ADD CONSTRAINT run_cancellations_state_check
            CHECK (state IN ('requested', 'done', 'failed'))""",
    # One live dispatch per attempt: N dispatchers creating one for the same attempt
    # give one row, whatever their timing.
    """CREATE UNIQUE INDEX dispatches_one_live_per_attempt
        ON dispatches (job_id, attempt) WHERE state IN ('pending', 'unknown', 'dispatched')""",
    # The claim's scan of dispatches with work left: a small set however many there were.
    """CREATE INDEX dispatches_working
        ON dispatches (next_try_at) WHERE state IN ('pending', 'unknown')""",
    "CREATE INDEX dispatches_job ON dispatches (job_id, created_at)",
    "CREATE INDEX dispatches_lease_owner ON dispatches (lease_owner) WHERE lease_owner IS NOT NULL",
    "CREATE INDEX dispatch_tries_dispatch ON dispatch_tries (dispatch_id, id)",
    """CREATE INDEX run_cancellations_requested
        ON run_cancellations (next_try_at) WHERE state = 'requested'""",
    "CREATE INDEX run_cancellations_job ON run_cancellations (job_id)",
]

BACKWARDS = [
    "DROP INDEX run_cancellations_job",
    "DROP INDEX run_cancellations_requested",
    "DROP INDEX dispatch_tries_dispatch",
    "DROP INDEX dispatches_lease_owner",
    "DROP INDEX dispatches_job",
    "DROP INDEX dispatches_working",
    "DROP INDEX dispatches_one_live_per_attempt",
    "ALTER TABLE run_cancellations DROP CONSTRAINT run_cancellations_state_check",
    "ALTER TABLE dispatch_tries DROP CONSTRAINT dispatch_tries_kind_check",
    """ALTER TABLE dispatches
        DROP CONSTRAINT dispatches_tries_check,
        DROP CONSTRAINT dispatches_state_check""",
    "UPDATE provisioning_jobs SET failure_reason = 'workflow_error' "
    "WHERE failure_reason = 'dispatch_error'",
    """ALTER TABLE provisioning_jobs
        DROP CONSTRAINT provisioning_jobs_failure_reason_check,
        ADD CONSTRAINT provisioning_jobs_failure_reason_check
            CHECK (failure_reason IN ('workflow_error', 'heartbeat_timeout',
                                      'deadline_exceeded', 'queue_timeout', 'operator'))""",
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
