"""Server-Sent Events: a job's or a user's transitions, replayed then live.

`GET /api/jobs/{id}/events/stream` and `GET /api/users/{user_id}/events/stream`. Every
decision that has a status (401, 403, 429, 404, 400) is taken in the handler, before
the response starts; the stream itself is `_EventStream.run`, driven by our own ASGI
response so its end is ours: its place is freed in a `finally` (and, should the
response never be called, when it is garbage-collected), not when a generator that a
cancelled task may never close gets closed.

A stream subscribes to the process's listener, then reads `job_events` after the last
id it sent whenever its subscription wakes (the first wake is the replay, from
`Last-Event-ID` or the start); ids only move forward, so the replay and the live part
neither miss nor repeat an event. It holds at most one batch of rows; a client that
stops reading fills the transport's bounded write buffer, the next send waits, and
after `SSE_SEND_TIMEOUT_SECONDS` the stream is cut off (the client resumes from its
`Last-Event-ID`). Other streams never wait for it: each runs in its own request task,
and the listener only sets events.

Stream tokens (`POST /api/stream-tokens`) let browsers, whose EventSource can't send
headers, open one stream: base64url of (scope, id, expiry, HMAC-SHA256), the key
derived from `JOBS_API_TOKEN`, valid 60 s, checked only when the stream opens. The
`token` query value is redacted from uvicorn's access log.

Shutdown: `live_updates` ends every open stream when the app shuts down and on the
first SIGTERM/SIGINT (chained before uvicorn's handler), so uvicorn's graceful
shutdown does not wait on them; clients reconnect elsewhere with `Last-Event-ID`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import hashlib
import hmac
import logging
import re
import signal
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

import msgspec
from litestar import Controller, Litestar, Request, get, post
from litestar.config.cors import CORSConfig
from litestar.exceptions import (
    NotAuthorizedException,
    PermissionDeniedException,
    ServiceUnavailableException,
    TooManyRequestsException,
)
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.response.base import ASGIResponse
from litestar.status_codes import HTTP_201_CREATED
from litestar.types import Receive, Scope, Send
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from jobs_app import database, errors
from jobs_app.http.auth import require_api_token, settings_of
from jobs_app.http.errors import error_responses
from jobs_app.live import queries
from jobs_app.live.listener import Listener, Subscription
from jobs_app.settings import Settings, SettingsError

__all__ = [
    "TOKEN_TTL_SECONDS",
    "LiveHub",
    "cors_config",
    "install_log_filters",
    "issue_token",
    "live_route_handlers",
    "live_updates",
    "stream_token_key",
    "verify_token",
]

log = logging.getLogger(__name__)

TOKEN_TTL_SECONDS = 60
RETRY_MS = 3000
BATCH = 100
"""Rows read per query: what one stream holds at most."""
RETRY_AFTER_SECONDS = 5

OPEN_STREAMS = Gauge("jobs_sse_open_streams", "Open event streams", multiprocess_mode="livesum")
CUT_OFF = PromCounter(
    "jobs_sse_streams_cut_off_total", "Event streams ended because the client stopped reading"
)


# --------------------------------------------------------------------------- tokens


class StreamScope(StrEnum):
    JOB = "job"
    USER = "user"


_SCOPE_BYTE = {StreamScope.JOB: b"j", StreamScope.USER: b"u"}
_BYTE_SCOPE = {v: k for k, v in _SCOPE_BYTE.items()}
_TOKEN_BYTES = 1 + 16 + 8 + 32


def stream_token_key(api_token: str) -> bytes:
    """The tokens' HMAC key, derived from the API token (every replica has it)."""
    return hmac.new(api_token.encode(), b"jobs_app stream token v1", hashlib.sha256).digest()


def issue_token(key: bytes, scope: StreamScope, ident: UUID, expires: int) -> str:
    """A token for one stream, valid until `expires` (unix seconds). URL-safe, no padding."""
    body = _SCOPE_BYTE[scope] + ident.bytes + expires.to_bytes(8, "big")
    mac = hmac.new(key, body, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode()


def verify_token(key: bytes, token: str, *, now: float | None = None) -> tuple[StreamScope, UUID]:
    """The scope and id a token grants; NotAuthorizedException if forged or expired."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
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


# --------------------------------------------------------------------------- logs

_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&\s\"]*")
_CUT_OFF_HERE: contextvars.ContextVar[bool] = contextvars.ContextVar("sse_cut_off", default=False)


class _RedactStreamTokens(logging.Filter):
    """uvicorn's access log prints the raw query string: hide `token=` values."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_IN_QUERY.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                for a in record.args
            )
        if isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = _TOKEN_IN_QUERY.sub(r"\1[redacted]", record.msg)
        return True


