"""The schema enforces the invariants itself: raw SQL on a separate connection,
bypassing queue.py, is refused whenever it would break them."""

from __future__ import annotations

import itertools
import uuid

import asyncpg
import pytest

from bench import seed
from jobs_app.core.lifecycle import RETRY_SOURCES, TRANSITIONS, JobStatus

STATUSES = [s.value for s in JobStatus]
# What the lifecycle allows: the status callbacks' transitions plus retry (failed -> queued).
LIFECYCLE_PAIRS = {
    (s.value, to.value) for to, rule in TRANSITIONS.items() for s in rule.sources
} | {(s.value, JobStatus.QUEUED.value) for s in RETRY_SOURCES}


@pytest.fixture
async def owner(db: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    user_id = await db.fetchval(
        "INSERT INTO users (email) VALUES ($1) RETURNING id", f"{uuid.uuid4().hex}@example.com"
    )
    agent_id = await db.fetchval(
        "INSERT INTO agents (user_id, name) VALUES ($1, 'a') RETURNING id", user_id
    )
    return user_id, agent_id


async def insert_job(
    db: asyncpg.Connection,
    owner: tuple[uuid.UUID, uuid.UUID],
    status: str = "queued",
    **columns: object,
) -> uuid.UUID:
    user_id, agent_id = owner
    values = {"user_id": user_id, "agent_id": agent_id, "status": status, **columns}
    if status == "failed":
        values.setdefault("failure_reason", "operator")
    names = ", ".join(values)
    params = ", ".join(f"${i + 1}" for i in range(len(values)))
    return await db.fetchval(
        f"INSERT INTO provisioning_jobs ({names}) VALUES ({params}) RETURNING id",
        *values.values(),
    )


async def test_defaults(db, owner) -> None:
    job_id = await insert_job(db, owner)
    row = await db.fetchrow("SELECT * FROM provisioning_jobs WHERE id = $1", job_id)
    assert row["status"] == "queued"
    assert row["region"] == "us-east"
    assert (row["retry_count"], row["max_retries"], row["attempt"]) == (0, 3, 1)
    assert row["stripe_event_id"] is row["workflow_run_id"] is row["failure_reason"] is None
    assert row["claimed_at"] is row["last_heartbeat_at"] is row["completed_at"] is None
    assert None not in (row["created_at"], row["updated_at"], row["queued_at"])
    assert isinstance(row["id"], uuid.UUID)


async def test_status_outside_the_set_is_refused(db, owner) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await insert_job(db, owner, status="bogus")
    assert info.value.constraint_name == "provisioning_jobs_status_check"
    job_id = await insert_job(db, owner)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE provisioning_jobs SET status = 'bogus' WHERE id = $1", job_id)
    # The CHECK alone refuses it too, not only the transition trigger.
    with pytest.raises(asyncpg.CheckViolationError) as info:
        async with db.transaction():
            await db.execute(
                "ALTER TABLE provisioning_jobs DISABLE TRIGGER provisioning_jobs_guard_transition"
            )
            await db.execute("UPDATE provisioning_jobs SET status = 'bogus' WHERE id = $1", job_id)
    assert info.value.constraint_name == "provisioning_jobs_status_check"
    assert await db.fetchval("SELECT status FROM provisioning_jobs WHERE id = $1", job_id) == (
        "queued"
    )
    enabled = await db.fetchval(
        "SELECT tgenabled FROM pg_trigger WHERE tgname = 'provisioning_jobs_guard_transition'"
    )
    assert enabled == b"O"  # the trigger is back on after the rollback


async def test_failure_reason_set_and_consistency(db, owner) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await insert_job(db, owner, status="failed", failure_reason="bogus")
    assert info.value.constraint_name == "provisioning_jobs_failure_reason_check"
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await insert_job(db, owner, status="failed", failure_reason=None)
    assert info.value.constraint_name == "provisioning_jobs_failed_has_reason_check"
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await insert_job(db, owner, status="queued", failure_reason="operator")
    assert info.value.constraint_name == "provisioning_jobs_failed_has_reason_check"
    assert await db.fetchval("SELECT count(*) FROM provisioning_jobs") == 0


async def test_second_active_job_per_user_is_refused(db, owner) -> None:
    await insert_job(db, owner, status="queued")
    for status in ("queued", "provisioning"):
        with pytest.raises(asyncpg.UniqueViolationError) as info:
            await insert_job(db, owner, status=status)
        assert info.value.constraint_name == "provisioning_jobs_one_active_per_user"
    # Finished jobs don't count.
    failed = await insert_job(db, owner, status="failed")
    await insert_job(db, owner, status="running")
    # Nor may a raw UPDATE bring a second job back into flight.
    with pytest.raises(asyncpg.UniqueViolationError) as info:
        await db.execute(
            "UPDATE provisioning_jobs SET status = 'queued', failure_reason = NULL WHERE id = $1",
            failed,
        )
    assert info.value.constraint_name == "provisioning_jobs_one_active_per_user"
    # Another user is independent.
    other = await db.fetchval("INSERT INTO users (email) VALUES ('o@example.com') RETURNING id")
    other_agent = await db.fetchval(
        "INSERT INTO agents (user_id, name) VALUES ($1, 'x') RETURNING id", other
    )
    await insert_job(db, (other, other_agent), status="queued")
    active = await db.fetchval(
        "SELECT count(*) FROM provisioning_jobs WHERE status IN ('queued', 'provisioning')"
    )
    assert active == 2


async def test_retry_count_bounds(db, owner) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await insert_job(db, owner, retry_count=4, max_retries=3)
    assert info.value.constraint_name == "provisioning_jobs_retry_count_check"
    with pytest.raises(asyncpg.CheckViolationError):
        await insert_job(db, owner, retry_count=-1)
    job_id = await insert_job(db, owner, retry_count=3, max_retries=3)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "UPDATE provisioning_jobs SET retry_count = retry_count + 1 WHERE id = $1", job_id
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE provisioning_jobs SET max_retries = 2 WHERE id = $1", job_id)


async def test_attempt_is_generated_from_retry_count(db, owner) -> None:
    job_id = await insert_job(db, owner, retry_count=2)
    assert await db.fetchval("SELECT attempt FROM provisioning_jobs WHERE id = $1", job_id) == 3
    await db.execute("UPDATE provisioning_jobs SET retry_count = 0 WHERE id = $1", job_id)
    assert await db.fetchval("SELECT attempt FROM provisioning_jobs WHERE id = $1", job_id) == 1
    generated = await db.fetchval(
        """SELECT is_generated FROM information_schema.columns
           WHERE table_name = 'provisioning_jobs' AND column_name = 'attempt'"""
    )
    assert generated == "ALWAYS"
    with pytest.raises(asyncpg.GeneratedAlwaysError):
        await db.execute("UPDATE provisioning_jobs SET attempt = 7 WHERE id = $1", job_id)
    with pytest.raises(asyncpg.GeneratedAlwaysError):
        await insert_job(db, (owner[0], owner[1]), status="failed", attempt=5)


async def test_trigger_refuses_illegal_raw_update(db, owner) -> None:
    job_id = await insert_job(db, owner, status="running")
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await db.execute("UPDATE provisioning_jobs SET status = 'queued' WHERE id = $1", job_id)
    assert info.value.constraint_name == "provisioning_jobs_transition_check"
    assert "running -> queued" in str(info.value)
    assert await db.fetchval("SELECT status FROM provisioning_jobs WHERE id = $1", job_id) == (
        "running"
    )


async def test_trigger_allows_exactly_the_lifecycle(db, owner) -> None:
    expected = {
        ("queued", "provisioning"),
        ("queued", "failed"),
        ("provisioning", "running"),
        ("provisioning", "failed"),
        ("failed", "queued"),
    }
    assert expected == LIFECYCLE_PAIRS
    accepted = set()
    for src, to in itertools.product(STATUSES, STATUSES):
        await db.execute("DELETE FROM provisioning_jobs")
        job_id = await insert_job(db, owner, status=src)
        try:
            await db.execute(
                """UPDATE provisioning_jobs
                   SET status = $2::text,
                       failure_reason = CASE WHEN $2::text = 'failed' THEN 'operator' END
                   WHERE id = $1""",
                job_id,
                to,
            )
        except asyncpg.CheckViolationError as exc:
            assert exc.constraint_name == "provisioning_jobs_transition_check", (src, to)
            status = await db.fetchval("SELECT status FROM provisioning_jobs WHERE id = $1", job_id)
            assert status == src
        else:
            accepted.add((src, to))
    same_status = {(s, s) for s in STATUSES}  # not a change of status: the trigger stays out
    assert accepted == LIFECYCLE_PAIRS | same_status


async def test_agent_must_belong_to_the_jobs_user(db, owner) -> None:
    other = await db.fetchval("INSERT INTO users (email) VALUES ('z@example.com') RETURNING id")
    with pytest.raises(asyncpg.ForeignKeyViolationError) as info:
        await insert_job(db, (other, owner[1]))
    assert info.value.constraint_name == "provisioning_jobs_agent_owner_fkey"


async def test_stripe_event_id_unique(db, owner) -> None:
    await insert_job(db, owner, status="failed", stripe_event_id="evt_1")
    with pytest.raises(asyncpg.UniqueViolationError) as info:
        await insert_job(db, owner, status="failed", stripe_event_id="evt_1")
    assert info.value.constraint_name == "provisioning_jobs_stripe_event_id_key"
    # NULL event ids don't collide.
    await insert_job(db, owner, status="failed")
    await insert_job(db, owner, status="failed")


async def test_cascade_deletes(db, owner) -> None:
    job_id = await insert_job(db, owner)
    await db.execute(
        """INSERT INTO job_events (job_id, from_status, to_status, attempt, actor)
           VALUES ($1, NULL, 'queued', 1, 'api')""",
        job_id,
    )
    await db.execute("DELETE FROM users WHERE id = $1", owner[0])
    for table in ("agents", "provisioning_jobs", "job_events"):
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0


@pytest.mark.parametrize(
    ("actor", "ok"),
    [
        ("system", True),
        ("workflow", True),
        ("api", True),
        ("operator:alice", True),
        ("operator:", False),
        ("operator", False),
        ("admin", False),
    ],
)
async def test_job_event_actor(db, owner, actor, ok) -> None:
    job_id = await insert_job(db, owner)
    statement = """INSERT INTO job_events (job_id, from_status, to_status, attempt, actor)
                   VALUES ($1, 'queued', 'provisioning', 1, $2)"""
    if ok:
        await db.execute(statement, job_id, actor)
    else:
        with pytest.raises(asyncpg.CheckViolationError) as info:
            await db.execute(statement, job_id, actor)
        assert info.value.constraint_name == "job_events_actor_check"


async def test_job_event_statuses(db, owner) -> None:
    job_id = await insert_job(db, owner)
    statement = """INSERT INTO job_events (job_id, from_status, to_status, attempt, actor)
                   VALUES ($1, $2, $3, 1, 'api')"""
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await db.execute(statement, job_id, "bogus", "queued")
    assert info.value.constraint_name == "job_events_from_status_check"
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await db.execute(statement, job_id, "queued", "bogus")
    assert info.value.constraint_name == "job_events_to_status_check"
    await db.execute(statement, job_id, None, "queued")
    assert await db.fetchval("SELECT count(*) FROM job_events") == 1


EVENT_ARG = "evt_1"
ANY_ID = uuid.UUID(int=1)


@pytest.mark.parametrize(
    ("query", "arg", "index"),
    [
        (
            "SELECT * FROM provisioning_jobs WHERE agent_id = $1 "
            "ORDER BY created_at DESC, id DESC LIMIT 1",
            ANY_ID,
            "provisioning_jobs_agent_newest",
        ),
        (
            "SELECT * FROM provisioning_jobs WHERE stripe_event_id = $1",
            EVENT_ARG,
            "provisioning_jobs_stripe_event_id_key",
        ),
        (
            "SELECT 1 FROM provisioning_jobs WHERE user_id = $1 "
            "AND status IN ('queued', 'provisioning')",
            ANY_ID,
            "provisioning_jobs_one_active_per_user",
        ),
        (
            "SELECT * FROM provisioning_jobs WHERE user_id = $1 "
            "ORDER BY created_at DESC, id DESC LIMIT 10",
            ANY_ID,
            "provisioning_jobs_user_newest",
        ),
        (
            "SELECT * FROM provisioning_jobs WHERE status = $1 "
            "ORDER BY created_at DESC, id DESC LIMIT 10",
            "failed",
            "provisioning_jobs_status_newest",
        ),
        (
            "SELECT * FROM job_events WHERE job_id = $1 ORDER BY id",
            ANY_ID,
            "job_events_job_id",
        ),
    ],
)
async def test_lookups_can_use_their_index(db, query, arg, index) -> None:
    # The plan is decided by data this test makes and analyses, not by whatever
    # statistics earlier tests and autovacuum left behind (TRUNCATE keeps column
    # statistics; PostgreSQL 18 picks other indexes on an empty table). Under 30,000
    # rows ANALYZE reads every row, so the statistics are the same on every run.
    await seed.population(db, "lookup", total_jobs=3_000, in_flight=100, analyze=False)
    await db.execute(
        "INSERT INTO job_events (job_id, from_status, to_status, attempt, actor)"
        " SELECT id, NULL, 'queued', 1, 'api' FROM provisioning_jobs"
    )
    await db.execute("VACUUM ANALYZE users, agents, provisioning_jobs, job_events")
    # With sequential scans priced out, the planner must find an index for the lookup.
    async with db.transaction():
        await db.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in await db.fetch(f"EXPLAIN {query}", arg))
    assert index in plan, plan
    assert "Seq Scan" not in plan, plan


async def test_heartbeats_can_be_hot_updates(db):
    """No index covers what a heartbeat writes, and pages keep free room: PostgreSQL
    can update the row in place (HOT) without touching any index."""
    covered = await db.fetch(
        """SELECT i.indexrelid::regclass::text AS index
           FROM pg_index i
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
           WHERE i.indrelid = 'provisioning_jobs'::regclass
             AND a.attname IN ('last_heartbeat_at', 'updated_at')
           UNION
           SELECT indexrelid::regclass::text FROM pg_index
           WHERE indrelid = 'provisioning_jobs'::regclass
             AND (pg_get_expr(indexprs, indrelid) ~ '(last_heartbeat_at|updated_at)'
                  OR pg_get_expr(indpred, indrelid) ~ '(last_heartbeat_at|updated_at)')"""
    )
    assert covered == []
    options = await db.fetchval(
        "SELECT reloptions FROM pg_class WHERE relname = 'provisioning_jobs'"
    )
    assert options == ["fillfactor=80"]
