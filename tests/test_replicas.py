"""Many replicas on one database behave like one.

Four `jobs-app serve` processes share the test database. 1,000 enqueues over 100 users,
each sent twice to two different processes, all at once; then callbacks racing each
other, the on-demand timeout check and the four sweepers on the same jobs. PostgreSQL
decides every race: one job in flight per user, one job per event, one outcome per
job, and a history that agrees with it.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import httpx
import pytest

from jobs_app.core.signing import sign
from tests.conftest import API_HEADERS, CALLBACK_SECRET, LoggedServer, record_figure

REPLICAS = 4
USERS = 100
EVENTS = 1000
CONCURRENCY = 64
JOB_TIMEOUT = 5
SWEEP_INTERVAL = 1


@pytest.fixture(scope="module")
async def replicas(database: str) -> Any:
    """Four server processes on the test database, started together."""
    env = {
        "DB_POOL_MAX_SIZE": "5",  # 4 x 5 connections: the shared server has 100 in all
        "JOB_TIMEOUT_SECONDS": str(JOB_TIMEOUT),
        "SWEEP_INTERVAL_SECONDS": str(SWEEP_INTERVAL),
    }
    servers = [LoggedServer(database, 1, **env) for _ in range(REPLICAS)]
    try:
        await asyncio.gather(*(s.wait_ready() for s in servers))
        yield servers
    finally:
        for server in servers:
            server.stop()
    for server in servers:  # the app logs every 500 it answers, and anything unexpected
        assert "unhandled error" not in server.log_text(), server.log_text()[-3000:]
        assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


@pytest.fixture
async def http() -> Any:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        yield client


async def bounded(coros: list[Any], limit: int = CONCURRENCY) -> list[Any]:
    """Run coroutines concurrently, at most `limit` at a time; results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def make_users(
    http: httpx.AsyncClient, servers: list[LoggedServer], n: int
) -> list[tuple[str, str]]:
    """n users with one agent each, created across the replicas."""

    async def one(i: int) -> tuple[str, str]:
        base = servers[i % len(servers)].url
        user = await http.post(
            f"{base}/api/users",
            json={"email": f"r{i}-{uuid.uuid4().hex[:8]}@example.com"},
            headers=API_HEADERS,
        )
        assert user.status_code == 201, user.text
        base = servers[(i + 1) % len(servers)].url
        agent = await http.post(
            f"{base}/api/agents",
            json={"user_id": user.json()["id"], "name": f"agent {i}"},
            headers=API_HEADERS,
        )
        assert agent.status_code == 201, agent.text
        return user.json()["id"], agent.json()["id"]

    return await bounded([one(i) for i in range(n)])


