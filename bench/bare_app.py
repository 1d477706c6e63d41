"""The HTTP baseline: a bare Litestar app running the service's own statements.

No guards, no signature check, no metrics middleware, no domain errors: a route
decodes its input, sends the statement `jobs_app.services.jobs` sends, and answers. Served
by the same server as `jobs-app serve` (uvicorn, uvloop, httptools, 2 workers).

    DATABASE_URL=... uvicorn bench.bare_app:app --workers 2 --loop uvloop --http httptools
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
from litestar import Litestar, get, post
from litestar.exceptions import NotFoundException

from jobs_app.core.settings import load_settings
from jobs_app.db import connector
from jobs_app.services import jobs

_settings = load_settings()
_pool: asyncpg.Pool | None = None
_TIMEOUTS = {
    "timeout": _settings.job_timeout_seconds,
    "deadline": _settings.job_deadline_seconds,
    "queue_timeout": _settings.queue_timeout_seconds,
}


async def _no_reset(conn: asyncpg.Connection) -> None:
    pass


@asynccontextmanager
async def _lifespan(_: Litestar) -> AsyncIterator[None]:
    global _pool
    _pool = await asyncpg.create_pool(
        os.environ["DATABASE_URL"],
        min_size=_settings.pool_min_size,
        max_size=_settings.pool_max_size,
        reset=_no_reset,
        server_settings=connector.PLANNING,
    )
    try:
        yield
    finally:
        await _pool.close()


class Heartbeat(msgspec.Struct):
    attempt: int


@post("/api/callbacks/jobs/{job_id:uuid}/heartbeat", status_code=204)
async def heartbeat(job_id: UUID, data: Heartbeat) -> None:
    assert _pool is not None
    statement = jobs.HEARTBEAT  # the service's statement for one heartbeat alone
    one = {"job_id": job_id, "attempt": data.attempt, "dispatch_id": None, "workflow_run_id": None}
    await _pool.fetchrow(statement.sql, *statement.args(one))


@get("/api/jobs/{job_id:uuid}")
async def get_job(job_id: UUID) -> dict[str, Any]:
    assert _pool is not None
    statement = jobs.GET_JOB_CHECKED
    # No ETA medians read: the service reads them only every JOBS_ETA_REFRESH_SECONDS
    # (it answers from its process's copy).
    values = {"job_id": job_id, **_TIMEOUTS}
    row = await _pool.fetchrow(statement.sql, *statement.args(values))
    if row is None:
        raise NotFoundException()
    return dict(row)


@get("/ping")
async def ping() -> str:
    return "pong"


app = Litestar([heartbeat, get_job, ping], lifespan=[_lifespan], debug=False)
