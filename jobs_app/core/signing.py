"""HMAC signatures and the base64url codec, with no web dependency.

The workflow's callbacks are signed as Stripe signs its webhooks:
`X-Signature: t=<unix seconds>,v1=<hex>`, the hex being HMAC-SHA256 with the shared
secret over `f"{t}.{raw_body}"`. `sign` is what the workflow's client sends (it runs on
a CI runner: this module must stay importable with nothing but the standard library);
`verify` is what the service checks, wrapped by the HTTP layer's guard.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Signature"


class SignatureError(Exception):
    """A signature that is missing, malformed, wrong or outside the tolerance window.
    The message never says which secret or digest was expected."""


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The X-Signature value for `body` at `timestamp` (now by default)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, t, body)}"


def verify(
    secret: str, header: str, body: bytes, *, tolerance: int, now: float | None = None
) -> None:
    """Check `t=<unix seconds>,v1=<hex>` over `body`; SignatureError when it fails.

    Every `v1` given is compared (key rotation), each in constant time.
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
        raise SignatureError(f"missing or malformed {SIGNATURE_HEADER} header")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureError("signature timestamp outside the tolerance window")
    expected = _digest(secret, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, c.encode()) for c in candidates):
        raise SignatureError("invalid signature")


def b64url_encode(raw: bytes) -> str:
    """URL-safe base64 without padding (cursors, stream tokens)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """The inverse of `b64url_encode`; ValueError for anything it could not have made."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
