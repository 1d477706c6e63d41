"""Races decided by PostgreSQL: many calls at once, each on its own pooled
connection (real backends, real commits), with exact counts of the outcome.

Nothing here sleeps to order things: the calls are fired together and every
interleaving they happen to take must end in the one allowed outcome. The races
that once went wrong rarely run several rounds to catch them reliably.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from jobs_app.core import errors
from jobs_app.core.lifecycle import CONCURRENT_PROVISION_MESSAGE
from jobs_app.core.models import Job
from jobs_app.core.settings import get_settings
from jobs_app.db.connector import close_pool, get_engine, start_pool
from jobs_app.services import accounts, jobs

N = 50
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
async def give_connections_back(database: str) -> AsyncIterator[None]:
    """After this module, shrink the app pool back to its minimum: the server's
    connection slots are shared with other test runs and processes."""
    yield
    await close_pool()
    await start_pool()


@pytest.fixture(autouse=True)
async def warm_pool(db: asyncpg.Connection) -> None:
    """Open every pooled connection first, so the racing calls start together
    instead of one by one as new connections get established."""
    pool = get_engine().pool
    assert pool is not None
    connections = [await pool.acquire() for _ in range(get_settings().pool_max_size)]
    for conn in connections:
        await pool.release(conn)


async def new_user_agent() -> tuple[uuid.UUID, uuid.UUID]:
    user = await accounts.create_user(f"race-{uuid.uuid4().hex}@example.com")
    agent = await accounts.create_agent(user.id, "agent")
    return user.id, agent.id


async def enqueue(user_id: uuid.UUID, agent_id: uuid.UUID, event: str) -> Job:
    result = await jobs.enqueue_provisioning_job(
        agent_id=agent_id, user_id=user_id, stripe_event_id=event
    )
    return result.job


async def failed_job(user_id: uuid.UUID, agent_id: uuid.UUID, event: str) -> Job:
    job = await enqueue(user_id, agent_id, event)
    await jobs.update_job_status(job.id, status="provisioning", attempt=1)
    return await jobs.update_job_status(job.id, status="failed", attempt=1, error="boom")


async def provisioning_job(user_id: uuid.UUID, agent_id: uuid.UUID, event: str) -> Job:
    job = await enqueue(user_id, agent_id, event)
    return await jobs.update_job_status(job.id, status="provisioning", attempt=1)


async def events_of(db: asyncpg.Connection, job_id: uuid.UUID) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT from_status, to_status, attempt, actor FROM job_events WHERE job_id = $1 "
        "ORDER BY id",
        job_id,
    )


def kinds(outcomes: list[Any]) -> Counter[str]:
    return Counter(type(o).__name__ if isinstance(o, BaseException) else "ok" for o in outcomes)


# --------------------------------------------------------------------------- enqueue


async def test_same_event_enqueued_50_times_at_once(db) -> None:
    for round_ in range(100):
        user_id, agent_id = await new_user_agent()
        event = f"evt_same_{round_}"
        outcomes = await asyncio.gather(
            *(
                jobs.enqueue_provisioning_job(
                    agent_id=agent_id, user_id=user_id, stripe_event_id=event
                )
                for _ in range(N)
            ),
            return_exceptions=True,
        )
        assert kinds(outcomes) == {"ok": N}, (round_, outcomes)
        assert Counter(o.created for o in outcomes) == {True: 1, False: N - 1}
        [job_id] = {o.job.id for o in outcomes}
        assert (
            await db.fetchval("SELECT count(*) FROM provisioning_jobs WHERE user_id = $1", user_id)
            == 1
        )
        assert (
            await db.fetchval("SELECT id FROM provisioning_jobs WHERE stripe_event_id = $1", event)
            == job_id
        )
        assert [tuple(e) for e in await events_of(db, job_id)] == [(None, "queued", 1, "api")]


async def test_different_events_for_one_user_enqueued_at_once(db) -> None:
    for round_ in range(5):
        user_id, agent_id = await new_user_agent()
        outcomes = await asyncio.gather(
            *(
                jobs.enqueue_provisioning_job(
                    agent_id=agent_id, user_id=user_id, stripe_event_id=f"evt_{round_}_{i}"
                )
                for i in range(N)
            ),
            return_exceptions=True,
        )
        assert kinds(outcomes) == {"ok": 1, "ConcurrentProvisionError": N - 1}, outcomes
        [winner] = [o for o in outcomes if not isinstance(o, BaseException)]
        assert winner.created
        assert all(
            o.message == CONCURRENT_PROVISION_MESSAGE
            for o in outcomes
            if isinstance(o, errors.ConcurrentProvisionError)
        )
        rows = await db.fetch("SELECT id FROM provisioning_jobs WHERE user_id = $1", user_id)
        assert [r["id"] for r in rows] == [winner.job.id]
        assert (
            await db.fetchval(
                "SELECT count(*) FROM job_events e JOIN provisioning_jobs j ON j.id = e.job_id "
                "WHERE j.user_id = $1",
                user_id,
            )
            == 1
        )


_CHILD = """
import asyncio, json, os, sys, uuid
import asyncpg
from jobs_app.db import connector
from jobs_app.services import jobs

