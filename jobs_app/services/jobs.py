"""The jobs service: every statement that reads or changes a provisioning job.

Each operation is one SQL statement (one round trip, autocommit) built from the shared
blocks of `jobs_app.db.fragments`. Invariants two requests could race on are decided by
PostgreSQL: the unique stripe_event_id, the partial unique index allowing one job in
flight per user, and conditional UPDATEs on a row locked in the same statement.
Transitions write their `job_events` row in that same statement, so history and state
never disagree. Time is `now()`.

Callers see typed errors from `jobs_app.core.errors`, never database exceptions. The
statements are named at module level (bench/ runs them on a raw pool to measure what
the service adds).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import msgspec

from jobs_app.core import errors, metrics
from jobs_app.core.lifecycle import (
    ACTIVE_STATUSES,
    CONCURRENT_PROVISION_MESSAGE,
    LIVE_DISPATCH_STATES,
    RETRY_SOURCES,
    TRANSITIONS,
    Actor,
    DispatchState,
    FailureReason,
    JobStatus,
)
from jobs_app.core.models import Enqueued, Job, JobEvent, JobPage
from jobs_app.core.settings import get_settings
from jobs_app.core.signing import b64url_decode, b64url_encode
from jobs_app.db.fragments import (
    JOB_COLUMNS,
    WORKING,
    cancel_attempt_runs,
    cancel_runs,
    dispatch_issued,
    fail_jobs,
    fence_ok,
    job_columns,
    job_from_row,
    record_events,
    set_status,
    sql_list,
)
from jobs_app.db.statement import Statement, fetch, fetchrow

__all__ = [
    "check_concurrent_provision",
    "check_job_timeout",
    "enqueue_provisioning_job",
    "get_job",
    "get_job_by_agent_id",
    "get_job_by_stripe_event_id",
    "list_job_events",
    "list_jobs",
    "record_heartbeat",
    "retry_job",
    "sweep_stale_jobs",
    "update_job_status",
]

_ACTIVE = sql_list(ACTIVE_STATUSES)

# --------------------------------------------------------------------------- enqueue

# ON CONFLICT targets the plain unique stripe_event_id only, so a second active job
# for the user still raises on the partial unique index (-> ConcurrentProvisionError).
ENQUEUE = Statement(
    f"""
    WITH inserted AS (
        INSERT INTO provisioning_jobs (agent_id, user_id, stripe_event_id, region, max_retries)
        VALUES (:agent_id, :user_id, :stripe_event_id, :region, :max_retries)
        ON CONFLICT (stripe_event_id) DO NOTHING
        RETURNING {JOB_COLUMNS}, CAST(NULL AS varchar) AS from_status
    ), event AS ({record_events("inserted", actor=":actor", reason="'enqueued'")})
    SELECT true AS created, {JOB_COLUMNS} FROM inserted
    UNION ALL
    SELECT false, {JOB_COLUMNS} FROM provisioning_jobs
    WHERE stripe_event_id = :stripe_event_id AND NOT EXISTS (SELECT 1 FROM inserted)
    """
)
BY_STRIPE_EVENT = Statement(
    f"SELECT {JOB_COLUMNS} FROM provisioning_jobs WHERE stripe_event_id = :stripe_event_id"
)


async def enqueue_provisioning_job(
    *,
    agent_id: UUID,
    user_id: UUID,
    stripe_event_id: str,
    region: str = "us-east",
    max_retries: int | None = None,
    actor: str = Actor.API,
) -> Enqueued:
    """Create the job for a Stripe event, exactly once.

    The same event again (same user and agent) returns the existing job with
    `created=False`. The same event for another user or agent raises
    IdempotencyConflictError; a second job in flight for the user raises
    ConcurrentProvisionError.
    """
    try:
        row = await fetchrow(
            ENQUEUE,
            agent_id=agent_id,
            user_id=user_id,
            stripe_event_id=stripe_event_id,
            region=region,
            max_retries=get_settings().max_retries if max_retries is None else max_retries,
            actor=actor,
        )
        concurrent: errors.ConcurrentProvisionError | None = None
    except errors.ConcurrentProvisionError as exc:
        # ON CONFLICT arbitrates stripe_event_id only: when a concurrent call for this
        # same event inserts first, ours can trip the one-active-job index instead
        # (it waits for that insert to commit, then fails). Then this call is a replay.
        row, concurrent = None, exc
    if row is not None:
        job, created = job_from_row(row, 1), row["created"]
    else:
        # Lost a race for this event to a call that committed after our statement's
        # snapshot was taken: a new statement sees its row.
        replay = await fetchrow(BY_STRIPE_EVENT, stripe_event_id=stripe_event_id)
        if replay is None:
            raise concurrent or errors.ConflictError("the job for this event was deleted")
        job, created = job_from_row(replay), False
    if not created and (job.user_id != user_id or job.agent_id != agent_id):
        raise errors.IdempotencyConflictError(
            "this stripe_event_id was already used for another user or agent"
        )
    if created:
        metrics.TRANSITIONS.labels(JobStatus.QUEUED).inc()
    return Enqueued(job=job, created=created)


ACTIVE_FOR_USER = Statement(
    f"SELECT 1 FROM provisioning_jobs WHERE user_id = :user_id AND status IN ({_ACTIVE})"
)


async def check_concurrent_provision(user_id: UUID) -> None:
    """Raise ConcurrentProvisionError if the user has a job in flight.

    Advisory only (for a friendly early answer): enqueue and retry do not rely on
    it; the partial unique index decides races.
    """
    if await fetchrow(ACTIVE_FOR_USER, user_id=user_id) is not None:
        raise errors.ConcurrentProvisionError(CONCURRENT_PROVISION_MESSAGE)


# --------------------------------------------------------------------------- transitions

# A transition has one shape: lock the row in a CTE (so the old status and attempt are
# the latest committed ones, not a snapshot's), update it only if the rules hold, record
# the event, and return either the moved row (moved = true) or the locked row unchanged
# (moved = false) for the caller to say why nothing moved. One round trip whatever the
# outcome.

_FENCE_OK = fence_ok("p", "p.issued")
_REFUSED_RUN_REASON = "'refused callback of a superseded or stale dispatch'"


def _transition_statement(to: JobStatus) -> Statement:
    """One transition in one statement: lock, fence, move, record, bind, cancel losers."""
    rule = TRANSITIONS[to]
    sets = set_status(
        to,
        error=":error",
        failed_step=":failed_step",
        failure_reason=":failure_reason",
    )
    reason = ":error" if rule.carries_failure else ":workflow_run_id"
    live = sql_list(LIVE_DISPATCH_STATES)
    return Statement(
        f"""
        WITH locked AS (
            SELECT {JOB_COLUMNS}, {dispatch_issued("p")} AS issued
            FROM provisioning_jobs AS p WHERE id = :job_id FOR UPDATE
        ), checked AS (
            SELECT p.*, {_FENCE_OK} AS fence_ok,
                   CAST(:attempt AS integer) IS NOT NULL AND p.attempt <> :attempt AS stale
            FROM locked AS p
        ), moved AS (
            UPDATE provisioning_jobs AS j SET {sets},
                workflow_run_id = COALESCE(:workflow_run_id, j.workflow_run_id),
                dispatch_id = COALESCE(j.dispatch_id, :dispatch_id)
            FROM checked AS locked
            WHERE j.id = locked.id AND locked.fence_ok AND NOT locked.stale
              AND locked.status IN ({sql_list(rule.sources)})
            RETURNING {job_columns("j")}, locked.status AS from_status,
                      locked.dispatch_id AS bound_before
        ), event AS ({record_events("moved", actor=":actor", reason=reason)}
        ), bound AS (
            -- The first callback of a dispatch: its run exists (a 204 or an unknown
            -- outcome learns the run id here); any other live dispatch of the attempt lost.
            -- The lease is left to its holder: a dispatcher whose request is still in
            -- flight records its answer (the run's URL) when it comes.
            UPDATE dispatches AS d SET
                state = CASE WHEN d.state IN ({WORKING}) THEN '{DispatchState.DISPATCHED}'
                             ELSE d.state END,
                workflow_run_id = COALESCE(d.workflow_run_id, :workflow_run_id),
                dispatched_at = COALESCE(d.dispatched_at, now()), updated_at = now()
            FROM moved WHERE d.id = :dispatch_id AND moved.bound_before IS NULL
        ), superseded AS (
            UPDATE dispatches AS d SET state = '{DispatchState.SUPERSEDED}', updated_at = now()
            FROM moved
            WHERE d.job_id = moved.id AND d.attempt = moved.attempt AND moved.bound_before IS NULL
              AND d.id <> :dispatch_id AND d.state IN ({live})
            RETURNING d.id, d.job_id, d.workflow_run_id
        ), cancel AS ({
            cancel_runs(
                f'''SELECT workflow_run_id, job_id, id,
                       'superseded: its attempt is bound to another run'
                FROM superseded WHERE workflow_run_id IS NOT NULL
                UNION ALL
                SELECT :workflow_run_id, p.id, :dispatch_id, {_REFUSED_RUN_REASON}
                FROM checked AS p
                WHERE CAST(:dispatch_id AS uuid) IS NOT NULL AND :workflow_run_id IS NOT NULL
                  AND (NOT p.fence_ok OR p.stale)'''
            )
        }), cancel_known AS ({
            cancel_attempt_runs(
                "moved",
                "'job failed by ' || :actor",
                f"m.status = '{JobStatus.FAILED}' AND :actor <> '{Actor.WORKFLOW}'",
            )
        })
        SELECT true AS moved, true AS issued, {JOB_COLUMNS} FROM moved
        UNION ALL
        SELECT false, issued, {JOB_COLUMNS} FROM locked WHERE NOT EXISTS (SELECT 1 FROM moved)
        """
    )


TRANSITION = {to: _transition_statement(to) for to in TRANSITIONS}
"""The transition statement for each status a status update may ask for."""


def _refusal(
    job: Job, attempt: int | None, dispatch_id: UUID | None, issued: bool
) -> errors.ConflictError | None:
    """Why a callback for this attempt and dispatch may not touch the job, if it may not."""
    if attempt is not None and job.attempt != attempt:
        return errors.StaleAttemptError(
            f"attempt {attempt} is not the job's current attempt {job.attempt}",
            reason="stale_attempt",
            current_attempt=job.attempt,
            attempt=attempt,
        )
    bound_elsewhere = job.dispatch_id is not None and job.dispatch_id != dispatch_id
    if dispatch_id is not None and (bound_elsewhere or (job.dispatch_id is None and not issued)):
        return errors.SupersededDispatchError(
            "this dispatch was superseded: another run moves this attempt"
            if bound_elsewhere
            else "this dispatch was not issued for the job's current attempt",
            reason="superseded_dispatch",
            dispatch_id=str(dispatch_id),
            attempt=job.attempt,
        )
    return None


def _explain_unmoved(
    row: asyncpg.Record | None,
    job_id: UUID,
    attempt: int | None,
    wanted: JobStatus,
    *,
    dispatch_id: UUID | None = None,
    repeat_ok: bool = True,
) -> Job:
    """Nothing moved: the idempotent repeat, or the error that says why."""
    if row is None:
        raise errors.NotFoundError("job not found", job_id=str(job_id))
    job = job_from_row(row, 2)
    refusal = _refusal(job, attempt, dispatch_id, row["issued"])
    if refusal is not None:
        raise refusal
    if job.status == wanted and repeat_ok:
        return job
    raise errors.InvalidTransitionError(
        f"the job is already {wanted}"
        if job.status == wanted
        else f"cannot move a {job.status} job to {wanted}",
        reason="invalid_transition",
        current_status=str(job.status),
        requested_status=str(wanted),
    )


async def update_job_status(
    job_id: UUID,
    *,
    status: JobStatus | str,
    attempt: int | None,
    dispatch_id: UUID | None = None,
    workflow_run_id: str | None = None,
    error: str | None = None,
    failed_step: str | None = None,
    failure_reason: FailureReason | None = None,
    actor: str = Actor.WORKFLOW,
    repeat_ok: bool = True,
) -> Job:
    """Move a job along the state machine, for the attempt named (None: the current one).

    Asking again for the status the job is in, for the same attempt, returns it
    unchanged with no new event (callbacks get retried); with `repeat_ok=False`
    (an operator's explicit action) that is an InvalidTransitionError instead.
    A `dispatch_id` fences the callback: the first one of an attempt binds it, and
    another one is SupersededDispatchError (its run, when named, is cancelled). A job
    failed by anyone but its workflow has its known runs cancelled.
    """
    try:
        wanted = JobStatus(status)
    except ValueError:
        raise errors.InvalidTransitionError(
            f"unknown status {status!r}", reason="invalid_transition"
        ) from None
    if wanted not in TRANSITION:
        raise errors.InvalidTransitionError(
            f"a job cannot be moved to {wanted} by a status update; use retry",
            reason="invalid_transition",
            requested_status=str(wanted),
        )
    values: dict[str, Any] = {
        "job_id": job_id,
        "attempt": attempt,
        "actor": actor,
        "dispatch_id": dispatch_id,
        "workflow_run_id": workflow_run_id,
    }
    if TRANSITIONS[wanted].carries_failure:
        values["error"] = error or "failed"
        values["failed_step"] = failed_step
        values["failure_reason"] = failure_reason or FailureReason.WORKFLOW_ERROR
    row = await fetchrow(TRANSITION[wanted], **values)
    if row is not None and row["moved"]:
        metrics.TRANSITIONS.labels(wanted).inc()
        return job_from_row(row, 2)
    return _explain_unmoved(
        row, job_id, attempt, wanted, dispatch_id=dispatch_id, repeat_ok=repeat_ok
    )


# A heartbeat is no transition: a plain conditional UPDATE, no row lock taken first
# and no history row. No index covers the columns it writes, so it is a HOT update.
HEARTBEAT = Statement(
    f"""
    UPDATE provisioning_jobs AS p SET last_heartbeat_at = now(), updated_at = now()
    WHERE id = :job_id AND status = '{JobStatus.PROVISIONING}' AND attempt = :attempt
      AND {fence_ok("p", dispatch_issued("p"))}
    RETURNING {JOB_COLUMNS}
    """
)
# A refused heartbeat: why, and (a superseded or stale dispatch naming its run) that
# run put up for cancellation, in the same statement.
HEARTBEAT_REFUSED = Statement(
    f"""
    WITH job AS (
        SELECT {JOB_COLUMNS}, {dispatch_issued("p")} AS issued
        FROM provisioning_jobs AS p WHERE id = :job_id
    ), cancel AS ({
        cancel_runs(
            f'''SELECT CAST(:workflow_run_id AS text), p.id, CAST(:dispatch_id AS uuid),
                   {_REFUSED_RUN_REASON}
            FROM job AS p
            WHERE CAST(:dispatch_id AS uuid) IS NOT NULL AND :workflow_run_id IS NOT NULL
              AND (p.attempt <> :attempt OR NOT {fence_ok("p", "p.issued")})'''
        )
    })
    SELECT issued, {JOB_COLUMNS} FROM job
    """
)


async def record_heartbeat(
    job_id: UUID,
    *,
    attempt: int,
    dispatch_id: UUID | None = None,
    workflow_run_id: str | None = None,
) -> Job:
    """Note a sign of life from the workflow running this attempt (and dispatch, if named).

    Only a provisioning job of the same attempt takes it: one whose timeout passed
    but which the sweeper has not failed yet is still alive, and is kept. When it
    is refused, one more statement says why (that path is rare: a late or confused
    caller) and cancels the run of a superseded or stale dispatch.
    """
    values = {"job_id": job_id, "attempt": attempt, "dispatch_id": dispatch_id}
    for _ in range(2):
        row = await fetchrow(HEARTBEAT, **values)
        if row is not None:
            return job_from_row(row)
        row = await fetchrow(HEARTBEAT_REFUSED, workflow_run_id=workflow_run_id, **values)
        if row is None:
            raise errors.NotFoundError("job not found", job_id=str(job_id))
        job = job_from_row(row, 1)
        refusal = _refusal(job, attempt, dispatch_id, row["issued"])
        if refusal is not None:
            raise refusal
        if job.status != JobStatus.PROVISIONING:
            raise errors.InvalidTransitionError(
                f"heartbeats are only taken while provisioning; the job is {job.status}",
                reason="invalid_transition",
                current_status=str(job.status),
            )
        # It was claimed between the two statements: take the heartbeat now, once more.
    raise errors.ConflictError(
        "the job changed while the heartbeat arrived; send it again", reason="retry"
    )


RETRY = Statement(
    f"""
    WITH locked AS (
        SELECT {JOB_COLUMNS} FROM provisioning_jobs WHERE id = :job_id FOR UPDATE
    ), moved AS (
        UPDATE provisioning_jobs AS j SET
            status = '{JobStatus.QUEUED}', retry_count = j.retry_count + 1,
            max_retries = CASE WHEN :grant_extra
                               THEN GREATEST(j.max_retries, j.retry_count + 1)
                               ELSE j.max_retries END,
            queued_at = now(), workflow_run_id = NULL, error = NULL, failed_step = NULL,
            failure_reason = NULL, claimed_at = NULL, last_heartbeat_at = NULL,
            completed_at = NULL, dispatch_id = NULL, updated_at = now()
        FROM locked
        WHERE j.id = locked.id AND locked.status IN ({sql_list(RETRY_SOURCES)})
          AND (locked.retry_count < locked.max_retries OR :grant_extra)
        RETURNING {job_columns("j")}, locked.status AS from_status
    ), event AS ({record_events("moved", actor=":actor", reason=":reason")})
    SELECT true AS moved, {JOB_COLUMNS} FROM moved
    UNION ALL
    SELECT false, {JOB_COLUMNS} FROM locked WHERE NOT EXISTS (SELECT 1 FROM moved)
    """
)


async def retry_job(
    job_id: UUID,
    *,
    actor: str = Actor.API,
    reason: str | None = None,
    grant_extra_attempt: bool = False,
) -> Job:
    """Re-queue a failed job as its next attempt, within its retry budget.

    `grant_extra_attempt` (operators only) raises max_retries when the budget is
    spent. A second job in flight for the user raises ConcurrentProvisionError.
    """
    row = await fetchrow(
        RETRY,
        job_id=job_id,
        actor=actor,
        reason=reason or ("extra attempt granted" if grant_extra_attempt else "retry"),
        grant_extra=grant_extra_attempt,
    )
    if row is not None and row["moved"]:
        metrics.TRANSITIONS.labels(JobStatus.QUEUED).inc()
        return job_from_row(row, 1)
    if row is None:
        raise errors.NotFoundError("job not found", job_id=str(job_id))
    job = job_from_row(row, 1)
    if job.status not in RETRY_SOURCES:
        raise errors.InvalidTransitionError(
            f"only failed jobs can be retried; the job is {job.status}",
            current_status=str(job.status),
        )
    raise errors.RetriesExhaustedError(
        f"retries exhausted ({job.retry_count} of {job.max_retries})",
        retry_count=job.retry_count,
        max_retries=job.max_retries,
    )


# --------------------------------------------------------------------------- timeouts

# A job is stale when it was queued too long, provisioning with no sign of life
# for the timeout, or provisioning past the hard deadline. SKIP LOCKED: a row a
# heartbeat (or another replica's sweep) holds right now is not stale; FOR UPDATE
# re-checks the condition on the latest version, so a heartbeat that committed
# first wins and the job stays provisioning.
_LAST_SIGN_OF_LIFE = "COALESCE(last_heartbeat_at, claimed_at, updated_at)"
_QUEUED = f"status = '{JobStatus.QUEUED}'"
_PROVISIONING = f"status = '{JobStatus.PROVISIONING}'"
_PAST_DEADLINE = "claimed_at < now() - make_interval(secs => :deadline)"
_STALE_CONDITION = f"""(
    ({_QUEUED} AND queued_at < now() - make_interval(secs => :queue_timeout))
    OR ({_PROVISIONING} AND (
        {_LAST_SIGN_OF_LIFE} < now() - make_interval(secs => :timeout) OR {_PAST_DEADLINE}))
)"""
_STALE_FIELDS = f"""
    CASE WHEN {_QUEUED} THEN '{FailureReason.QUEUE_TIMEOUT}'
         WHEN {_PAST_DEADLINE} THEN '{FailureReason.DEADLINE_EXCEEDED}'
         ELSE '{FailureReason.HEARTBEAT_TIMEOUT}' END AS reason,
    CASE WHEN {_QUEUED} THEN
             'Queue timeout: queued for '
             || floor(extract(epoch FROM now() - queued_at))::bigint || 's'
         WHEN {_PAST_DEADLINE} THEN
             'Deadline exceeded: provisioning for '
             || floor(extract(epoch FROM now() - claimed_at))::bigint || 's'
         ELSE 'Timeout: No heartbeat for '
             || floor(extract(epoch FROM now() - {_LAST_SIGN_OF_LIFE}))::bigint || 's'
    END AS error"""


def _fail_stale(scope: str, limit: str = "") -> str:
    return f"""
    WITH stale AS (
        SELECT id, status AS from_status, {_STALE_FIELDS}
        FROM provisioning_jobs
        WHERE {scope} AND {_STALE_CONDITION}
        {limit}
        FOR UPDATE SKIP LOCKED
    ), moved AS ({fail_jobs("stale", error="stale.error", failure_reason="stale.reason")}
    ), event AS ({record_events("moved", actor=f"'{Actor.SYSTEM}'", reason="error")}
    ), cancel AS ({cancel_attempt_runs("moved", "'timed out: ' || m.failure_reason")}
    )"""


SWEEP = Statement(_fail_stale("true", "LIMIT :batch") + f"\n    SELECT {JOB_COLUMNS} FROM moved")
GET_JOB_CHECKED = Statement(
    _fail_stale("id = :job_id")
    + f"""
    SELECT true AS timed_out, {JOB_COLUMNS} FROM moved
    UNION ALL
    SELECT false, {JOB_COLUMNS} FROM provisioning_jobs
    WHERE id = :job_id AND NOT EXISTS (SELECT 1 FROM moved)"""
)


def timeouts() -> dict[str, float]:
    """The stale statements' parameters, from the settings."""
    s = get_settings()
    return {
        "timeout": s.job_timeout_seconds,
        "deadline": s.job_deadline_seconds,
        "queue_timeout": s.queue_timeout_seconds,
    }


def _count_stale(job: Job) -> None:
    metrics.TRANSITIONS.labels(JobStatus.FAILED).inc()
    metrics.STALE_FAILED.labels(job.failure_reason).inc()


async def _get_job_checked(job_id: UUID) -> tuple[Job, bool]:
    row = await fetchrow(GET_JOB_CHECKED, job_id=job_id, **timeouts())
    if row is None:
        raise errors.NotFoundError("job not found", job_id=str(job_id))
    job = job_from_row(row, 1)
    if row["timed_out"]:
        _count_stale(job)
    return job, row["timed_out"]


async def get_job(job_id: UUID) -> Job:
    """The job, after failing it if it is stale (the dashboard's on-demand check)."""
    job, _ = await _get_job_checked(job_id)
    return job


async def check_job_timeout(job_id: UUID) -> bool:
    """Fail the job if it is stale; True if this call failed it."""
    _, timed_out = await _get_job_checked(job_id)
    return timed_out


async def sweep_stale_jobs(batch_size: int = 1000) -> list[Job]:
    """Fail every stale job (in batches of one statement each); returns those failed."""
    failed: list[Job] = []
    while True:
        rows = await fetch(SWEEP, batch=batch_size, **timeouts())
        for job in map(job_from_row, rows):
            _count_stale(job)
            failed.append(job)
        if len(rows) < batch_size:
            return failed


# --------------------------------------------------------------------------- reads

BY_AGENT = Statement(
    f"""SELECT {JOB_COLUMNS} FROM provisioning_jobs WHERE agent_id = :agent_id
        ORDER BY created_at DESC, id DESC LIMIT 1"""
)
EVENTS = Statement(
    """SELECT e.id, j.id, e.from_status, e.to_status, e.attempt, e.actor, e.reason, e.created_at
       FROM provisioning_jobs j LEFT JOIN job_events e ON e.job_id = j.id
       WHERE j.id = :job_id ORDER BY e.id"""
)


async def get_job_by_stripe_event_id(stripe_event_id: str) -> Job | None:
    row = await fetchrow(BY_STRIPE_EVENT, stripe_event_id=stripe_event_id)
    return None if row is None else job_from_row(row)


async def get_job_by_agent_id(agent_id: UUID) -> Job | None:
    """The agent's newest job."""
    row = await fetchrow(BY_AGENT, agent_id=agent_id)
    return None if row is None else job_from_row(row)


async def list_job_events(job_id: UUID) -> list[JobEvent]:
    """The job's history, oldest first; NotFoundError for an unknown job."""
    rows = await fetch(EVENTS, job_id=job_id)
    if not rows:
        raise errors.NotFoundError("job not found", job_id=str(job_id))
    return [JobEvent(*r) for r in rows if r[0] is not None]


class _Cursor(msgspec.Struct, array_like=True):
    created_at: datetime
    id: UUID


def _encode_cursor(job: Job) -> str:
    return b64url_encode(msgspec.json.encode(_Cursor(job.created_at, job.id)))


def _decode_cursor(cursor: str) -> _Cursor:
    try:
        return msgspec.json.decode(b64url_decode(cursor), type=_Cursor)
    except (ValueError, msgspec.DecodeError):
        raise errors.BadRequestError("cursor is not one this service issued") from None


_list_statements: dict[tuple[str, ...], Statement] = {}


def list_statement(filters: tuple[str, ...]) -> Statement:
    """The listing statement for a combination of filters (`user_id`, `agent_id`,
    `status`, `cursor`): one per combination, so each can use its index."""
    statement = _list_statements.get(filters)
    if statement is None:
        where = [f"{name} = :{name}" for name in filters if not name.startswith("cursor")]
        if "cursor" in filters:
            where.append("(created_at, id) < (:cursor_created_at, :cursor_id)")
        statement = Statement(
            f"""SELECT {JOB_COLUMNS} FROM provisioning_jobs
                WHERE {" AND ".join(where) or "true"}
                ORDER BY created_at DESC, id DESC LIMIT :limit"""
        )
        _list_statements[filters] = statement
    return statement


async def list_jobs(
    *,
    user_id: UUID | None = None,
    agent_id: UUID | None = None,
    status: JobStatus | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> JobPage:
    """Jobs newest first, keyset-paged: pass `next_cursor` back to get the next page."""
    if limit < 1:
        raise errors.BadRequestError("limit must be at least 1")
    values: dict[str, Any] = {"user_id": user_id, "agent_id": agent_id, "status": status}
    values = {k: v for k, v in values.items() if v is not None}
    if cursor is not None:
        position = _decode_cursor(cursor)
        values |= {
            "cursor": True,
            "cursor_created_at": position.created_at,
            "cursor_id": position.id,
        }
    statement = list_statement(tuple(values))
    rows = await fetch(statement, limit=limit + 1, **values)
    items = [job_from_row(r) for r in rows[:limit]]
    more = len(rows) > limit
    return JobPage(items=items, next_cursor=_encode_cursor(items[-1]) if more else None)
