"""A real browser on another origin follows a job live: headless Debian Chromium
(through Playwright, as tests/test_admin_browser.py drives it) loads a page from its own
loopback origin, opens an EventSource with a stream token, receives the job's
transitions, and when the server ends the stream (SIGTERM; a new server on the same
port) reconnects by itself with Last-Event-ID and misses nothing. A page from an
origin not in JOBS_CORS_ORIGINS receives nothing."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

from jobs_app.core.lifecycle import JobStatus
from jobs_app.services import jobs
from tests.conftest import API_HEADERS, LoggedServer, free_port
from tests.http_helpers import make_job
from tests.test_admin_browser import CHROMIUM_ARGS, chromium  # noqa: F401 - fixture

PAGE = """<!doctype html>
<html><body><pre id="log"></pre><script>
window.received = []; window.errors = []; window.opens = 0;
const stream = new URLSearchParams(location.search).get("stream");
const source = new EventSource(stream);
source.onopen = () => { window.opens += 1; };
source.addEventListener("transition", (e) => {
  const data = JSON.parse(e.data);
  window.received.push({id: Number(e.lastEventId), to: data.to_status, job: data.job.status});
  document.getElementById("log").textContent += e.lastEventId + " " + data.to_status + "\\n";
});
source.onerror = () => { window.errors.push(source.readyState); };
</script></body></html>
"""
STEP_SECONDS = 30


@contextlib.contextmanager
def page_origin(directory: Path) -> Iterator[str]:
    """A tiny static server on its own loopback port: a distinct browser origin."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def server_on(database: str, port: int, **env: str) -> LoggedServer:
    # A later --port wins in argparse: the same port across a restart.
    server = LoggedServer(database, 1, "--port", str(port), **env)
    server.port, server.url = port, f"http://127.0.0.1:{port}"
    return server


async def eventually(page: Any, expression: str, within: float = STEP_SECONDS) -> Any:
    """Poll a page expression until it is truthy, with a deadline."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await page.evaluate(expression)
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, expression
        await asyncio.sleep(0.1)  # polling the page with a deadline


async def test_a_browser_follows_a_job_live_and_resumes_after_the_server_ends_the_stream(
    chromium: Path,  # noqa: F811 - the fixture
    database: str,
    db: Any,
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright

    (tmp_path / "index.html").write_text(PAGE)
    port = free_port()
    servers: list[LoggedServer] = []
    with page_origin(tmp_path) as allowed, page_origin(tmp_path) as refused:
        env = {"JOBS_CORS_ORIGINS": allowed}
        servers.append(server_on(database, port, **env))
        try:
            await servers[0].wait_ready()
            base = servers[0].url
            async with httpx.AsyncClient(base_url=base, headers=API_HEADERS, timeout=20) as api:
                job = await make_job(api)

                async def stream_url() -> str:
                    r = await api.post("/api/stream-tokens", json={"job_id": job["id"]})
                    assert r.status_code == 201, r.text
                    token = r.json()["token"]
                    return f"{base}/api/jobs/{job['id']}/events/stream?token={token}"

                async with async_playwright() as playwright:
                    browser = await playwright.chromium.launch(
                        executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
                    )
                    try:
                        page = await browser.new_page()
                        url = httpx.URL(
                            f"{allowed}/index.html", params={"stream": await stream_url()}
                        )
                        await page.goto(str(url))
                        await eventually(page, "window.received.length >= 1")  # the history
                        job_id = UUID(job["id"])
                        await jobs.update_job_status(
                            job_id, status=JobStatus.PROVISIONING, attempt=1
                        )
                        await eventually(page, "window.received.length >= 2")  # live

                        # The server ends the stream; a transition while it is down.
                        servers[0].stop()
                        await jobs.update_job_status(
                            job_id, status=JobStatus.FAILED, attempt=1, error="quota"
                        )
                        servers.append(server_on(database, port, **env))
                        await servers[1].wait_ready()
                        # EventSource reconnects by itself, with Last-Event-ID.
                        await eventually(page, "window.received.length >= 3")
                        await jobs.retry_job(job_id)
                        await eventually(page, "window.received.length >= 4")

                        other = await browser.new_page()
                        url = httpx.URL(
                            f"{refused}/index.html", params={"stream": await stream_url()}
                        )
                        await other.goto(str(url))
                        # CORS refused: the browser fails the EventSource for good (CLOSED = 2).
                        await eventually(other, "window.errors.includes(2)")
                        await jobs.update_job_status(
                            job_id, status=JobStatus.PROVISIONING, attempt=2
                        )
                        await eventually(page, "window.received.length >= 5")
                        refused_got = await other.evaluate("window.received")
                        received = await page.evaluate("window.received")
                        opens = await page.evaluate("window.opens")
                        await page.screenshot(path=str(tmp_path / "live.png"))
                    finally:
                        await browser.close()
                history = (await api.get(f"/api/jobs/{job['id']}/events")).json()["items"]
        finally:
            for server in servers:
                server.stop()

    assert [r["id"] for r in received] == [e["id"] for e in history]  # each once, in order
    assert [r["to"] for r in received] == [
        "queued",
        "provisioning",
        "failed",
        "queued",
        "provisioning",
    ]
    assert received[1]["job"] == "provisioning"
    assert opens >= 2  # it did reconnect
    assert refused_got == []
    resumed = servers[1].log_text()
    assert "Traceback" not in resumed, resumed[-3000:]
