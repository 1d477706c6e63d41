"""The one map from errors to HTTP answers. Every error body is an ErrorBody:
`{status_code, detail, extra}`; nothing internal (SQL, secrets, tracebacks) leaks."""

from __future__ import annotations

import traceback
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi import ResponseSpec
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ExceptionHandlersMap

from jobs_app.core import errors
from jobs_app.core.logs import get_logger
from jobs_app.http.schemas import ErrorBody

log = get_logger("jobs_app.http")

STATUS_BY_ERROR: dict[type[errors.DomainError], int] = {
    errors.BadRequestError: 400,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,  # and its subclasses: concurrent provision, stale attempt, ...
    errors.InvalidReferenceError: 422,
    errors.DatabaseUnavailableError: 503,
}

_DESCRIPTIONS = {
    400: "Bad input: the body says what was wrong",
    401: "Missing or invalid credentials or signature",
    403: "The credentials are valid but not for this",
    404: "Not found",
    409: "Conflicts with the job's current state",
    413: "Request body too large",
    422: "Names things that do not belong together",
    429: "Too many open streams; retry after Retry-After seconds",
    503: "Database unavailable; retry later",
}


def error_responses(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the error answers a route can give (always 400 and 503 too)."""
    return {
        code: ResponseSpec(ErrorBody, description=_DESCRIPTIONS[code])
        for code in sorted({*codes, 400, 503})
    }


def _error(status_code: int, detail: str, extra: Any = None, **kw: Any) -> Response[ErrorBody]:
    return Response(
        ErrorBody(status_code=status_code, detail=detail, extra=extra or None),
        status_code=status_code,
        media_type=MediaType.JSON,
        **kw,
    )


def domain_error_handler(_: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    assert isinstance(exc, errors.DomainError)
    status = next((code for cls, code in STATUS_BY_ERROR.items() if isinstance(exc, cls)), 400)
    if status == 503:
        log.warning("database unavailable", error=str(exc.__cause__ or exc))
    else:  # a refusal the client caused; with a job's fields when the route bound them
        log.info("request refused", status=status, error=type(exc).__name__, detail=exc.message)
    return _error(
        status, exc.message, exc.extra, headers={"Retry-After": "1"} if status == 503 else None
    )


def http_exception_handler(_: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, exc.detail, exc.extra, headers=exc.headers)


def _raised_decoding_json(exc: BaseException) -> bool:
    return any(
        frame.name == "decode_json" and "litestar" in frame.filename
        for frame in traceback.extract_tb(exc.__traceback__)
    )


def undecodable_body_handler(
    request: Request[Any, Any, Any], exc: Exception
) -> Response[ErrorBody]:
    """Litestar decodes a JSON body untyped before converting it, and lets through what
    msgspec raises besides DecodeError: RecursionError for nesting deeper than it
    allows, UnicodeDecodeError for invalid UTF-8. Those are bad input (400); the same
    errors raised anywhere else are bugs (500)."""
    if not _raised_decoding_json(exc):
        return unexpected_error_handler(request, exc)
    if isinstance(exc, RecursionError):
        return _error(400, "malformed JSON body: nested too deeply")
    return _error(400, "malformed JSON body: not valid UTF-8")


def unexpected_error_handler(
    request: Request[Any, Any, Any], exc: Exception
) -> Response[ErrorBody]:
    # The route template, not the path: a path can hold ids, never a query string.
    route = request.scope.get("path_template") or "unmatched"
    log.error("unhandled error", method=request.method, route=route, exc_info=exc)
    return _error(HTTP_500_INTERNAL_SERVER_ERROR, "internal server error")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    errors.DomainError: domain_error_handler,
    HTTPException: http_exception_handler,
    RecursionError: undecodable_body_handler,
    UnicodeDecodeError: undecodable_body_handler,
    Exception: unexpected_error_handler,
}
