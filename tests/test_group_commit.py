"""Group commit: concurrent transitions coalesced into one statement and one commit, each
caller answered exactly as it would be alone; races across processes; a row that raises;
a caller cancelled mid-batch.

Batches are forced, never hoped for: a row lock held by this test keeps one batch in the
database while the next one gathers, and the batch-size histogram says what was sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from jobs_app.core import errors
from jobs_app.core.lifecycle import Actor
from jobs_app.services import accounts
from jobs_app.services import jobs as job_service
from jobs_app.services.batching import MAX_IN_FLIGHT
from tests.conftest import record_figure

ROUNDS = 20
JOBS = 100
PROCESSES = 4


def batches(operation: str) -> tuple[float, float]:
    """(batches sent, requests in them) so far, from the batch-size histogram."""
    labels = {"operation": operation}
    count = REGISTRY.get_sample_value("jobs_batch_size_count", labels) or 0.0
    total = REGISTRY.get_sample_value("jobs_batch_size_sum", labels) or 0.0
    return count, total


async def provisioning_jobs(n: int) -> list[uuid.UUID]:
    """n jobs, each of its own user, moved to provisioning."""
    made = []
    for _ in range(n):
        user = await accounts.create_user(f"gc-{uuid.uuid4().hex[:12]}@example.com")
        agent = await accounts.create_agent(user.id, "a")
        job = await job_service.enqueue_provisioning_job(
            agent_id=agent.id, user_id=user.id, stripe_event_id=f"evt_{uuid.uuid4().hex}"
        )
        made.append(job.job.id)
    await asyncio.gather(
        *(job_service.update_job_status(j, status="provisioning", attempt=1) for j in made)
    )
    return made


async def hold_batches(
    db: asyncpg.Connection, job_ids: list[uuid.UUID]
) -> tuple[Any, list[asyncio.Task[Any]]]:
    """Every transition batch slot of this process taken by a batch waiting in the
    database on a row this test's transaction holds: what comes next gathers."""
    assert len(job_ids) == MAX_IN_FLIGHT
    transaction = db.transaction()
    await transaction.start()
    await db.execute("SELECT 1 FROM provisioning_jobs WHERE id = ANY($1) FOR UPDATE", job_ids)
    tasks = []
    for job_id in job_ids:  # one at a time: each goes as a batch of its own
        tasks.append(
            asyncio.create_task(job_service.update_job_status(job_id, status="running", attempt=1))
        )
        await until_waiting_on_lock(db, len(tasks))
    return transaction, tasks


