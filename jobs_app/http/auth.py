"""Who may call what: a bearer token for the dashboard API, an HMAC signature over
the raw body for the workflow's callbacks. Secrets are compared in constant time
and never echoed."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any, cast

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler

from jobs_app.settings import Settings

SIGNATURE_HEADER = "X-Signature"


def settings_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Settings:
    return cast(Settings, connection.app.state.settings)


def require_api_token(
    connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler
) -> None:
    """Guard: `Authorization: Bearer $JOBS_API_TOKEN`."""
    expected = settings_of(connection).api_token.encode()
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise NotAuthorizedException(
            "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
        )


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The X-Signature value for `body`: what the workflow sends (and tests use)."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify_signature(
    secret: str, header: str, body: bytes, *, tolerance: int, now: float | None = None
) -> None:
    """Check `t=<unix seconds>,v1=<hex>`: HMAC-SHA256 of f"{t}.{body}" (Stripe's scheme).

    Raises NotAuthorizedException for a missing, malformed, wrong or out-of-tolerance
    signature, without saying which secret or digest was expected.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t" and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise NotAuthorizedException(f"missing or malformed {SIGNATURE_HEADER} header")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise NotAuthorizedException("signature timestamp outside the tolerance window")
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    # Compare against every v1 given (key rotation), each in constant time.
    if not any(hmac.compare_digest(expected.encode(), c.encode()) for c in candidates):
        raise NotAuthorizedException("invalid signature")


async def require_signature(
    connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler
) -> None:
    """Guard for workflow callbacks: verify the raw body before anything parses it."""
    settings = settings_of(connection)
    # Guards of HTTP routes receive the Request; its body is cached for the handler.
    body = await cast(Request[Any, Any, Any], connection).body()
    verify_signature(
        settings.callback_secret,
        connection.headers.get(SIGNATURE_HEADER, ""),
        body,
        tolerance=settings.signature_tolerance_seconds,
    )
