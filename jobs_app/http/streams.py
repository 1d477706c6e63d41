"""Live-update routes: a job's or a user's events as Server-Sent Events, and the stream
tokens browsers open them with. The stream itself is `http.live.sse`, its place and
limits `http.live.hub`, the tokens `http.live.tokens`."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

import msgspec
from litestar import Controller, Request, get, post
from litestar.config.cors import CORSConfig
from litestar.exceptions import PermissionDeniedException, ServiceUnavailableException
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.response.base import ASGIResponse
from litestar.status_codes import HTTP_201_CREATED

from jobs_app.core import errors
from jobs_app.core.settings import Settings, SettingsError
from jobs_app.http.auth import require_api_token, settings_of
from jobs_app.http.errors import error_responses
from jobs_app.http.live.hub import LiveHub
from jobs_app.http.live.sse import EventStream, EventStreamResponse
from jobs_app.http.live.tokens import StreamScope, issue_token_for, verify_token
from jobs_app.services import live

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


async def _authorize(
    request: Request[Any, Any, Any],
    hub: LiveHub,
    scope: StreamScope,
    ident: UUID,
    token: str | None,
) -> None:
    """The bearer header decides when there is one; else the stream token, for this stream."""
    if "authorization" in request.headers or token is None:
        await require_api_token(request)
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
    await _authorize(request, hub, StreamScope.JOB, job_id, token)
    hub.check_capacity()
    after = _last_event_id(last_event_id_header, last_event_id)
    user_id = await live.open_job_stream(job_id, after)
    slot = hub.admit(user_id, job_id=job_id)

    async def read(after: int, limit: int) -> list[live.StreamEvent]:
        return await live.job_events_after(job_id, after, limit)

    return EventStreamResponse(EventStream(hub, slot, after or 0, read))


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
    await _authorize(request, hub, StreamScope.USER, user_id, token)
    hub.check_capacity()
    after = await live.open_user_stream(
        user_id, _last_event_id(last_event_id_header, last_event_id)
    )
    slot = hub.admit(user_id)

    async def read(after: int, limit: int) -> list[live.StreamEvent]:
        return await live.user_events_after(user_id, after, limit)

    return EventStreamResponse(EventStream(hub, slot, after, read))


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
            await live.open_job_stream(data.job_id, None)
            scope, ident = StreamScope.JOB, data.job_id
        else:
            assert data.user_id is not None
            await live.open_user_stream(data.user_id, None)
            scope, ident = StreamScope.USER, data.user_id
        token, expires = issue_token_for(settings_of(request).api_token, scope, ident)
        return StreamToken(token=token, expires_at=datetime.fromtimestamp(expires, UTC))


STREAM_ROUTES: list[Any] = [job_event_stream, user_event_stream, StreamTokenController]


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
