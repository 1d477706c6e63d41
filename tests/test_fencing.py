"""Every callback refused for its dispatch or its attempt puts the run it names up for
cancellation, once, whichever route refused it; nothing else changes.

Each case: a signed callback naming `dispatch_id` and `workflow_run_id` is refused with
409 and its reason; the run is in `run_cancellations` exactly once (a repeat adds
nothing); the job and its history are as they were.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from jobs_app.services import dispatches
from tests.conftest import API_HEADERS
from tests.http_helpers import callback, make_job

ROUTES = ("status", "heartbeat")


async def claim_dispatch(db: asyncpg.Connection, job_id: str) -> uuid.UUID:
    """The dispatch the dispatcher would have issued for the job's current attempt."""
    claims = await dispatches.claim("test-owner", "scripted", lease_seconds=60, batch=50)
    [claim] = [c for c in claims if str(c.job_id) == job_id]
    return claim.dispatch_id


async def snapshot(db: asyncpg.Connection, job_id: str) -> tuple[Any, ...]:
    job = await db.fetchrow("SELECT * FROM provisioning_jobs WHERE id = $1", uuid.UUID(job_id))
    events = await db.fetchval("SELECT count(*) FROM job_events WHERE job_id = $1", job["id"])
    return tuple(job.values()), events


def body(route: str, attempt: int, dispatch_id: uuid.UUID, run_id: str) -> dict[str, Any]:
    common = {"attempt": attempt, "dispatch_id": str(dispatch_id), "workflow_run_id": run_id}
    return common | ({"status": "provisioning"} if route == "status" else {})


async def refused_and_cancelled(
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    job_id: str,
    route: str,
    payload: dict[str, Any],
    reason: str,
) -> None:
    before = await snapshot(db, job_id)
    for _ in range(2):  # a repeat is refused alike and adds no second row
        r = await callback(client, job_id, route, payload)
        assert r.status_code == 409, r.text
        assert r.json()["extra"]["reason"] == reason, r.text
    rows = await db.fetch(
        "SELECT job_id, dispatch_id, state FROM run_cancellations WHERE workflow_run_id = $1",
        payload["workflow_run_id"],
    )
    assert [tuple(row) for row in rows] == [
        (uuid.UUID(job_id), uuid.UUID(payload["dispatch_id"]), "requested")
    ]
    assert await snapshot(db, job_id) == before


@pytest.mark.parametrize("route", ROUTES)
async def test_a_dispatch_never_issued_for_an_unbound_attempt(client, db, route) -> None:
    """The job's attempt is bound to no dispatch yet (queued, or provisioning by a run
    started by hand), and the callback names one never issued for it."""
    job = await make_job(client)
    if route == "heartbeat":  # heartbeats are taken while provisioning only
        r = await callback(client, job["id"], "status", {"attempt": 1, "status": "provisioning"})
        assert r.status_code == 200 and r.json()["dispatch_id"] is None, r.text
    payload = body(route, 1, uuid.uuid4(), f"run-never-issued-{route}")
    await refused_and_cancelled(client, db, job["id"], route, payload, "superseded_dispatch")


@pytest.mark.parametrize("route", ROUTES)
async def test_a_dispatch_other_than_the_one_the_attempt_is_bound_to(client, db, route) -> None:
    job = await make_job(client)
    bound = await claim_dispatch(db, job["id"])
    r = await callback(client, job["id"], "status", body("status", 1, bound, "run-bound"))
    assert r.status_code == 200 and r.json()["dispatch_id"] == str(bound), r.text
    payload = body(route, 1, uuid.uuid4(), f"run-other-{route}")
    if route == "status":
        payload["status"] = "running"
    await refused_and_cancelled(client, db, job["id"], route, payload, "superseded_dispatch")
    assert await db.fetchval("SELECT count(*) FROM run_cancellations") == 1  # not run-bound


@pytest.mark.parametrize("route", ROUTES)
async def test_a_dispatch_of_an_attempt_that_is_over(client, db, route) -> None:
    """Attempt 1 failed and the job was retried: attempt 1's run calls back."""
    job = await make_job(client)
    first = await claim_dispatch(db, job["id"])
    r = await callback(client, job["id"], "status", body("status", 1, first, "run-attempt-1"))
    assert r.status_code == 200, r.text
    failed = body("status", 1, first, "run-attempt-1") | {"status": "failed", "error": "x"}
    assert (await callback(client, job["id"], "status", failed)).status_code == 200
    retried = await client.post(f"/api/jobs/{job['id']}/retry", headers=API_HEADERS)
    assert retried.status_code == 200 and retried.json()["attempt"] == 2, retried.text
    payload = body(route, 1, first, f"run-late-{route}")
    await refused_and_cancelled(client, db, job["id"], route, payload, "stale_attempt")


async def test_a_callback_naming_no_dispatch_cancels_nothing(client, db) -> None:
    """A run started by hand names no dispatch: a refusal (here an illegal move) leaves
    its run alone, since nothing says which dispatch it belongs to."""
    job = await make_job(client)
    r = await callback(
        client, job["id"], "status", {"attempt": 1, "status": "running", "workflow_run_id": "r"}
    )
    assert r.status_code == 409 and r.json()["extra"]["reason"] == "invalid_transition"
    assert await db.fetchval("SELECT count(*) FROM run_cancellations") == 0
