"""Fast seeding with INSERT ... SELECT generate_series: users, agents and jobs.

Ids are derived from a tag and a row number (md5 -> uuid), so related rows join
without lookups and a caller can name any seeded row without fetching it.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

# Foreign keys and the transition guard are triggers; the rows below are consistent
# by construction, so bulk seeding skips them (superuser only, this session only).
_FAST = "SET session_replication_role = replica"
_NORMAL = "SET session_replication_role = DEFAULT"


def user_id(tag: str, n: int) -> uuid.UUID:
    return uuid.UUID(_md5(f"{tag}:user:{n}"))


def agent_id(tag: str, n: int) -> uuid.UUID:
    return uuid.UUID(_md5(f"{tag}:agent:{n}"))


def job_id(tag: str, n: int) -> uuid.UUID:
    return uuid.UUID(_md5(f"{tag}:job:{n}"))


def stripe_event_id(tag: str, n: int) -> str:
    return f"evt_{tag}_{n}"


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


async def _with_fast_session(conn: asyncpg.Connection, sql: str, *args: object) -> None:
    try:
        await conn.execute(_FAST)
        fast = True
    except asyncpg.InsufficientPrivilegeError:  # not a superuser: seed with triggers on
        fast = False
    try:
        await conn.execute(sql, *args)
    finally:
        if fast:
            await conn.execute(_NORMAL)


async def users(conn: asyncpg.Connection, tag: str, first: int, count: int) -> None:
    """Users first..first+count-1 of `tag`, each with one agent."""
    await _with_fast_session(
        conn,
        """
        WITH u AS (
            INSERT INTO users (id, email)
            SELECT md5($1 || ':user:' || g)::uuid, $1 || '-' || g || '@bench.invalid'
            FROM generate_series($2::int, $3::int) g
        )
        INSERT INTO agents (id, user_id, name)
        SELECT md5($1 || ':agent:' || g)::uuid, md5($1 || ':user:' || g)::uuid, 'agent-' || g
        FROM generate_series($2::int, $3::int) g
        """,
        tag,
        first,
        first + count - 1,
    )


# One job per row number j, for user (j - 1) % users + user_offset + 1 of `tag`.
_JOBS = """
    INSERT INTO provisioning_jobs (
        id, agent_id, user_id, stripe_event_id, status, retry_count, max_retries,
        error, failed_step, failure_reason, queued_at, claimed_at, last_heartbeat_at,
        completed_at, created_at, updated_at)
    SELECT md5($1 || ':job:' || j)::uuid,
           md5($1 || ':agent:' || u)::uuid,
           md5($1 || ':user:' || u)::uuid,
           'evt_' || $1 || '_' || j,
           s.status, 0, $7::int,
           CASE WHEN s.status = 'failed' THEN 'seeded failure' END,
           CASE WHEN s.status = 'failed' THEN 'create_vm' END,
           CASE WHEN s.status = 'failed' THEN 'workflow_error' END,
           t.at,
           CASE WHEN s.status <> 'queued' THEN t.at END,
           CASE WHEN s.status <> 'queued' THEN t.at END,
           CASE WHEN s.status IN ('running', 'failed') THEN t.at END,
           t.at, t.at
    FROM generate_series($2::int, $3::int) j
    CROSS JOIN LATERAL (SELECT ((j - $2) % $4) + $5 AS u) AS owner
    CROSS JOIN LATERAL (SELECT CASE
        WHEN $6::text <> 'history' THEN $6::text
        WHEN j % 10 = 0 THEN 'failed'
        ELSE 'running' END AS status) AS s
    CROSS JOIN LATERAL (SELECT CASE
        WHEN $6::text = 'history' THEN now() - make_interval(secs => ($3 - j) + 3600)
        ELSE now() END AS at) AS t
