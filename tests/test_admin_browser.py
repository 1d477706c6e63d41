"""End to end: `jobs-app serve` as a real server, the admin in a real headless Chromium.

Needs Debian's `chromium` at /usr/bin/chromium (CI: `apt-get install -y chromium`),
driven by Playwright's Python package; `playwright install` is not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from jobs_app.core.lifecycle import JobStatus
from jobs_app.services import jobs
from tests.conftest import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_SECONDS = 120
BROWSER_SECONDS = 300
STEP_MS = 30_000
PASSWORD = "correct-horse-battery-staple"


def serve_command(port: int) -> list[str]:
    exe = shutil.which("jobs-app")
    base = [exe] if exe else [sys.executable, "-m", "jobs_app.cli"]
    return [*base, "serve", "--host", "127.0.0.1", "--port", str(port)]


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
async def server(database: str, tmp_path: Path) -> AsyncIterator[str]:
    """`jobs-app serve` on a free port against the test database; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "JOBS_DEV_MODE": "",
        "JOBS_PRODUCTION": "",  # plain http here: Secure cookies would not be sent back
    }
    log = tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    with running(serve_command(port), env, log) as process:
        async with httpx.AsyncClient(timeout=2) as client:
            async with asyncio.timeout(SERVER_START_SECONDS):
                while True:
                    if process.poll() is not None:
                        pytest.fail(f"jobs-app serve exited early:\n{log.read_text()}")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(f"{base}/health")).status_code == 200:
                            break
                    await asyncio.sleep(0.2)
        yield base


async def test_operator_retries_a_failed_job_in_a_real_browser(
    chromium: Path,
    server: str,
    db: asyncpg.Connection,
    user_agent: tuple[uuid.UUID, uuid.UUID],
    tmp_path: Path,
) -> None:
    from piccolo.apps.user.tables import BaseUser
    from playwright.async_api import async_playwright, expect

    username = f"ops-{uuid.uuid4().hex[:8]}"
    await BaseUser.create_user(username=username, password=PASSWORD, active=True, admin=True)
    user_id, agent_id = user_agent
    job = (
        await jobs.enqueue_provisioning_job(
            agent_id=agent_id, user_id=user_id, stripe_event_id="evt_browser"
        )
    ).job
    await jobs.update_job_status(
        job.id, status=JobStatus.FAILED, attempt=1, error="VM quota exceeded", failed_step="vm"
    )
    job_link = f"a[href='#/provisioning_jobs/{job.id}/']"
    screenshot = tmp_path / "admin-retry.png"

    async with asyncio.timeout(BROWSER_SECONDS), async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(STEP_MS)
            expect.set_options(timeout=STEP_MS)

            # /admin lands on the single-page app, which asks for a login.
            await page.goto(f"{server}/admin")
            await expect(page).to_have_url(re.compile(r"/admin/#/login"))
            await page.fill("input[name=username]", username)
            await page.fill("input[name=password]", PASSWORD)
            await page.click("[data-uitest=login_button]")
            await expect(page.locator("[data-uitest=nav_dropdown_button]")).to_contain_text(
                username
            )

            # The failed jobs, from the sidebar link; the job's row says Failed.
            await page.get_by_role("link", name=re.compile("failed jobs", re.I)).click()
            row = page.locator("tr", has=page.locator(job_link))
            await expect(row).to_contain_text("Failed")
            await expect(row).to_contain_text("VM quota exceeded")

            # Open it. A generic edit of its status is refused, with the reason shown.
            await page.locator(job_link).click()
            status = page.locator("select[name=status]")
            await expect(status).to_have_value("failed")
            await status.select_option("queued")
            await page.get_by_role("button", name=re.compile("save", re.I)).click()
            await expect(page.get_by_text("Provisioning jobs are read-only here")).to_be_visible()
            await page.screenshot(path=str(tmp_path / "admin-edit-refused.png"), full_page=True)
            assert (
                await db.fetchval("SELECT status FROM provisioning_jobs WHERE id = $1", job.id)
                == "failed"
            )

            # Retry it with the operator form (reloaded: no toast left from the refusal).
            await page.goto(f"{server}/admin/#/forms/retry-job")
            await page.reload()
            await page.fill("input[name=job_id]", str(job.id))
            await page.fill("input[name=reason]", "quota raised, customer asked")
            await page.click("[data-uitest=submit_custom_form_button]")
            await expect(page.locator("#success_message")).to_contain_text(
                f"Job {job.id} re-queued"
            )
            await page.screenshot(path=str(tmp_path / "admin-retry-form.png"))

            # The job list shows it queued again, as attempt 2.
            await page.goto(f"{server}/admin/#/provisioning_jobs?status=queued")
            row = page.locator("tr", has=page.locator(job_link))
            await expect(row).to_contain_text("Queued")
            await expect(row.locator("td").nth(5)).to_have_text("2")  # the attempt column
            await page.screenshot(path=str(screenshot), full_page=True)
        finally:
            await browser.close()

    assert screenshot.stat().st_size > 0
    stored = await db.fetchrow("SELECT * FROM provisioning_jobs WHERE id = $1", job.id)
    assert (stored["status"], stored["attempt"], stored["error"]) == ("queued", 2, None)
    event = await db.fetchrow(
        "SELECT * FROM job_events WHERE job_id = $1 ORDER BY id DESC LIMIT 1", job.id
    )
    assert (event["from_status"], event["to_status"]) == ("failed", "queued")
    assert event["actor"] == f"operator:{username}"
    assert event["reason"] == "quota raised, customer asked"