async def main():
    user_id, agent_id, event, calls, gate_key = sys.argv[1:]
    await connector.start_pool()
    pool = connector.get_engine().pool
    conns = [await pool.acquire() for _ in range(int(calls))]
    for conn in conns:
        await pool.release(conn)
    gate = await asyncpg.connect(os.environ["DATABASE_URL"])
    print("ready", flush=True)
    await gate.execute("SELECT pg_advisory_lock_shared($1)", int(gate_key))
    outcomes = await asyncio.gather(*(
        jobs.enqueue_provisioning_job(
            agent_id=uuid.UUID(agent_id), user_id=uuid.UUID(user_id), stripe_event_id=event)
        for _ in range(int(calls))), return_exceptions=True)
    print(json.dumps([
        [type(o).__name__] if isinstance(o, BaseException) else [o.created, str(o.job.id)]
        for o in outcomes]), flush=True)
    await gate.close()
    await connector.close_pool()

asyncio.run(main())
"""


async def test_same_event_enqueued_from_separate_processes(db) -> None:
    """Four processes, each with its own pool, released together by an advisory lock."""
    user_id, agent_id = await new_user_agent()
    processes, calls, gate_key = 4, 5, 0x7261636500000000 + os.getpid()
    env = {**os.environ, "DB_POOL_MAX_SIZE": str(calls), "DB_POOL_MIN_SIZE": "1"}
    await db.execute("SELECT pg_advisory_lock($1)", gate_key)
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            str(user_id),
            str(agent_id),
            "evt_multi_process",
            str(calls),
            str(gate_key),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(processes)
    ]
    ready = []
    try:
        for child in children:
            assert child.stdout is not None
            ready.append(await asyncio.wait_for(child.stdout.readline(), 120))
    finally:
        # Open the gate: every child that got there starts its calls now.
        await db.execute("SELECT pg_advisory_unlock($1)", gate_key)
    results = [await asyncio.wait_for(child.communicate(), 120) for child in children]
    assert ready == [b"ready\n"] * processes, results
    assert [child.returncode for child in children] == [0] * processes, results
    outcomes = [o for stdout, _ in results for o in json.loads(stdout)]
    assert len(outcomes) == processes * calls
    assert Counter(o[0] for o in outcomes) == {True: 1, False: processes * calls - 1}, outcomes
    job_ids = {o[1] for o in outcomes}
    assert len(job_ids) == 1
    assert await db.fetchval("SELECT count(*) FROM provisioning_jobs") == 1
    assert await db.fetchval("SELECT count(*) FROM job_events") == 1


# --------------------------------------------------------------------------- retry


async def test_same_failed_job_retried_50_times_at_once(db) -> None:
    for round_ in range(3):
        user_id, agent_id = await new_user_agent()
        job = await failed_job(user_id, agent_id, f"evt_retry_{round_}")
        outcomes = await asyncio.gather(
            *(jobs.retry_job(job.id) for _ in range(N)), return_exceptions=True
        )
        # Exactly InvalidTransitionError, not its RetriesExhaustedError subclass: the
        # losers find the job no longer failed.
        assert kinds(outcomes) == {"ok": 1, "InvalidTransitionError": N - 1}, outcomes
        [retried] = [o for o in outcomes if not isinstance(o, BaseException)]
        assert (retried.status, retried.retry_count, retried.attempt) == ("queued", 1, 2)
        row = await db.fetchrow(
            "SELECT status, retry_count, attempt FROM provisioning_jobs WHERE id = $1", job.id
        )
        assert tuple(row) == ("queued", 1, 2)
        events = [tuple(e) for e in await events_of(db, job.id)]
        assert events.count(("failed", "queued", 2, "api")) == 1
        assert len(events) == 4


async def test_two_failed_jobs_of_one_user_retried_at_once(db) -> None:
    for round_ in range(5):
        user_id, agent_id = await new_user_agent()
        first = await failed_job(user_id, agent_id, f"evt_a_{round_}")
        second = await failed_job(user_id, agent_id, f"evt_b_{round_}")
        targets = [first.id, second.id] * (N // 2)
        outcomes = await asyncio.gather(
            *(jobs.retry_job(job_id) for job_id in targets), return_exceptions=True
        )
        assert kinds(outcomes)["ok"] == 1, outcomes
        [winner] = [o for o in outcomes if not isinstance(o, BaseException)]
        loser_id = second.id if winner.id == first.id else first.id
        on_winner = kinds(o for t, o in zip(targets, outcomes, strict=True) if t == winner.id)
        on_loser = kinds(o for t, o in zip(targets, outcomes, strict=True) if t == loser_id)
        assert on_winner == {"ok": 1, "InvalidTransitionError": N // 2 - 1}
        assert on_loser == {"ConcurrentProvisionError": N // 2}
        rows = await db.fetch(
            "SELECT id, status, retry_count FROM provisioning_jobs WHERE user_id = $1", user_id
        )
        assert {r["id"]: (r["status"], r["retry_count"]) for r in rows} == {
            winner.id: ("queued", 1),
            loser_id: ("failed", 0),
        }
        assert len(await events_of(db, winner.id)) == 4
        assert len(await events_of(db, loser_id)) == 3


# --------------------------------------------------------------------------- transitions


async def test_running_and_failed_at_once(db) -> None:
    finals = Counter()
    for round_ in range(10):
        user_id, agent_id = await new_user_agent()
        job = await provisioning_job(user_id, agent_id, f"evt_rf_{round_}")
        outcomes = await asyncio.gather(
            jobs.update_job_status(job.id, status="running", attempt=1),
            jobs.update_job_status(job.id, status="failed", attempt=1, error="x"),
            return_exceptions=True,
        )
        assert kinds(outcomes) == {"ok": 1, "InvalidTransitionError": 1}, outcomes
        [winner] = [o for o in outcomes if not isinstance(o, BaseException)]
        final = await db.fetchval("SELECT status FROM provisioning_jobs WHERE id = $1", job.id)
        assert final == winner.status
        finals[final] += 1
        events = [tuple(e) for e in await events_of(db, job.id)]
        assert [e for e in events if e[0] == "provisioning"] == [
            ("provisioning", final, 1, "workflow")
        ]
        assert len(events) == 3
    assert sum(finals.values()) == 10


async def test_many_running_and_failed_callbacks_at_once(db) -> None:
    user_id, agent_id = await new_user_agent()
    job = await provisioning_job(user_id, agent_id, "evt_many")
    wanted = ["running", "failed"] * (N // 2)
    outcomes = await asyncio.gather(
        *(jobs.update_job_status(job.id, status=s, attempt=1, error="x") for s in wanted),
        return_exceptions=True,
    )
    final = await db.fetchval("SELECT status FROM provisioning_jobs WHERE id = $1", job.id)
    # Every callback for the winning status succeeds (one moved it, the rest are
    # idempotent repeats); every callback for the other is refused.
    for status, outcome in zip(wanted, outcomes, strict=True):
        if status == final:
            assert isinstance(outcome, Job) and outcome.status == final, outcome
        else:
            assert type(outcome) is errors.InvalidTransitionError, outcome
    events = [tuple(e) for e in await events_of(db, job.id)]
    assert events == [
        (None, "queued", 1, "api"),
        ("queued", "provisioning", 1, "workflow"),
        ("provisioning", final, 1, "workflow"),
    ]


# --------------------------------------------------------------------------- sweeper vs heartbeat


async def _job_at_its_timeout(db: asyncpg.Connection, event: str) -> Job:
    user_id, agent_id = await new_user_agent()
    job = await provisioning_job(user_id, agent_id, event)
    await db.execute(
        "UPDATE provisioning_jobs SET claimed_at = now() - make_interval(secs => $2), "
        "updated_at = now() - make_interval(secs => $2) WHERE id = $1",
        job.id,
        float(get_settings().job_timeout_seconds),
    )
    return job


async def _assert_one_outcome(
    db: asyncpg.Connection, job: Job, beats: list[Any], failures: int
) -> str:
    """Either the heartbeats won (all of them) or the timeout did (exactly once)."""
    row = await db.fetchrow(
        "SELECT status, failure_reason, error FROM provisioning_jobs WHERE id = $1", job.id
    )
    events = [tuple(e) for e in await events_of(db, job.id)]
    if row["status"] == "provisioning":
        assert kinds(beats) == {"ok": len(beats)}, beats
        assert failures == 0
        assert events == [(None, "queued", 1, "api"), ("queued", "provisioning", 1, "workflow")]
        return "heartbeat"
    assert row["status"] == "failed"
    assert row["failure_reason"] == "heartbeat_timeout"
    assert row["error"].startswith("Timeout: No heartbeat for ")
    assert kinds(beats) == {"InvalidTransitionError": len(beats)}, beats
    assert failures == 1
    assert events[2:] == [("provisioning", "failed", 1, "system")]
    return "timeout"


async def test_sweeper_vs_heartbeat_at_the_timeout(db) -> None:
    seen = Counter()
    for round_ in range(10):
        job = await _job_at_its_timeout(db, f"evt_sweep_{round_}")
        swept, beat = await asyncio.gather(
            jobs.sweep_stale_jobs(),
            jobs.record_heartbeat(job.id, attempt=1),
            return_exceptions=True,
        )
        assert isinstance(swept, list), swept
        assert [j.id for j in swept] in ([], [job.id])
        seen[await _assert_one_outcome(db, job, [beat], len(swept))] += 1
    assert sum(seen.values()) == 10


async def test_sweepers_checks_and_heartbeats_at_the_timeout(db) -> None:
    for round_ in range(5):
        job = await _job_at_its_timeout(db, f"evt_mix_{round_}")
        calls: list[Any] = []
        for _ in range(3):
            calls += [jobs.sweep_stale_jobs(), jobs.check_job_timeout(job.id)]
            calls += [jobs.record_heartbeat(job.id, attempt=1) for _ in range(4)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        sweeps = outcomes[0::6] + outcomes[1::6]
        assert not any(isinstance(o, BaseException) for o in sweeps), sweeps
        failures = sum(len(o) if isinstance(o, list) else int(o) for o in sweeps)
        beats = [o for i, o in enumerate(outcomes) if i % 6 >= 2]
        await _assert_one_outcome(db, job, beats, failures)
