"""The support console's reads: find jobs by anything a customer or a log line can tell,
the jobs needing attention, and one job's whole story.

Each read is ONE statement (one round trip), named at module level like the other
services' statements:

- `SEARCH`: the jobs a query matches, each with the keys it matched (job id, user id,
  agent id, dispatch id; email exact or a prefix, case-insensitive; Stripe event id;
  workflow run id, on the job or on any of its dispatches), newest first. Every branch
  reads an index (the console's migration adds the email, run id and recent-failure
  ones).
- `ATTENTION`: jobs failed in the last 24 hours, and jobs in flight for longer than a
  floor, with the learned medians; `attention()` keeps those in flight longer than usual.
- `JOB_PAGE`: the job with its user's email, its agent, its progress, and its history,
  dispatches (each with its tries) and run cancellations as JSON arrays; `job_page()`
  merges them into one timeline, oldest first.

Read-only: viewing a job never changes it (unlike `GET /api/jobs/{id}`, no on-demand
timeout check: the sweeper fails stale jobs).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import msgspec

from jobs_app.core.lifecycle import ACTIVE_STATUSES, EventKind, JobStatus
from jobs_app.core.models import Job
from jobs_app.core.settings import get_settings
from jobs_app.db.fragments import job_columns, job_from_row, sql_list
from jobs_app.db.statement import Statement, fetch, fetchrow
from jobs_app.services import progress

__all__ = [
    "ATTENTION",
    "JOB_PAGE",
    "SEARCH",
    "AttentionJob",
    "FoundJob",
    "JobPage",
    "TimelineItem",
    "attention",
    "job_page",
    "search",
]

SEARCH_LIMIT = 50
"""At most this many jobs in a search's list (newest first)."""
ATTENTION_LIMIT = 100
"""At most this many of each kind of job needing attention."""
PREFIX_MIN = 3
"""An email prefix is searched from this many characters on."""
FAILED_WITHIN = timedelta(hours=24)
SLOW_FLOOR_SECONDS = {JobStatus.QUEUED: 60.0, JobStatus.PROVISIONING: 120.0}
"""In flight for less than this is never "longer than usual"."""
_USUAL_FACTOR = 2.0

# Matched keys, as the console names them.
JOB_ID = "job id"
USER_ID = "user id"
AGENT_ID = "agent id"
DISPATCH_ID = "dispatch id"
EMAIL = "email"
EMAIL_PREFIX = "email prefix"
STRIPE_EVENT = "Stripe event id"
RUN_ID = "workflow run id"


class FoundJob(msgspec.Struct):
    job: Job
    email: str
    matched: list[str]


class AttentionJob(msgspec.Struct):
    job: Job
    email: str
    why: str
    """`failed`, or `slow` (in flight longer than usual)."""
    since: datetime
    """Failed at, or in its current state since."""
    usual_seconds: float | None
    """For a slow job: how long it usually takes (None: too few samples to say)."""


class TimelineItem(msgspec.Struct):
    kind: str
    """`transition`, `step`, `dispatch`, `try`, `cancellation` or `heartbeats`."""
    at: datetime
    attempt: int | None = None
    # A transition's from/to, actor and reason; a step's name, state and detail; a
    # dispatch's or cancellation's state; a try's kind, outcome, status and message.
    title: str = ""
    actor: str | None = None
    reason: str | None = None
    detail: str | None = None
    state: str | None = None
    link: str | None = None
    event_id: int | None = None
    first: datetime | None = None
    last: datetime | None = None
    count: int | None = None


class JobPage(msgspec.Struct):
    job: Job
    email: str
    agent_name: str
    run_url: str | None
    """The current attempt's run on GitHub (its dispatch's recorded run URL)."""
    run_id: str | None
    """That run's id (the dispatch's, else the job's)."""
    timeline: list[TimelineItem]
    last_event_id: int
    now: datetime


# --------------------------------------------------------------------------- search

