"""What wraps every request: a request id and one access line (the outermost ASGI
wrapper), the Prometheus request metrics, and the OpenTelemetry request span.

`RequestContextMiddleware` wraps Litestar's whole handler (exception handling, routing,
the OpenTelemetry middleware), so it sees every request, 404s included, which app
middleware doesn't. The access line names the route template, never the raw path or
query string (stream tokens travel as `?token=`), and no header at all; uvicorn's own
access log (off under `jobs-app serve`) gets its query secrets redacted too.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import structlog

from jobs_app.core import metrics, tracing
from jobs_app.core.redaction import Redactor

if TYPE_CHECKING:
    from litestar.plugins import InitPlugin

access_log = structlog.get_logger("jobs_app.access")

REQUEST_ID_HEADER = b"x-request-id"
# What a proxy's id may look like to be trusted as ours: bounded, no spaces, no
# characters that could forge log structure or headers.
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The proxy's X-Request-ID if it is a safe token, otherwise a new one."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _VALID_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Binds `request_id` for every line logged while serving the request, returns it
    in X-Request-ID, and (when `access_log`) logs one line per request:
    method, route template, status, duration."""

    def __init__(self, app: Any, *, access_log: bool) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers") or [])
        started = time.perf_counter()
        status = 500  # no response started: the server answers 500 for us
        trace_ids: dict[str, str] = {}

        async def send_with_id(message: Any) -> None:
            nonlocal status, trace_ids
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *[(k, v) for k, v in message.get("headers") or [] if k != REQUEST_ID_HEADER],
                    (REQUEST_ID_HEADER, request_id.encode("ascii")),
                ]
                trace_ids = tracing.current_trace_ids()  # the request's span is current here
            await send(message)

        # Each request gets a clean structlog context: what handlers bind (a job's
        # fields) ends with the request, even where the caller shares our context
        # (httpx's in-process ASGITransport).
        outer = structlog.contextvars.get_contextvars()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access_log:
                route = scope.get("path_template") or "unmatched"
                access_log.info(
                    f"{scope['method']} {route} {status}",
                    method=scope["method"],
                    route=route,
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3),
                    **trace_ids,
                )
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(**outer)


class MetricsMiddleware:
    """Counts each answered request by route template and status, and times it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("path_template") or "unmatched"
            metrics.REQUESTS.labels(scope["method"], route, str(status)).inc()
            metrics.LATENCY.labels(route).observe(time.perf_counter() - started)


# --------------------------------------------------------------------------- traces


def tracing_plugin() -> InitPlugin | None:
    """Litestar's OpenTelemetry plugin on the configured provider, or None when off."""
    provider = tracing.provider()
    if provider is None:
        return None
    from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin

    # No spans for each ASGI receive/send message: a request is one span, its statements
    # and calls its children.
    return OpenTelemetryPlugin(
        OpenTelemetryConfig(tracer_provider=provider, exclude_spans=["receive", "send"])
    )


class RouteSpanNameMiddleware:
    """Names the request's span by its route template (`POST /api/jobs/{job_id}/retry`),
    not its path: the OpenTelemetry middleware starts the span before routing, so it
    only knows the path, whose ids would make every span name unique."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        template = scope.get("path_template")
        if template and scope["type"] == "http":
            tracing.name_current_span(f"{scope['method']} {template}", template)
        await self.app(scope, receive, send)


def tracing_middleware() -> list[Any]:
    """App middleware that goes with the plugin (empty when tracing is off)."""
    return [RouteSpanNameMiddleware] if tracing.provider() is not None else []


# --------------------------------------------------------------------------- uvicorn's log


class _RedactQuery(logging.Filter):
    """uvicorn's access log prints the raw query string: hide its secrets (`token=`)."""

    _redactor = Redactor()

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._redactor.text(a) if isinstance(a, str) else a for a in record.args
            )
        if isinstance(record.msg, str):
            record.msg = self._redactor.text(record.msg)
        return True


REDACT_QUERY = _RedactQuery()
"""uvicorn.access's filter (the app factory installs it)."""