async def until(what: str, check: Any, within: float = 20) -> None:
    """Poll `check()` (a coroutine function) until true, for at most `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # polling with a bound


async def until_waiting_on_lock(db: asyncpg.Connection, sessions: int = 1) -> None:
    """Until `sessions` sessions wait for a row lock (batches holding the next one back)."""

    async def waiting() -> bool:
        # `db` may be in a transaction: its view of pg_stat_activity is refreshed first.
        await db.execute("SELECT pg_stat_clear_snapshot()")
        return bool(
            await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            )
            >= sessions
        )

    await until("a batch waiting on the test's lock", waiting)


# --------------------------------------------------------------------------- in one process


async def test_concurrent_transitions_share_a_batch_and_each_gets_its_own_answer(db) -> None:
    jobs = await provisioning_jobs(MAX_IN_FLIGHT + 10)
    first, others = jobs[:MAX_IN_FLIGHT], jobs[MAX_IN_FLIGHT:]
    before = batches("transition")
    lock, blocked = await hold_batches(db, first)
    # While those batches wait in the database, the next one gathers: ten different
    # jobs, one of them asked twice (the second waits for a batch after the first's),
    # one asked for an illegal move.
    calls = [job_service.update_job_status(j, status="running", attempt=1) for j in others]
    calls.append(job_service.update_job_status(others[0], status="failed", attempt=1))
    gathered = asyncio.gather(*calls, return_exceptions=True)
    await asyncio.sleep(0)  # let them queue behind the held batches
    await lock.rollback()
    answers = await gathered
    assert [job.status for job in await asyncio.gather(*blocked)] == ["running"] * MAX_IN_FLIGHT
    after = batches("transition")
    # The held ones alone, the ten together, then the repeat of others[0] alone.
    assert (after[0] - before[0], after[1] - before[1]) == (MAX_IN_FLIGHT + 2, MAX_IN_FLIGHT + 11)
    assert [a.status for a in answers[:10]] == ["running"] * 10
    assert isinstance(answers[10], errors.InvalidTransitionError)
    assert answers[10].extra["current_status"] == "running"
    counts = await db.fetch(
        "SELECT job_id, count(*) FROM job_events WHERE job_id = ANY($1) GROUP BY job_id", jobs
    )
    assert len(counts) == len(jobs)
    assert {row["count"] for row in counts} == {3}  # enqueued, provisioning, running


async def test_a_row_that_raises_fails_alone_and_the_others_commit(db) -> None:
    jobs = await provisioning_jobs(MAX_IN_FLIGHT + 8)
    first, others = jobs[:MAX_IN_FLIGHT], jobs[MAX_IN_FLIGHT:]
    lock, blocked = await hold_batches(db, first)
    before = batches("transition")
    calls = [job_service.update_job_status(j, status="running", attempt=1) for j in others[:-1]]
    # An actor the job_events CHECK refuses: this row's INSERT raises, for the whole
    # statement; the batch then runs one by one.
    calls.append(
        job_service.update_job_status(
            others[-1], status="failed", attempt=None, actor="operator:", error="x"
        )
    )
    gathered = asyncio.gather(*calls, return_exceptions=True)
    await asyncio.sleep(0)
    await lock.rollback()
    answers = await gathered
    await asyncio.gather(*blocked)
    after = batches("transition")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 8)  # the eight in one batch
    assert [a.status for a in answers[:-1]] == ["running"] * 7
    assert isinstance(answers[-1], errors.BadRequestError), answers[-1]
    row = await db.fetchrow("SELECT status FROM provisioning_jobs WHERE id = $1", others[-1])
    assert row["status"] == "provisioning"  # nothing changed for it


async def test_an_enqueue_that_raises_fails_alone(db) -> None:
    held = MAX_IN_FLIGHT
    users = [await accounts.create_user(f"e-{uuid.uuid4().hex}@x.io") for _ in range(held + 5)]
    agents = [await accounts.create_agent(u.id, "a") for u in users]
    # The first enqueues' foreign-key checks wait on these locks: their batches stay in
    # the database while the next one gathers.
    lock = db.transaction()
    await lock.start()
    await db.execute(
        "SELECT 1 FROM agents WHERE id = ANY($1) FOR UPDATE", [a.id for a in agents[:held]]
    )
    before = batches("enqueue")
    blocked = []
    for user, agent in zip(users[:held], agents[:held], strict=True):
        blocked.append(
            asyncio.create_task(
                job_service.enqueue_provisioning_job(
                    agent_id=agent.id, user_id=user.id, stripe_event_id=f"evt_{uuid.uuid4()}"
                )
            )
        )
        await until_waiting_on_lock(db, len(blocked))
    calls = [
        job_service.enqueue_provisioning_job(
            agent_id=a.id, user_id=u.id, stripe_event_id=f"evt_{uuid.uuid4()}"
        )
        for u, a in zip(users[held:-1], agents[held:-1], strict=True)
    ]
    # max_retries below 0 breaks the retry-count CHECK: that caller's 409, no one else's.
    calls.append(
        job_service.enqueue_provisioning_job(
            agent_id=agents[-1].id,
            user_id=users[-1].id,
            stripe_event_id=f"evt_{uuid.uuid4()}",
            max_retries=-1,
        )
    )
    gathered = asyncio.gather(*calls, return_exceptions=True)
    await asyncio.sleep(0)
    await lock.rollback()
    answers = await gathered
    assert all(enqueued.created for enqueued in await asyncio.gather(*blocked))
    after = batches("enqueue")
    assert (after[0] - before[0], after[1] - before[1]) == (held + 1, held + 5)
    assert all(a.created for a in answers[:-1]), answers
    assert isinstance(answers[-1], errors.RetriesExhaustedError), answers[-1]
    made = "SELECT count(*) FROM provisioning_jobs WHERE user_id = $1"
    assert await db.fetchval(made, users[-1].id) == 0
    assert [await db.fetchval(made, u.id) for u in users[:-1]] == [1] * (held + 4)


async def test_an_operators_failure_batched_with_workflow_moves_cancels_only_its_run(db) -> None:
    """A batch that fails a job for someone other than its workflow runs the statement
    that cancels that job's known runs; batched with the workflow's own moves (one to
    running, one failure), it cancels that run and no other."""
    jobs = await provisioning_jobs(MAX_IN_FLIGHT + 3)
    failed, running, workflow_failed = jobs[MAX_IN_FLIGHT:]
    runs = {job_id: f"run-{uuid.uuid4().hex[:8]}" for job_id in (failed, running, workflow_failed)}
    for job_id, run in runs.items():  # each attempt's run, as its first callback names it
        await db.execute(
            "UPDATE provisioning_jobs SET workflow_run_id = $2 WHERE id = $1", job_id, run
        )
    lock, blocked = await hold_batches(db, jobs[:MAX_IN_FLIGHT])
    before = batches("transition")  # the held batches are counted as they start
    calls = asyncio.gather(
        job_service.update_job_status(
            failed, status="failed", attempt=None, error="stuck", actor=Actor.operator("alice")
        ),
        job_service.update_job_status(running, status="running", attempt=1),
        job_service.update_job_status(
            workflow_failed, status="failed", attempt=1, error="ansible failed"
        ),
    )
    await asyncio.sleep(0)  # one turn of the loop: all three wait for the next batch
    await lock.rollback()
    answers = await calls
    await asyncio.gather(*blocked)
    after = batches("transition")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 3)  # one batch of the three
    assert [job.status for job in answers] == ["failed", "running", "failed"]
    cancelled = await db.fetch(
        "SELECT workflow_run_id, job_id, reason FROM run_cancellations WHERE job_id = ANY($1)",
        list(runs),
    )
    assert [tuple(row) for row in cancelled] == [
        (runs[failed], failed, "job failed by operator:alice")
    ]


async def test_a_caller_cancelled_mid_batch_keeps_its_committed_change(db) -> None:
    jobs = await provisioning_jobs(MAX_IN_FLIGHT + 1)
    lock, blocked = await hold_batches(db, jobs[:MAX_IN_FLIGHT])
    caller = blocked[0]  # its batch is in the database, waiting on the test's lock
    bystander = asyncio.create_task(
        job_service.update_job_status(jobs[-1], status="running", attempt=1)
    )
    await asyncio.sleep(0)
    caller.cancel()  # the client went away while its batch is in the database
    with pytest.raises(asyncio.CancelledError):
        await caller
    await lock.rollback()
    assert (await bystander).status == "running"

    async def committed() -> bool:
        row = await db.fetchrow("SELECT status FROM provisioning_jobs WHERE id = $1", jobs[0])
        return row["status"] == "running"

    await until("the cancelled caller's batch to commit", committed)
    assert await db.fetchval("SELECT count(*) FROM job_events WHERE job_id = $1", jobs[0]) == 3


# --------------------------------------------------------------------------- across processes

WORKER = r"""
import asyncio, json, sys, uuid
from prometheus_client import REGISTRY
from jobs_app.db import connector
from jobs_app.services import jobs
from jobs_app.core import errors
from jobs_app.core.lifecycle import Actor

