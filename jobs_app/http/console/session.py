"""Who may use the console: a staff user logged into the Piccolo admin (its session
cookie, the same rules as the admin's own API: an active user with `admin`), and the
admin's CSRF token on every form (piccolo_api's double-submit cookie, sent back as the
form's `csrftoken` field or the `X-CSRFToken` header)."""

from __future__ import annotations

import hmac
import secrets
from datetime import timedelta
from typing import Any

from litestar import Request
from piccolo.apps.user.tables import BaseUser
from piccolo_api.session_auth.tables import SessionsBase

SESSION_COOKIE = "id"
"""piccolo_api's session cookie (SessionsAuthBackend's default, as the admin uses it)."""
CSRF_COOKIE = "csrftoken"
CSRF_FIELD = "csrftoken"
CSRF_HEADER = "x-csrftoken"
INCREASE_EXPIRY = timedelta(minutes=20)
"""As the admin does: a session in use is extended (never past its hard maximum)."""
LOGIN_PATH = "/admin/#/login"


async def staff_username(request: Request[Any, Any, Any]) -> str | None:
    """The logged-in staff user's name, or None (no session, expired, not admin, inactive)."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 200:
        return None
    user_id = await SessionsBase.get_user_id(token, increase_expiry=INCREASE_EXPIRY)
    if not user_id:
        return None
    user = await BaseUser.objects().where(BaseUser.id == user_id).first().run()
    if user is None or not user.admin or not user.active:
        return None
    return str(user.username)


def csrf_token(request: Request[Any, Any, Any]) -> tuple[str, bool]:
    """The CSRF token the page's forms carry, and whether the cookie must be set (the
    admin sets it on its first page; a console opened first sets it itself)."""
    token = request.cookies.get(CSRF_COOKIE)
    if token:
        return token, False
    return secrets.token_hex(32), True


def csrf_ok(request: Request[Any, Any, Any], form_token: str | None) -> bool:
    """The cookie and the form field (or header) carry the same token."""
    cookie = request.cookies.get(CSRF_COOKIE)
    sent = form_token or request.headers.get(CSRF_HEADER)
    return bool(cookie and sent) and hmac.compare_digest(str(cookie), str(sent))
