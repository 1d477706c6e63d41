"""Request and response bodies. Unknown fields are refused; every string is bounded
and may not contain NUL (PostgreSQL text can't hold it), so bad input is a 400
before anything touches the database."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

import msgspec
from msgspec import Meta

from jobs_app.core.lifecycle import JobStatus, StepState
from jobs_app.core.models import (
    Agent,
    Dispatch,
    HistoryEvent,
    Job,
    JobEvent,
    JobPage,
    StepEvent,
    User,
)

__all__ = [
    "Agent",
    "CreateAgent",
    "CreateJob",
    "CreateUser",
    "Dispatch",
    "DispatchList",
    "ErrorBody",
    "EventList",
    "Heartbeat",
    "Job",
    "JobEvent",
    "JobPage",
    "StatusCallback",
    "StepCallback",
    "StepEvent",
    "User",
    "WebhookResult",
]

_NO_NUL = r"^[^\x00]*$"


def _text(max_length: int, *, min_length: int = 1, pattern: str = _NO_NUL) -> Meta:
    return Meta(min_length=min_length, max_length=max_length, pattern=pattern)


Email = Annotated[str, _text(320, min_length=3, pattern=r"^[^\x00\s@]+@[^\x00\s@]+$")]
Name = Annotated[str, _text(200)]
StripeEventId = Annotated[str, _text(255)]
Region = Annotated[str, _text(64, pattern=r"^[a-z0-9][a-z0-9-]*$")]
RunId = Annotated[str, _text(255)]
Message = Annotated[str, _text(10_000)]
Step = Annotated[str, _text(255)]
StepName = Annotated[str, Meta(min_length=1, max_length=40, pattern=r"^[a-z0-9_]+$")]
Detail = Annotated[str, _text(500, min_length=0)]
Attempt = Annotated[int, Meta(ge=1, le=1_000_000)]


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    """Base for request bodies: a misspelt field is an error, not silently ignored."""


class CreateUser(_Body):
    email: Email


class CreateAgent(_Body):
    user_id: UUID
    name: Name


class CreateJob(_Body):
    agent_id: UUID
    user_id: UUID
    stripe_event_id: StripeEventId
    region: Region = "us-east"


class StatusCallback(_Body):
    attempt: Attempt
    status: JobStatus
    dispatch_id: UUID | None = None
    """The dispatch that started this run: fences the attempt to one run."""
    workflow_run_id: RunId | None = None
    error: Message | None = None
    failed_step: Step | None = None


class StepCallback(_Body):
    """A step of the plan reported by the workflow running this attempt."""

    attempt: Attempt
    step: StepName
    state: StepState
    dispatch_id: UUID | None = None
    workflow_run_id: RunId | None = None
    detail: Detail | None = None
    """What happened, for support (at most 500 characters)."""


class Heartbeat(_Body):
    attempt: Attempt
    dispatch_id: UUID | None = None
    workflow_run_id: RunId | None = None


class EventList(msgspec.Struct):
    items: list[HistoryEvent]
    """Both kinds, oldest first: `kind` is `transition` or `step`."""


class DispatchList(msgspec.Struct):
    items: list[Dispatch]


class WebhookResult(msgspec.Struct):
    received: bool
    job_id: UUID | None = None
    created: bool | None = None
    ignored: bool = False


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """Every error answer: the status code, what was wrong, and details when there are some."""

    status_code: int
    detail: str
    extra: dict[str, Any] | list[Any] | None = None
