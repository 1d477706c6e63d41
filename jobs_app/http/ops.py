"""Operations: health and metrics, open to the monitoring system."""

from __future__ import annotations

import msgspec
from litestar import MediaType, Response, get
from litestar.datastructures import State
from litestar.openapi import ResponseSpec

from jobs_app.core import metrics
from jobs_app.db import connector
from jobs_app.loops.dispatcher import DispatcherHealth


class Health(msgspec.Struct, omit_defaults=True):
    status: str
    database: str
    dispatcher: DispatcherHealth | None = None
    """This process's dispatcher: `paused` (misconfigured or rate limited) is said here
    while the answer stays 200, since the API itself works."""


@get(
    "/health",
    tags=["operations"],
    responses={503: ResponseSpec(Health, description="PostgreSQL is unreachable")},
)
async def health(state: State) -> Response[Health]:
    """200 when PostgreSQL answers, 503 when it does not; and the dispatcher's state."""
    dispatcher = state.get("dispatcher")
    dispatching = None if dispatcher is None else dispatcher.health()
    if await connector.ping():
        return Response(Health(status="ok", database="up", dispatcher=dispatching))
    return Response(
        Health(status="unavailable", database="down", dispatcher=dispatching), status_code=503
    )


@get("/metrics", tags=["operations"], media_type=MediaType.TEXT)
async def prometheus_metrics() -> Response[bytes]:
    """Prometheus exposition text, summed over all workers."""
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE_LATEST)
