"""Shutdown and deploys: a rolling restart of two replicas under load loses nothing.

Two `jobs-app serve` processes share the test database; the test restarts them one at
a time (SIGTERM, wait for the exit, start the new one, wait until it is healthy) while
workers drive workflows through both: enqueue, then the signed callbacks provisioning
→ heartbeat → running. A refused connection, or one closed before an answer, is retried
against the other replica and counted (every request here is idempotent: an enqueue
names its event, a callback repeats to the same answer). At each SIGTERM one request is
certainly in flight (blocked on its job's row by this test): it must be answered.
Afterwards every acknowledged request is in the database, with exact counts.

Both replicas also dispatch (to a GitHub stand-in on loopback): each stopped replica gives
its dispatch leases back before it exits, so no job waits for a lease to expire.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import uuid
from typing import Any

import asyncpg
import httpx

from jobs_app.core.signing import sign
from jobs_app.services import accounts, jobs
from tests.conftest import API_HEADERS, CALLBACK_SECRET, LoggedServer, free_port, record_figure
from tests.github_standin import github_env

WORKERS = 12
BOUND = 60.0  # seconds any wait below may take before the test fails
ENV = {"DB_POOL_MAX_SIZE": "6"}


class Fleet:
    """The replicas' current addresses, and a client that survives their restarts."""

    def __init__(self, urls: list[str], client: httpx.AsyncClient) -> None:
        self.urls = urls
        self.client = client
        self.next = 0
        self.refused = 0  # connection refused: the replica was restarting
        self.dropped = 0  # connection closed before any answer: retried, idempotently
        self.answers: list[int] = []

    async def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self.next += 1
        deadline = time.monotonic() + BOUND
        for turn in range(self.next, self.next + 1000):
            url = self.urls[turn % len(self.urls)]
            try:
                response = await self.client.request(method, url + path, **kwargs)
            except httpx.ConnectError:
                self.refused += 1
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                self.dropped += 1
            else:
                self.answers.append(response.status_code)
                return response
            assert time.monotonic() < deadline, "no replica answered"
        raise AssertionError("no replica answered")


def _signed(payload: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps(payload).encode()
    return {
        "content": body,
        "headers": {"X-Signature": sign(CALLBACK_SECRET, body), "Content-Type": "application/json"},
    }


async def _workflow(fleet: Fleet, user_id: str, agent_id: str, acked: dict[str, Any]) -> None:
    """One job's life through the fleet; records what each 2xx acknowledged."""
    event_id = f"evt_roll_{uuid.uuid4().hex}"
    body = {"user_id": user_id, "agent_id": agent_id, "stripe_event_id": event_id}
    r = await fleet.send("POST", "/api/jobs", json=body, headers=API_HEADERS)
    assert r.status_code in (200, 201), r.text  # 200: a retry found the job it made
    job_id = r.json()["id"]
    acked[event_id] = {"job_id": job_id, "status": "queued"}
    base = f"/api/callbacks/jobs/{job_id}"
    started = {"attempt": 1, "status": "provisioning", "workflow_run_id": f"run-{event_id}"}
    r = await fleet.send("POST", f"{base}/status", **_signed(started))
    assert r.status_code == 200, r.text
    acked[event_id]["status"] = "provisioning"
    r = await fleet.send("POST", f"{base}/heartbeat", **_signed({"attempt": 1}))
    assert r.status_code == 204, r.text
    acked[event_id]["heartbeat"] = True
    r = await fleet.send("POST", f"{base}/status", **_signed({"attempt": 1, "status": "running"}))
    assert r.status_code == 200, r.text
    acked[event_id]["status"] = "running"


async def _until(predicate: Any, what: str) -> None:
    """Poll a condition with a bound (not a sleep to synchronise: a wait for a state)."""
    deadline = time.monotonic() + BOUND
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.02)


