"""Live job updates: the NOTIFY trigger, the listener and the SSE streams, read from a
real `jobs-app serve` process (httpx's in-process transport would buffer a stream).

One server for the module (ping 1 s, 12 streams per process, 10 per user, a 2 s send
timeout, the access log on); its whole output is checked for stream tokens at the end.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from jobs_app.http.live.tokens import StreamScope, issue_token, stream_token_key
from tests.conftest import API_HEADERS, LoggedServer
from tests.http_helpers import callback, make_job, make_user_agent
from tests.sse_helpers import SSEReader, open_metric, wait_metric

TOKENS_SEEN: list[str] = []
"""Every stream token this module handled: none may appear in the server's output."""


@pytest.fixture(scope="module")
async def live_server(database: str) -> AsyncIterator[LoggedServer]:
    server = LoggedServer(
        database,
        1,
        "--access-log",
        SSE_PING_SECONDS="1",
        SSE_MAX_STREAMS="12",
        SSE_MAX_STREAMS_PER_USER="10",
        SSE_SEND_TIMEOUT_SECONDS="2",
    )
    try:
        await server.wait_ready()
        yield server
    finally:
        server.stop()
    output = server.log_text()
    assert "Traceback" not in output, output[-3000:]
    assert "unhandled error" not in output, output[-3000:]
    assert "ERROR" not in output, output[-3000:]
    for token in TOKENS_SEEN:
        assert token not in output
    if TOKENS_SEEN:  # the access log did see those requests (by route, no query string)
        access = [r for r in server.json_lines() if r.get("logger") == "jobs_app.access"]
        assert any(str(r.get("route", "")).endswith("/events/stream") for r in access)


@pytest.fixture
async def api(live_server: LoggedServer) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(
        base_url=live_server.url, headers=API_HEADERS, timeout=20, limits=limits
    ) as client:
        yield client


@pytest.fixture
async def anon(live_server: LoggedServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live_server.url, timeout=20) as client:
        yield client


async def move(client: httpx.AsyncClient, job_id: str, status: str, attempt: int = 1) -> None:
    r = await callback(client, job_id, "status", {"attempt": attempt, "status": status})
    assert r.status_code == 200, r.text


async def token_for(client: httpx.AsyncClient, **scope: str) -> str:
    r = await client.post("/api/stream-tokens", json=scope)
    assert r.status_code == 201, r.text
    token = str(r.json()["token"])
    TOKENS_SEEN.append(token)
    return token


# --------------------------------------------------------------------------- the trigger


