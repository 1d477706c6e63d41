"""What is secret, in one list, and how it is hidden: the logs (core.logs) and the
traces (core.tracing's span processor) both redact through here, so a secret added to
the list is hidden from both.

Secrets are of three kinds: the service's own (API token, callback secret, Stripe
secret, the database password, GitHub credentials), credentials that travel in a URL's
query string (`?token=` opens a live stream) or its user-info part, and headers that
carry credentials (by name, whatever attribute name a tracing instrumentation files
them under). GitHub tokens, JWTs (the App's), bearer credentials and callback
signatures are recognised by their shape wherever they appear.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from jobs_app.core.settings import Settings

REDACTED = "[redacted]"

SECRET_QUERY_PARAMETERS = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "code",
        "client_secret",
        "password",
        "api_key",
        "signature",
        "jwt",
    }
)
"""Query parameters whose values are credentials (`token`: a live stream's token)."""
SECRET_HEADERS = frozenset(
    {"authorization", "x-signature", "stripe-signature", "cookie", "set-cookie", "x-csrftoken"}
)
"""Request and response headers whose values are credentials."""

_SECRET_NAMES = "|".join(sorted(SECRET_QUERY_PARAMETERS))
_QUERY_SECRET = re.compile(rf"(?P<key>(?:^|[?&;])(?:{_SECRET_NAMES})=)[^&#\s\"']*", re.IGNORECASE)
_GITHUB_TOKEN = re.compile(r"\b(?:ghs|ghp|gho|ghu|ghr|github_pat)_[A-Za-z0-9_]{10,}")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
_BEARER = re.compile(r"\b(Bearer|token)\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
# `X-Signature: t=<unix>,v1=<hex>` (core.signing), wherever its value is quoted.
_SIGNATURE = re.compile(r"(?P<key>\bv1=)[0-9a-fA-F]{16,}")
# scheme://user:password@host: the password part.
_URL_PASSWORD = re.compile(r"(?P<key>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@")
# How tracing instrumentations name captured headers: `http.request.header.x_signature`.
_HEADER_ATTRIBUTE = re.compile(r"^http\.(?:request|response)\.header\.(?P<name>.+)$")


def is_secret_header(name: str) -> bool:
    """Whether a header (any case, `-` or `_`) carries a credential."""
    return name.lower().replace("_", "-") in SECRET_HEADERS


def is_secret_attribute(key: str) -> bool:
    """Whether a span attribute holds a secret header's value, by its key alone."""
    match = _HEADER_ATTRIBUTE.match(key.lower())
    return match is not None and is_secret_header(match["name"])


def service_secrets(settings: Settings) -> list[str]:
    """The values of this service's secrets (those long enough to be recognised)."""
    values = [
        settings.api_token,
        settings.callback_secret,
        settings.stripe_webhook_secret,
        settings.github_token,
        settings.github_app_private_key,
    ]
    if settings.database_url:
        password = urlsplit(settings.database_url).password
        if password:
            values.append(password)
    return [v for v in values if len(v) >= 8]


class Redactor:
    """Hides the service's secrets, secret query values, GitHub tokens and JWTs in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        if "=" in value:
            value = _QUERY_SECRET.sub(rf"\g<key>{REDACTED}", value)
            value = _SIGNATURE.sub(rf"\g<key>{REDACTED}", value)
        if "@" in value:
            value = _URL_PASSWORD.sub(rf"\g<key>{REDACTED}@", value)
        if "_" in value:
            value = _GITHUB_TOKEN.sub(REDACTED, value)
        if "eyJ" in value:
            value = _JWT.sub(REDACTED, value)
        if " " in value:
            value = _BEARER.sub(rf"\1 {REDACTED}", value)
        return value

    def header(self, name: str, value: str) -> str:
        return REDACTED if is_secret_header(name) else self.text(value)

    def attribute(self, key: str, value: Any) -> Any:
        """A span attribute's value, hidden where secret: a secret header's whole value,
        secrets inside any text (a URL under whichever name: `http.url`, `url.query`...)."""
        if is_secret_attribute(key):
            return tuple(REDACTED for _ in value) if isinstance(value, (tuple, list)) else REDACTED
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, (tuple, list)) and any(isinstance(v, str) for v in value):
            return tuple(self.text(v) if isinstance(v, str) else v for v in value)
        return value
