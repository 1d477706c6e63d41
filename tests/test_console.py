"""The support console at /admin/console/, over HTTP against a real `jobs-app serve`
process on the test database: the admin's login guards it, every search key finds its
job, a job's page tells its whole story in order, the actions need the admin's CSRF
token and record the staff user, and nothing a customer or GitHub wrote is ever
rendered as HTML. Bad input is a 4xx page, never a 500 (the `server` fixture fails the
module on any unhandled error in the server's log)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import pytest
from markupsafe import escape

from jobs_app.core.lifecycle import JobStatus
from jobs_app.services import accounts, jobs
from tests.conftest import LoggedServer

pytestmark = pytest.mark.filterwarnings("ignore:If running sessions in production:UserWarning")

PASSWORD = "correct-horse-battery-staple"
CONSOLE = "/admin/console"
LOGIN = "/admin/#/login"
XSS = '<script>alert("x")</script>'


async def create_operator(*, admin: bool = True) -> str:
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


async def log_in(client: httpx.AsyncClient, username: str) -> None:
    """As the admin's single-page app does: the CSRF cookie, then the login with it."""
    await client.get("/admin/")
    answer = await client.post(
        "/admin/public/login/",
        json={"username": username, "password": PASSWORD},
        headers={"X-CSRFToken": client.cookies["csrftoken"]},
    )
    assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
async def staff(server: LoggedServer) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """One logged-in staff user for the module (the login endpoint is rate limited)."""
    username = await create_operator()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        await log_in(client, username)
        yield username, client


