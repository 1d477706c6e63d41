"""What is secret, in one list, and how it is hidden: the logs and the traces both
redact through here, so a secret added to the list is hidden from both.

Secrets are of three kinds: the service's own (API token, callback secret, Stripe
secret, the database password, GitHub credentials), credentials that travel in a URL's
query string (`?token=` opens a live stream), and headers that carry credentials.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from jobs_app.core.settings import Settings

REDACTED = "[redacted]"

SECRET_QUERY_PARAMETERS = frozenset({"token", "access_token", "code", "client_secret"})
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
        if "_" in value:
            value = _GITHUB_TOKEN.sub(REDACTED, value)
        if "eyJ" in value:
            value = _JWT.sub(REDACTED, value)
        if " " in value:
            value = _BEARER.sub(rf"\1 {REDACTED}", value)
        return value

    def header(self, name: str, value: str) -> str:
        return REDACTED if name.lower() in SECRET_HEADERS else self.text(value)