def _refuses(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def _restart_with_one_in_flight(
    fleet: Fleet,
    index: int,
    server: LoggedServer,
    start_logged_server: Any,
    db: asyncpg.Connection,
    pinned_job: Any,
    env: dict[str, Any],
) -> tuple[LoggedServer, float]:
    """SIGTERM replica `index` while one of its requests is certainly in flight; the
    request is answered, the process exits, the new replica takes its place."""
    in_flight_client = httpx.AsyncClient(timeout=BOUND)
    path = f"{server.url}/api/callbacks/jobs/{pinned_job}/heartbeat"
    async with db.transaction():
        await db.execute("SELECT 1 FROM provisioning_jobs WHERE id = $1 FOR UPDATE", pinned_job)
        in_flight = asyncio.create_task(in_flight_client.post(path, **_signed({"attempt": 1})))

        async def blocked() -> bool:
            waiting = await db.fetchval(  # blocked by this transaction's row lock
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
            )
            return bool(waiting)

        await _until(blocked, "the pinned heartbeat to wait on its row")
        server.proc.send_signal(signal.SIGTERM)
        # The listener closes first; the request in flight is still being served.
        await _until(lambda: asyncio.to_thread(_refuses, server.url), "the listener to close")
        assert not in_flight.done()
        assert server.proc.poll() is None
    # The row is free: the request in flight finishes, then the process exits.
    answer = await asyncio.wait_for(in_flight, BOUND)
    await in_flight_client.aclose()
    assert answer.status_code == 204, answer.text
    stopped = time.monotonic()
    returncode = await asyncio.to_thread(server.proc.wait, BOUND)
    # A clean shutdown: uvicorn re-raises the SIGTERM it handled, so the exit says so.
    assert returncode == -signal.SIGTERM, server.log_text()[-3000:]
    assert "Application shutdown complete." in server.log_text()
    # It gave its dispatch leases back: nothing of it is left to expire.
    held = await db.fetchval(
        "SELECT count(*) FROM dispatches WHERE split_part(lease_owner, ':', 2) = $1",
        str(server.proc.pid),
    )
    assert held == 0
    # While it is gone, the workers' requests to it are refused and go to the other.
    refused_before = fleet.refused

    async def some_refused() -> bool:
        return fleet.refused > refused_before

    await _until(some_refused, "a request refused by the stopped replica")
    replacement = await start_logged_server(1, **github_env_for(env))
    fleet.urls[index] = replacement.url
    return replacement, time.monotonic() - stopped


def github_env_for(env: dict[str, Any]) -> dict[str, Any]:
    """The same replica settings on a new port (each serves its own callbacks' URL)."""
    return {**env, "port": free_port(), "JOBS_PUBLIC_URL": env["JOBS_PUBLIC_URL"]}


async def test_rolling_restart_of_two_replicas_loses_no_acknowledged_request(
    start_logged_server, start_github_standin, db
):
    # Dispatching to a stand-in whose runs never call back: the test's workers drive the
    # workflows themselves; the dispatchers' leases are what the restarts must not strand.
    standin = start_github_standin(runner=None)
    env = {**github_env(standin, free_port(), DISPATCH_LEASE_SECONDS="60"), **ENV}
    first = await start_logged_server(1, **github_env_for(env))
    second = await start_logged_server(1, **github_env_for(env))
    # One job per restart, provisioning, whose heartbeat the test pins in flight.
    pinned = []
    for _ in range(2):
        user = await accounts.create_user(f"pinned-{uuid.uuid4().hex[:8]}@example.com")
        agent = await accounts.create_agent(user.id, "agent")
        enqueued = await jobs.enqueue_provisioning_job(
            agent_id=agent.id, user_id=user.id, stripe_event_id=f"evt_pin_{uuid.uuid4().hex}"
        )
        job = enqueued.job
        await jobs.update_job_status(job.id, status="provisioning", attempt=1)
        pinned.append(job.id)

    acked: dict[str, Any] = {}
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=WORKERS * 2, max_keepalive_connections=WORKERS * 2)
    async with httpx.AsyncClient(timeout=BOUND, limits=limits) as client:
        fleet = Fleet([first.url, second.url], client)

        async def worker() -> None:
            """Workflows, one after another, until the restarts are over."""
            while not done.is_set():
                user = await accounts.create_user(f"roll-{uuid.uuid4().hex}@example.com")
                agent = await accounts.create_agent(user.id, "agent")
                await _workflow(fleet, str(user.id), str(agent.id), acked)

        workers = [asyncio.create_task(worker()) for _ in range(WORKERS)]
        try:

            async def progressing() -> bool:
                return sum(1 for a in acked.values() if a["status"] == "running") >= 10

            await _until(progressing, "workflows to run before the restart")
            downtimes = []
            old = [first, second]
            for index in range(2):
                await _until(progressing, "load on the fleet")
                old[index], downtime = await _restart_with_one_in_flight(
                    fleet, index, old[index], start_logged_server, db, pinned[index], env
                )
                downtimes.append(downtime)
            # Load on the new fleet too, then stop taking new workflows.
            running_after = sum(1 for a in acked.values() if a["status"] == "running")

            async def more() -> bool:
                return sum(1 for a in acked.values() if a["status"] == "running") >= (
                    running_after + 10
                )

            await _until(more, "workflows on the restarted fleet")
        finally:
            done.set()
            results = await asyncio.gather(*workers, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures

    # Every workflow a worker started finished: all its requests were acknowledged.
    assert all(a["status"] == "running" and a.get("heartbeat") for a in acked.values())
    assert all(200 <= code < 300 for code in fleet.answers), sorted(set(fleet.answers))
    rows = await db.fetch(
        "SELECT id::text, stripe_event_id, status, workflow_run_id FROM provisioning_jobs"
        " WHERE stripe_event_id LIKE 'evt_roll_%'"
    )
    assert len(rows) == len(acked)
    by_event = {r["stripe_event_id"]: r for r in rows}
    for event_id, ack in acked.items():
        row = by_event[event_id]
        assert row["id"] == ack["job_id"]
        assert row["status"] == "running"
        assert row["workflow_run_id"] == f"run-{event_id}"
    events = await db.fetchval(
        "SELECT count(*) FROM job_events e JOIN provisioning_jobs j ON j.id = e.job_id"
        " WHERE j.stripe_event_id LIKE 'evt_roll_%'"
    )
    assert events == 3 * len(acked)  # queued, provisioning, running: once each
    # The pinned heartbeats answered during shutdown were recorded.
    beats = await db.fetch(
        "SELECT last_heartbeat_at FROM provisioning_jobs WHERE id = ANY($1::uuid[])", pinned
    )
    assert all(b["last_heartbeat_at"] is not None for b in beats)
    for server in (first, second):
        text = server.log_text()
        assert "Traceback" not in text and "unhandled error" not in text, text[-3000:]
        assert [r["event"] for r in server.json_lines() if r["logger"] == "jobs_app"] == [
            "shutting down",
            "shut down",
        ]
        assert "dispatcher stopped" in text
    assert standin.records("dispatch")  # the replicas did dispatch meanwhile
    record_figure(
        "rolling_restart",
        replicas=2,
        workflows=len(acked),
        requests_acknowledged=len(fleet.answers),
        refused_and_retried=fleet.refused,
        dropped_and_retried=fleet.dropped,
        downtime_seconds=[round(d, 2) for d in downtimes],
        lost=0,
    )