async def _collect(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []
    await conn.add_listener("job_events", lambda *args: received.append(json.loads(args[3])))
    return received


async def _drain(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT 1")  # notifications already delivered arrive before its answer


async def test_the_trigger_announces_other_writers_once_never_the_service_nor_a_rollback(
    db: asyncpg.Connection, user_agent: tuple[uuid.UUID, uuid.UUID], database: str
) -> None:
    """The service layer announces its own commits (after them, with their ids and its
    origin); the trigger announces every other writer's statement, once, in its own
    transaction, and never a rolled-back one."""
    from jobs_app.services import jobs as job_service

    listener = await asyncpg.connect(database)
    received = await _collect(listener)
    try:
        user_id, agent_id = user_agent
        job = (
            await job_service.enqueue_provisioning_job(
                agent_id=agent_id, user_id=user_id, stripe_event_id="evt_n1"
            )
        ).job
        await job_service.update_job_status(job.id, status="provisioning", attempt=1)
        # A hand-written insert is announced by the trigger; a rolled-back one is not.
        await db.execute(
            "INSERT INTO job_events (job_id, to_status, attempt, actor) "
            "VALUES ($1, 'running', 1, 'system')",
            job.id,
        )
        rolled_back = db.transaction()
        await rolled_back.start()
        await db.execute(
            "INSERT INTO job_events (job_id, to_status, attempt, actor) "
            "VALUES ($1, 'failed', 1, 'system')",
            job.id,
        )
        await rolled_back.rollback()
        # 150 more jobs (in one statement), then one statement with an event for each:
        # their ids would not fit in NOTIFY's 8,000 bytes, so the range alone is sent.
        await db.execute(
            """WITH u AS (INSERT INTO users (email)
                          SELECT 'bulk' || g || '@example.com' FROM generate_series(1, 150) g
                          RETURNING id),
                    a AS (INSERT INTO agents (user_id, name) SELECT id, 'a' FROM u
                          RETURNING id, user_id)
               INSERT INTO provisioning_jobs (agent_id, user_id, stripe_event_id)
               SELECT id, user_id, 'bulk-' || id FROM a"""
        )
        await db.execute(
            "INSERT INTO job_events (job_id, to_status, attempt, actor) "
            "SELECT id, 'queued', 1, 'system' FROM provisioning_jobs"
        )
        ids = [r["id"] for r in await db.fetch("SELECT id FROM job_events ORDER BY id")]
        assert len(ids) == 3 + 151

        def triggered() -> list[dict[str, Any]]:
            return [n for n in received if "origin" not in n]

        async with asyncio.timeout(10):
            while len(triggered()) < 2:
                await _drain(listener)  # a round trip delivers what has arrived
        await _drain(listener)
        jobs, user = [str(job.id)], [str(user_id)]
        assert triggered() == [
            {"first": ids[2], "last": ids[2], "queued": False, "jobs": jobs, "users": user},
            {"first": ids[3], "last": ids[-1], "queued": True},
        ]
    finally:
        await listener.close()


# --------------------------------------------------------------------------- streams


async def test_a_job_stream_replays_its_history_then_goes_live(api, live_server) -> None:
    job = await make_job(api)
    job_url = f"/api/jobs/{job['id']}/events/stream"
    user_url = f"/api/users/{job['user_id']}/events/stream"
    job_stream = SSEReader(api, job_url)
    user_stream = SSEReader(api, user_url)
    try:
        await job_stream.wait_open()
        await user_stream.wait_open()
        assert job_stream.status == 200 and job_stream.retry == 3000
        assert job_stream.headers is not None
        assert job_stream.headers["content-type"].startswith("text/event-stream")
        assert job_stream.headers["cache-control"] == "no-cache"
        await job_stream.wait_for(1)  # the history: the enqueue
        await move(api, job["id"], "provisioning")
        await job_stream.wait_for(2)
        await user_stream.wait_for(1)
        shown = (await api.get(f"/api/jobs/{job['id']}")).json()
        await move(api, job["id"], "running")
        await job_stream.wait_for(3)
        await user_stream.wait_for(2)
        history = (await api.get(f"/api/jobs/{job['id']}/events")).json()["items"]

        assert [e["data"]["to_status"] for e in job_stream.events] == [
            "queued",
            "provisioning",
            "running",
        ]
        assert job_stream.ids == [e["id"] for e in history]
        assert user_stream.ids == job_stream.ids[1:]  # a user stream starts with nothing old
        for event, stored in zip(job_stream.events, history, strict=True):
            assert event["event"] == "transition"
            assert {k: event["data"][k] for k in stored} == stored
        # The job as it was when the provisioning message was sent (after that move).
        assert job_stream.events[1]["data"]["job"] == shown
        assert job_stream.events[2]["data"]["job"]["status"] == "running"
        # Idle: pings every second.
        await job_stream.wait_until(lambda r: r.pings >= 2, within=10)
    finally:
        await job_stream.close()
        await user_stream.close()


async def test_resume_from_last_event_id_gives_exactly_the_missed_events(api) -> None:
    job = await make_job(api)
    url = f"/api/jobs/{job['id']}/events/stream"
    first = SSEReader(api, url)
    await first.wait_for(1)
    await move(api, job["id"], "provisioning")
    await first.wait_for(2)
    seen = first.ids
    await first.close()

    await move(api, job["id"], "failed")
    await api.post(f"/api/jobs/{job['id']}/retry")
    await move(api, job["id"], "provisioning", attempt=2)
    history = [e["id"] for e in (await api.get(f"/api/jobs/{job['id']}/events")).json()["items"]]
    missed = history[len(seen) :]
    assert len(missed) == 3

    by_header = SSEReader(api, url, {"Last-Event-ID": str(seen[-1])})
    by_query = SSEReader(api, f"{url}?last_event_id={seen[-1]}")  # a fresh EventSource's way
    user_resume = SSEReader(
        api, f"/api/users/{job['user_id']}/events/stream", {"Last-Event-ID": str(seen[0])}
    )
    try:
        for reader in (by_header, by_query):
            await reader.wait_for(3)
        await user_resume.wait_for(4)
        await move(api, job["id"], "running", attempt=2)
        for reader in (by_header, by_query):
            await reader.wait_for(4)
        await user_resume.wait_for(5)
        final = [e["id"] for e in (await api.get(f"/api/jobs/{job['id']}/events")).json()["items"]]
        assert by_header.ids == by_query.ids == final[len(seen) :]
        assert user_resume.ids == final[1:]
    finally:
        for reader in (by_header, by_query, user_resume):
            await reader.close()


async def test_bad_resumption_points_and_unknown_streams_are_refused(api) -> None:
    job = await make_job(api)
    other = await make_job(api)
    other_event = (await api.get(f"/api/jobs/{other['id']}/events")).json()["items"][0]["id"]
    url = f"/api/jobs/{job['id']}/events/stream"
    for value in ("abc", "-1", "1.5", "99999999999999999999", str(other_event), "123456789"):
        r = await api.get(url, headers={"Last-Event-ID": value})
        assert r.status_code == 400, (value, r.text)
        assert r.json()["status_code"] == 400
    r = await api.get(f"/api/users/{job['user_id']}/events/stream?last_event_id={other_event}")
    assert r.status_code == 400
    unknown = uuid.uuid4()
    for path in (f"/api/jobs/{unknown}/events/stream", f"/api/users/{unknown}/events/stream"):
        r = await api.get(path)
        assert r.status_code == 404, r.text
    for body in ({"job_id": str(unknown)}, {"user_id": str(unknown)}):
        assert (await api.post("/api/stream-tokens", json=body)).status_code == 404
    for body in ({}, {"job_id": job["id"], "user_id": job["user_id"]}, {"job": job["id"]}):
        assert (await api.post("/api/stream-tokens", json=body)).status_code == 400


async def test_the_listener_killed_while_transitions_are_made_loses_nothing(
    api, db, database
) -> None:
    jobs = [await make_job(api) for _ in range(4)]
    readers = [SSEReader(api, f"/api/jobs/{j['id']}/events/stream") for j in jobs]

    async def listener_pids() -> list[int]:
        rows = await db.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE application_name = 'jobs_app_listener' AND datname = current_database()"
        )
        return [r["pid"] for r in rows]

    async def kill_listener_when_back(previous: int | None) -> int:
        """Wait (bounded) for a listener other than `previous`, then terminate it."""
        deadline = time.monotonic() + 20
        while True:
            pids = [p for p in await listener_pids() if p != previous]
            if pids or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)  # polling pg_stat_activity with a deadline
        assert len(pids) == 1, pids  # one listener per process, reconnected
        assert await db.fetchval("SELECT pg_terminate_backend($1)", pids[0])
        return int(pids[0])

    async def listener_back(previous: int) -> None:
        deadline = time.monotonic() + 20
        while [p for p in await listener_pids() if p != previous] == []:
            assert time.monotonic() < deadline, "the listener did not reconnect"
            await asyncio.sleep(0.05)  # polling pg_stat_activity with a deadline

    try:
        for reader in readers:
            await reader.wait_for(1)
        killed = None
        for step in ("provisioning", "failed"):
            killed = await kill_listener_when_back(killed)
            for job in jobs:  # made while the listener is down or reconnecting
                await move(api, job["id"], step)
        assert killed is not None
        await listener_back(killed)
        for job in jobs:  # announced through the re-issued LISTEN
            assert (await api.post(f"/api/jobs/{job['id']}/retry")).status_code == 200
        for job, reader in zip(jobs, readers, strict=True):
            await reader.wait_for(4, within=30)
            history = (await api.get(f"/api/jobs/{job['id']}/events")).json()["items"]
            assert reader.ids == [e["id"] for e in history]
            assert [e["data"]["to_status"] for e in reader.events] == [
                "queued",
                "provisioning",
                "failed",
                "queued",
            ]
        assert len(await listener_pids()) == 1
    finally:
        for reader in readers:
            await reader.close()