SEARCH = Statement(
    f"""
    WITH hits AS (
        SELECT j.id, '{JOB_ID}' AS matched FROM provisioning_jobs AS j
        WHERE j.id = CAST(:uuid AS uuid)
        UNION ALL
        SELECT j.id, '{USER_ID}' FROM provisioning_jobs AS j WHERE j.user_id = CAST(:uuid AS uuid)
        UNION ALL
        SELECT j.id, '{AGENT_ID}' FROM provisioning_jobs AS j
        WHERE j.agent_id = CAST(:uuid AS uuid)
        UNION ALL
        SELECT d.job_id, '{DISPATCH_ID}' FROM dispatches AS d WHERE d.id = CAST(:uuid AS uuid)
        UNION ALL
        SELECT j.id,
               CASE WHEN lower(u.email) = lower(:text) THEN '{EMAIL}' ELSE '{EMAIL_PREFIX}' END
        FROM users AS u JOIN provisioning_jobs AS j ON j.user_id = u.id
        WHERE lower(u.email) ~>=~ lower(:text) AND lower(u.email) ~<~ (lower(:text) || :above)
        UNION ALL
        SELECT j.id, '{STRIPE_EVENT}' FROM provisioning_jobs AS j
        WHERE j.stripe_event_id = :text
        UNION ALL
        SELECT j.id, '{RUN_ID}' FROM provisioning_jobs AS j
        WHERE j.workflow_run_id = :text AND j.workflow_run_id IS NOT NULL
        UNION ALL
        SELECT d.job_id, '{RUN_ID}' FROM dispatches AS d
        WHERE d.workflow_run_id = :text AND d.workflow_run_id IS NOT NULL
    ), found AS (
        SELECT id, array_agg(DISTINCT matched ORDER BY matched) AS matched FROM hits GROUP BY id
    )
    SELECT f.matched, u.email, {job_columns("j")}
    FROM found AS f JOIN provisioning_jobs AS j ON j.id = f.id JOIN users AS u ON u.id = j.user_id
    ORDER BY j.created_at DESC, j.id DESC LIMIT :limit
    """
)
_SEARCH_COLUMNS = 2  # matched, email


