"""The support console in a real headless Chromium (Debian's, driven by Playwright as
tests/test_admin_browser.py does) against `jobs-app serve`: log in at /admin/, open the
console from the admin's sidebar, find a job by its user's email, read its timeline in
order, watch a transition made through the API appear without a reload, and retry a
failed job from its page; when the server goes away, a banner says the page is
reconnecting, and it resumes without missing a transition.

Screenshots (search, a failed job's page, a running job's page, each on a laptop and a
phone width) are kept in the test's tmp_path, and copied to $CONSOLE_SCREENSHOTS when
that is set.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from datetime import datetime
from pathlib import Path

import asyncpg
import httpx
import pytest

from jobs_app.core.lifecycle import JobStatus
from jobs_app.services import accounts, jobs
from tests.conftest import API_HEADERS, LoggedServer
from tests.http_helpers import callback
from tests.test_admin_browser import CHROMIUM_ARGS, PASSWORD, chromium  # noqa: F401 - fixture

pytestmark = pytest.mark.filterwarnings("ignore:If running sessions in production:UserWarning")

BROWSER_SECONDS = 300
STEP_MS = 30_000
LAPTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


async def seed(db: asyncpg.Connection) -> tuple[str, uuid.UUID, uuid.UUID]:
    """A failed job with a rich story (steps, heartbeats, a dispatch with its tries, its run
    cancelled) and another job in flight: (the failed job's email, its id, the other's id)."""
    email = f"cust.dana.{uuid.uuid4().hex[:6]}@example.com"
    user = await accounts.create_user(email)
    agent = await accounts.create_agent(user.id, "support-bot")
    job = (
        await jobs.enqueue_provisioning_job(
            agent_id=agent.id, user_id=user.id, stripe_event_id=f"evt_{uuid.uuid4().hex[:12]}"
        )
    ).job
    dispatch_id = uuid.uuid4()
    await db.execute(
        """INSERT INTO dispatches (id, job_id, attempt, state, provisioner, tries,
               workflow_run_id, run_url, next_try_at, created_at, updated_at, dispatched_at)
           VALUES ($1, $2, 1, 'dispatched', 'github', 2, '91827364',
                   'https://github.com/acme/infra/actions/runs/91827364',
                   now(), now(), now(), now())""",
        dispatch_id,
        job.id,
    )
    await db.execute(
        """INSERT INTO dispatch_tries (dispatch_id, kind, outcome, status_code, message,
               workflow_run_id, created_at) VALUES
           ($1, 'dispatch', 'again_later', 502, 'Bad gateway from GitHub', NULL, now()),
           ($1, 'dispatch', 'started', 204, NULL, '91827364', now() + interval '2 ms')""",
        dispatch_id,
    )
    await jobs.update_job_status(
        job.id, status=JobStatus.PROVISIONING, attempt=1, dispatch_id=dispatch_id
    )
    for _ in range(12):
        await jobs.record_heartbeat(job.id, attempt=1)
    await jobs.report_step(job.id, attempt=1, step="create_vm", state="started")
    await jobs.report_step(job.id, attempt=1, step="create_vm", state="succeeded")
    await jobs.report_step(job.id, attempt=1, step="install_agent", state="started")
    await jobs.report_step(
        job.id, attempt=1, step="install_agent", state="failed", detail="apt-get: 404 Not Found"
    )
    await jobs.update_job_status(
        job.id,
        status=JobStatus.FAILED,
        attempt=1,
        error="install_agent failed: apt-get exited 100 (mirror unreachable)",
        failed_step="install_agent",
    )
    await db.execute(
        """INSERT INTO run_cancellations (workflow_run_id, job_id, dispatch_id, reason, state,
               tries, next_try_at, created_at, done_at)
           VALUES ('91827364', $1, $2, 'job failed', 'done', 1, now(), now(), now())""",
        job.id,
        dispatch_id,
    )
    other_user = await accounts.create_user(f"cust.sam.{uuid.uuid4().hex[:6]}@example.com")
    other_agent = await accounts.create_agent(other_user.id, "research-agent")
    other = (
        await jobs.enqueue_provisioning_job(
            agent_id=other_agent.id, user_id=other_user.id, stripe_event_id="evt_live"
        )
    ).job
    await jobs.update_job_status(other.id, status=JobStatus.PROVISIONING, attempt=1)
    await jobs.record_heartbeat(other.id, attempt=1)
    await jobs.report_step(other.id, attempt=1, step="create_vm", state="started")
    return email, job.id, other.id


def keep(shots: list[Path]) -> None:
    target = os.environ.get("CONSOLE_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, Path(target) / shot.name)


async def test_support_finds_a_job_reads_it_live_and_retries_it(
    chromium: Path,  # noqa: F811 - the fixture
    server: LoggedServer,
    database: str,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    from piccolo.apps.user.tables import BaseUser
    from playwright.async_api import async_playwright, expect

    username = f"ops-{uuid.uuid4().hex[:8]}"
    await BaseUser.create_user(
        username=username,
        password=PASSWORD,
        email=f"{username}@support.example.com",
        active=True,
        admin=True,
    )
    email, failed_id, live_id = await seed(db)
    base = server.url
    shots: list[Path] = []
    restarted: list[LoggedServer] = []

    async def shoot(page: object, name: str) -> None:
        path = tmp_path / f"console-{name}.png"
        await page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
        shots.append(path)

    async with (
        asyncio.timeout(BROWSER_SECONDS),
        async_playwright() as playwright,
        httpx.AsyncClient(base_url=base, headers=API_HEADERS, timeout=20) as api,
    ):
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(viewport=LAPTOP)
            page = await context.new_page()
            page.set_default_timeout(STEP_MS)
            expect.set_options(timeout=STEP_MS)

            await page.goto(f"{base}/admin/")
            await expect(page).to_have_url(re.compile(r"/admin/#/login"))
            await page.fill("input[name=username]", username)
            await page.fill("input[name=password]", PASSWORD)
            await page.click("[data-uitest=login_button]")
            await expect(page.locator("[data-uitest=nav_dropdown_button]")).to_contain_text(
                username
            )

            # The console, from the admin's sidebar: the jobs needing attention.
            await page.get_by_role("link", name=re.compile("support console", re.I)).click()
            await expect(page).to_have_url(re.compile(r"/admin/console/$"))
            await expect(page.locator(f"#attention tr[data-job-id='{failed_id}']")).to_contain_text(
                "failed"
            )
            await shoot(page, "search")

            # A prefix both customers' emails share: a list, newest first, saying what matched.
            await page.fill("input[name=q]", "CUST.")
            await page.press("input[name=q]", "Enter")
            rows = page.locator("#found tbody tr")
            await expect(rows).to_have_count(2)
            await expect(rows.first).to_have_attribute("data-job-id", str(live_id))
            await expect(rows.first.locator(".matched")).to_have_text("email prefix")
            await shoot(page, "search-results")
            await page.set_viewport_size(PHONE)
            await shoot(page, "search-results-phone")
            await page.set_viewport_size(LAPTOP)

            # Search by the customer's email (another case): straight to the job's page.
            await page.fill("input[name=q]", email.upper())
            await page.press("input[name=q]", "Enter")
            await expect(page).to_have_url(f"{base}/admin/console/jobs/{failed_id}")
            await expect(page.locator("#status")).to_have_attribute("data-status", "failed")
            await expect(page.locator("#error")).to_contain_text("mirror unreachable")
            items = page.locator("#timeline > li")
            kinds = await items.evaluate_all("els => els.map(e => e.dataset.kind)")
            at = await items.evaluate_all("els => els.map(e => e.dataset.at)")
            assert kinds[0] == "transition"
            assert {"transition", "step", "dispatch", "try", "cancellation", "heartbeats"} <= set(
                kinds
            )
            assert kinds.count("heartbeats") == 1
            moments = [datetime.fromisoformat(value) for value in at]
            assert moments == sorted(moments)
            history = await db.fetch(
                "SELECT kind, created_at FROM job_events WHERE job_id = $1 ORDER BY id", failed_id
            )
            shown = [m for k, m in zip(kinds, moments, strict=True) if k in ("transition", "step")]
            assert shown == [row["created_at"] for row in history]
            await shoot(page, "failed-job")
            await page.set_viewport_size(PHONE)
            await shoot(page, "failed-job-phone")
            await page.set_viewport_size(LAPTOP)

            # Retry from the page: the job is queued again, and the page shows it.
            await page.fill("#retry-reason", "mirror is back, customer waiting")
            await page.click("#retry-form button[type=submit]")
            await expect(page.locator("#notice")).to_contain_text("queued again")
            await expect(page.locator("#status")).to_have_attribute("data-status", "queued")
            await expect(page.locator("#timeline > li.operator")).to_contain_text(
                f"operator:{username}"
            )
            stored = await db.fetchrow(
                "SELECT status, attempt FROM provisioning_jobs WHERE id = $1", failed_id
            )
            assert (stored["status"], stored["attempt"]) == ("queued", 2)

            # A job in flight, live: a transition through the API appears without a reload.
            await page.goto(f"{base}/admin/console/jobs/{live_id}")
            await expect(page.locator("body")).to_have_attribute("data-live", "live")
            await expect(page.locator("#fail-form")).to_be_visible()
            await shoot(page, "in-flight-job")
            await page.evaluate("window.notReloaded = true")
            before = await items.count()
            answer = await callback(
                api, live_id, "steps", {"attempt": 1, "step": "create_vm", "state": "succeeded"}
            )
            assert answer.status_code == 200, answer.text
            answer = await callback(api, live_id, "status", {"attempt": 1, "status": "running"})
            assert answer.status_code == 200, answer.text
            await expect(page.locator("#status")).to_have_attribute("data-status", "running")
            await expect(items).to_have_count(before + 2)
            await expect(items.last).to_have_attribute("data-kind", "transition")
            await expect(items.last).to_contain_text("provisioning → running")
            assert await page.evaluate("window.notReloaded") is True
            await expect(page.locator("#fail-form")).to_be_hidden()
            await shoot(page, "running-job")
            await page.set_viewport_size(PHONE)
            await shoot(page, "running-job-phone")
            await page.set_viewport_size(LAPTOP)

            # The server goes away: a banner says the page is reconnecting. A transition
            # made meanwhile shows once a server is back on the same address (a fresh
            # stream token from the console, resuming after the last event shown).
            await page.goto(f"{base}/admin/console/jobs/{failed_id}")
            await expect(page.locator("body")).to_have_attribute("data-live", "live")
            server.stop()
            await expect(page.locator("#banner")).to_be_visible()
            await expect(page.locator("body")).to_have_attribute("data-live", "reconnecting")
            await shoot(page, "reconnecting")
            await jobs.update_job_status(failed_id, status=JobStatus.PROVISIONING, attempt=2)
            again = LoggedServer(database, 1, port=server.port)
            restarted.append(again)
            await again.wait_ready()
            await expect(page.locator("#status")).to_have_attribute("data-status", "provisioning")
            await expect(page.locator("#banner")).to_be_hidden()
            await expect(items.last).to_contain_text("queued → provisioning")
        finally:
            await browser.close()
            for process in restarted:
                process.stop()
    keep(shots)
    assert all(shot.stat().st_size > 0 for shot in shots)