async def main():
    await connector.start_pool()
    for line in sys.stdin:
        calls = json.loads(line)
        async def one(job_id, status):
            try:
                job = await jobs.update_job_status(uuid.UUID(job_id), status=status, attempt=1,
                                                   error="x")
                return {"ok": job.status}
            except errors.DomainError as exc:
                return {"error": type(exc).__name__, "current": exc.extra.get("current_status")}
        answers = await asyncio.gather(*(one(j, s) for j, s in calls))
        labels = {"operation": "transition"}
        print(json.dumps({
            "answers": answers,
            "batches": REGISTRY.get_sample_value("jobs_batch_size_count", labels),
            "requests": REGISTRY.get_sample_value("jobs_batch_size_sum", labels),
        }), flush=True)
    await connector.close_pool()

asyncio.run(main())
"""


async def test_conflicting_transitions_from_four_processes_twenty_times(db, database) -> None:
    """200 transitions over 100 jobs per round, two per job and conflicting (running and
    failed, both legal from provisioning), from 4 processes: each job moves once, the
    loser sees the winner's move as it would alone, one history row per move, no
    deadlock; half the pairs share a process (its batcher keeps them apart), half don't
    (row locks decide)."""
    env = {**os.environ, "DATABASE_URL": database, "DB_POOL_MAX_SIZE": "8"}
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(PROCESSES)
    ]
    moves = Counter[str]()
    batch_figures = []
    try:
        for _ in range(ROUNDS):
            await db.execute("TRUNCATE provisioning_jobs, agents, users CASCADE")
            job_ids = await provisioning_jobs(JOBS)
            plan: list[list[tuple[str, str]]] = [[] for _ in range(PROCESSES)]
            for i, job_id in enumerate(job_ids):
                other = i % PROCESSES if i % 2 else (i + 1) % PROCESSES
                plan[i % PROCESSES].append((str(job_id), "running"))
                plan[other].append((str(job_id), "failed"))
            for worker, calls in zip(workers, plan, strict=True):
                assert worker.stdin is not None
                worker.stdin.write(json.dumps(calls).encode() + b"\n")
                await worker.stdin.drain()
            outcomes: dict[str, list[dict[str, Any]]] = {}
            for worker, calls in zip(workers, plan, strict=True):
                assert worker.stdout is not None
                line = await asyncio.wait_for(worker.stdout.readline(), 120)
                report = json.loads(line)
                batch_figures.append(report["requests"] / report["batches"])
                for (job_id, status), answer in zip(calls, report["answers"], strict=True):
                    outcomes.setdefault(job_id, []).append({"asked": status, **answer})
            rows = {
                str(r["id"]): r["status"]
                for r in await db.fetch("SELECT id, status FROM provisioning_jobs")
            }
            for job_id, answers in outcomes.items():
                won = [a for a in answers if "ok" in a]
                lost = [a for a in answers if "error" in a]
                assert len(won) == 1 and len(lost) == 1, answers
                assert won[0]["ok"] == won[0]["asked"] == rows[job_id]
                assert lost[0] == {
                    "asked": lost[0]["asked"],
                    "error": "InvalidTransitionError",
                    "current": rows[job_id],
                }
                moves[rows[job_id]] += 1
            history = await db.fetch("SELECT job_id, count(*) AS n FROM job_events GROUP BY job_id")
            assert len(history) == JOBS and {r["n"] for r in history} == {3}
    finally:
        for worker in workers:
            if worker.stdin is not None:
                worker.stdin.close()
            await asyncio.wait_for(worker.wait(), 60)
    assert sum(moves.values()) == ROUNDS * JOBS
    record_figure(
        "group commit: 4 processes x 20 rounds of 200 conflicting transitions",
        transitions=ROUNDS * JOBS * 2,
        jobs_moved=dict(moves),
        mean_batch_size_per_process=round(sum(batch_figures) / len(batch_figures), 1),
        violations=0,
    )