async def test_limits_answer_429_and_disconnects_free_every_place(api, live_server) -> None:
    user_id, _ = await make_user_agent(api)
    url = f"/api/users/{user_id}/events/stream"
    readers = [SSEReader(api, url) for _ in range(10)]
    extra: list[SSEReader] = []
    try:
        for reader in readers:
            await reader.wait_open()
            assert reader.status == 200
        r = await api.get(url)  # the 11th for this user
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        others = [await make_user_agent(api) for _ in range(3)]
        extra = [SSEReader(api, f"/api/users/{u}/events/stream") for u, _ in others[:2]]
        for reader in extra:
            await reader.wait_open()
            assert reader.status == 200
        r = await api.get(f"/api/users/{others[2][0]}/events/stream")  # the 13th on the process
        assert r.status_code == 429 and "retry-after" in r.headers
        assert await open_metric(api, live_server.url) == 12
    finally:
        for reader in [*readers, *extra]:
            await reader.close()
    await wait_metric(api, live_server.url, 0)
    again = SSEReader(api, url)
    await again.wait_open()
    assert again.status == 200
    await again.close()
    await wait_metric(api, live_server.url, 0)


async def test_stream_tokens_scope_expiry_forgery_and_bearer(api, anon) -> None:
    job = await make_job(api)
    other = await make_job(api)
    job_url = f"/api/jobs/{job['id']}/events/stream"
    user_url = f"/api/users/{job['user_id']}/events/stream"
    job_token = await token_for(api, job_id=job["id"])
    user_token = await token_for(api, user_id=job["user_id"])
    assert "+" not in job_token and "/" not in job_token and "=" not in job_token

    opened = [SSEReader(anon, f"{job_url}?token={job_token}")]
    opened.append(SSEReader(anon, f"{user_url}?token={user_token}"))
    try:
        for reader in opened:
            await reader.wait_open()
            assert reader.status == 200
        await opened[0].wait_for(1)
    finally:
        for reader in opened:
            await reader.close()

    expired = issue_token(
        stream_token_key("test-api-token"),
        StreamScope.JOB,
        uuid.UUID(job["id"]),
        int(time.time()) - 1,
    )
    forged = issue_token(
        stream_token_key("another-key"),
        StreamScope.JOB,
        uuid.UUID(job["id"]),
        int(time.time()) + 60,
    )
    flipped = job_token[:-2] + ("A" if job_token[-2] != "A" else "B") + job_token[-1]
    TOKENS_SEEN.extend([expired, forged, flipped])
    cases = [
        (f"{job_url}?token={expired}", {}, 401),
        (f"{job_url}?token={forged}", {}, 401),
        (f"{job_url}?token={flipped}", {}, 401),
        (f"{job_url}?token=not-a-token", {}, 401),
        (job_url, {}, 401),
        # the right kind of token for another stream, or the other kind for this one
        (f"/api/jobs/{other['id']}/events/stream?token={job_token}", {}, 403),
        (f"{job_url}?token={user_token}", {}, 403),
        (f"{user_url}?token={job_token}", {}, 403),
        (f"/api/users/{other['user_id']}/events/stream?token={user_token}", {}, 403),
        # with a bearer header, the bearer decides
        (f"{job_url}?token={job_token}", {"Authorization": "Bearer wrong"}, 401),
        # only on the stream routes
        (f"/api/jobs/{job['id']}?token={job_token}", {}, 401),
    ]
    for url, headers, status in cases:
        r = await anon.get(url, headers=headers)
        assert r.status_code == status, (url, r.status_code, r.text)
        assert r.json()["status_code"] == status
    r = await anon.post("/api/stream-tokens", json={"job_id": job["id"]})
    assert r.status_code == 401


