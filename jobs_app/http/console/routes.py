"""The console's routes: search, a job's page, its actions, and the stream token its page
reconnects with. Every route needs a staff session (`_require_staff`, run before the
route's parameters are even read); every answer is HTML but the token's JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

from litestar import Request, Response, Router, get, post
from litestar.datastructures import Cookie
from litestar.enums import MediaType, RequestEncodingType
from litestar.exceptions import HTTPException
from litestar.params import Body, FromPath, FromQuery
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.status_codes import (
    HTTP_303_SEE_OTHER,
    HTTP_400_BAD_REQUEST,
    HTTP_403_FORBIDDEN,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_500_INTERNAL_SERVER_ERROR,
)
from litestar.template.config import TemplateConfig

from jobs_app.core import errors
from jobs_app.core.lifecycle import ACTIVE_STATUSES, RETRY_SOURCES
from jobs_app.core.logs import get_logger
from jobs_app.http.admin import (
    OperatorRefused,
    fail_as_operator,
    reason_given,
    retry_as_operator,
)
from jobs_app.http.auth import settings_of
from jobs_app.http.console import view
from jobs_app.http.console.session import (
    CSRF_COOKIE,
    CSRF_FIELD,
    LOGIN_PATH,
    csrf_ok,
    csrf_token,
    staff_username,
)
from jobs_app.http.errors import STATUS_BY_ERROR
from jobs_app.http.live.tokens import StreamScope, issue_token_for
from jobs_app.services import console, live

log = get_logger("jobs_app.console")

CONSOLE_PATH = "/admin/console"
TEMPLATES = Path(__file__).parent / "templates"
QUERY_MAX = 320
"""The longest query the box takes (an email's limit)."""
REASON_MAX = 1000
"""The longest reason (as the admin's forms)."""
PAGE_HEADERS = {
    # Customer data: never kept by a cache. Never framed (the action forms can't be
    # clickjacked).
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
}


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(
        directory=TEMPLATES, engine=JinjaTemplateEngine, engine_callback=view.register
    )


class PageError(HTTPException):
    """An HTML error page (404 for a missing job or a malformed id, 400 for bad input)."""


async def _require_staff(request: Request[Any, Any, Any]) -> Redirect | None:
    """Before every route: a staff session, or off to the admin's login."""
    username = await staff_username(request)
    if username is None:
        return Redirect(LOGIN_PATH, status_code=HTTP_303_SEE_OTHER)
    request.state.operator = username
    return None


def _error_page(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Every error of the console as an HTML page (never the API's JSON)."""
    if isinstance(exc, errors.DomainError):
        status = next((code for cls, code in STATUS_BY_ERROR.items() if isinstance(exc, cls)), 400)
        message = exc.message
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, exc.detail
    else:
        status, message = HTTP_500_INTERNAL_SERVER_ERROR, ""
    if status >= 500:
        log.error("console error", exc_info=exc)
        message = "Something went wrong on our side."
    return Template(
        "error.html",
        context={
            "status": status,
            "message": message or "That request can't be answered.",
            "operator": _operator_or_none(request),
            "base": CONSOLE_PATH,
        },
        status_code=status,
        media_type=MediaType.HTML,
        headers=PAGE_HEADERS,
    )


def _operator_or_none(request: Request[Any, Any, Any]) -> str | None:
    return getattr(request.state, "operator", None)


def _page(
    request: Request[Any, Any, Any], name: str, context: dict[str, Any], status: int = 200
) -> Template:
    token, new = csrf_token(request)
    cookies = [Cookie(key=CSRF_COOKIE, value=token, path="/", samesite="lax")] if new else []
    return Template(
        name,
        context={
            **context,
            "operator": request.state.operator,
            "csrf_token": token,
            "csrf_field": CSRF_FIELD,
            "base": CONSOLE_PATH,
        },
        status_code=status,
        cookies=cookies,
        media_type=MediaType.HTML,
        headers=PAGE_HEADERS,
    )


def _job_id(raw: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise PageError(status_code=HTTP_404_NOT_FOUND, detail="No such job.") from None


# --------------------------------------------------------------------------- search


@get("/", name="console:search")
async def search_page(request: Request[Any, Any, Any], q: FromQuery[str | None] = None) -> Any:
    """Find jobs; one found → its page; no query → the jobs needing attention."""
    query = (q or "").strip()
    if "\x00" in query:
        raise PageError(status_code=HTTP_400_BAD_REQUEST, detail="A query has no NUL character.")
    if len(query) > QUERY_MAX:
        raise PageError(
            status_code=HTTP_400_BAD_REQUEST,
            detail=f"A query is at most {QUERY_MAX} characters.",
        )
    if not query:
        return _page(
            request,
            "search.html",
            {"query": "", "attention": await console.attention(), "now": datetime.now(UTC)},
        )
    found = await console.search(query)
    if len(found) == 1:
        return Redirect(f"{CONSOLE_PATH}/jobs/{found[0].job.id}", status_code=HTTP_303_SEE_OTHER)
    return _page(
        request,
        "search.html",
        {
            "query": query,
            "found": found,
            "limit": console.SEARCH_LIMIT,
            "now": datetime.now(UTC),
        },
    )


# --------------------------------------------------------------------------- a job's page


async def _job_page(
    request: Request[Any, Any, Any],
    job_id: UUID,
    *,
    status: int = 200,
    notice: str | None = None,
    problem: str | None = None,
    reason: str = "",
) -> Template:
    page = await console.job_page(job_id)
    if page is None:
        raise PageError(status_code=HTTP_404_NOT_FOUND, detail="No such job.")
    token, expires = issue_token_for(settings_of(request).api_token, StreamScope.JOB, job_id)
    job = page.job
    live = {
        "job_id": str(job.id),
        "stream_url": f"/api/jobs/{job.id}/events/stream",
        "token": token,
        "token_expires": expires,
        "token_url": f"{CONSOLE_PATH}/jobs/{job.id}/stream-token",
        "last_event_id": page.last_event_id,
        "in_flight": list(ACTIVE_STATUSES),
        "retry_from": list(RETRY_SOURCES),
    }
    return _page(
        request,
        "job.html",
        {
            "page": page,
            "job": job,
            "now": page.now,
            "live": live,
            "can_retry": job.status in RETRY_SOURCES,
            "can_fail": job.status in ACTIVE_STATUSES,
            "notice": notice,
            "problem": problem,
            "reason": reason,
            "retries_left": max(0, job.max_retries - job.retry_count),
        },
        status,
    )


_DONE = {"retried": "Retried: the job is queued again.", "failed": "Failed: recorded."}


@get("/jobs/{job_id:str}", name="console:job")
async def job_page(
    request: Request[Any, Any, Any], job_id: FromPath[str], done: FromQuery[str | None] = None
) -> Any:
    return await _job_page(request, _job_id(job_id), notice=_DONE.get(done or ""))


@get("/jobs/{job_id:str}/stream-token", name="console:stream-token")
async def stream_token(request: Request[Any, Any, Any], job_id: FromPath[str]) -> dict[str, Any]:
    """A fresh stream token for the job's page to reconnect with (tokens live 60 s)."""
    ident = _job_id(job_id)
    await live.open_job_stream(ident, None)  # NotFoundError (a 404 page) for no such job
    token, expires = issue_token_for(settings_of(request).api_token, StreamScope.JOB, ident)
    return {"token": token, "expires_at": datetime.fromtimestamp(expires, UTC).isoformat()}


# --------------------------------------------------------------------------- actions

_Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]


async def _act(
    request: Request[Any, Any, Any], job_id: str, data: dict[str, str], action: str
) -> Any:
    ident = _job_id(job_id)
    if not csrf_ok(request, data.get(CSRF_FIELD)):
        raise PageError(
            status_code=HTTP_403_FORBIDDEN,
            detail="The form's CSRF token is missing or wrong: reload the page and try again.",
        )
    raw_reason = data.get("reason", "")
    try:
        reason = reason_given(raw_reason)
        if "\x00" in reason:
            raise ValueError("A reason has no NUL character.")
        if len(reason) > REASON_MAX:
            raise ValueError(f"A reason is at most {REASON_MAX} characters.")
    except ValueError as exc:
        return await _job_page(
            request, ident, status=HTTP_400_BAD_REQUEST, problem=str(exc), reason=raw_reason
        )
    actor = f"operator:{request.state.operator}"
    try:
        if action == "retry":
            await retry_as_operator(
                actor, ident, reason, grant_extra_attempt=data.get("grant_extra_attempt") == "on"
            )
        else:
            await fail_as_operator(actor, ident, reason)
    except OperatorRefused as exc:
        return await _job_page(
            request, ident, status=HTTP_409_CONFLICT, problem=str(exc), reason=raw_reason
        )
    done = "retried" if action == "retry" else "failed"
    return Redirect(f"{CONSOLE_PATH}/jobs/{ident}?done={done}", status_code=HTTP_303_SEE_OTHER)


@post("/jobs/{job_id:str}/retry", name="console:retry")
async def retry(request: Request[Any, Any, Any], job_id: FromPath[str], data: _Form) -> Any:
    """Retry a failed job as the logged-in staff user, with their reason."""
    return await _act(request, job_id, data, "retry")


@post("/jobs/{job_id:str}/fail", name="console:fail")
async def fail(request: Request[Any, Any, Any], job_id: FromPath[str], data: _Form) -> Any:
    """Fail a job in flight as the logged-in staff user, with their reason."""
    return await _act(request, job_id, data, "fail")


def console_router() -> Router:
    return Router(
        path=CONSOLE_PATH,
        route_handlers=[search_page, job_page, stream_token, retry, fail],
        before_request=_require_staff,
        # By class, each: the app's own map (JSON) would otherwise answer for HTTPException
        # and the domain errors, found first in an exception's MRO.
        exception_handlers={
            HTTPException: _error_page,
            errors.DomainError: _error_page,
            Exception: _error_page,
        },
        include_in_schema=False,
    )
