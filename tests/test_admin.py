"""The Piccolo admin mounted at /admin/: login, the read-only generic views of jobs
and events, and the operator forms with their audit rows, on real PostgreSQL.

The app runs in-process (httpx's ASGITransport on the test's event loop); the
`database` fixture has opened the pool, so the app's lifespan is not run.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from litestar import Litestar

from jobs_app.core.lifecycle import JobStatus
from jobs_app.services import accounts, jobs

pytestmark = pytest.mark.filterwarnings(
    # piccolo_api warns on every login when `production` is off (as in tests).
    "ignore:If running sessions in production:UserWarning"
)

PASSWORD = "correct-horse-battery-staple"


async def create_operator(*, admin: bool = True) -> str:
    """A new piccolo_user account (unique name: the tables outlive each test)."""
    from piccolo.apps.user.tables import BaseUser

    username = f"ops-{uuid.uuid4().hex[:8]}"
    await BaseUser.create_user(
        username=username,
        password=PASSWORD,
        email=f"{username}@support.example.com",
        active=True,
        admin=admin,
    )
    return username


def client_for(app: Litestar) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=30
    )


async def log_in(client: httpx.AsyncClient, username: str) -> httpx.Response:
    """Log in as piccolo_admin's UI does: get the CSRF cookie, then post it back."""
    await client.get("/admin/")
    return await client.post(
        "/admin/public/login/",
        json={"username": username, "password": PASSWORD},
        headers={"X-CSRFToken": client.cookies["csrftoken"]},
    )


@pytest.fixture(scope="module")
async def app(database: str) -> Litestar:
    from jobs_app.http.app import create_app

    return create_app(run_sweeper=False)


