"""Stream tokens: what lets a browser, whose EventSource can't send headers, open one
stream (`?token=`).

A token is base64url of (scope, id, expiry, HMAC-SHA256 of those), the key derived from
`JOBS_API_TOKEN` (every replica has it), valid for TOKEN_TTL_SECONDS and checked only
when the stream opens.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from enum import StrEnum
from uuid import UUID

from litestar.exceptions import NotAuthorizedException

from jobs_app.core.signing import b64url_decode, b64url_encode

TOKEN_TTL_SECONDS = 60


class StreamScope(StrEnum):
    JOB = "job"
    USER = "user"


_SCOPE_BYTE = {StreamScope.JOB: b"j", StreamScope.USER: b"u"}
_BYTE_SCOPE = {v: k for k, v in _SCOPE_BYTE.items()}
_TOKEN_BYTES = 1 + 16 + 8 + 32


def stream_token_key(api_token: str) -> bytes:
    """The tokens' HMAC key, derived from the API token."""
    return hmac.new(api_token.encode(), b"jobs_app stream token v1", hashlib.sha256).digest()


def issue_token(key: bytes, scope: StreamScope, ident: UUID, expires: int) -> str:
    """A token for one stream, valid until `expires` (unix seconds). URL-safe, no padding."""
    body = _SCOPE_BYTE[scope] + ident.bytes + expires.to_bytes(8, "big")
    return b64url_encode(body + hmac.new(key, body, hashlib.sha256).digest())


def issue_token_for(api_token: str, scope: StreamScope, ident: UUID) -> tuple[str, int]:
    """A fresh token for one stream, and when it expires (unix seconds)."""
    expires = int(time.time()) + TOKEN_TTL_SECONDS
    return issue_token(stream_token_key(api_token), scope, ident, expires), expires


def verify_token(key: bytes, token: str, *, now: float | None = None) -> tuple[StreamScope, UUID]:
    """The scope and id a token grants; NotAuthorizedException if forged or expired."""
    try:
        raw = b64url_decode(token)
    except ValueError:
        raw = b""
    body, mac = raw[:-32], raw[-32:]
    expected = hmac.new(key, body, hashlib.sha256).digest()
    if len(raw) != _TOKEN_BYTES or not hmac.compare_digest(mac, expected):
        raise NotAuthorizedException("invalid stream token")
    if int.from_bytes(body[17:25], "big") < (time.time() if now is None else now):
        raise NotAuthorizedException("stream token expired")
    scope = _BYTE_SCOPE.get(body[:1])
    if scope is None:
        raise NotAuthorizedException("invalid stream token")
    return scope, UUID(bytes=body[1:17])