async def test_a_client_that_never_reads_is_cut_off_and_others_are_not(
    api, db, live_server
) -> None:
    job = await make_job(api)
    reader = SSEReader(api, f"/api/jobs/{job['id']}/events/stream")
    await reader.wait_for(1)
    # A raw client with a tiny receive window that never reads a byte.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", live_server.port))
    stalled.sendall(
        f"GET /api/jobs/{job['id']}/events/stream HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: {API_HEADERS['Authorization']}\r\n\r\n".encode()
    )
    try:
        await wait_metric(api, live_server.url, 2)
        # 400 events of 10 kB each: far more than the socket buffers hold.
        await db.execute(
            "INSERT INTO job_events (job_id, to_status, attempt, actor, reason)"
            " SELECT $1, 'queued', 1, 'system', repeat('x', 10000) FROM generate_series(1, 400)",
            uuid.UUID(job["id"]),
        )
        await reader.wait_for(401, within=30)
        assert reader.ids == sorted(set(reader.ids))
        await wait_metric(api, live_server.url, 1, within=20)  # the stalled one is gone
        cut = (await api.get("/metrics")).text
        assert "jobs_sse_streams_cut_off_total 1.0" in cut
    finally:
        stalled.close()
        await reader.close()
    await wait_metric(api, live_server.url, 0)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_ends_open_streams_at_once(database: str, workers: int) -> None:
    server = LoggedServer(database, workers)
    try:
        await server.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=20) as c:
            job = await make_job(c)
            readers = [SSEReader(c, f"/api/jobs/{job['id']}/events/stream") for _ in range(3)]
            for reader in readers:
                await reader.wait_for(1)
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            for reader in readers:
                await asyncio.wait_for(reader.task, 10)
                assert reader.ended and reader.error is None  # ended cleanly, not cut
            await asyncio.to_thread(server.proc.wait, 10)
            elapsed = time.monotonic() - started
        # uvicorn re-raises the signal it caught once it has shut down cleanly.
        assert server.proc.returncode in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log_text()
        assert elapsed < 5, elapsed  # uvicorn's graceful timeout is 10 s
    finally:
        server.stop()
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


