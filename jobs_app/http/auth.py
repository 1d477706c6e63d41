"""Who may call what: a bearer token for the dashboard API, an HMAC signature over the
raw body for the workflow's callbacks (checked by `jobs_app.core.signing`, wrapped here
as a guard). Secrets are compared in constant time and never echoed.

Guards are `async def`: Litestar runs a plain `def` guard in a thread pool, a thread hop
on every request.
"""

from __future__ import annotations

import hmac
from typing import Any, cast

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler

from jobs_app.core import signing
from jobs_app.core.settings import Settings


def settings_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Settings:
    return cast(Settings, connection.app.state.settings)


async def require_api_token(
    connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler | None = None
) -> None:
    """Guard: `Authorization: Bearer $JOBS_API_TOKEN`."""
    expected = settings_of(connection).api_token.encode()
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise NotAuthorizedException(
            "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
        )


def verify_signature(
    secret: str, header: str, body: bytes, *, tolerance: int, now: float | None = None
) -> None:
    """`jobs_app.core.signing.verify`, its refusal a 401."""
    try:
        signing.verify(secret, header, body, tolerance=tolerance, now=now)
    except signing.SignatureError as exc:
        raise NotAuthorizedException(str(exc)) from None


async def require_signature(
    connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler
) -> None:
    """Guard for workflow callbacks: verify the raw body before anything parses it."""
    settings = settings_of(connection)
    # Guards of HTTP routes receive the Request; its body is cached for the handler.
    body = await cast(Request[Any, Any, Any], connection).body()
    verify_signature(
        settings.callback_secret,
        connection.headers.get(signing.SIGNATURE_HEADER, ""),
        body,
        tolerance=settings.signature_tolerance_seconds,
    )
