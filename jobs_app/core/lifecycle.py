"""The provisioning job's state machine, as data.

`queue.py` builds its SQL from these tables, so the rules live in one place:
which status may lead to which, and which columns a transition stamps.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

HEARTBEAT_INTERVAL_SECONDS = 60
"""The workflow posts a heartbeat this often."""
JOB_TIMEOUT_SECONDS = 900
"""A provisioning job with no sign of life for this long is failed (15 min)."""
JOB_DEADLINE_SECONDS = 3600
"""A provisioning job is failed after this long in total, heartbeats or not."""
QUEUE_TIMEOUT_SECONDS = 900
"""A job still queued this long after entering `queued` is failed: it would block its user."""
MAX_RETRIES = 3
"""Retries allowed after the first attempt, before support has to step in."""

CONCURRENT_PROVISION_MESSAGE = (
    "A provisioning job is already in progress. Please wait for it to complete."
)


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    FAILED = "failed"


ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.PROVISIONING)
"""Statuses that count as "in flight": at most one such job per user."""


class FailureReason(StrEnum):
    WORKFLOW_ERROR = "workflow_error"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    QUEUE_TIMEOUT = "queue_timeout"
    OPERATOR = "operator"
    DISPATCH_ERROR = "dispatch_error"
    """GitHub refused the dispatch for good, or no dispatch succeeded before the deadline."""


class Actor(StrEnum):
    """Who caused a transition; operators are recorded as ``operator:<name>``."""

    SYSTEM = "system"
    WORKFLOW = "workflow"
    API = "api"

    @staticmethod
    def operator(name: str) -> str:
        return f"operator:{name}"


@dataclass(frozen=True, slots=True)
class Transition:
    to: JobStatus
    sources: tuple[JobStatus, ...]
    """The statuses a job may be in for this transition to apply."""
    stamps: tuple[str, ...] = ()
    """Timestamp columns set to the database's now()."""
    carries_failure: bool = False
    """Whether error, failed_step and failure_reason are written."""


TRANSITIONS: dict[JobStatus, Transition] = {
    JobStatus.PROVISIONING: Transition(
        JobStatus.PROVISIONING, (JobStatus.QUEUED,), stamps=("claimed_at",)
    ),
    JobStatus.RUNNING: Transition(
        JobStatus.RUNNING, (JobStatus.PROVISIONING,), stamps=("completed_at",)
    ),
    JobStatus.FAILED: Transition(
        JobStatus.FAILED,
        (JobStatus.QUEUED, JobStatus.PROVISIONING),
        stamps=("completed_at",),
        carries_failure=True,
    ),
}
"""Transitions a status callback may ask for. `queued` is absent on purpose:
only `retry_job` re-queues, from `failed`, within the retry budget."""

RETRY_SOURCES = (JobStatus.FAILED,)


class EventKind(StrEnum):
    """What a `job_events` row records: a move of the job, or a workflow step's report."""

    TRANSITION = "transition"
    STEP = "step"


class StepState(StrEnum):
    """A workflow step's report: it began, or ended one way or the other."""

    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


STEP_ENDS = (StepState.SUCCEEDED, StepState.FAILED)
"""A step reported in one of these is over: no other report of it is taken after."""


class DispatchState(StrEnum):
    """A dispatch's own progress, kept apart from the job's status."""

    PENDING = "pending"
    """Claimed: the request is about to be sent, or waits to go again (nothing reached GitHub)."""
    UNKNOWN = "unknown"
    """The request may have started a run: reconcile before sending another."""
    DISPATCHED = "dispatched"
    """GitHub accepted it (or its run called back): a run exists."""
    LOST = "lost"
    """Reconciliation found no run within the grace period: a new dispatch replaces it."""
    SUPERSEDED = "superseded"
    """Another dispatch of the same attempt bound the job first."""
    FAILED = "failed"
    """Refused for good (or the deadline passed): the job failed with dispatch_error."""


LIVE_DISPATCH_STATES = (DispatchState.PENDING, DispatchState.UNKNOWN, DispatchState.DISPATCHED)
"""At most one dispatch per job attempt is in one of these (a partial unique index)."""
WORKING_DISPATCH_STATES = (DispatchState.PENDING, DispatchState.UNKNOWN)
"""Dispatches the dispatcher still has work on."""
CLOSED_DISPATCH_STATES = (DispatchState.LOST, DispatchState.SUPERSEDED, DispatchState.FAILED)
"""Dispatches that will never move their attempt: a run they started is to be cancelled."""


class TryKind(StrEnum):
    """What one request a dispatch made to the provisioner was for."""

    DISPATCH = "dispatch"
    RECONCILE = "reconcile"
    CANCEL = "cancel"


class CancellationState(StrEnum):
    """A run cancellation's progress (best effort: `failed` after its tries ran out)."""

    REQUESTED = "requested"
    DONE = "done"
    FAILED = "failed"


DISPATCH_DEADLINE_SECONDS = 600
"""No successful dispatch this long after the attempt's first one: the job fails."""
DISPATCH_RECONCILE_GRACE_SECONDS = 120
"""How long a run is looked for after an unknown outcome before a new dispatch."""
