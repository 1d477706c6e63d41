"""The live-queries service: what the event streams read, one round trip each, typed
errors, rows mapped positionally into Structs.

`job_events` is the truth a stream shows: it reads the rows after the last id it
delivered, joined with the job as it is now (what `GET /api/jobs/{id}` returns, minus
the on-demand timeout check: the sweeper fails stale jobs and announces it).

Ids follow commit order within one job (a transition locks the job's row before it
draws its event id) and within one user (at most one of a user's jobs is in flight,
and the partial unique index makes a move into flight wait for the move out of it to
commit), so reading `id > last delivered` never skips a row that commits later.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg
import msgspec

from jobs_app.core import errors
from jobs_app.core.lifecycle import EventKind, JobStatus
from jobs_app.core.models import Job, JobEvent, StepEvent
from jobs_app.db.fragments import job_columns, job_from_row
from jobs_app.db.statement import Statement, fetch, fetchrow
from jobs_app.services import progress
from jobs_app.services.announcements import Committed
from jobs_app.services.jobs import HISTORY_COLUMNS, history_event

__all__ = [
    "StepMessage",
    "StreamEvent",
    "TransitionMessage",
    "committed_since",
    "job_events_after",
    "latest_event_id",
    "open_job_stream",
    "open_user_stream",
    "user_events_after",
]

_MESSAGE_COLUMNS = f"""{HISTORY_COLUMNS}, {progress.step_reports("j")} AS reports,
    {progress.DB_NOW}, {job_columns("j")}"""
_BEFORE_JOB = 14  # the event's twelve columns, reports, db_now


class TransitionMessage(JobEvent, tag=EventKind.TRANSITION.value):
    """A `transition` message: the event, and the job as it is when it is sent."""

    job: Job


class StepMessage(StepEvent, tag=EventKind.STEP.value, kw_only=True):
    """A `step` message: the step report, and the job as it is when it is sent."""

    job: Job


StreamEvent = TransitionMessage | StepMessage
"""One message of a stream (its `kind` is its SSE event name)."""


def _stream_event(row: asyncpg.Record, medians: progress.Medians) -> StreamEvent:
    job = progress.with_progress(job_from_row(row, _BEFORE_JOB), row, medians)
    event = history_event(row)
    if isinstance(event, StepEvent):
        return StepMessage(**msgspec.structs.asdict(event), job=job)
    return TransitionMessage(**msgspec.structs.asdict(event), job=job)


_OPEN_JOB = Statement(
    """SELECT j.user_id,
              CAST(:after AS bigint) IS NULL OR EXISTS (
                  SELECT 1 FROM job_events e WHERE e.id = :after AND e.job_id = j.id
              ) AS after_known
       FROM provisioning_jobs j WHERE j.id = :job_id"""
)
_OPEN_USER = Statement(
    """SELECT COALESCE((SELECT max(e.id) FROM provisioning_jobs j
                        JOIN job_events e ON e.job_id = j.id WHERE j.user_id = u.id), 0) AS latest,
              CAST(:after AS bigint) IS NULL OR EXISTS (
                  SELECT 1 FROM job_events e JOIN provisioning_jobs j ON j.id = e.job_id
                  WHERE e.id = :after AND j.user_id = u.id
              ) AS after_known
       FROM users u WHERE u.id = :user_id"""
)
_JOB_EVENTS_AFTER = Statement(
    f"""SELECT {_MESSAGE_COLUMNS}
        FROM job_events e JOIN provisioning_jobs j ON j.id = e.job_id
        WHERE e.job_id = :job_id AND e.id > :after ORDER BY e.id LIMIT :limit"""
)
_USER_EVENTS_AFTER = Statement(
    f"""SELECT {_MESSAGE_COLUMNS}
        FROM provisioning_jobs j JOIN job_events e ON e.job_id = j.id
        WHERE j.user_id = :user_id AND e.id > :after ORDER BY e.id LIMIT :limit"""
)

_NOT_AN_EVENT = "Last-Event-ID is not an event of this stream"


async def open_job_stream(job_id: UUID, last_event_id: int | None) -> UUID:
    """Check a job stream can start: the job's user id.

    NotFoundError for an unknown job; BadRequestError when `last_event_id` is not one
    of the job's events. The stream then starts after `last_event_id` (or at 0: the
    job's whole history).
    """
    row = await fetchrow(_OPEN_JOB, job_id=job_id, after=last_event_id)
    if row is None:
        raise errors.NotFoundError("job not found", job_id=str(job_id))
    if not row["after_known"]:
        raise errors.BadRequestError(_NOT_AN_EVENT, last_event_id=last_event_id)
    return UUID(str(row["user_id"]))


async def open_user_stream(user_id: UUID, last_event_id: int | None) -> int:
    """Check a user stream can start: the id it starts after.

    That is `last_event_id`, or without one the user's latest event (a user stream
    starts with nothing old). NotFoundError for an unknown user; BadRequestError when
    `last_event_id` is not an event of one of the user's jobs.
    """
    row = await fetchrow(_OPEN_USER, user_id=user_id, after=last_event_id)
    if row is None:
        raise errors.NotFoundError("user not found", user_id=str(user_id))
    if not row["after_known"]:
        raise errors.BadRequestError(_NOT_AN_EVENT, last_event_id=last_event_id)
    return int(row["latest"]) if last_event_id is None else last_event_id


async def job_events_after(job_id: UUID, after: int, limit: int) -> list[StreamEvent]:
    """The job's events with id > `after`, oldest first, at most `limit`."""
    medians = await progress.learned()
    rows = await fetch(_JOB_EVENTS_AFTER, job_id=job_id, after=after, limit=limit)
    return [_stream_event(r, medians) for r in rows]


async def user_events_after(user_id: UUID, after: int, limit: int) -> list[StreamEvent]:
    """The events of all the user's jobs with id > `after`, oldest first, at most `limit`."""
    medians = await progress.learned()
    rows = await fetch(_USER_EVENTS_AFTER, user_id=user_id, after=after, limit=limit)
    return [_stream_event(r, medians) for r in rows]


# --------------------------------------------------------------------------- catch-up

LATEST_EVENT = Statement("SELECT COALESCE(max(id), 0) FROM job_events")
COMMITTED_SINCE = Statement(
    f"""SELECT e.id, e.job_id, j.user_id, e.to_status = '{JobStatus.QUEUED}'
        FROM job_events AS e JOIN provisioning_jobs AS j ON j.id = e.job_id
        WHERE e.id > :after OR e.id = ANY(CAST(:missing AS bigint[]))
        ORDER BY e.id LIMIT :limit"""
)


async def latest_event_id() -> int:
    """The newest event's id (0 when there is none)."""
    row = await fetchrow(LATEST_EVENT)
    assert row is not None
    return int(row[0])


async def committed_since(after: int, missing: list[int], limit: int) -> list[Committed]:
    """Events with id > `after`, or among `missing`, oldest first, at most `limit`: what
    the catch-up read looks at (whom each concerns)."""
    rows = await fetch(COMMITTED_SINCE, after=after, missing=missing, limit=limit)
    return [Committed(*row) for row in rows]