@pytest.fixture
async def anon(server: LoggedServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        yield client


async def new_user(email: str | None = None) -> tuple[uuid.UUID, uuid.UUID]:
    user = await accounts.create_user(email or f"cust-{uuid.uuid4().hex[:10]}@example.com")
    agent = await accounts.create_agent(user.id, "support-bot")
    return user.id, agent.id


async def enqueue(user_agent: tuple[uuid.UUID, uuid.UUID], stripe: str | None = None) -> Any:
    user_id, agent_id = user_agent
    return (
        await jobs.enqueue_provisioning_job(
            agent_id=agent_id,
            user_id=user_id,
            stripe_event_id=stripe or f"evt_{uuid.uuid4().hex}",
        )
    ).job


async def failed_job(user_agent: tuple[uuid.UUID, uuid.UUID], error: str = "boom") -> Any:
    job = await enqueue(user_agent)
    await jobs.update_job_status(job.id, status=JobStatus.PROVISIONING, attempt=1)
    return await jobs.update_job_status(
        job.id, status=JobStatus.FAILED, attempt=1, error=error, failed_step="create_vm"
    )


async def add_dispatch(
    db: asyncpg.Connection, job_id: uuid.UUID, *, run_id: str, tries: int = 1, message: str = ""
) -> uuid.UUID:
    """A dispatch of attempt 1 with its tries, as the dispatcher records them."""
    dispatch_id = uuid.uuid4()
    await db.execute(
        """INSERT INTO dispatches (id, job_id, attempt, state, provisioner, tries,
               workflow_run_id, run_url, next_try_at, created_at, updated_at, dispatched_at)
           VALUES ($1, $2, 1, 'dispatched', 'github', $3, $4,
                   'https://github.com/acme/infra/actions/runs/' || $4,
                   now(), now(), now(), now())""",
        dispatch_id,
        job_id,
        tries,
        run_id,
    )
    await db.execute(
        """INSERT INTO dispatch_tries (dispatch_id, kind, outcome, status_code, message,
               workflow_run_id, created_at)
           SELECT $1, 'dispatch', CASE WHEN n = $2 THEN 'started' ELSE 'again_later' END,
                  CASE WHEN n = $2 THEN 204 ELSE 502 END, $3 || ' #' || n, $4,
                  now() + n * interval '1 millisecond'
           FROM generate_series(1, $2) AS n""",
        dispatch_id,
        tries,
        message or "GitHub said",
        run_id,
    )
    return dispatch_id


def timeline(page: str) -> list[tuple[str, str]]:
    """The timeline's items: (data-kind, data-at), in the page's order."""
    block = page.split('<ol id="timeline">', 1)[1].split("</ol>", 1)[0]
    return re.findall(r'<li data-kind="([a-z]+)" data-at="([^"]+)"', block)


def location(answer: httpx.Response) -> str:
    return answer.headers.get("location", "")


# --------------------------------------------------------------------------- login


async def test_without_a_staff_session_everything_redirects_to_the_admins_login(
    anon: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    job = await failed_job(await new_user())
    paths = [
        f"{CONSOLE}/",
        f"{CONSOLE}",
        f"{CONSOLE}/?q={job.id}",
        f"{CONSOLE}/jobs/{job.id}",
        f"{CONSOLE}/jobs/not-a-uuid",
        f"{CONSOLE}/jobs/{job.id}/stream-token",
    ]
    for path in paths:
        answer = await anon.get(path)
        assert answer.status_code == 303, (path, answer.status_code)
        assert location(answer) == LOGIN, path
        assert str(job.id) not in answer.text
    # A forged or unknown session cookie is no session.
    anon.cookies.set("id", "forged-session-token")
    answer = await anon.get(f"{CONSOLE}/jobs/{job.id}")
    assert (answer.status_code, location(answer)) == (303, LOGIN)
    # Nor can an action be taken.
    anon.cookies.set("csrftoken", "t")
    answer = await anon.post(
        f"{CONSOLE}/jobs/{job.id}/retry", data={"csrftoken": "t", "reason": "sneaky"}
    )
    assert (answer.status_code, location(answer)) == (303, LOGIN)
    assert await db.fetchval("SELECT status FROM provisioning_jobs WHERE id = $1", job.id) == (
        "failed"
    )


async def test_a_user_without_admin_rights_is_refused(
    server: LoggedServer, db: asyncpg.Connection
) -> None:
    """A piccolo user who is not staff (admin off) with a valid session: still no console."""
    from piccolo.apps.user.tables import BaseUser
    from piccolo_api.session_auth.tables import SessionsBase

    username = await create_operator(admin=False)
    user = await BaseUser.objects().where(BaseUser.username == username).first().run()
    assert user is not None
    session = await SessionsBase.create_session(user_id=user.id)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        client.cookies.set("id", session.token)
        answer = await client.get(f"{CONSOLE}/")
    assert (answer.status_code, location(answer)) == (303, LOGIN)


# --------------------------------------------------------------------------- search


async def test_every_search_key_finds_its_job(
    staff: tuple[str, httpx.AsyncClient], db: asyncpg.Connection
) -> None:
    _, client = staff
    email = f"Pat.Example-{uuid.uuid4().hex[:6]}@Example.COM"
    user_agent = await new_user(email)
    job = await enqueue(user_agent, stripe=f"evt_{uuid.uuid4().hex}")
    run_on_job, run_on_dispatch = f"9{time.time_ns()}", f"8{time.time_ns()}"
    dispatch_id = await add_dispatch(db, job.id, run_id=run_on_dispatch)
    await db.execute(
        "UPDATE provisioning_jobs SET workflow_run_id = $2 WHERE id = $1", job.id, run_on_job
    )
    keys = {
        "job id": str(job.id),
        "user id": str(user_agent[0]),
        "agent id": str(user_agent[1]),
        "email exact, another case": email.upper(),
        "email prefix": email[:4].lower(),
        "Stripe event id": job.stripe_event_id,
        "workflow run id (job)": run_on_job,
        "workflow run id (dispatch)": run_on_dispatch,
        "dispatch id": str(dispatch_id),
        "with spaces around": f"  {job.id}  ",
    }
    for name, query in keys.items():
        answer = await client.get(f"{CONSOLE}/", params={"q": query})
        assert answer.status_code == 303, (name, answer.status_code, answer.text[:300])
        assert location(answer) == f"{CONSOLE}/jobs/{job.id}", name
    # Two characters are no prefix (an exact email only), and a prefix is of the email.
    for query in (email[:2], email[1:6]):
        answer = await client.get(f"{CONSOLE}/", params={"q": query})
        assert answer.status_code == 200 and 'id="nothing-found"' in answer.text, query


async def test_several_jobs_are_listed_newest_first_with_what_matched(
    staff: tuple[str, httpx.AsyncClient], db: asyncpg.Connection
) -> None:
    _, client = staff
    user_agent = await new_user()
    older = await failed_job(user_agent)
    newer = await enqueue(user_agent)
    answer = await client.get(f"{CONSOLE}/", params={"q": str(user_agent[0])})
    assert answer.status_code == 200
    page = answer.text
    rows = re.findall(r'<tr data-job-id="([0-9a-f-]+)">', page)
    assert rows == [str(newer.id), str(older.id)]
    assert page.count('class="matched">user id<') == 2
    assert 'data-status="queued"' in page and 'data-status="failed"' in page


async def test_a_query_that_finds_nothing_says_so_escaped(
    staff: tuple[str, httpx.AsyncClient], db: asyncpg.Connection
) -> None:
    _, client = staff
    for query in (XSS, "ab", str(uuid.uuid4()), "%", "_", "' OR 1=1 --", "\\"):
        answer = await client.get(f"{CONSOLE}/", params={"q": query})
        assert answer.status_code == 200, query
        assert 'id="nothing-found"' in answer.text, query
        assert str(escape(query)) in answer.text
    assert XSS not in answer.text
    # A query too long, or one PostgreSQL can't hold, is refused in words, never a 500.
    answer = await client.get(f"{CONSOLE}/", params={"q": "x" * 321})
    assert answer.status_code == 400
    assert "at most 320" in answer.text
    for raw in ("q=a%00b", "q=%ff%fe", "q=%ED%A0%80abc", "q=a&q=b", "q"):
        answer = await client.get(f"{CONSOLE}/?{raw}")
        assert answer.status_code in (200, 400), (raw, answer.status_code)
        assert answer.headers["content-type"].startswith("text/html"), raw


async def test_with_no_query_the_jobs_needing_attention(
    staff: tuple[str, httpx.AsyncClient], db: asyncpg.Connection
) -> None:
    _, client = staff
    failed = await failed_job(await new_user())
    stuck = await enqueue(await new_user())
    fresh = await enqueue(await new_user())
    old_failure = await failed_job(await new_user())
    # No usual time is learned on an empty history: half the queue timeout (450 s) is "long".
    await db.execute(
        "UPDATE provisioning_jobs SET queued_at = now() - interval '20 minutes' WHERE id = $1",
        stuck.id,
    )
    await db.execute(
        "UPDATE provisioning_jobs SET completed_at = now() - interval '25 hours' WHERE id = $1",
        old_failure.id,
    )
    answer = await client.get(f"{CONSOLE}/")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    rows = dict(re.findall(r'<tr data-job-id="([0-9a-f-]+)" data-why="([a-z]+)">', answer.text))
    assert rows == {str(failed.id): "failed", str(stuck.id): "slow"}
    assert str(fresh.id) not in answer.text


# --------------------------------------------------------------------------- a job's page


async def test_a_jobs_page_tells_its_whole_story_in_order(
    staff: tuple[str, httpx.AsyncClient], db: asyncpg.Connection
) -> None:
    username, client = staff
    email = f"story-{uuid.uuid4().hex[:6]}@example.com"
    job = await enqueue(await new_user(email))
    await jobs.update_job_status(job.id, status=JobStatus.PROVISIONING, attempt=1)
    dispatch_id = await add_dispatch(db, job.id, run_id="4242", tries=3)
    for _ in range(3):
        await jobs.record_heartbeat(job.id, attempt=1)
    await jobs.report_step(job.id, attempt=1, step="create_vm", state="started")
    await jobs.report_step(job.id, attempt=1, step="create_vm", state="succeeded")
    await jobs.update_job_status(
        job.id, status=JobStatus.FAILED, attempt=1, error="VM quota exceeded"
    )
    await db.execute(
        """INSERT INTO run_cancellations (workflow_run_id, job_id, dispatch_id, reason,
               next_try_at, created_at) VALUES ('4242', $1, $2, 'superseded', now(), now())""",
        job.id,
        dispatch_id,
    )
    await client.post(
        f"{CONSOLE}/jobs/{job.id}/retry",
        data={"csrftoken": client.cookies["csrftoken"], "reason": "quota raised"},
    )

    answer = await client.get(f"{CONSOLE}/jobs/{job.id}")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert answer.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    page = answer.text
    assert '<span class="status" id="status" data-status="queued">' in page
    assert email in page
    assert "https://github.com/acme/infra/actions/runs/4242" in page
    items = timeline(page)
    kinds = [kind for kind, _ in items]
    assert kinds.count("transition") == 4  # created, provisioning, failed, queued again
    assert kinds.count("step") == 2
    assert kinds.count("dispatch") == 1
    assert kinds.count("try") == 3
    assert kinds.count("cancellation") == 1
    assert kinds.count("heartbeats") == 1  # summarised: never one line each
    assert "3 heartbeats" in page
    at = [datetime.fromisoformat(value) for _, value in items]
    assert at == sorted(at)  # oldest first
    assert kinds[0] == "transition" and kinds[-1] in ("transition", "cancellation")
    assert f"operator:{username}" in page and "quota raised" in page
    assert 'id="retry-form" hidden' in page  # queued: retry does not apply
    assert 'id="fail-form" hidden' not in page


async def test_everything_a_customer_or_github_writes_is_escaped(
    staff: tuple[str, httpx.AsyncClient], db: asyncpg.Connection
) -> None:
    _, client = staff
    email = f"{XSS}{uuid.uuid4().hex[:4]}@evil.example"
    job = await enqueue(await new_user(email), stripe=f"evt_{XSS}")
    await jobs.update_job_status(job.id, status=JobStatus.PROVISIONING, attempt=1)
    await jobs.report_step(job.id, attempt=1, step="create_vm", state="failed", detail=XSS)
    await add_dispatch(db, job.id, run_id=f"run{XSS}", message=XSS)
    await db.execute(
        "UPDATE dispatches SET run_url = 'javascript:alert(1)' WHERE job_id = $1", job.id
    )
    await jobs.update_job_status(
        job.id, status=JobStatus.FAILED, attempt=1, error=XSS, failed_step=XSS
    )
    answer = await client.get(f"{CONSOLE}/jobs/{job.id}")
    assert answer.status_code == 200
    assert "<script>alert" not in answer.text
    assert "javascript:alert" not in answer.text  # not a link: only http(s) runs are
    assert answer.text.count(str(escape(XSS))) >= 4  # error, step detail, try message, email
    # The search list shows the email escaped too.
    listed = await client.get(f"{CONSOLE}/", params={"q": "<script>alert"})
    assert listed.status_code in (200, 303)
    assert "<script>alert" not in listed.text


async def test_a_missing_job_or_a_malformed_id_is_a_404_page(
    staff: tuple[str, httpx.AsyncClient], db: asyncpg.Connection
) -> None:
    _, client = staff
    for path in (
        f"{CONSOLE}/jobs/{uuid.uuid4()}",
        f"{CONSOLE}/jobs/not-a-uuid",
        f"{CONSOLE}/jobs/%3Cscript%3Ealert(1)",
        f"{CONSOLE}/jobs/{'9' * 500}",
        f"{CONSOLE}/jobs/{uuid.uuid4()}/stream-token",
    ):
        answer = await client.get(path)
        assert answer.status_code == 404, path
        assert answer.headers["content-type"].startswith("text/html"), path
        assert "<script>alert" not in answer.text


async def test_the_stream_token_opens_only_that_jobs_stream(
    staff: tuple[str, httpx.AsyncClient], db: asyncpg.Connection
) -> None:
    _, client = staff
    job = await enqueue(await new_user())
    other = await enqueue(await new_user())
    answer = await client.get(f"{CONSOLE}/jobs/{job.id}/stream-token")
    assert answer.status_code == 200
    token = answer.json()["token"]
    page = (await client.get(f"{CONSOLE}/jobs/{job.id}")).text
    assert "test-api-token" not in page  # the API's bearer never reaches the page
    async with client.stream(
        "GET", f"/api/jobs/{other.id}/events/stream", params={"token": token}
    ) as refused:
        assert refused.status_code == 403


# --------------------------------------------------------------------------- actions


async def test_actions_need_the_csrf_token_and_record_the_staff_user(
    staff: tuple[str, httpx.AsyncClient], db: asyncpg.Connection
) -> None:
    username, client = staff
    job = await failed_job(await new_user())
    url = f"{CONSOLE}/jobs/{job.id}/retry"
    for data in ({"reason": "no token"}, {"reason": "wrong", "csrftoken": "not-the-cookie"}):
        answer = await client.post(url, data=data)
        assert answer.status_code == 403, data
        assert "CSRF" in answer.text
    assert await db.fetchval("SELECT status FROM provisioning_jobs WHERE id = $1", job.id) == (
        "failed"
    )
    token = client.cookies["csrftoken"]
    # No reason: refused in words.
    answer = await client.post(url, data={"csrftoken": token, "reason": "   "})
    assert answer.status_code == 400 and "Give a reason" in answer.text
    answer = await client.post(url, data={"csrftoken": token, "reason": "a\x00b"})
    assert answer.status_code == 400 and "NUL" in answer.text
    answer = await client.post(url, data={"csrftoken": token, "reason": "x" * 1001})
    assert answer.status_code == 400 and "at most 1000" in answer.text
    # A JSON body instead of the form: a 4xx, never a 500.
    answer = await client.post(url, json={"csrftoken": token, "reason": "x"})
    assert 400 <= answer.status_code < 500

    answer = await client.post(url, data={"csrftoken": token, "reason": f"asked {XSS}"})
    assert answer.status_code == 303
    assert location(answer) == f"{CONSOLE}/jobs/{job.id}?done=retried"
    row = await db.fetchrow(
        "SELECT * FROM job_events WHERE job_id = $1 ORDER BY id DESC LIMIT 1", job.id
    )
    assert (row["to_status"], row["actor"], row["reason"]) == (
        "queued",
        f"operator:{username}",
        f"asked {XSS}",
    )
    shown = await client.get(location(answer))
    assert "Retried: the job is queued again." in shown.text
    assert "<script>alert" not in shown.text

    # Retry again: the state machine refuses (409), said in words, nothing changed.
    answer = await client.post(url, data={"csrftoken": token, "reason": "again"})
    assert answer.status_code == 409
    assert "Retry refused" in answer.text and 'id="problem"' in answer.text

    # Fail it with a reason: recorded as the error and in the history.
    answer = await client.post(
        f"{CONSOLE}/jobs/{job.id}/fail", data={"csrftoken": token, "reason": "customer cancelled"}
    )
    assert answer.status_code == 303
    stored = await db.fetchrow("SELECT * FROM provisioning_jobs WHERE id = $1", job.id)
    assert (stored["status"], stored["error"], stored["failure_reason"]) == (
        "failed",
        "customer cancelled",
        "operator",
    )
    # Failing a failed job: 409.
    answer = await client.post(
        f"{CONSOLE}/jobs/{job.id}/fail", data={"csrftoken": token, "reason": "twice"}
    )
    assert answer.status_code == 409
    # An action on a job that does not exist, or a malformed id: 404 page.
    for bad in (str(uuid.uuid4()), "nope"):
        answer = await client.post(
            f"{CONSOLE}/jobs/{bad}/retry", data={"csrftoken": token, "reason": "x"}
        )
        assert answer.status_code == 404, bad


async def test_a_heavy_jobs_page_renders_quickly(
    staff: tuple[str, httpx.AsyncClient], db: asyncpg.Connection
) -> None:
    """1,000 heartbeats and 50 dispatch tries: one heartbeats line, fifty try lines.
    (Statements and server-side time are measured by `python -m bench.console`.)"""
    _, client = staff
    job = await enqueue(await new_user())
    await jobs.update_job_status(job.id, status=JobStatus.PROVISIONING, attempt=1)
    for _ in range(1000):
        await jobs.record_heartbeat(job.id, attempt=1)
    await add_dispatch(db, job.id, run_id="777", tries=50)
    answer = await client.get(f"{CONSOLE}/jobs/{job.id}")
    assert answer.status_code == 200
    kinds = [kind for kind, _ in timeline(answer.text)]
    assert kinds.count("heartbeats") == 1 and "1000 heartbeats" in answer.text
    assert kinds.count("try") == 50
    started = time.perf_counter()
    for _ in range(5):
        assert (await client.get(f"{CONSOLE}/jobs/{job.id}")).status_code == 200
    # Generous (a shared 2-core machine, the client's time included): the bench has the figure.
    assert (time.perf_counter() - started) / 5 < 1.0


def test_the_heavy_page_is_three_statements_in_the_bench() -> None:
    """`python -m bench.console` (its own database): a job with 1,000 heartbeats and 50
    dispatch tries is one statement in the service, three per page over HTTP (the staff
    session, its user, the page), and renders within the target on the server."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run(
        [sys.executable, "-m", "bench.console", "--runs", "20"],
        cwd=Path(__file__).resolve().parent.parent,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line.removeprefix("RESULT "))
    assert results["service_job_page"]["statements"] == 1
    assert results["service_search_email_prefix"]["statements"] == 1
    assert results["http_job_page"]["statements"] == 3
    # The 100 ms target, with room for a shared CI machine (the bench prints the figure).
    assert results["http_job_page"]["median_ms"] < 100