@pytest.fixture
async def anon(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as client:
        yield client


@pytest.fixture(scope="module")
async def operator(app: Litestar) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """One logged-in operator per module (the login endpoint is rate limited)."""
    username = await create_operator()
    async with client_for(app) as client:
        response = await log_in(client, username)
        assert response.status_code == 200, response.text
        yield username, client


async def submit(client: httpx.AsyncClient, form: str, **data: Any) -> httpx.Response:
    return await client.post(
        f"/admin/api/forms/{form}/",
        json=data,
        headers={"X-CSRFToken": client.cookies["csrftoken"]},
    )


def csrf(client: httpx.AsyncClient) -> dict[str, str]:
    return {"X-CSRFToken": client.cookies["csrftoken"]}


async def make_job(
    user_agent: tuple[uuid.UUID, uuid.UUID],
    status: JobStatus = JobStatus.QUEUED,
    *,
    max_retries: int | None = None,
) -> uuid.UUID:
    user_id, agent_id = user_agent
    job = (
        await jobs.enqueue_provisioning_job(
            agent_id=agent_id,
            user_id=user_id,
            stripe_event_id=f"evt_{uuid.uuid4().hex}",
            max_retries=max_retries,
        )
    ).job
    if status in (JobStatus.PROVISIONING, JobStatus.RUNNING):
        await jobs.update_job_status(job.id, status=JobStatus.PROVISIONING, attempt=1)
    if status == JobStatus.RUNNING:
        await jobs.update_job_status(job.id, status=JobStatus.RUNNING, attempt=1)
    if status == JobStatus.FAILED:
        await jobs.update_job_status(
            job.id, status=JobStatus.FAILED, attempt=1, error="boom", failed_step="create_vm"
        )
    return job.id


async def snapshot(db: asyncpg.Connection, job_id: uuid.UUID) -> tuple[Any, list[Any]]:
    """The job's row and its history, to show nothing changed."""
    row = await db.fetchrow("SELECT * FROM provisioning_jobs WHERE id = $1", job_id)
    events = await db.fetch("SELECT * FROM job_events WHERE job_id = $1 ORDER BY id", job_id)
    return (None if row is None else dict(row)), [dict(e) for e in events]


async def last_event(db: asyncpg.Connection, job_id: uuid.UUID) -> asyncpg.Record:
    return await db.fetchrow(
        "SELECT * FROM job_events WHERE job_id = $1 ORDER BY id DESC LIMIT 1", job_id
    )


# --------------------------------------------------------------------------- mounting, login


async def test_bare_admin_path_redirects_to_the_app(anon: httpx.AsyncClient) -> None:
    response = await anon.get("/admin")
    assert response.status_code in (301, 302, 307, 308)
    assert response.headers["location"] == "/admin/"

    page = await anon.get("/admin", follow_redirects=True)
    assert page.status_code == 200
    assert str(page.url) == "http://testserver/admin/"
    assert '<div id="app">' in page.text
    assert (await anon.get("/admin/public/meta/")).json()["site_name"] == "jobs_app admin"


@pytest.mark.parametrize(
    "path",
    [
        "/admin/api/tables/",
        "/admin/api/tables/provisioning_jobs/",
        "/admin/api/tables/job_events/",
        "/admin/api/tables/users/",
        "/admin/api/forms/",
        "/admin/api/user/",
    ],
)
async def test_admin_api_needs_a_session(anon: httpx.AsyncClient, path: str) -> None:
    response = await anon.get(path)
    assert response.status_code == 401


async def test_forms_need_a_session(
    anon: httpx.AsyncClient, db: asyncpg.Connection, user_agent: tuple[uuid.UUID, uuid.UUID]
) -> None:
    job_id = await make_job(user_agent)
    before = await snapshot(db, job_id)
    await anon.get("/admin/")  # a CSRF cookie, but no session
    response = await submit(anon, "fail-job", job_id=str(job_id), reason="no session")
    assert response.status_code == 401
    assert await snapshot(db, job_id) == before


async def test_operator_account_made_with_the_piccolo_cli_can_log_in(
    anon: httpx.AsyncClient, database: str
) -> None:
    """The README's non-interactive `piccolo user create`."""
    username = f"cli-{uuid.uuid4().hex[:8]}"
    process = await asyncio.create_subprocess_exec(
        *("piccolo", "user", "create", f"--username={username}"),
        *(f"--email={username}@support.example.com", f"--password={PASSWORD}"),
        *("--is_admin=True", "--is_superuser=False", "--is_active=True"),
        env={**os.environ, "DATABASE_URL": database},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, output.decode()
    assert (await log_in(anon, username)).status_code == 200
    assert (await anon.get("/admin/api/user/")).json()["username"] == username


async def test_wrong_password_is_refused(anon: httpx.AsyncClient) -> None:
    username = await create_operator()
    await anon.get("/admin/")
    response = await anon.post(
        "/admin/public/login/",
        json={"username": username, "password": "wrong"},
        headers=csrf(anon),
    )
    assert response.status_code == 401
    assert (await anon.get("/admin/api/tables/")).status_code == 401


async def test_accounts_without_admin_rights_cannot_use_the_admin(
    anon: httpx.AsyncClient,
) -> None:
    username = await create_operator(admin=False)
    await log_in(anon, username)
    assert (await anon.get("/admin/api/tables/")).status_code == 401


async def test_login_needs_the_csrf_token(anon: httpx.AsyncClient) -> None:
    username = await create_operator()
    await anon.get("/admin/")
    response = await anon.post(
        "/admin/public/login/", json={"username": username, "password": PASSWORD}
    )
    assert response.status_code == 403
    assert "id" not in anon.cookies


async def test_forms_need_the_csrf_token(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
) -> None:
    _, client = operator
    job_id = await make_job(user_agent)
    before = await snapshot(db, job_id)
    response = await client.post(
        "/admin/api/forms/fail-job/", json={"job_id": str(job_id), "reason": "forged"}
    )
    assert response.status_code == 403
    assert await snapshot(db, job_id) == before


# --------------------------------------------------------------------------- tables


async def test_tables_and_job_list_config(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
) -> None:
    username, client = operator
    assert (await client.get("/admin/api/user/")).json()["username"] == username
    tables = (await client.get("/admin/api/tables/")).json()
    assert sorted(tables) == [
        "agents",
        "dispatch_tries",
        "dispatches",
        "job_events",
        "provisioning_jobs",
        "run_cancellations",
        "users",
    ]

    extra = (await client.get("/admin/api/tables/provisioning_jobs/schema/")).json()["extra"]
    assert extra["order_by"][0] == {"column": "created_at", "ascending": False}
    assert {"status", "user_id", "agent_id", "attempt", "retry_count", "error"} <= set(
        extra["visible_column_names"]
    )
    assert {"failed_step", "last_heartbeat_at", "created_at"} <= set(extra["visible_column_names"])
    assert set(extra["visible_filter_names"]) == {
        "status",
        "user_id",
        "agent_id",
        "region",
        "failure_reason",
    }
    events_extra = (await client.get("/admin/api/tables/job_events/schema/")).json()["extra"]
    assert "job_id" in events_extra["visible_filter_names"]

    older = await make_job(user_agent, JobStatus.FAILED)
    newer = await make_job(user_agent)
    response = await client.get(
        "/admin/api/tables/provisioning_jobs/",
        params={"__readable": "true", "__order": "-created_at", "status": "queued"},
    )
    assert response.status_code == 200
    rows = response.json()["rows"]
    assert [r["id"] for r in rows] == [str(newer)]
    email = await db.fetchval("SELECT email FROM users WHERE id = $1", user_agent[0])
    assert rows[0]["user_id_readable"] == email
    assert rows[0]["agent_id_readable"] == "agent"
    response = await client.get(
        "/admin/api/tables/job_events/", params={"job_id": str(older), "__order": "id"}
    )
    assert [r["to_status"] for r in response.json()["rows"]] == ["queued", "failed"]

    # The workflow's steps are in a job's history too, in order.
    user = await accounts.create_user(f"steps-{uuid.uuid4().hex[:8]}@example.com")
    agent = await accounts.create_agent(user.id, "agent")
    provisioning = await make_job((user.id, agent.id), JobStatus.PROVISIONING)
    await jobs.report_step(provisioning, attempt=1, step="create_vm", state="started")
    response = await client.get(
        "/admin/api/tables/job_events/", params={"job_id": str(provisioning), "__order": "id"}
    )
    rows = response.json()["rows"]
    shown = [(r["kind"], r["to_status"], r["step"], r["step_state"]) for r in rows]
    assert shown == [
        ("transition", "queued", None, None),
        ("transition", "provisioning", None, None),
        ("step", "provisioning", "create_vm", "started"),
    ]
    assert {"kind", "step"} <= set(events_extra["visible_filter_names"])


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
async def test_generic_edit_of_a_job_is_refused(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
    method: str,
) -> None:
    _, client = operator
    job_id = await make_job(user_agent)
    before = await snapshot(db, job_id)
    # What the admin's edit form sends: every field, here with a new status.
    row = (await client.get(f"/admin/api/tables/provisioning_jobs/{job_id}/")).json()
    row.pop("id")
    row.pop("attempt")
    for body in ({"status": "running"}, {**row, "status": "running"}, {**row, "retry_count": 0}):
        response = await client.request(
            method,
            f"/admin/api/tables/provisioning_jobs/{job_id}/",
            json=body,
            headers=csrf(client),
        )
        assert response.status_code == 405
        assert "read-only" in response.json()["detail"]
        assert "Retry job or Fail job" in response.json()["detail"]
    assert await snapshot(db, job_id) == before


async def test_generic_add_and_delete_of_jobs_and_events_are_refused(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
) -> None:
    _, client = operator
    user_id, agent_id = user_agent
    job_id = await make_job(user_agent, JobStatus.FAILED)
    before = await snapshot(db, job_id)
    event_id = before[1][-1]["id"]

    response = await client.post(
        "/admin/api/tables/provisioning_jobs/",
        json={"user_id": str(user_id), "agent_id": str(agent_id), "status": "running"},
        headers=csrf(client),
    )
    assert response.status_code == 405
    response = await client.post(
        "/admin/api/tables/job_events/",
        json={"job_id": str(job_id), "to_status": "queued", "attempt": 1, "actor": "api"},
        headers=csrf(client),
    )
    assert response.status_code == 405
    assert "audit trail" in response.json()["detail"]
    for path in (
        f"/admin/api/tables/provisioning_jobs/{job_id}/",
        f"/admin/api/tables/job_events/{event_id}/",
    ):
        response = await client.delete(path, headers=csrf(client))
        assert response.status_code == 405
    response = await client.patch(
        f"/admin/api/tables/job_events/{event_id}/",
        json={"actor": "operator:someone-else"},
        headers=csrf(client),
    )
    assert response.status_code == 405

    assert await snapshot(db, job_id) == before
    assert await db.fetchval("SELECT count(*) FROM provisioning_jobs") == 1
    assert await db.fetchval("SELECT count(*) FROM job_events") == len(before[1])


async def test_users_and_agents_with_jobs_cannot_be_deleted(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
) -> None:
    """Deleting them would cascade to the jobs and their history."""
    _, client = operator
    user_id, agent_id = user_agent
    job_id = await make_job(user_agent)
    before = await snapshot(db, job_id)
    for path in (f"/admin/api/tables/users/{user_id}/", f"/admin/api/tables/agents/{agent_id}/"):
        response = await client.delete(path, headers=csrf(client))
        assert response.status_code == 405
        assert "history" in response.json()["detail"]
    assert await snapshot(db, job_id) == before

    spare = await accounts.create_user("spare@example.com")
    response = await client.delete(f"/admin/api/tables/users/{spare.id}/", headers=csrf(client))
    assert response.status_code == 204
    assert await db.fetchval("SELECT count(*) FROM users WHERE id = $1", spare.id) == 0


# --------------------------------------------------------------------------- operator forms


async def test_retry_job_form_requeues_and_records_the_operator(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
) -> None:
    username, client = operator
    job_id = await make_job(user_agent, JobStatus.FAILED)

    response = await submit(
        client, "retry-job", job_id=f" {job_id} ", reason="VM quota raised by the cloud"
    )
    assert response.status_code == 200, response.text
    message = response.json()["custom_form_success"]
    assert str(job_id) in message
    assert "re-queued" in message
    assert "attempt 2" in message

    job = await db.fetchrow("SELECT * FROM provisioning_jobs WHERE id = $1", job_id)
    assert (job["status"], job["attempt"], job["retry_count"], job["max_retries"]) == (
        "queued",
        2,
        1,
        3,
    )
    assert job["error"] is None
    event = await last_event(db, job_id)
    assert (event["from_status"], event["to_status"], event["attempt"]) == ("failed", "queued", 2)
    assert event["actor"] == f"operator:{username}"
    assert event["reason"] == "VM quota raised by the cloud"


async def test_retry_past_max_retries_needs_the_grant(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
) -> None:
    username, client = operator
    job_id = await make_job(user_agent, JobStatus.FAILED, max_retries=0)
    before = await snapshot(db, job_id)

    refused = await submit(client, "retry-job", job_id=str(job_id), reason="one more go")
    assert refused.status_code == 422
    error = refused.json()["custom_form_error"]
    assert "retries exhausted (0 of 0)" in error
    assert "Nothing was changed" in error
    assert "grant" in error
    assert await snapshot(db, job_id) == before

    granted = await submit(
        client, "retry-job", job_id=str(job_id), reason="one more go", grant_extra_attempt=True
    )
    assert granted.status_code == 200, granted.text
    assert "extra attempt granted" in granted.json()["custom_form_success"]
    job = await db.fetchrow("SELECT * FROM provisioning_jobs WHERE id = $1", job_id)
    assert (job["status"], job["attempt"], job["retry_count"], job["max_retries"]) == (
        "queued",
        2,
        1,
        1,
    )
    event = await last_event(db, job_id)
    assert event["actor"] == f"operator:{username}"
    assert event["reason"] == "one more go (extra attempt granted past max_retries)"
    assert len((await snapshot(db, job_id))[1]) == len(before[1]) + 1


async def test_grant_is_not_used_when_the_budget_allows_a_retry(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
) -> None:
    _, client = operator
    job_id = await make_job(user_agent, JobStatus.FAILED)
    response = await submit(
        client, "retry-job", job_id=str(job_id), reason="retry", grant_extra_attempt=True
    )
    assert response.status_code == 200, response.text
    job = await db.fetchrow("SELECT * FROM provisioning_jobs WHERE id = $1", job_id)
    assert (job["status"], job["max_retries"]) == ("queued", 3)
    assert (await last_event(db, job_id))["reason"] == "retry"


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.PROVISIONING])
async def test_fail_job_form_fails_an_active_job(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
    status: JobStatus,
) -> None:
    username, client = operator
    job_id = await make_job(user_agent, status)

    response = await submit(client, "fail-job", job_id=str(job_id), reason="customer cancelled")
    assert response.status_code == 200, response.text
    assert f"failed by operator:{username}" in response.json()["custom_form_success"]

    job = await db.fetchrow("SELECT * FROM provisioning_jobs WHERE id = $1", job_id)
    assert (job["status"], job["failure_reason"], job["error"]) == (
        "failed",
        "operator",
        "customer cancelled",
    )
    assert job["completed_at"] is not None
    event = await last_event(db, job_id)
    assert (event["from_status"], event["to_status"]) == (status, "failed")
    assert event["actor"] == f"operator:{username}"
    assert event["reason"] == "customer cancelled"


