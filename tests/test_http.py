"""The HTTP API, in-process over httpx's ASGI transport, on real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import asyncpg
import pytest

from tests.conftest import API_HEADERS, CALLBACK_SECRET
from tests.http_helpers import (
    callback,
    make_job,
    make_user_agent,
    signed_headers,
    stripe_event,
    stripe_headers,
)

JOB_FIELDS = {
    "id",
    "agent_id",
    "user_id",
    "stripe_event_id",
    "status",
    "region",
    "workflow_run_id",
    "attempt",
    "retry_count",
    "max_retries",
    "error",
    "failed_step",
    "failure_reason",
    "claimed_at",
    "last_heartbeat_at",
    "completed_at",
    "created_at",
    "updated_at",
    "dispatch_id",
    "first_heartbeat_at",
    "heartbeat_count",
    "progress",
}


async def count(db: asyncpg.Connection, table: str) -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM {table}"))


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/users"),
        ("POST", "/api/agents"),
        ("POST", "/api/jobs"),
        ("GET", "/api/jobs"),
        ("GET", f"/api/jobs/{uuid.uuid4()}"),
        ("GET", f"/api/jobs/{uuid.uuid4()}/events"),
        ("POST", f"/api/jobs/{uuid.uuid4()}/retry"),
        ("GET", f"/api/agents/{uuid.uuid4()}/job"),
    ],
)
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="}]
)
async def test_dashboard_routes_need_the_bearer_token(client, db, method, path, headers):
    r = await client.request(method, path, headers=headers, json={})
    assert r.status_code == 401
    assert r.json()["detail"] == "missing or invalid bearer token"
    assert "test-api-token" not in r.text


async def test_open_routes(client, db):
    assert (await client.get("/health")).json() == {"status": "ok", "database": "up"}
    assert (await client.get("/metrics")).status_code == 200
    spec = (await client.get("/schema/openapi.json")).json()
    assert {
        "/api/users",
        "/api/agents",
        "/api/jobs",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/events",
        "/api/jobs/{job_id}/retry",
        "/api/agents/{agent_id}/job",
        "/api/callbacks/jobs/{job_id}/status",
        "/api/callbacks/jobs/{job_id}/heartbeat",
        "/webhooks/stripe",
        "/health",
        "/metrics",
    } <= set(spec["paths"])
    create_job = spec["paths"]["/api/jobs"]["post"]["responses"]
    assert {"200", "201", "400", "401", "404", "409", "422"} <= set(create_job)


# --------------------------------------------------------------------------- users, agents, jobs


async def test_users_and_agents(client, db):
    r = await client.post("/api/users", json={"email": "ann@example.com"}, headers=API_HEADERS)
    assert r.status_code == 201
    user = r.json()
    assert set(user) == {"id", "email", "created_at"}
    assert user["created_at"].endswith("Z")
    dup = await client.post("/api/users", json={"email": "ann@example.com"}, headers=API_HEADERS)
    assert dup.status_code == 409
    r = await client.post(
        "/api/agents", json={"user_id": user["id"], "name": "bot"}, headers=API_HEADERS
    )
    assert r.status_code == 201
    assert r.json()["user_id"] == user["id"]
    r = await client.post(
        "/api/agents", json={"user_id": str(uuid.uuid4()), "name": "bot"}, headers=API_HEADERS
    )
    assert r.status_code == 404
    assert r.json()["detail"] == "user not found"
    assert await count(db, "users") == 1
    assert await count(db, "agents") == 1


async def test_create_job_then_replay_then_conflict(client, db):
    user_id, agent_id = await make_user_agent(client)
    body = {
        "user_id": user_id,
        "agent_id": agent_id,
        "stripe_event_id": "evt_a",
        "region": "eu-west",
    }
    first = await client.post("/api/jobs", json=body, headers=API_HEADERS)
    assert first.status_code == 201
    job = first.json()
    assert set(job) == JOB_FIELDS
    assert (job["status"], job["attempt"], job["retry_count"], job["region"]) == (
        "queued",
        1,
        0,
        "eu-west",
    )
    replay = await client.post("/api/jobs", json=body, headers=API_HEADERS)
    assert replay.status_code == 200
    assert replay.json() == job
    other = await client.post(
        "/api/jobs", json={**body, "stripe_event_id": "evt_b"}, headers=API_HEADERS
    )
    assert other.status_code == 409
    assert other.json()["detail"] == (
        "A provisioning job is already in progress. Please wait for it to complete."
    )
    assert await count(db, "provisioning_jobs") == 1
    assert await count(db, "job_events") == 1


async def test_create_job_reference_errors(client, db):
    user_id, agent_id = await make_user_agent(client)
    other_user, other_agent = await make_user_agent(client)
    cases = [
        ({"user_id": str(uuid.uuid4()), "agent_id": agent_id}, 404),
        ({"user_id": user_id, "agent_id": str(uuid.uuid4())}, 404),
        ({"user_id": user_id, "agent_id": other_agent}, 422),
    ]
    for ids, status in cases:
        r = await client.post(
            "/api/jobs",
            json={**ids, "stripe_event_id": f"evt_{uuid.uuid4().hex}"},
            headers=API_HEADERS,
        )
        assert r.status_code == status, r.text
        assert r.json()["detail"]
    # An event id already used by someone else is a conflict, and reveals nothing.
    await client.post(
        "/api/jobs",
        json={"user_id": other_user, "agent_id": other_agent, "stripe_event_id": "e1"},
        headers=API_HEADERS,
    )
    r = await client.post(
        "/api/jobs",
        json={"user_id": user_id, "agent_id": agent_id, "stripe_event_id": "e1"},
        headers=API_HEADERS,
    )
    assert r.status_code == 409
    assert other_user not in r.text
    assert await count(db, "provisioning_jobs") == 1


async def test_get_job_and_agent_job_and_events(client, db):
    job = await make_job(client)
    r = await client.get(f"/api/jobs/{job['id']}", headers=API_HEADERS)
    assert r.status_code == 200
    assert r.json() == job
    assert (await client.get(f"/api/jobs/{uuid.uuid4()}", headers=API_HEADERS)).status_code == 404
    r = await client.get(f"/api/agents/{job['agent_id']}/job", headers=API_HEADERS)
    assert r.json()["id"] == job["id"]
    r = await client.get(f"/api/agents/{uuid.uuid4()}/job", headers=API_HEADERS)
    assert r.status_code == 404
    r = await client.get(f"/api/jobs/{job['id']}/events", headers=API_HEADERS)
    events = r.json()["items"]
    assert [(e["from_status"], e["to_status"], e["actor"]) for e in events] == [
        (None, "queued", "api")
    ]
    r = await client.get(f"/api/jobs/{uuid.uuid4()}/events", headers=API_HEADERS)
    assert r.status_code == 404


async def test_get_job_fails_a_stale_job_on_read(client, db):
    job = await make_job(client)
    assert (
        await callback(client, job["id"], "status", {"attempt": 1, "status": "provisioning"})
    ).status_code == 200
    await db.execute(
        "UPDATE provisioning_jobs SET claimed_at = now() - interval '16 minutes',"
        " updated_at = now() - interval '16 minutes' WHERE id = $1",
        uuid.UUID(job["id"]),
    )
    r = await client.get(f"/api/jobs/{job['id']}", headers=API_HEADERS)
    assert r.status_code == 200
    body = r.json()
    assert (body["status"], body["failure_reason"]) == ("failed", "heartbeat_timeout")
    assert body["error"].startswith("Timeout: No heartbeat for 9")


async def test_list_jobs_keyset_paging_and_filters(client, db):
    jobs = []
    for _ in range(5):
        job = await make_job(client)
        jobs.append(job)
    seen = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/api/jobs", params=params, headers=API_HEADERS)).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [j["id"] for j in reversed(jobs)]
    only = await client.get(
        "/api/jobs", params={"user_id": jobs[0]["user_id"]}, headers=API_HEADERS
    )
    assert [j["id"] for j in only.json()["items"]] == [jobs[0]["id"]]
    by_status = await client.get("/api/jobs", params={"status": "running"}, headers=API_HEADERS)
    assert by_status.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 10**12},
        {"limit": "x"},
        {"cursor": "not-a-cursor"},
        {"cursor": "x" * 10_000},
        {"status": "bogus"},
        {"user_id": "not-a-uuid"},
        {"agent_id": "1' OR '1'='1"},
    ],
)
async def test_list_jobs_bad_params_are_400(client, db, params):
    r = await client.get("/api/jobs", params=params, headers=API_HEADERS)
    assert r.status_code == 400, r.text
    assert r.json()["detail"]


async def test_retry_over_http(client, db):
    job = await make_job(client)
    r = await client.post(f"/api/jobs/{job['id']}/retry", headers=API_HEADERS)
    assert r.status_code == 409
    assert "only failed jobs" in r.json()["detail"]
    await callback(client, job["id"], "status", {"attempt": 1, "status": "failed", "error": "x"})
    r = await client.post(f"/api/jobs/{job['id']}/retry", headers=API_HEADERS)
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["attempt"]) == ("queued", 2)
    for attempt in (2, 3):
        await callback(client, job["id"], "status", {"attempt": attempt, "status": "failed"})
        r = await client.post(f"/api/jobs/{job['id']}/retry", headers=API_HEADERS)
        assert r.status_code == 200
    await callback(client, job["id"], "status", {"attempt": 4, "status": "failed"})
    r = await client.post(f"/api/jobs/{job['id']}/retry", headers=API_HEADERS)
    assert r.status_code == 409
    assert r.json()["detail"] == "retries exhausted (3 of 3)"
    assert (
        await client.post(f"/api/jobs/{uuid.uuid4()}/retry", headers=API_HEADERS)
    ).status_code == 404


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"email": 5}',
        b'{"email": "a@b.c", "admin": true}',
        b'{"email": "a\\u0000@b.c"}',
        b'{"email": "no-at-sign"}',
        b"",
        json.dumps({"email": "x" * 400 + "@b.c"}).encode(),
    ],
)
async def test_bad_bodies_are_400_and_write_nothing(client, db, content):
    r = await client.post(
        "/api/users", content=content, headers={**API_HEADERS, "Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["status_code"] == 400
    assert r.json()["detail"]
    assert await count(db, "users") == 0


async def test_bad_job_bodies(client, db):
    user_id, agent_id = await make_user_agent(client)
    for body in [
        {"user_id": user_id, "agent_id": agent_id},
        {"user_id": user_id, "agent_id": "nope", "stripe_event_id": "e"},
        {"user_id": user_id, "agent_id": agent_id, "stripe_event_id": ""},
        {"user_id": user_id, "agent_id": agent_id, "stripe_event_id": "e\x00"},
        {"user_id": user_id, "agent_id": agent_id, "stripe_event_id": "e", "region": "EU WEST"},
        {"user_id": user_id, "agent_id": agent_id, "stripe_event_id": "e", "extra": 1},
    ]:
        r = await client.post("/api/jobs", json=body, headers=API_HEADERS)
        assert r.status_code == 400, (body, r.text)
    assert await count(db, "provisioning_jobs") == 0


async def test_bad_path_uuid_is_4xx(client, db):
    r = await client.get("/api/jobs/not-a-uuid", headers=API_HEADERS)
    assert 400 <= r.status_code < 500


async def test_body_over_one_mebibyte_is_413(client, db):
    body = json.dumps({"email": "a@b.c", "pad": "x" * (1024 * 1024)}).encode()
    r = await client.post(
        "/api/users", content=body, headers={**API_HEADERS, "Content-Type": "application/json"}
    )
    assert r.status_code == 413
    assert r.json()["status_code"] == 413
    assert await count(db, "users") == 0


# --------------------------------------------------------------------------- callbacks


async def test_workflow_lifecycle_over_callbacks(client, db):
    job = await make_job(client)
    jid = job["id"]
    r = await callback(
        client, jid, "status", {"attempt": 1, "status": "provisioning", "workflow_run_id": "run-1"}
    )
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["workflow_run_id"]) == ("provisioning", "run-1")
    assert r.json()["claimed_at"] is not None
    r = await callback(client, jid, "heartbeat", {"attempt": 1})
    assert r.status_code == 204
    assert r.content == b""
    r = await callback(client, jid, "status", {"attempt": 1, "status": "running"})
    assert r.status_code == 200
    assert r.json()["completed_at"] is not None
    again = await callback(client, jid, "status", {"attempt": 1, "status": "running"})
    assert again.status_code == 200
    assert again.json() == r.json()
    r = await callback(client, jid, "heartbeat", {"attempt": 1})
    assert r.status_code == 409
    events = (await client.get(f"/api/jobs/{jid}/events", headers=API_HEADERS)).json()["items"]
    assert [e["to_status"] for e in events] == ["queued", "provisioning", "running"]


async def test_callbacks_refuse_illegal_and_stale(client, db):
    job = await make_job(client)
    jid = job["id"]
    r = await callback(client, jid, "status", {"attempt": 1, "status": "running"})
    assert r.status_code == 409
    assert r.json()["extra"] == {
        "reason": "invalid_transition",
        "current_status": "queued",
        "requested_status": "running",
    }
    r = await callback(client, jid, "status", {"attempt": 1, "status": "queued"})
    assert r.status_code == 409
    await callback(
        client,
        jid,
        "status",
        {"attempt": 1, "status": "failed", "error": "boom", "failed_step": "ansible"},
    )
    await client.post(f"/api/jobs/{jid}/retry", headers=API_HEADERS)
    r = await callback(client, jid, "status", {"attempt": 1, "status": "provisioning"})
    assert r.status_code == 409
    assert r.json()["extra"] == {"reason": "stale_attempt", "current_attempt": 2, "attempt": 1}
    r = await callback(client, jid, "heartbeat", {"attempt": 1})
    assert r.status_code == 409
    r = await callback(client, str(uuid.uuid4()), "status", {"attempt": 1, "status": "running"})
    assert r.status_code == 404
    r = await callback(client, jid, "status", {"attempt": 1, "status": "bogus"})
    assert r.status_code == 400
    row = await db.fetchrow("SELECT status, attempt FROM provisioning_jobs")
    assert (row["status"], row["attempt"]) == ("queued", 2)


async def test_signatures_are_checked_before_the_body(client, db):
    job = await make_job(client)
    url = f"/api/callbacks/jobs/{job['id']}/status"
    body = json.dumps({"attempt": 1, "status": "provisioning"}).encode()
    now = int(time.time())
    other = json.dumps({"attempt": 1, "status": "failed"}).encode()
    cases = {
        "missing": {"Content-Type": "application/json"},
        "malformed": {"X-Signature": "garbage"},
        "wrong secret": signed_headers(body, secret="not-the-secret"),
        "expired": signed_headers(body, t=now - 400),
        "future": signed_headers(body, t=now + 400),
        "other body": signed_headers(other),
        "empty v1": {"X-Signature": f"t={now},v1="},
    }
    for name, headers in cases.items():
        r = await client.post(url, content=body, headers=headers)
        assert r.status_code == 401, name
        assert CALLBACK_SECRET not in r.text
    # A bad signature is 401 even when the body is bad too.
    r = await client.post(url, content=b"{oops", headers={"X-Signature": "t=1,v1=00"})
    assert r.status_code == 401
    # Within tolerance either way is fine.
    r = await client.post(url, content=body, headers=signed_headers(body, t=now - 250))
    assert r.status_code == 200
    assert await db.fetchval("SELECT status FROM provisioning_jobs") == "provisioning"


async def test_callbacks_do_not_take_the_bearer_token(client, db):
    job = await make_job(client)
    r = await client.post(
        f"/api/callbacks/jobs/{job['id']}/heartbeat", json={"attempt": 1}, headers=API_HEADERS
    )
    assert r.status_code == 401


# --------------------------------------------------------------------------- stripe


async def test_stripe_checkout_enqueues_once(client, db):
    user_id, agent_id = await make_user_agent(client)
    payload = stripe_event(user_id, agent_id, event_id="evt_stripe_1")
    r = await client.post("/webhooks/stripe", content=payload, headers=stripe_headers(payload))
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["created"] is True
    r = await client.post("/webhooks/stripe", content=payload, headers=stripe_headers(payload))
    assert r.status_code == 200
    assert r.json() == {**first, "created": False}
    job = await db.fetchrow("SELECT stripe_event_id, status FROM provisioning_jobs")
    assert tuple(job) == ("evt_stripe_1", "queued")
    # The user has a job in flight: 409, so Stripe retries later.
    second = stripe_event(user_id, agent_id)
    r = await client.post("/webhooks/stripe", content=second, headers=stripe_headers(second))
    assert r.status_code == 409
    assert await count(db, "provisioning_jobs") == 1


async def test_stripe_rejections(client, db):
    user_id, agent_id = await make_user_agent(client)
    payload = stripe_event(user_id, agent_id)
    r = await client.post(
        "/webhooks/stripe", content=payload, headers=stripe_headers(payload, secret="whsec_other")
    )
    assert r.status_code == 400
    r = await client.post("/webhooks/stripe", content=payload)
    assert r.status_code == 400
    ignored = stripe_event(type_="invoice.paid", metadata={})
    r = await client.post("/webhooks/stripe", content=ignored, headers=stripe_headers(ignored))
    assert (r.status_code, r.json()["ignored"]) == (200, True)
    for metadata in (
        {},
        {"user_id": user_id},
        {"user_id": "nope", "agent_id": agent_id},
        {"user_id": str(uuid.uuid4()), "agent_id": agent_id},
    ):
        bad = stripe_event(metadata=metadata)
        r = await client.post("/webhooks/stripe", content=bad, headers=stripe_headers(bad))
        assert r.status_code == 422, (metadata, r.text)
        assert r.json()["detail"]
    assert await count(db, "provisioning_jobs") == 0
    metrics = (await client.get("/metrics")).text
    assert 'jobs_stripe_webhook_rejected_total{reason="bad_metadata"}' in metrics
    assert 'jobs_stripe_webhook_rejected_total{reason="unknown_reference"}' in metrics


# --------------------------------------------------------------------------- races


async def test_fifty_concurrent_enqueues_for_one_user(client, db):
    user_id, agent_id = await make_user_agent(client)
    responses = await asyncio.gather(
        *[
            client.post(
                "/api/jobs",
                json={"user_id": user_id, "agent_id": agent_id, "stripe_event_id": f"evt_race_{i}"},
                headers=API_HEADERS,
            )
            for i in range(50)
        ]
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] + [409] * 49
    assert await count(db, "provisioning_jobs") == 1
    assert await count(db, "job_events") == 1


async def test_metrics_count_requests_and_transitions(client, db):
    job = await make_job(client)
    await callback(client, job["id"], "status", {"attempt": 1, "status": "provisioning"})
    text = (await client.get("/metrics")).text
    assert 'jobs_http_requests_total{method="POST",route="/api/jobs",status="201"}' in text
    assert 'jobs_transitions_total{to_status="provisioning"}' in text


def test_signature_tolerance_is_300_seconds_either_way():
    from litestar.exceptions import NotAuthorizedException

    from jobs_app.core.signing import sign
    from jobs_app.http.auth import verify_signature

    body = b'{"attempt": 1}'
    header = sign(CALLBACK_SECRET, body, timestamp=1_000_000)
    for now in (1_000_000 - 300, 1_000_000, 1_000_000 + 300):
        verify_signature(CALLBACK_SECRET, header, body, tolerance=300, now=now)
    for now in (1_000_000 - 301, 1_000_000 + 301):
        with pytest.raises(NotAuthorizedException):
            verify_signature(CALLBACK_SECRET, header, body, tolerance=300, now=now)
    # Key rotation: any one of several v1 values may match.
    rotated = header.replace("v1=", "v1=00,v1=")
    verify_signature(CALLBACK_SECRET, rotated, body, tolerance=300, now=1_000_000)
