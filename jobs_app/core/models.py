"""The records the service layer returns. msgspec Structs, so the HTTP layer
encodes them as they are (snake_case, ISO 8601 UTC timestamps)."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import msgspec

from jobs_app.core.lifecycle import DispatchState, FailureReason, JobStatus


class Job(msgspec.Struct, kw_only=False):
    id: UUID
    agent_id: UUID
    user_id: UUID
    stripe_event_id: str | None
    status: JobStatus
    region: str
    workflow_run_id: str | None
    attempt: int
    retry_count: int
    max_retries: int
    error: str | None
    failed_step: str | None
    failure_reason: FailureReason | None
    claimed_at: datetime | None
    last_heartbeat_at: datetime | None
    completed_at: datetime | None
    created_at: datetime
    updated_at: datetime
    dispatch_id: UUID | None
    """The dispatch this attempt is bound to (set by its first callback that names one)."""


class JobEvent(msgspec.Struct):
    id: int
    job_id: UUID
    from_status: JobStatus | None
    to_status: JobStatus
    attempt: int
    actor: str
    reason: str | None
    created_at: datetime


class User(msgspec.Struct):
    id: UUID
    email: str
    created_at: datetime


class Agent(msgspec.Struct):
    id: UUID
    user_id: UUID
    name: str
    created_at: datetime


class Enqueued(msgspec.Struct):
    """The job, and whether this call created it (False: a replay of the same event)."""

    job: Job
    created: bool


class JobPage(msgspec.Struct):
    items: list[Job]
    next_cursor: str | None


class DispatchTry(msgspec.Struct):
    """One request a dispatch made to the provisioner (or a lookup, or a cancel)."""

    kind: str
    """`dispatch`, `reconcile` or `cancel`."""
    outcome: str
    status_code: int | None
    message: str | None
    workflow_run_id: str | None
    at: datetime


class Dispatch(msgspec.Struct):
    """A job attempt's request to start the workflow, and what became of it."""

    dispatch_id: UUID
    attempt: int
    state: DispatchState
    provisioner: str
    tries: int
    workflow_run_id: str | None
    run_url: str | None
    last_error: str | None
    created_at: datetime
    dispatched_at: datetime | None
    updated_at: datetime
    bound: bool
    """The attempt is bound to this dispatch: its run is the one that moves the job."""
    cancel_state: str | None
    """Its run's cancellation: `requested`, `done` or `failed` (None: not cancelled)."""
    history: list[DispatchTry]