@pytest.mark.parametrize(
    ("form", "status", "expected"),
    [
        ("fail-job", JobStatus.RUNNING, "cannot move a running job to failed"),
        ("fail-job", JobStatus.FAILED, "already failed"),
        ("retry-job", JobStatus.QUEUED, "only failed jobs can be retried; the job is queued"),
        ("retry-job", JobStatus.RUNNING, "only failed jobs can be retried; the job is running"),
    ],
)
async def test_illegal_actions_are_refused_and_change_nothing(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
    form: str,
    status: JobStatus,
    expected: str,
) -> None:
    _, client = operator
    job_id = await make_job(user_agent, status)
    before = await snapshot(db, job_id)
    response = await submit(client, form, job_id=str(job_id), reason="try it")
    assert response.status_code == 422
    error = response.json()["custom_form_error"]
    assert expected in error
    assert "Nothing was changed" in error
    assert await snapshot(db, job_id) == before


@pytest.mark.parametrize("form", ["retry-job", "fail-job"])
@pytest.mark.parametrize(
    ("job_id", "expected"),
    [
        ("not-a-uuid", "'not-a-uuid' is not a job id"),
        ("", "is not a job id"),
        ("00000000-0000-4000-8000-000000000000", "job not found"),
    ],
)
async def test_bad_job_ids_are_refused_and_change_nothing(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
    form: str,
    job_id: str,
    expected: str,
) -> None:
    _, client = operator
    existing = await make_job(user_agent, JobStatus.FAILED)
    before = await snapshot(db, existing)
    response = await submit(client, form, job_id=job_id, reason="typo")
    assert response.status_code == 422
    assert expected in response.json()["custom_form_error"]
    assert await snapshot(db, existing) == before
    assert await db.fetchval("SELECT count(*) FROM job_events") == len(before[1])


