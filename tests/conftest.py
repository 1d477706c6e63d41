"""Test set-up: a fresh PostgreSQL database per run, migrated the way production is.

The server is DATABASE_URL's (CI: the machine's PostgreSQL) or, without it, the
embedded one. The database is created here, before any jobs_app settings are read,
and dropped at the end. Each test starts from empty tables (TRUNCATE), never a
wrapping transaction, so constraint errors and real commits behave as in production.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from jobs_app.core.settings import load_settings


def with_database(url: str, name: str) -> str:
    """The same server's URL for database `name`: the one place a test builds a URL
    (the embedded server's URL names its socket folder in the query, not the path)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _server_url() -> str:
    settings = load_settings()
    if settings.database_url:
        return settings.database_url
    from jobs_app.db.connector import embedded_database_url

    return embedded_database_url(settings)


SERVER_URL = _server_url()
TEST_DB = f"jobs_app_test_{uuid.uuid4().hex[:10]}"
TEST_DATABASE_URL = with_database(SERVER_URL, TEST_DB)
ADMIN_URL = with_database(SERVER_URL, "postgres")

# Every jobs_app module reads settings from here on.
os.environ["DATABASE_URL"] = TEST_DATABASE_URL
os.environ["JOBS_API_TOKEN"] = "test-api-token"
os.environ["JOBS_CALLBACK_SECRET"] = "test-callback-secret"
os.environ["STRIPE_WEBHOOK_SECRET"] = "whsec_test_secret"
os.environ["DB_POOL_MAX_SIZE"] = "30"

TABLES = (
    "run_cancellations, dispatch_tries, dispatches, job_events, provisioning_jobs, agents, users"
)


async def _create_database() -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{TEST_DB}"')
    finally:
        await conn.close()


async def _drop_database() -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{TEST_DB}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def database() -> AsyncIterator[str]:
    """The migrated test database's URL, with the app's pool open on it."""
    from jobs_app.db import connector as db

    await _create_database()
    try:
        await db.migrate()
        await db.start_pool()
        yield TEST_DATABASE_URL
        await db.close_pool()
    finally:
        await _drop_database()


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection]:
    """A separate raw connection for arranging and asserting, on empty tables."""
    conn = await asyncpg.connect(database)
    await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def user_agent(db: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    """A user with one agent."""
    from jobs_app.services import accounts

    user = await accounts.create_user(f"user-{uuid.uuid4().hex[:8]}@example.com")
    agent = await accounts.create_agent(user.id, "agent")
    return user.id, agent.id


async def gather_outcomes(coros: list) -> list:  # type: ignore[type-arg]
    """Run coroutines concurrently; exceptions come back as values."""
    return await asyncio.gather(*coros, return_exceptions=True)


# --------------------------------------------------------------------------- HTTP


# Ports for the servers tests start: below the kernel's ephemeral range (32768-60999 on
# Linux), so no outgoing connection can take one between the test choosing it and the
# server binding it; each call gets the next one (this process's own block of ports).
_PORTS = itertools.count(20000 + (os.getpid() % 400) * 25)


def free_port() -> int:
    """A loopback port no one listens on, never handed out twice by this process."""
    import socket

    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # something else listens there: take the next one
            return port
    raise AssertionError("unreachable")


@pytest.fixture
async def client(database: str) -> AsyncIterator:  # type: ignore[type-arg]
    """An httpx client on the app in this process and event loop (the pool is the session's)."""
    import httpx

    from jobs_app.http.app import create_app

    app = create_app(run_sweeper=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


API_HEADERS = {"Authorization": "Bearer test-api-token"}
CALLBACK_SECRET = "test-callback-secret"
STRIPE_SECRET = "whsec_test_secret"


# --------------------------------------------------------------------------- server processes


class LoggedServer:
    """A real `jobs-app serve` process on loopback, on the test database, whose output
    (stderr and stdout together) is read on a thread from the start.

    A chatty process (warnings under database faults) never blocks on a full pipe, and
    everything it printed or logged stays available: `server.log_text()`.
    """

    def __init__(
        self, database_url: str, workers: int = 1, *args: str, port: int | None = None, **env: str
    ) -> None:  # `args` go to `serve`, `env` over this process's environment
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "DATABASE_URL": database_url, "DB_POOL_MAX_SIZE": "8", **env}
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        command = [sys.executable, "-m", "jobs_app.cli", "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*command, "--workers", str(workers), *args],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.log_lines: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        for raw in iter(stream.readline, b""):
            self.log_lines.append(raw.decode(errors="replace"))

    def log_text(self) -> str:
        return "".join(self.log_lines)

    def json_lines(self) -> list[dict[str, object]]:
        """Every line of the output as the JSON object it must be (fails on any other)."""
        import json

        parsed = []
        for line in list(self.log_lines):
            if line.strip():
                record = json.loads(line)
                assert isinstance(record, dict), line
                parsed.append(record)
        return parsed

    async def wait_ready(self, within: float = 120.0) -> None:
        import httpx

        deadline = asyncio.get_running_loop().time() + within
        async with httpx.AsyncClient() as client:
            while self.proc.poll() is None:
                try:
                    if (await client.get(f"{self.url}/health", timeout=1)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"server did not become healthy: {self.log_text()[-2000:]}")
                await asyncio.sleep(0.1)  # polling a starting process, not synchronising tests
        self._reader.join(timeout=5)
        raise RuntimeError(f"server exited: {self.log_text()[-2000:]}")

    def stop(self) -> None:
        # Generous bounds (they return as soon as the process is gone and its output
        # read): tests read the whole log afterwards, even on a loaded machine.
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=30)


@pytest.fixture(scope="module")
async def server(request: pytest.FixtureRequest, database: str) -> AsyncIterator[LoggedServer]:
    """One server process for a whole test module (its tests reset the tables), with the
    module's `SERVER_ENV` (a dict, if it has one) over the environment.

    Afterwards the module fails if the app logged an error it did not expect: it logs
    every 500 it answers and every exception it did not handle.
    """
    process = LoggedServer(database, 1, **getattr(request.module, "SERVER_ENV", {}))
    try:
        await process.wait_ready()
        yield process
    finally:
        process.stop()
    assert "unhandled error" not in process.log_text(), process.log_text()[-3000:]
    assert "Traceback" not in process.log_text(), process.log_text()[-3000:]


@pytest.fixture
async def start_logged_server(database: str) -> AsyncIterator:  # type: ignore[type-arg]
    """Factory: `server = await start_logged_server(workers, *serve_args, **env)`."""
    servers: list[LoggedServer] = []

    async def start(workers: int = 1, *args: str, **env: str) -> LoggedServer:
        server = LoggedServer(database, workers, *args, **env)
        servers.append(server)
        await server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


# --------------------------------------------------------------------------- measured figures

FIGURES: dict[str, dict[str, object]] = {}
"""Figures the reliability tests measured, printed at the end of the run (and written
to reliability-figures.json in pytest's base temp directory)."""


def record_figure(name: str, **values: object) -> None:
    FIGURES[name] = values


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    import json

    text = json.dumps(FIGURES, indent=2, sort_keys=True, default=str)
    terminalreporter.section("reliability figures (measured)")
    terminalreporter.write_line(text)
    try:
        base = terminalreporter.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
        (base / "reliability-figures.json").write_text(text)
        terminalreporter.write_line(f"written to {base / 'reliability-figures.json'}")
    except (AttributeError, OSError):
        pass


# --------------------------------------------------------------------------- GitHub stand-in


@pytest.fixture
def start_github_standin() -> Iterator:  # type: ignore[type-arg]
    """Factory: `standin = start_github_standin(**GitHubStandIn kwargs)`, stopped afterwards.

    A real HTTP server on loopback, on its own thread and event loop (tests/github_standin.py).
    """
    from tests.github_standin import GitHubStandIn

    started: list[GitHubStandIn] = []

    def start(**kwargs: object) -> GitHubStandIn:
        standin = GitHubStandIn(**kwargs).start()  # type: ignore[arg-type]
        started.append(standin)
        return standin

    yield start
    for standin in started:
        standin.stop()


@pytest.fixture
def github_standin(start_github_standin):  # type: ignore[no-untyped-def]
    """One GitHub stand-in with the default App, repository and workflow."""
    return start_github_standin()