"""


async def jobs(
    conn: asyncpg.Connection,
    tag: str,
    *,
    first: int,
    count: int,
    owners: int,
    first_owner: int,
    status: str = "history",
    max_retries: int = 3,
) -> None:
    """Jobs first..first+count-1 of `tag`, owned round-robin by `owners` users from
    `first_owner`. status 'history' makes terminal jobs (90% running, 10% failed)
    created in the past; any other status makes fresh jobs in that status (then
    `owners` must be >= `count`: one job in flight per user)."""
    if status != "history" and owners < count:
        raise ValueError("jobs in flight need one user each")
    await _with_fast_session(
        conn, _JOBS, tag, first, first + count - 1, owners, first_owner, status, max_retries
    )


# What the ETA learns from, for each history job j of `tag`: its wait before provisioning
# and its three steps, succeeded (the default plan), with durations that vary by job.
_HISTORY_EVENTS = """
    INSERT INTO job_events (job_id, from_status, to_status, attempt, actor, reason, created_at,
                            kind, step, step_state, seconds)
    SELECT md5($1 || ':job:' || j)::uuid, e.from_status, 'provisioning', 1, e.actor, e.reason,
           now() - make_interval(secs => ($3 - j) + 3600), e.kind, e.step, e.state,
           e.base + (j % 7)
    FROM generate_series($2::int, $3::int) j
    CROSS JOIN (VALUES
        ('queued', 'workflow', NULL, 'transition', NULL, NULL, 20.0),
        ('provisioning', 'workflow', NULL, 'step', 'create_vm', 'succeeded', 60.0),
        ('provisioning', 'workflow', NULL, 'step', 'install_agent', 'succeeded', 90.0),
        ('provisioning', 'workflow', NULL, 'step', 'health_check', 'succeeded', 10.0)
    ) AS e(from_status, actor, reason, kind, step, state, base)
"""


async def history_events(conn: asyncpg.Connection, tag: str, *, first: int, count: int) -> None:
    """Four `job_events` rows for each history job first..first+count-1 of `tag`: the wait
    before provisioning and the three steps of the default plan (the ETA's samples)."""
    await _with_fast_session(conn, _HISTORY_EVENTS, tag, first, first + count - 1)


@contextlib.asynccontextmanager
async def _indexes_rebuilt_after(conn: asyncpg.Connection, *, rebuild: bool) -> AsyncIterator[None]:
    """For a large load: drop the job table's plain indexes, then recreate them from
    their exact definitions (twice as fast as maintaining them row by row). Indexes
    backing constraints (primary key, unique stripe_event_id) stay."""
    if not rebuild:
        yield
        return
    definitions = await conn.fetch(
        """SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS sql
           FROM pg_index i
           WHERE i.indrelid = 'provisioning_jobs'::regclass
             AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)"""
    )
    for index in definitions:
        await conn.execute(f"DROP INDEX {index['name']}")
    try:
        yield
    finally:
        await conn.execute("SET maintenance_work_mem = '256MB'")
        for index in definitions:
            await conn.execute(index["sql"])
        await conn.execute("RESET maintenance_work_mem")


@dataclass(frozen=True)
class Population:
    """What `population` seeded, by row number."""

    tag: str
    history_users: int
    history_jobs: int
    in_flight: int
    spare_users: int

    @property
    def in_flight_users(self) -> range:
        return range(self.history_users + 1, self.history_users + self.in_flight + 1)

    @property
    def spare_user_numbers(self) -> range:
        start = self.history_users + self.in_flight + 1
        return range(start, start + self.spare_users)

    @property
    def in_flight_jobs(self) -> range:
        return range(self.history_jobs + 1, self.history_jobs + self.in_flight + 1)


async def population(
    conn: asyncpg.Connection,
    tag: str,
    *,
    total_jobs: int,
    in_flight: int = 100,
    spare_users: int = 0,
    jobs_per_user: int = 10,
    analyze: bool = True,
    with_history_events: bool = False,
) -> Population:
    """A table of `total_jobs` jobs: `in_flight` provisioning ones (fresh, one per
    user), the rest terminal history spread over users with ~`jobs_per_user` each;
    plus `spare_users` users (with agents) and no job, free to enqueue.
    `with_history_events`: the history jobs' waits and steps too (`history_events`)."""
    history_jobs = max(total_jobs - in_flight, 0)
    history_users = max(history_jobs // jobs_per_user, 1)
    pop = Population(tag, history_users, history_jobs, in_flight, spare_users)
    await users(conn, tag, 1, history_users + in_flight + spare_users)
    if history_jobs:
        async with _indexes_rebuilt_after(conn, rebuild=history_jobs >= 100_000):
            await jobs(conn, tag, first=1, count=history_jobs, owners=history_users, first_owner=1)
        if with_history_events:
            await history_events(conn, tag, first=1, count=history_jobs)
    if in_flight:
        await jobs(
            conn,
            tag,
            first=history_jobs + 1,
            count=in_flight,
            owners=in_flight,
            first_owner=history_users + 1,
            status="provisioning",
        )
    if analyze:
        await conn.execute("VACUUM ANALYZE users, agents, provisioning_jobs, job_events")
    return pop