@pytest.mark.parametrize("form", ["retry-job", "fail-job"])
async def test_a_reason_is_required(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
    form: str,
) -> None:
    _, client = operator
    job_id = await make_job(
        user_agent, JobStatus.FAILED if form == "retry-job" else JobStatus.QUEUED
    )
    before = await snapshot(db, job_id)
    blank = await submit(client, form, job_id=str(job_id), reason="   ")
    assert blank.status_code == 422
    assert "Give a reason" in blank.json()["custom_form_error"]
    missing = await submit(client, form, job_id=str(job_id))
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["reason"]
    assert await snapshot(db, job_id) == before


async def test_find_jobs_of_a_user_by_email(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
) -> None:
    _, client = operator
    first = await make_job(user_agent, JobStatus.FAILED)
    second = await make_job(user_agent)
    email = await db.fetchval("SELECT email FROM users WHERE id = $1", user_agent[0])
    events_before = await db.fetchval("SELECT count(*) FROM job_events")

    response = await submit(client, "find-jobs-of-a-user-by-email", email=email.upper())
    assert response.status_code == 200, response.text
    message = response.json()["custom_form_success"]
    assert message.startswith(f"{email} (user {user_agent[0]}), 2 jobs, newest first: ")
    assert message.index(f"job {second}: queued, attempt 1, created ") < message.index(
        f"job {first}: failed, attempt 1, created "
    )
    assert await db.fetchval("SELECT count(*) FROM job_events") == events_before

    nobody = await submit(client, "find-jobs-of-a-user-by-email", email="nobody@example.com")
    assert nobody.status_code == 422
    assert nobody.json()["custom_form_error"] == "no user with this email: nobody@example.com."

    await accounts.create_user("idle@example.com")
    idle = await submit(client, "find-jobs-of-a-user-by-email", email="idle@example.com")
    assert "has no jobs" in idle.json()["custom_form_success"]