def _as_uuid(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


async def search(query: str) -> list[FoundJob]:
    """The jobs `query` finds, newest first (at most SEARCH_LIMIT), each with what matched."""
    text = query.strip()
    if not text:
        return []
    rows = await fetch(
        SEARCH,
        uuid=_as_uuid(text),
        text=text,
        # One byte-wise range on the email index (PostgreSQL's lower() on both sides):
        # every string starting with the query (a prefix), or the query alone (nothing
        # sorts between it and it + U+0001).
        above="\U0010ffff" if len(text) >= PREFIX_MIN else "\x01",
        limit=SEARCH_LIMIT,
    )
    return [
        FoundJob(job_from_row(row, _SEARCH_COLUMNS), row["email"], list(row["matched"]))
        for row in rows
    ]


# --------------------------------------------------------------------------- attention

ATTENTION = Statement(
    f"""
    WITH learned AS (SELECT {progress.DB_NOW}, {progress.MEDIANS} AS medians)
    (SELECT 'failed' AS why, j.completed_at AS since, u.email, learned.db_now, learned.medians,
            {job_columns("j")}
     FROM provisioning_jobs AS j JOIN users AS u ON u.id = j.user_id CROSS JOIN learned
     WHERE j.status = '{JobStatus.FAILED}'
       AND j.completed_at > now() - make_interval(secs => :failed_within)
     ORDER BY j.completed_at DESC LIMIT :limit)
    UNION ALL
    (SELECT 'slow', COALESCE(j.claimed_at, j.queued_at), u.email, learned.db_now, learned.medians,
            {job_columns("j")}
     FROM provisioning_jobs AS j JOIN users AS u ON u.id = j.user_id CROSS JOIN learned
     WHERE j.status IN ({sql_list(ACTIVE_STATUSES)})
       AND COALESCE(j.claimed_at, j.queued_at) < now() - make_interval(secs => :floor)
     ORDER BY COALESCE(j.claimed_at, j.queued_at) LIMIT :limit)
    """
)
_ATTENTION_COLUMNS = 5  # why, since, email, db_now, medians


def _usual(status: JobStatus, medians: Any) -> float | None:
    """How long a job usually spends in `status`: the median wait before provisioning, or
    the sum of the plan's step medians; None with too few samples."""
    learned = progress.medians_of(medians)
    if status == JobStatus.QUEUED:
        return learned.queue_wait()
    total = 0.0
    for step in progress.plan():
        median = learned.step(step.name)
        if median is None:
            return None
        total += median
    return total


def _threshold(status: JobStatus, usual: float | None) -> float:
    """Seconds in `status` past which a job is "in flight longer than usual": twice the
    usual (never under the floor); without a usual yet, half the status's timeout."""
    floor = SLOW_FLOOR_SECONDS[status]
    if usual is not None:
        return max(floor, _USUAL_FACTOR * usual)
    settings = get_settings()
    timeout = (
        settings.queue_timeout_seconds
        if status == JobStatus.QUEUED
        else settings.job_deadline_seconds
    )
    return max(floor, timeout / 2)


async def attention() -> list[AttentionJob]:
    """Jobs failed in the last 24 h (newest first), then jobs in flight longer than usual
    (longest first)."""
    rows = await fetch(
        ATTENTION,
        plan=progress.plan_names(),
        failed_within=FAILED_WITHIN.total_seconds(),
        floor=min(SLOW_FLOOR_SECONDS.values()),
        limit=ATTENTION_LIMIT,
    )
    found: list[AttentionJob] = []
    for row in rows:
        job = job_from_row(row, _ATTENTION_COLUMNS)
        if row["why"] == "failed":
            found.append(AttentionJob(job, row["email"], "failed", row["since"], None))
            continue
        usual = _usual(job.status, row["medians"])
        spent = (row["db_now"] - row["since"]).total_seconds()
        if spent > _threshold(job.status, usual):
            found.append(AttentionJob(job, row["email"], "slow", row["since"], usual))
    return found


# --------------------------------------------------------------------------- one job

JOB_PAGE = Statement(
    f"""
    SELECT u.email, a.name AS agent_name, j.steps AS reports, {progress.DB_NOW},
        {progress.MEDIANS} AS medians,
        COALESCE((SELECT json_agg(json_build_object(
                'id', e.id, 'kind', e.kind, 'from_status', e.from_status,
                'to_status', e.to_status, 'attempt', e.attempt, 'actor', e.actor,
                'reason', e.reason, 'at', e.created_at, 'step', e.step,
                'step_state', e.step_state, 'detail', e.detail,
                'heartbeat_count', e.heartbeat_count,
                'first_heartbeat_at', e.first_heartbeat_at,
                'last_heartbeat_at', e.last_heartbeat_at) ORDER BY e.id)
            FROM job_events AS e WHERE e.job_id = j.id), '[]') AS events,
        COALESCE((SELECT json_agg(json_build_object(
                'id', d.id, 'attempt', d.attempt, 'state', d.state,
                'provisioner', d.provisioner, 'tries', d.tries,
                'workflow_run_id', d.workflow_run_id, 'run_url', d.run_url,
                'last_error', d.last_error, 'at', d.created_at,
                'history', COALESCE((SELECT json_agg(json_build_object(
                        'kind', t.kind, 'outcome', t.outcome, 'status_code', t.status_code,
                        'message', t.message, 'workflow_run_id', t.workflow_run_id,
                        'at', t.created_at) ORDER BY t.id)
                    FROM dispatch_tries AS t WHERE t.dispatch_id = d.id), '[]'))
                ORDER BY d.created_at, d.id)
            FROM dispatches AS d WHERE d.job_id = j.id), '[]') AS dispatches,
        COALESCE((SELECT json_agg(json_build_object(
                'workflow_run_id', c.workflow_run_id, 'dispatch_id', c.dispatch_id,
                'reason', c.reason, 'state', c.state, 'tries', c.tries,
                'last_error', c.last_error, 'at', c.created_at, 'done_at', c.done_at)
                ORDER BY c.created_at)
            FROM run_cancellations AS c WHERE c.job_id = j.id), '[]') AS cancellations,
        {job_columns("j")}
    FROM provisioning_jobs AS j
    JOIN users AS u ON u.id = j.user_id
    JOIN agents AS a ON a.id = j.agent_id
    WHERE j.id = :job_id
    """
)
_PAGE_COLUMNS = 8  # email, agent_name, reports, db_now, medians, events, dispatches, cancellations


class _Event(msgspec.Struct):
    id: int
    kind: str
    from_status: str | None
    to_status: str
    attempt: int
    actor: str
    reason: str | None
    at: datetime
    step: str | None
    step_state: str | None
    detail: str | None
    heartbeat_count: int | None
    first_heartbeat_at: datetime | None
    last_heartbeat_at: datetime | None


class _Try(msgspec.Struct):
    kind: str
    outcome: str
    status_code: int | None
    message: str | None
    workflow_run_id: str | None
    at: datetime


class _Dispatch(msgspec.Struct):
    id: UUID
    attempt: int
    state: str
    provisioner: str
    tries: int
    workflow_run_id: str | None
    run_url: str | None
    last_error: str | None
    at: datetime
    history: list[_Try]


class _Cancellation(msgspec.Struct):
    workflow_run_id: str
    dispatch_id: UUID | None
    reason: str
    state: str
    tries: int
    last_error: str | None
    at: datetime
    done_at: datetime | None


def _decode(raw: Any, kind: type[Any]) -> Any:
    return msgspec.json.decode(raw, type=list[kind])  # type: ignore[valid-type]


def _web_link(url: str | None) -> str | None:
    return url if url and url.startswith(("https://", "http://")) else None


def transition_item(event: Any) -> TimelineItem:
    """A transition's timeline item (`event`: a `job_events` row of kind transition)."""
    start = f"{event.from_status} → " if event.from_status else "created, "
    return TimelineItem(
        kind="transition",
        at=event.at,
        attempt=event.attempt,
        title=f"{start}{event.to_status}",
        actor=event.actor,
        reason=event.reason,
        state=event.to_status,
        event_id=event.id,
    )


def step_item(event: Any) -> TimelineItem:
    """A step report's timeline item."""
    return TimelineItem(
        kind="step",
        at=event.at,
        attempt=event.attempt,
        title=f"step {event.step} {event.step_state}",
        detail=event.detail,
        state=event.step_state,
        event_id=event.id,
    )


def _heartbeats(attempt: int, first: datetime, last: datetime | None, count: int) -> TimelineItem:
    return TimelineItem(
        kind="heartbeats",
        at=first,
        attempt=attempt,
        title=f"{count} heartbeat{'' if count == 1 else 's'}",
        first=first,
        last=last or first,
        count=count,
    )


def _timeline(
    job: Job,
    events: list[_Event],
    dispatches: list[_Dispatch],
    cancellations: list[_Cancellation],
) -> list[TimelineItem]:
    items: list[TimelineItem] = []
    summarised: set[int] = set()
    for event in events:
        if event.kind == EventKind.STEP:
            items.append(step_item(event))
            continue
        items.append(transition_item(event))
        if event.heartbeat_count and event.first_heartbeat_at is not None:
            summarised.add(event.attempt)
            items.append(
                _heartbeats(
                    event.attempt,
                    event.first_heartbeat_at,
                    event.last_heartbeat_at,
                    event.heartbeat_count,
                )
            )
    if job.heartbeat_count and job.first_heartbeat_at is not None and job.attempt not in summarised:
        items.append(
            _heartbeats(
                job.attempt, job.first_heartbeat_at, job.last_heartbeat_at, job.heartbeat_count
            )
        )
    for dispatch in dispatches:
        items.append(
            TimelineItem(
                kind="dispatch",
                at=dispatch.at,
                attempt=dispatch.attempt,
                title=f"dispatch {dispatch.id} ({dispatch.provisioner})",
                state=dispatch.state,
                detail=dispatch.last_error,
                reason=dispatch.workflow_run_id,
                link=_web_link(dispatch.run_url),
                count=dispatch.tries,
            )
        )
        for attempt_try in dispatch.history:
            status = attempt_try.status_code
            items.append(
                TimelineItem(
                    kind="try",
                    at=attempt_try.at,
                    attempt=dispatch.attempt,
                    title=f"{attempt_try.kind}: {attempt_try.outcome}"
                    + (f" (GitHub {status})" if status is not None else ""),
                    state=attempt_try.outcome,
                    detail=attempt_try.message,
                    reason=attempt_try.workflow_run_id,
                )
            )
    for cancellation in cancellations:
        items.append(
            TimelineItem(
                kind="cancellation",
                at=cancellation.at,
                title=f"cancel run {cancellation.workflow_run_id}",
                reason=cancellation.reason,
                state=cancellation.state,
                detail=cancellation.last_error,
                last=cancellation.done_at,
                count=cancellation.tries,
            )
        )
    # Oldest first; Python's sort is stable, so items at the same instant keep the order
    # built above (a transition before its heartbeats, a dispatch before its tries).
    items.sort(key=lambda item: item.at)
    return items


def _current_run(job: Job, dispatches: list[_Dispatch]) -> tuple[str | None, str | None]:
    """The current attempt's run (URL, id): its bound dispatch's, else its latest
    dispatch's with a run URL; else only the id the job has."""
    bound = [d for d in dispatches if d.id == job.dispatch_id]
    latest = [d for d in reversed(dispatches) if d.attempt == job.attempt]
    for dispatch in bound + latest:
        if _web_link(dispatch.run_url):
            return dispatch.run_url, dispatch.workflow_run_id or job.workflow_run_id
    return None, job.workflow_run_id


async def job_page(job_id: UUID) -> JobPage | None:
    """Everything the console shows of one job (one statement); None for an unknown job."""
    row = await fetchrow(JOB_PAGE, job_id=job_id, plan=progress.plan_names())
    if row is None:
        return None
    # The console reads the medians fresh, in its own statement: no process's copy.
    medians = progress.medians_of(row["medians"])
    job = progress.with_progress(job_from_row(row, _PAGE_COLUMNS), row, medians)
    events: list[_Event] = _decode(row["events"], _Event)
    dispatches: list[_Dispatch] = _decode(row["dispatches"], _Dispatch)
    cancellations: list[_Cancellation] = _decode(row["cancellations"], _Cancellation)
    run_url, run_id = _current_run(job, dispatches)
    return JobPage(
        job=job,
        email=row["email"],
        agent_name=row["agent_name"],
        run_url=run_url,
        run_id=run_id,
        timeline=_timeline(job, events, dispatches, cancellations),
        last_event_id=events[-1].id if events else 0,
        now=row["db_now"],
    )