async def test_a_thousand_enqueues_twice_over_four_replicas(replicas, http, db):
    users = await make_users(http, replicas, USERS)
    # Event k belongs to user k % 100; each goes to two different processes.
    sends: list[tuple[int, int]] = []
    for k in range(EVENTS):
        first = k % REPLICAS
        second = (first + 1 + (k // REPLICAS) % (REPLICAS - 1)) % REPLICAS
        assert second != first
        sends += [(k, first), (k, second)]
    random.Random(6).shuffle(sends)

    async def send(k: int, replica: int) -> tuple[int, int, int, dict[str, Any], float]:
        user_id, agent_id = users[k % USERS]
        started = time.monotonic()
        r = await http.post(
            f"{replicas[replica].url}/api/jobs",
            json={"user_id": user_id, "agent_id": agent_id, "stripe_event_id": f"evt_{k}"},
            headers=API_HEADERS,
        )
        return k, replica, r.status_code, r.json(), time.monotonic() - started

    started = time.monotonic()
    results = await bounded([send(k, replica) for k, replica in sends])
    elapsed = time.monotonic() - started

    statuses = Counter(status for _, _, status, _, _ in results)
    assert set(statuses) <= {200, 201, 409}, statuses
    by_event: dict[int, list[tuple[int, int, dict[str, Any]]]] = defaultdict(list)
    for k, replica, status, body, _ in results:
        by_event[k].append((status, replica, body))
    assert len(by_event) == EVENTS and all(len(v) == 2 for v in by_event.values())

    # Each event: created once and replayed (201 + 200, same job, from two processes),
    # or refused twice because its user already has a job in flight.
    created: dict[int, str] = {}
    for k, answers in by_event.items():
        codes = sorted(status for status, _, _ in answers)
        assert codes in ([200, 201], [409, 409]), (k, answers)
        assert answers[0][1] != answers[1][1]
        if codes == [200, 201]:
            ids = {body["id"] for _, _, body in answers}
            assert len(ids) == 1, (k, answers)
            for _, _, body in answers:
                assert body["stripe_event_id"] == f"evt_{k}"
                assert (body["user_id"], body["agent_id"]) == users[k % USERS]
            created[k] = ids.pop()
        else:
            for _, _, body in answers:
                assert body["status_code"] == 409 and body["detail"]

    # The database agrees: one job per user, in flight; one per created event; every
    # 2xx answer is a row with its id and event.
    rows = await db.fetch(
        "SELECT id, user_id, agent_id, stripe_event_id, status FROM provisioning_jobs"
    )
    assert len(rows) == USERS == len(created)
    assert Counter(str(r["user_id"]) for r in rows) == Counter(u for u, _ in users)
    assert {r["status"] for r in rows} == {"queued"}
    assert {r["stripe_event_id"]: str(r["id"]) for r in rows} == {
        f"evt_{k}": job_id for k, job_id in created.items()
    }
    for r in rows:
        k = int(r["stripe_event_id"].removeprefix("evt_"))
        assert (str(r["user_id"]), str(r["agent_id"])) == users[k % USERS]
    events = await db.fetch("SELECT job_id, from_status, to_status, reason FROM job_events")
    assert len(events) == USERS
    assert {(e["from_status"], e["to_status"], e["reason"]) for e in events} == {
        (None, "queued", "enqueued")
    }
    # Every process answered its share.
    assert Counter(replica for _, replica, _, _, _ in results) == Counter(
        {i: EVENTS * 2 // REPLICAS for i in range(REPLICAS)}
    )
    latencies = sorted(t for *_, t in results)
    record_figure(
        "replicas_enqueue",
        replicas=REPLICAS,
        users=USERS,
        events=EVENTS,
        requests=len(results) + 2 * USERS,
        enqueue_requests=len(results),
        statuses={str(k): v for k, v in sorted(statuses.items())},
        jobs=len(rows),
        seconds=round(elapsed, 1),
        p99_ms=round(latencies[int(len(latencies) * 0.99)] * 1000),
        violations=0,
    )


async def _callback(
    http: httpx.AsyncClient, base: str, job_id: str, payload: dict[str, Any]
) -> httpx.Response:
    body = json.dumps(payload).encode()
    return await http.post(
        f"{base}/api/callbacks/jobs/{job_id}/status",
        content=body,
        headers={"X-Signature": sign(CALLBACK_SECRET, body), "Content-Type": "application/json"},
    )


async def test_racing_callbacks_sweepers_and_reads_give_one_outcome(replicas, http, db):
    jobs_n = 60
    users = await make_users(http, replicas, jobs_n)
    job_ids: list[str] = []
    for i, (user_id, agent_id) in enumerate(users):
        r = await http.post(
            f"{replicas[i % REPLICAS].url}/api/jobs",
            json={"user_id": user_id, "agent_id": agent_id, "stripe_event_id": f"race_{i}"},
            headers=API_HEADERS,
        )
        assert r.status_code == 201, r.text
        job_ids.append(r.json()["id"])
    for i, job_id in enumerate(job_ids):
        moved = await _callback(
            http, replicas[i % REPLICAS].url, job_id, {"attempt": 1, "status": "provisioning"}
        )
        assert moved.status_code == 200, moved.text
    # One job at a time: its heartbeat is made long gone, so the sweepers (every
    # second, in each of the four processes) may fail it at any moment, while the
    # workflow says running and failed at once, twice each through different
    # processes, and every other job is also read (a read fails a stale job too).
    racers: list[tuple[str, str, httpx.Response]] = []
    started = time.monotonic()
    for i, job_id in enumerate(job_ids):
        a, b, c, d = (replicas[(i + n) % REPLICAS].url for n in range(4))
        failed = {"attempt": 1, "status": "failed", "error": "boom", "failed_step": "ansible"}
        race = [
            ("running", _callback(http, a, job_id, {"attempt": 1, "status": "running"})),
            ("failed", _callback(http, b, job_id, failed)),
            ("running", _callback(http, c, job_id, {"attempt": 1, "status": "running"})),
            ("failed", _callback(http, d, job_id, failed)),
        ]
        if i % 2 == 0:
            race.append(("read", http.get(f"{b}/api/jobs/{job_id}", headers=API_HEADERS)))
        random.Random(i).shuffle(race)
        await db.execute(
            "UPDATE provisioning_jobs SET last_heartbeat_at = now() - interval '1 hour'"
            " WHERE id = $1",
            uuid.UUID(job_id),
        )
        responses = await asyncio.gather(*(coro for _, coro in race))
        racers += [(job_id, kind, r) for (kind, _), r in zip(race, responses, strict=True)]
    elapsed = time.monotonic() - started

    answers: dict[str, list[tuple[str, httpx.Response]]] = defaultdict(list)
    for job_id, kind, response in racers:
        answers[job_id].append((kind, response))
    outcomes: Counter[str] = Counter()
    early_reads = 0
    for i, job_id in enumerate(job_ids):
        job = await db.fetchrow(
            "SELECT status, failure_reason, error FROM provisioning_jobs WHERE id = $1",
            uuid.UUID(job_id),
        )
        assert job is not None
        history = await db.fetch(
            "SELECT from_status, to_status, actor, attempt FROM job_events"
            " WHERE job_id = $1 ORDER BY id",
            uuid.UUID(job_id),
        )
        # Exactly one event left provisioning, and it is the job's final state.
        assert [(e["from_status"], e["to_status"]) for e in history] == [
            (None, "queued"),
            ("queued", "provisioning"),
            ("provisioning", job["status"]),
        ], (job_id, history)
        final = history[-1]
        assert final["attempt"] == 1
        if job["status"] == "running":
            winner = "workflow running"
            assert final["actor"] == "workflow" and job["failure_reason"] is None
        elif final["actor"] == "workflow":
            winner = "workflow failed"
            assert (job["failure_reason"], job["error"]) == ("workflow_error", "boom")
        else:
            # Only a sweeper can have done it where no read raced.
            winner = "system: read or sweeper" if i % 2 == 0 else "system: sweeper"
            assert final["actor"] == "system"
            assert job["failure_reason"] == "heartbeat_timeout"
        outcomes[winner] += 1
        # Every answer agrees with that one outcome: 200s show it, the rest are 409. A
        # read that met the row locked by the winning transition shows the job as it
        # was just before (a stale job whose row is locked is being moved already).
        for kind, response in answers[job_id]:
            if kind == "read" and response.json()["status"] == "provisioning":
                assert response.status_code == 200
                early_reads += 1
                continue
            if kind == "read" or kind == job["status"]:
                assert response.status_code == 200, (kind, response.text)
                assert response.json()["status"] == job["status"]
                assert response.json()["failure_reason"] == job["failure_reason"]
            else:
                assert response.status_code == 409, (kind, response.text)
                assert response.json()["extra"]["current_status"] == job["status"]
    assert sum(outcomes.values()) == jobs_n
    record_figure(
        "replicas_race",
        replicas=REPLICAS,
        jobs=jobs_n,
        racing_requests=len(racers),
        outcomes=dict(outcomes),
        reads_before_the_winner_committed=early_reads,
        seconds=round(elapsed, 1),
        violations=0,
    )
