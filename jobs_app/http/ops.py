"""Operations: health and metrics, open to the monitoring system."""

from __future__ import annotations

import msgspec
from litestar import MediaType, Response, get
from litestar.openapi import ResponseSpec

from jobs_app import database, metrics


class Health(msgspec.Struct):
    status: str
    database: str


@get(
    "/health",
    tags=["operations"],
    responses={503: ResponseSpec(Health, description="PostgreSQL is unreachable")},
)
async def health() -> Response[Health]:
    """200 when PostgreSQL answers, 503 when it does not."""
    if await database.ping():
        return Response(Health(status="ok", database="up"))
    return Response(Health(status="unavailable", database="down"), status_code=503)


@get("/metrics", tags=["operations"], media_type=MediaType.TEXT)
async def prometheus_metrics() -> Response[bytes]:
    """Prometheus exposition text, summed over all workers."""
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE_LATEST)