async def test_listener_observers_see_every_notification_and_reconnects(
    db: asyncpg.Connection, user_agent: tuple[uuid.UUID, uuid.UUID], database: str
) -> None:
    """The hook the dispatcher uses: `queued` when a job enters queued; after the
    listener's connection is killed, a `reconnected` notification, then live ones again."""
    from jobs_app.loops.listener import Listener, Notification
    from jobs_app.services import jobs as job_service

    listener = Listener(database, health_interval=0.5, backoff_initial=0.05)
    seen: list[Notification] = []
    changed = asyncio.Event()

    def observe(notification: Notification) -> None:
        seen.append(notification)
        changed.set()

    async def until(predicate: Any) -> None:
        async with asyncio.timeout(20):
            while not predicate():
                changed.clear()
                await changed.wait()

    remove = listener.add_observer(observe)
    subscription = listener.subscribe(job_id=uuid.uuid4())
    await listener.start()
    try:
        await until(lambda: any(n.reconnected for n in seen))  # listening
        user_id, agent_id = user_agent
        job = (
            await job_service.enqueue_provisioning_job(
                agent_id=agent_id, user_id=user_id, stripe_event_id="evt_obs"
            )
        ).job
        await until(lambda: any(n.jobs == [job.id] for n in seen))
        enqueued = next(n for n in seen if n.jobs == [job.id])
        assert enqueued.queued and enqueued.users == [user_id]
        assert enqueued.first == enqueued.last
        subscription.wake.clear()
        await job_service.update_job_status(job.id, status="provisioning", attempt=1)
        await until(lambda: sum(1 for n in seen if n.jobs == [job.id]) == 2)
        assert not seen[-1].queued
        assert not subscription.wake.is_set()  # another job's stream is not woken

        before = len(seen)
        assert await db.fetchval("SELECT pg_terminate_backend($1)", listener.backend_pid)
        await until(lambda: any(n.reconnected for n in seen[before:]))
        assert subscription.wake.is_set()  # after a reconnect every stream re-reads
        assert listener.connections == 2
        await job_service.update_job_status(job.id, status="running", attempt=1)
        await until(lambda: sum(1 for n in seen if n.jobs == [job.id]) == 3)
        remove()
        count = len(seen)
        still: list[Notification] = []
        listener.add_observer(lambda n: (still.append(n), changed.set()))
        await db.execute(
            "INSERT INTO job_events (job_id, to_status, attempt, actor)"
            " VALUES ($1, 'running', 1, 'system')",
            job.id,
        )
        await until(lambda: len(still) == 1)
        assert len(seen) == count  # the removed observer is not called any more
    finally:
        await listener.stop()
    listener.unsubscribe(subscription)
    assert listener.subscriptions == 0