class _QuietCutOff(logging.Filter):
    """A stream cut off for not reading ends without completing its response, which
    uvicorn reports as an error; it was ours, and logged as a warning already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            _CUT_OFF_HERE.get() and "without completing response" in str(record.getMessage())
        )


_REDACT = _RedactStreamTokens()
_QUIET = _QuietCutOff()


def install_log_filters() -> None:
    """Idempotent: logging ignores a filter added twice."""
    logging.getLogger("uvicorn.access").addFilter(_REDACT)
    logging.getLogger("uvicorn.error").addFilter(_QUIET)


# --------------------------------------------------------------------------- streams


class _Slot:
    """A stream's place in the limits; released once, whichever path gets there first."""

    __slots__ = ("__weakref__", "hub", "released", "subscription", "user_id")

    def __init__(self, hub: LiveHub, user_id: UUID, subscription: Subscription) -> None:
        self.hub = hub
        self.user_id = user_id
        self.subscription = subscription
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.hub._release(self)


class LiveHub:
    """The process's open streams, their limits, and the listener feeding them."""

    def __init__(self, settings: Settings, listener: Listener) -> None:
        self.settings = settings
        self.listener = listener
        self.token_key = stream_token_key(settings.api_token)
        self._open: dict[_Slot, _EventStream | None] = {}
        self._per_user: Counter[UUID] = Counter()
        self.closing = False

    @property
    def open_streams(self) -> int:
        return len(self._open)

    def check_capacity(self) -> None:
        if self.closing:
            raise ServiceUnavailableException(
                "shutting down", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
            )
        if len(self._open) >= self.settings.sse_max_streams:
            raise TooManyRequestsException(
                "too many open streams on this server",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )

    def admit(self, user_id: UUID, *, job_id: UUID | None = None) -> _Slot:
        """Take a place (no await between the checks and the taking), or 429."""
        self.check_capacity()
        if self._per_user[user_id] >= self.settings.sse_max_streams_per_user:
            raise TooManyRequestsException(
                "too many open streams for this user",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        if job_id is not None:
            subscription = self.listener.subscribe(job_id=job_id)
        else:
            subscription = self.listener.subscribe(user_id=user_id)
        slot = _Slot(self, user_id, subscription)
        self._open[slot] = None
        self._per_user[user_id] += 1
        OPEN_STREAMS.inc()
        return slot

    def _release(self, slot: _Slot) -> None:
        self._open.pop(slot, None)
        self._per_user[slot.user_id] -= 1
        if self._per_user[slot.user_id] <= 0:
            del self._per_user[slot.user_id]
        self.listener.unsubscribe(slot.subscription)
        OPEN_STREAMS.dec()

    def _running(self, slot: _Slot, stream: _EventStream) -> None:
        if slot in self._open:
            self._open[slot] = stream

    def close_all(self) -> None:
        """End every open stream (shutdown); new ones get 503."""
        self.closing = True
        for stream in list(self._open.values()):
            if stream is not None:
                stream.end()


class _CutOff(Exception):
    """The client took no data for the send timeout."""


class _EventStream:
    """One open stream's loop (see the module docstring)."""

    def __init__(
        self,
        hub: LiveHub,
        slot: _Slot,
        after: int,
        read: Callable[[int, int], Awaitable[list[queries.StreamEvent]]],
    ) -> None:
        self.hub = hub
        self.slot = slot
        self.after = after
        self.read = read
        self.ending = False
        self.gone = False

    def end(self) -> None:
        self.ending = True
        self.slot.subscription.wake.set()

    async def run(self, send: Send, receive: Receive) -> None:
        settings = self.hub.settings
        wake = self.slot.subscription.wake
        self.hub._running(self.slot, self)
        watcher = asyncio.create_task(self._watch_disconnect(receive))
        try:
            last_sent = await self._send(send, f"retry: {RETRY_MS}\n\n".encode())
            while not (self.ending or self.gone):
                if wake.is_set():
                    wake.clear()
                    try:
                        events = await self.read(self.after, BATCH)
                    except errors.DatabaseUnavailableError:
                        log.warning("event stream ended: database unavailable")
                        break
                    for event in events:
                        data = msgspec.json.encode(event)
                        last_sent = await self._send(
                            send, b"id: %d\nevent: transition\ndata: %s\n\n" % (event.id, data)
                        )
                        self.after = event.id
                    if len(events) == BATCH:
                        wake.set()  # more to read
                    continue
                idle = last_sent + settings.sse_ping_seconds - time.monotonic()
                if idle <= 0:
                    last_sent = await self._send(send, b": ping\n\n")
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(idle):
                        await wake.wait()
            if not self.gone:
                await self._send(send, b"", more_body=False)
        except _CutOff:
            CUT_OFF.inc()
            _CUT_OFF_HERE.set(True)
            log.warning(
                "event stream cut off: the client took no data for %ss",
                settings.sse_send_timeout_seconds,
            )
        finally:
            watcher.cancel()

    async def _send(self, send: Send, body: bytes, *, more_body: bool = True) -> float:
        try:
            async with asyncio.timeout(self.hub.settings.sse_send_timeout_seconds):
                await send({"type": "http.response.body", "body": body, "more_body": more_body})
        except TimeoutError:
            raise _CutOff from None
        return time.monotonic()

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                self.slot.subscription.wake.set()
                return


class _EventStreamResponse(ASGIResponse):
    _should_set_content_length = False

    def __init__(self, stream: _EventStream) -> None:
        super().__init__(
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            status_code=200,
        )
        self.stream = stream
        # If this response is never called, its place is still freed.
        weakref.finalize(self, stream.slot.release)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.slot.release()

    async def send_body(self, send: Send, receive: Receive) -> None:
        await self.stream.run(send, receive)


# --------------------------------------------------------------------------- routes

_EVENT_ID = re.compile(r"^[0-9]{1,19}$")
_STREAM_DESCRIPTION = (
    "`text/event-stream`: `retry: 3000`, then one `transition` message per job event (`id:` "
    "the event id, `data:` the event with `job`), replayed after `Last-Event-ID` then live; "
    "`: ping` when idle."
)


def _hub(request: Request[Any, Any, Any]) -> LiveHub:
    hub = getattr(request.app.state, "live", None)
    if hub is None:
        raise ServiceUnavailableException("live updates are not running")
    return hub  # type: ignore[no-any-return]


def _authorize(
    request: Request[Any, Any, Any],
    hub: LiveHub,
    scope: StreamScope,
    ident: UUID,
    token: str | None,
) -> None:
    """The bearer header decides when there is one; else the stream token, for this stream."""
    if "authorization" in request.headers or token is None:
        require_api_token(request, None)  # type: ignore[arg-type]
        return
    granted_scope, granted_id = verify_token(hub.token_key, token)
    if granted_scope != scope or granted_id != ident:
        raise PermissionDeniedException("this stream token is for another stream")


def _last_event_id(header: str | None, query: str | None) -> int | None:
    value = header if header is not None else query
    if value is None or value == "":
        return None
    value = value.strip()
    if not _EVENT_ID.match(value) or int(value) > 2**63 - 1:
        raise errors.BadRequestError("Last-Event-ID must be an event id")
    return int(value)


_Token = Annotated[
    str | None,
    QueryParameter(max_length=200, description="A stream token (browsers); or send the bearer"),
]
_LastEventIdQuery = Annotated[
    str | None,
    QueryParameter(
        max_length=20,
        description="Resume after this event id (for a new EventSource; the header wins)",
    ),
]
_LastEventIdHeader = Annotated[
    str | None,
    HeaderParameter(
        name="Last-Event-ID", required=False, max_length=20, description="Resume after this id"
    ),
]
_STREAM_RESPONSES = {
    200: ResponseSpec(None, description=_STREAM_DESCRIPTION, media_type="text/event-stream"),
    **error_responses(401, 403, 404, 429),
}


@get(
    "/api/jobs/{job_id:uuid}/events/stream",
    tags=["live"],
    security=[{"bearer": []}],
    responses=_STREAM_RESPONSES,
    media_type="text/event-stream",
)
async def job_event_stream(
    request: Request[Any, Any, Any],
    job_id: FromPath[UUID],
    token: _Token = None,
    last_event_id: _LastEventIdQuery = None,
    last_event_id_header: _LastEventIdHeader = None,
) -> ASGIResponse:
    """The job's transitions: its whole history (or after `Last-Event-ID`), then live."""
    hub = _hub(request)
    _authorize(request, hub, StreamScope.JOB, job_id, token)
    hub.check_capacity()
    after = _last_event_id(last_event_id_header, last_event_id)
    user_id = await queries.open_job_stream(job_id, after)
    slot = hub.admit(user_id, job_id=job_id)

    async def read(after: int, limit: int) -> list[queries.StreamEvent]:
        return await queries.job_events_after(job_id, after, limit)

    return _EventStreamResponse(_EventStream(hub, slot, after or 0, read))


@get(
    "/api/users/{user_id:uuid}/events/stream",
    tags=["live"],
    security=[{"bearer": []}],
    responses=_STREAM_RESPONSES,
    media_type="text/event-stream",
)
async def user_event_stream(
    request: Request[Any, Any, Any],
    user_id: FromPath[UUID],
    token: _Token = None,
    last_event_id: _LastEventIdQuery = None,
    last_event_id_header: _LastEventIdHeader = None,
) -> ASGIResponse:
    """Transitions of all the user's jobs from now on (or after `Last-Event-ID`)."""
    hub = _hub(request)
    _authorize(request, hub, StreamScope.USER, user_id, token)
    hub.check_capacity()
    after = await queries.open_user_stream(
        user_id, _last_event_id(last_event_id_header, last_event_id)
    )
    slot = hub.admit(user_id)

    async def read(after: int, limit: int) -> list[queries.StreamEvent]:
        return await queries.user_events_after(user_id, after, limit)

    return _EventStreamResponse(_EventStream(hub, slot, after, read))


class StreamTokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Exactly one of the two: the stream the token opens."""

    user_id: UUID | None = None
    job_id: UUID | None = None


class StreamToken(msgspec.Struct):
    token: str
    expires_at: datetime


class StreamTokenController(Controller):
    path = "/api/stream-tokens"
    tags = ["live"]  # noqa: RUF012
    guards = [require_api_token]  # noqa: RUF012
    security = [{"bearer": []}]  # noqa: RUF012

    @post(status_code=HTTP_201_CREATED, responses=error_responses(401, 404, 413))
    async def create_stream_token(
        self, request: Request[Any, Any, Any], data: JSONBody[StreamTokenRequest]
    ) -> StreamToken:
        """A token (valid 60 s) that opens that one user's or job's stream as `?token=`."""
        if (data.user_id is None) == (data.job_id is None):
            raise errors.BadRequestError("give exactly one of user_id and job_id")
        if data.job_id is not None:
            await queries.open_job_stream(data.job_id, None)
            scope, ident = StreamScope.JOB, data.job_id
        else:
            assert data.user_id is not None
            await queries.open_user_stream(data.user_id, None)
            scope, ident = StreamScope.USER, data.user_id
        expires = int(time.time()) + TOKEN_TTL_SECONDS
        key = stream_token_key(settings_of(request).api_token)
        return StreamToken(
            token=issue_token(key, scope, ident, expires),
            expires_at=datetime.fromtimestamp(expires, UTC),
        )


def live_route_handlers() -> list[Any]:
    return [job_event_stream, user_event_stream, StreamTokenController]


def cors_config(settings: Settings) -> CORSConfig | None:
    """Exactly the configured origins may read streams from a browser; no credentials."""
    if not settings.cors_origins:
        return None
    if "*" in settings.cors_origins:
        raise SettingsError("JOBS_CORS_ORIGINS lists origins; a wildcard is not allowed")
    return CORSConfig(
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET"],
        allow_headers=["Last-Event-ID"],
        allow_credentials=False,
        max_age=600,
    )


# --------------------------------------------------------------------------- lifespan


def _end_streams_on_signal(hub: LiveHub) -> Callable[[], None]:
    """Chain a handler before uvicorn's for SIGTERM/SIGINT that ends every stream, so
    its graceful shutdown doesn't wait for them. Returns the undo."""
    loop = asyncio.get_running_loop()
    restore: list[tuple[int, Any]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: Any, previous: Callable[..., Any] = previous) -> None:
            loop.call_soon_threadsafe(hub.close_all)
            previous(signum, frame)

        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread: nothing to chain to
            continue
        restore.append((sig, previous))

    def undo() -> None:
        for sig, previous in restore:
            with contextlib.suppress(ValueError):
                signal.signal(sig, previous)

    return undo


@contextlib.asynccontextmanager
async def live_updates(app: Litestar, settings: Settings) -> AsyncIterator[LiveHub]:
    """Start the listener and the stream hub (`app.state.live`) for the app's lifetime."""
    listener = Listener(database.database_url(settings))
    hub = LiveHub(settings, listener)
    await listener.start()
    app.state.live = hub
    undo = _end_streams_on_signal(hub)
    try:
        yield hub
    finally:
        undo()
        hub.close_all()
        await listener.stop()
