"""The records the service layer returns. msgspec Structs, so the HTTP layer
encodes them as they are (snake_case, ISO 8601 UTC timestamps)."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import msgspec

from jobs_app.core.lifecycle import DispatchState, EventKind, FailureReason, JobStatus, StepState


class StepProgress(msgspec.Struct):
    """One step of the plan, as the job's current attempt has reported it."""

    name: str
    label: str
    state: str
    """`pending`, `started`, `succeeded` or `failed`."""
    started_at: datetime | None
    finished_at: datetime | None


class Progress(msgspec.Struct):
    """How far the job's current attempt is, and an estimate of the time left."""

    steps: list[StepProgress]
    completed: int
    """Steps succeeded."""
    total: int
    """Steps in the plan."""
    current: str | None
    """The step running (started, not ended), if any."""
    eta_seconds: float | None
    """Seconds left, from the medians of past jobs; null until each has 5 samples, and
    once the job is running or failed."""


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
    first_heartbeat_at: datetime | None
    heartbeat_count: int
    """The current attempt's heartbeats: the first one's time, and how many."""
    progress: Progress | None = None
    """The current attempt's steps and ETA (every answer of the API carries it)."""


JOB_FIELDS = tuple(field for field in Job.__struct_fields__ if field != "progress")
"""The job's columns, in the order rows map onto `Job`."""


class JobEvent(msgspec.Struct, tag=EventKind.TRANSITION.value, tag_field="kind"):
    """A transition in a job's history (`kind`: `transition`)."""

    id: int
    job_id: UUID
    from_status: JobStatus | None
    to_status: JobStatus
    attempt: int
    actor: str
    reason: str | None
    created_at: datetime


class StepEvent(msgspec.Struct, tag=EventKind.STEP.value, tag_field="kind", omit_defaults=True):
    """A workflow step the job's attempt reported (`kind`: `step`)."""

    id: int
    job_id: UUID
    attempt: int
    step: str
    state: StepState
    created_at: datetime
    detail: str | None = None


HistoryEvent = JobEvent | StepEvent
"""An item of a job's history: either kind, in one ordered sequence of ids."""


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