def test_admin_allowed_hosts_come_from_the_environment():
    from jobs_app.core.settings import load_settings

    settings = load_settings({"JOBS_ADMIN_ALLOWED_HOSTS": "ops.example.com, admin.example.com,"})
    assert settings.admin_allowed_hosts == ("ops.example.com", "admin.example.com")
    assert load_settings({}).admin_allowed_hosts == ()


async def test_dispatches_beside_the_job_with_the_run_as_a_link(
    operator: tuple[str, httpx.AsyncClient],
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
) -> None:
    """A refused dispatch: the job failed with GitHub's message, the dispatch and its
    try are listed by job, the run opens from its row, and nothing there is editable."""
    from jobs_app.core.provisioning import Outcome, Result
    from jobs_app.services import dispatches

    _, client = operator
    job_id = await make_job(user_agent)
    [claim] = await dispatches.claim("admin-test", "github", lease_seconds=60, batch=5)
    run_url = "https://github.com/acme/infra/actions/runs/123"
    started = Result(outcome=Outcome.OK, status_code=200, workflow_run_id="123", run_url=run_url)
    await dispatches.record_started(claim.dispatch_id, "admin-test", "dispatch", started)

    rows = (
        await client.get("/admin/api/tables/dispatches/", params={"job_id": str(job_id)})
    ).json()["rows"]
    assert [(r["id"], r["state"], r["run_url"]) for r in rows] == [
        (str(claim.dispatch_id), "dispatched", run_url)
    ]
    schema = (await client.get("/admin/api/tables/dispatches/schema/")).json()["extra"]
    assert "run_url" in schema["media_columns"]
    link = await client.post(
        "/admin/api/media/generate-file-url/",
        json={"table_name": "dispatches", "column_name": "run_url", "file_key": run_url},
        headers=csrf(client),
    )
    assert link.status_code == 200 and link.json()["file_url"] == run_url
    tries = (
        await client.get(
            "/admin/api/tables/dispatch_tries/", params={"dispatch_id": str(claim.dispatch_id)}
        )
    ).json()["rows"]
    assert [(t["kind"], t["outcome"], t["status_code"]) for t in tries] == [("dispatch", "ok", 200)]

    before = await db.fetch("SELECT * FROM dispatches")
    for method, path, body in (
        ("PATCH", f"/admin/api/tables/dispatches/{claim.dispatch_id}/", {"state": "lost"}),
        ("DELETE", f"/admin/api/tables/dispatches/{claim.dispatch_id}/", None),
        ("POST", "/admin/api/tables/dispatches/", {"job_id": str(job_id), "attempt": 1}),
    ):
        response = await client.request(method, path, json=body, headers=csrf(client))
        assert response.status_code == 405, (method, response.text)
        assert "read-only" in response.json()["detail"]
    assert await db.fetch("SELECT * FROM dispatches") == before
