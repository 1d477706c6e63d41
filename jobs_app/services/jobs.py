"""The jobs service: every statement that reads or changes a provisioning job.

Each operation is one SQL statement (one round trip, autocommit) built from the shared
blocks of `jobs_app.db.fragments`; concurrent enqueues, transitions and heartbeats are
coalesced into one statement and one commit per batch (group commit, see
`services/batching.py`), and what a statement committed is announced after its commit
(`services/announcements.py`). Invariants two requests could race on are decided by
PostgreSQL: the unique stripe_event_id, the partial unique index allowing one job in
flight per user, and conditional UPDATEs on a row locked in the same statement.
Transitions write their `job_events` row in that same statement, so history and state
never disagree. Time is `now()`.

Callers see typed errors from `jobs_app.core.errors`, never database exceptions. The
statements are named at module level (bench/ runs them on a raw pool to measure what
the service adds).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple
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
    EventKind,
    FailureReason,
    JobStatus,
    StepState,
)
from jobs_app.core.models import (
    Enqueued,
    HistoryEvent,
    Job,
    JobEvent,
    JobPage,
    StepEvent,
)
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
    jobs_by_id,
    locked_jobs,
    record_events,
    requests_input,
    running_step,
    set_status_to,
    sql_list,
    transition_allowed,
)
from jobs_app.db.statement import Statement, fetch, fetchrow
from jobs_app.services import progress
from jobs_app.services.announcements import Committed, announce
from jobs_app.services.batching import Batcher

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
_LOCKED_COLUMNS = f"{JOB_COLUMNS}, steps"
"""A job's columns and its step states: what a transition or a step report locks."""

# --------------------------------------------------------------------------- how writes run

# Enqueues, transitions and heartbeats go through a Batcher (services/batching.py):
# concurrent calls for different jobs share one statement and one commit, each caller
# getting the answer it would get alone. So each statement below takes arrays, one
# element per request, and answers one row per request (`n`, its place in the arrays);
# a batch of one runs the same statement over scalars (`requests_input`).
# The rows a batch locks are locked in id order, so batches never deadlock.


_CALLBACK_FIELDS = (
    ("job_id", "uuid"),
    ("attempt", "integer"),
    ("dispatch_id", "uuid"),
    ("workflow_run_id", "text"),
)
"""What every callback of the workflow names: the job, its attempt, the dispatch and run."""


class _Write(NamedTuple):
    """A write's statement for a batch and the same for a batch of one, both built on
    `requests_input(fields)`."""

    many: Statement
    one: Statement
    fields: tuple[tuple[str, str], ...]

    def bind(self, requests: Sequence[Any]) -> tuple[Statement, dict[str, Any]]:
        """The statement for these requests, and its parameters named after the fields:
        each one's values, one per request (`CAST(:job_id AS uuid[])` holds each request's
        job_id), or for a batch of one, its value itself."""
        if len(requests) == 1:
            return self.one, {name: getattr(requests[0], name) for name, _ in self.fields}
        return self.many, {name: [getattr(r, name) for r in requests] for name, _ in self.fields}


def _by_n(rows: Sequence[asyncpg.Record]) -> dict[int, asyncpg.Record]:
    return {row["n"]: row for row in rows}


# --------------------------------------------------------------------------- enqueue

# A row is inserted only when its agent belongs to its user (so no foreign key can
# raise for one row of a batch), and ON CONFLICT DO NOTHING skips both a replayed
# Stripe event and a second job in flight for a user (the partial unique index); the
# answer row says which, or what does not exist.
_ENQUEUE_FIELDS = (
    ("agent_id", "uuid"),
    ("user_id", "uuid"),
    ("stripe_event_id", "text"),
    ("region", "text"),
    ("max_retries", "integer"),
    ("actor", "text"),
)


def _enqueue_statement(*, one: bool) -> Statement:
    return Statement(
        f"""
    WITH input AS ({requests_input(_ENQUEUE_FIELDS, one=one)}
    ), owned AS (
        SELECT i.* FROM input AS i
        CROSS JOIN LATERAL (SELECT 1 FROM agents AS a
                            WHERE a.id = i.agent_id AND a.user_id = i.user_id OFFSET 0) AS a
    ), inserted AS (
        INSERT INTO provisioning_jobs (agent_id, user_id, stripe_event_id, region, max_retries)
        SELECT agent_id, user_id, stripe_event_id, region, max_retries FROM owned ORDER BY n
        ON CONFLICT DO NOTHING
        RETURNING {JOB_COLUMNS}, steps
    ), created AS (
        SELECT ins.*, CAST(NULL AS varchar) AS from_status, o.actor AS by_actor, o.n
        FROM inserted AS ins JOIN owned AS o ON o.stripe_event_id = ins.stripe_event_id
    ), event AS ({record_events("created", actor="by_actor", reason="'enqueued'")}
    )
    SELECT c.n, true AS created, e.event_id, true AS user_known, true AS agent_known,
           true AS owned, c.steps AS reports, {progress.DB_NOW}, {job_columns("c")}
    FROM created AS c JOIN event AS e ON e.job_id = c.id
    UNION ALL
    SELECT i.n, false, NULL,
           x.id IS NOT NULL OR EXISTS (SELECT 1 FROM users AS u WHERE u.id = i.user_id),
           x.id IS NOT NULL OR EXISTS (SELECT 1 FROM agents AS a WHERE a.id = i.agent_id),
           x.id IS NOT NULL OR EXISTS (SELECT 1 FROM owned AS o WHERE o.n = i.n),
           x.steps, {progress.DB_NOW}, {job_columns("x")}
    FROM input AS i
    LEFT JOIN LATERAL (SELECT {JOB_COLUMNS}, steps FROM provisioning_jobs
                       WHERE stripe_event_id = i.stripe_event_id OFFSET 0) AS x ON true
    WHERE NOT EXISTS (SELECT 1 FROM created AS c WHERE c.n = i.n)
    """
    )


ENQUEUES = _enqueue_statement(one=False)
"""Enqueue a batch of jobs (array parameters)."""
ENQUEUE = _enqueue_statement(one=True)
"""Enqueue one job: ENQUEUES for a batch of one (scalar parameters)."""
_ENQUEUE = _Write(ENQUEUES, ENQUEUE, _ENQUEUE_FIELDS)
BY_STRIPE_EVENT = Statement(
    f"SELECT {JOB_COLUMNS} FROM provisioning_jobs WHERE stripe_event_id = :stripe_event_id"
)
_ANSWER_COLUMNS = 8  # n, created, event_id, user_known, agent_known, owned, reports, db_now


class _Enqueue(msgspec.Struct, frozen=True):
    agent_id: UUID
    user_id: UUID
    stripe_event_id: str
    region: str
    max_retries: int
    actor: str


async def _run_enqueues(requests: Sequence[_Enqueue]) -> list[Enqueued | BaseException]:
    statement, values = _ENQUEUE.bind(requests)
    medians = await progress.learned()  # before the write: a failed read changes nothing
    rows = _by_n(await fetch(statement, **values))
    answers: list[Enqueued | BaseException] = []
    committed: list[Committed] = []
    for n, request in enumerate(requests, 1):
        row = rows[n]
        if row["created"]:
            job = progress.with_progress(job_from_row(row, _ANSWER_COLUMNS), row, medians)
            committed.append(Committed(row["event_id"], job.id, job.user_id, True))
            metrics.TRANSITIONS.labels(JobStatus.QUEUED).inc()
            answers.append(Enqueued(job=job, created=True))
        elif row["id"] is not None:
            replayed = progress.with_progress(job_from_row(row, _ANSWER_COLUMNS), row, medians)
            answers.append(_replay(request, replayed))
        elif not row["user_known"]:
            answers.append(errors.NotFoundError("user not found"))
        elif not row["agent_known"]:
            answers.append(errors.NotFoundError("agent not found"))
        elif not row["owned"]:
            answers.append(errors.InvalidReferenceError("agent does not belong to this user"))
        else:
            answers.append(await _skipped(request))
    announce(committed)
    return answers


def _replay(request: _Enqueue, job: Job) -> Enqueued | BaseException:
    if job.user_id != request.user_id or job.agent_id != request.agent_id:
        return errors.IdempotencyConflictError(
            "this stripe_event_id was already used for another user or agent"
        )
    return Enqueued(job=job, created=False)


async def _skipped(request: _Enqueue) -> Enqueued | BaseException:
    """The insert was skipped, and the statement saw no job for the event: a concurrent
    call for this same event committed after the statement's snapshot was taken (then a
    new statement sees its row: a replay), or the user has a job in flight."""
    replay = await fetchrow(BY_STRIPE_EVENT, stripe_event_id=request.stripe_event_id)
    if replay is not None:
        return _replay(request, job_from_row(replay))
    return errors.ConcurrentProvisionError(CONCURRENT_PROVISION_MESSAGE)


_enqueues: Batcher[_Enqueue, Enqueued] = Batcher(
    "enqueue",
    _run_enqueues,
    # One job per event, one in flight per user: such requests never share a batch.
    keys=lambda r: (("event", r.stripe_event_id), ("user", r.user_id)),
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
    ConcurrentProvisionError; an unknown user or agent NotFoundError, an agent of
    another user InvalidReferenceError.
    """
    return await _enqueues.submit(
        _Enqueue(
            agent_id=agent_id,
            user_id=user_id,
            stripe_event_id=stripe_event_id,
            region=region,
            max_retries=get_settings().max_retries if max_retries is None else max_retries,
            actor=actor,
        )
    )


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

# A transition: lock the row (so the old status and attempt are the latest committed
# ones, not a snapshot's), fence the callback by its dispatch, move the row only if the
# lifecycle, the attempt and the fence allow it, record the event, bind the attempt to
# the dispatch (superseding the attempt's other dispatches, their runs cancelled),
# cancel the run of a refused callback, and the known runs of a job failed by anyone
# but its workflow. Each answer row holds the moved row, or the locked row unchanged,
# from which the caller learns why nothing moved.
#
# A batch in which nobody but the workflow fails a job runs the statement without that
# last part: the executor sets up every part of a statement on each call, used or not.

_REFUSED_RUN_REASON = "'refused callback of a superseded or stale dispatch'"
_FAILED_STEP = f"COALESCE(c.failed_step, {running_step('j')})"
"""A failure the workflow did not place: where the attempt was when it broke."""
_WAIT = f"""CASE WHEN status = '{JobStatus.PROVISIONING}'
                 THEN extract(epoch FROM now() - queued_at) END"""
"""A move to provisioning measures the wait before it (the ETA's queue median)."""
_INPUT_ROW = "i"

_CANCEL_KNOWN_RUNS = f""", cancel_known AS ({
    cancel_attempt_runs(
        "moved",
        "'job failed by ' || m.by_actor",
        f"m.status = '{JobStatus.FAILED}' AND m.by_actor <> '{Actor.WORKFLOW}'",
    )
})"""


_TRANSITION_FIELDS = (
    *_CALLBACK_FIELDS,
    ("to_status", "text"),
    ("error", "text"),
    ("failed_step", "text"),
    ("failure_reason", "text"),
    ("actor", "text"),
)


def _transition_statement(*, one: bool, cancel_known_runs: str) -> Statement:
    return Statement(
        f"""
    WITH input AS ({requests_input(_TRANSITION_FIELDS, one=one)}
    ), locked AS ({locked_jobs("job_id", _LOCKED_COLUMNS, one=one)}
    ), checked AS (
        SELECT i.*, p.status AS from_status, p.dispatch_id AS bound_before, f.issued,
               {fence_ok("p", "f.issued", dispatch="i.dispatch_id")} AS fence_ok,
               i.attempt IS NOT NULL AND p.attempt <> i.attempt AS stale,
               {transition_allowed("i.to_status", "p.status")} AS allowed
        FROM input AS i JOIN locked AS p ON p.id = i.job_id
        CROSS JOIN LATERAL (SELECT {dispatch_issued("p", "i.dispatch_id")} AS issued) AS f
    ), moved AS (
        UPDATE provisioning_jobs AS j SET {
            set_status_to(
                "c.to_status",
                error="c.error",
                failed_step=_FAILED_STEP,
                failure_reason="c.failure_reason",
            )
        },
            workflow_run_id = COALESCE(c.workflow_run_id, j.workflow_run_id),
            dispatch_id = COALESCE(j.dispatch_id, c.dispatch_id)
        FROM checked AS c
        WHERE j.id = c.job_id AND c.fence_ok AND NOT c.stale AND c.allowed
        RETURNING {job_columns("j")}, j.steps, c.from_status, c.bound_before, c.n,
                  c.actor AS by_actor, c.dispatch_id AS by_dispatch,
                  c.workflow_run_id AS by_run, c.error AS by_error, j.queued_at
    ), event AS ({
            record_events(
                "moved",
                actor="by_actor",
                reason=f"CASE WHEN status = '{JobStatus.FAILED}' THEN by_error ELSE by_run END",
                seconds=_WAIT,
            )
        }), bound AS (
        -- The first callback of a dispatch: its run exists (a 204 or an unknown outcome
        -- learns the run id here). The lease is left to its holder: a dispatcher whose
        -- request is still in flight records its answer (the run's URL) when it comes.
        UPDATE dispatches AS d SET
            state = CASE WHEN d.state IN ({WORKING}) THEN '{DispatchState.DISPATCHED}'
                         ELSE d.state END,
            workflow_run_id = COALESCE(d.workflow_run_id, m.by_run),
            dispatched_at = COALESCE(d.dispatched_at, now()), updated_at = now()
        FROM moved AS m WHERE d.id = m.by_dispatch AND m.bound_before IS NULL
    ), superseded AS (
        -- Any other live dispatch of the attempt lost.
        UPDATE dispatches AS d SET state = '{DispatchState.SUPERSEDED}', updated_at = now()
        FROM moved AS m
        WHERE d.job_id = m.id AND d.attempt = m.attempt AND m.bound_before IS NULL
          AND d.id <> m.by_dispatch AND d.state IN ({sql_list(LIVE_DISPATCH_STATES)})
        RETURNING d.id, d.job_id, d.workflow_run_id
    ), cancel AS ({
            cancel_runs(
                f'''SELECT workflow_run_id, job_id, id,
                   'superseded: its attempt is bound to another run'
            FROM superseded WHERE workflow_run_id IS NOT NULL
            UNION ALL
            SELECT c.workflow_run_id, c.job_id, c.dispatch_id, {_REFUSED_RUN_REASON}
            FROM checked AS c
            WHERE c.dispatch_id IS NOT NULL AND c.workflow_run_id IS NOT NULL
              AND (NOT c.fence_ok OR c.stale)'''
            )
        }){cancel_known_runs}
    SELECT m.n, true AS moved, e.event_id, true AS issued, m.steps AS reports, {progress.DB_NOW},
           {job_columns("m")}
    FROM moved AS m JOIN event AS e ON e.job_id = m.id
    UNION ALL
    SELECT c.n, false, NULL, c.issued, p.steps, {progress.DB_NOW}, {job_columns("p")}
    FROM checked AS c JOIN locked AS p ON p.id = c.job_id
    WHERE NOT EXISTS (SELECT 1 FROM moved AS m WHERE m.n = c.n)
    """
    )


TRANSITIONS_BATCH = _transition_statement(one=False, cancel_known_runs="")
"""The transitions of a batch in which only the workflow fails jobs (if any)."""
TRANSITIONS_BATCH_FAILING = _transition_statement(one=False, cancel_known_runs=_CANCEL_KNOWN_RUNS)
"""The same, for a batch that fails a job for someone else: its known runs cancelled."""
TRANSITION = _transition_statement(one=True, cancel_known_runs="")
"""TRANSITIONS_BATCH for a batch of one (scalar parameters)."""
TRANSITION_FAILING = _transition_statement(one=True, cancel_known_runs=_CANCEL_KNOWN_RUNS)
"""TRANSITIONS_BATCH_FAILING for a batch of one."""
_TRANSITIONS = {
    False: _Write(TRANSITIONS_BATCH, TRANSITION, _TRANSITION_FIELDS),
    True: _Write(TRANSITIONS_BATCH_FAILING, TRANSITION_FAILING, _TRANSITION_FIELDS),
}
"""By whether the batch fails a job for someone other than its workflow."""


_MOVED_COLUMNS = 6  # n, moved, event_id, issued, reports, db_now


class _Transition(msgspec.Struct, frozen=True):
    job_id: UUID
    to_status: JobStatus
    attempt: int | None
    dispatch_id: UUID | None
    workflow_run_id: str | None
    error: str | None
    failed_step: str | None
    failure_reason: str | None
    actor: str
    repeat_ok: bool


async def _run_transitions(requests: Sequence[_Transition]) -> list[Job | BaseException]:
    failing = any(r.to_status == JobStatus.FAILED and r.actor != Actor.WORKFLOW for r in requests)
    statement, values = _TRANSITIONS[failing].bind(requests)
    # Each answer's job is in its request's status (moved, or a repeat), or an error: no
    # medians to read when none of those statuses has an estimate.
    medians = await progress.learned(progress.eta_wanted(r.to_status for r in requests))
    rows = _by_n(await fetch(statement, **values))
    answers: list[Job | BaseException] = []
    committed: list[Committed] = []
    for n, request in enumerate(requests, 1):
        row = rows.get(n)
        if row is not None and row["moved"]:
            job = progress.with_progress(job_from_row(row, _MOVED_COLUMNS), row, medians)
            committed.append(Committed(row["event_id"], job.id, job.user_id, False))
            metrics.TRANSITIONS.labels(request.to_status).inc()
            answers.append(job)
        else:
            answers.append(_explain_unmoved(row, request, medians))
    announce(committed)
    return answers


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
    row: asyncpg.Record | None, request: _Transition, medians: progress.Medians
) -> Job | BaseException:
    """Nothing moved: the idempotent repeat (the job), or the error that says why."""
    if row is None:
        return errors.NotFoundError("job not found", job_id=str(request.job_id))
    job = progress.with_progress(job_from_row(row, _MOVED_COLUMNS), row, medians)
    refusal = _refusal(job, request.attempt, request.dispatch_id, row["issued"])
    if refusal is not None:
        return refusal
    wanted = request.to_status
    if job.status == wanted and request.repeat_ok:
        return job
    return errors.InvalidTransitionError(
        f"the job is already {wanted}"
        if job.status == wanted
        else f"cannot move a {job.status} job to {wanted}",
        reason="invalid_transition",
        current_status=str(job.status),
        requested_status=str(wanted),
    )


_transitions: Batcher[_Transition, Job] = Batcher(
    "transition", _run_transitions, keys=lambda r: (r.job_id,)
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
    if wanted not in TRANSITIONS:
        raise errors.InvalidTransitionError(
            f"a job cannot be moved to {wanted} by a status update; use retry",
            reason="invalid_transition",
            requested_status=str(wanted),
        )
    failing = TRANSITIONS[wanted].carries_failure
    return await _transitions.submit(
        _Transition(
            job_id=job_id,
            to_status=wanted,
            attempt=attempt,
            dispatch_id=dispatch_id,
            workflow_run_id=workflow_run_id,
            error=(error or "failed") if failing else None,
            failed_step=failed_step if failing else None,
            failure_reason=(failure_reason or FailureReason.WORKFLOW_ERROR) if failing else None,
            actor=actor,
            repeat_ok=repeat_ok,
        )
    )


# --------------------------------------------------------------------------- heartbeats

# A heartbeat is no transition: no history row, and no index covers the columns it
# writes, so it is a HOT update. A refused one says why from the same statement, and
# cancels the run of a superseded or stale dispatch.


def _heartbeat_statement(*, one: bool) -> Statement:
    return Statement(
        f"""
    WITH input AS ({requests_input(_CALLBACK_FIELDS, one=one)}
    ), locked AS ({locked_jobs("job_id", JOB_COLUMNS, one=one)}
    ), checked AS (
        SELECT i.*, p.status, p.attempt AS current_attempt, f.issued,
               {fence_ok("p", "f.issued", dispatch="i.dispatch_id")} AS fence_ok
        FROM input AS i JOIN locked AS p ON p.id = i.job_id
        CROSS JOIN LATERAL (SELECT {dispatch_issued("p", "i.dispatch_id")} AS issued) AS f
    ), beat AS (
        UPDATE provisioning_jobs AS j SET
            last_heartbeat_at = now(), updated_at = now(),
            first_heartbeat_at = COALESCE(j.first_heartbeat_at, now()),
            heartbeat_count = j.heartbeat_count + 1
        FROM checked AS c
        WHERE j.id = c.job_id AND c.status = '{JobStatus.PROVISIONING}'
          AND c.current_attempt = c.attempt AND c.fence_ok
        RETURNING {job_columns("j")}, c.n
    ), cancel AS ({
            cancel_runs(
                f'''SELECT c.workflow_run_id, c.job_id, c.dispatch_id, {_REFUSED_RUN_REASON}
            FROM checked AS c
            WHERE c.dispatch_id IS NOT NULL AND c.workflow_run_id IS NOT NULL
              AND (c.current_attempt <> c.attempt OR NOT c.fence_ok)'''
            )
        })
    SELECT b.n, true AS beat, true AS issued, {job_columns("b")} FROM beat AS b
    UNION ALL
    SELECT c.n, false, c.issued, {job_columns("p")}
    FROM checked AS c JOIN locked AS p ON p.id = c.job_id
    WHERE NOT EXISTS (SELECT 1 FROM beat AS b WHERE b.n = c.n)
    """
    )


HEARTBEATS = _heartbeat_statement(one=False)
"""Heartbeats of a batch (array parameters)."""
HEARTBEAT = _heartbeat_statement(one=True)
"""HEARTBEATS for a batch of one (scalar parameters)."""
_HEARTBEATS = _Write(HEARTBEATS, HEARTBEAT, _CALLBACK_FIELDS)
_BEAT_COLUMNS = 3  # n, beat, issued


class _Heartbeat(msgspec.Struct, frozen=True):
    job_id: UUID
    attempt: int
    dispatch_id: UUID | None
    workflow_run_id: str | None


async def _run_heartbeats(requests: Sequence[_Heartbeat]) -> list[Job | BaseException]:
    statement, values = _HEARTBEATS.bind(requests)
    rows = _by_n(await fetch(statement, **values))
    answers: list[Job | BaseException] = []
    for n, request in enumerate(requests, 1):
        row = rows.get(n)
        if row is None:
            answers.append(errors.NotFoundError("job not found", job_id=str(request.job_id)))
            continue
        job = job_from_row(row, _BEAT_COLUMNS)
        if row["beat"]:
            answers.append(job)
            continue
        refusal = _refusal(job, request.attempt, request.dispatch_id, row["issued"])
        answers.append(
            refusal
            or errors.InvalidTransitionError(
                f"heartbeats are only taken while provisioning; the job is {job.status}",
                reason="invalid_transition",
                current_status=str(job.status),
            )
        )
    return answers


_heartbeats: Batcher[_Heartbeat, Job] = Batcher(
    "heartbeat", _run_heartbeats, keys=lambda r: (r.job_id,)
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
    but which the sweeper has not failed yet is still alive, and is kept. A refusal
    says why; the run of a superseded or stale dispatch is put up for cancellation.
    """
    return await _heartbeats.submit(
        _Heartbeat(
            job_id=job_id,
            attempt=attempt,
            dispatch_id=dispatch_id,
            workflow_run_id=workflow_run_id,
        )
    )


# --------------------------------------------------------------------------- step reports

# The workflow reports each step of the plan (started, succeeded, failed), fenced exactly
# as a status callback is: the attempt, the dispatch (a refused run is put up for
# cancellation), the job provisioning. The attempt's step states live on the job's row
# (`steps`), so the decision (a repeat records nothing, a step never moves backwards) is
# taken on the row the statement locks: concurrent reports of one job are serialised by
# that lock and each sees the one before it. A recorded report updates `steps` and writes
# its history row; a step that succeeds records how long it took since it started (0
# without a start): the ETA's samples.
_STEP = "p.steps -> i.step"
_STEP_FIELDS = (*_CALLBACK_FIELDS, ("step", "text"), ("state", "text"), ("detail", "text"))


def _step_statement(*, one: bool) -> Statement:
    return Statement(
        f"""
    WITH input AS ({requests_input(_STEP_FIELDS, one=one)}
    ), locked AS ({locked_jobs("job_id", _LOCKED_COLUMNS, one=one)}
    ), checked AS (
        SELECT i.*, p.status AS job_status, p.attempt AS current_attempt, f.issued,
               {fence_ok("p", "f.issued", dispatch="i.dispatch_id")} AS fence_ok,
               p.attempt <> i.attempt AS stale, {_STEP} ->> 'state' AS last_state,
               CAST({_STEP} ->> 'started_at' AS timestamptz) AS started_at
        FROM input AS i JOIN locked AS p ON p.id = i.job_id
        CROSS JOIN LATERAL (SELECT {dispatch_issued("p", "i.dispatch_id")} AS issued) AS f
    ), accepted AS (
        SELECT * FROM checked
        WHERE fence_ok AND NOT stale AND job_status = '{JobStatus.PROVISIONING}'
          AND (last_state IS NULL
               OR (last_state = '{StepState.STARTED}' AND state <> '{StepState.STARTED}'))
    ), updated AS (
        UPDATE provisioning_jobs AS j SET
            steps = j.steps || jsonb_build_object(a.step, jsonb_build_object(
                'state', a.state,
                'started_at', COALESCE(a.started_at, now()),
                'finished_at', CASE WHEN a.state <> '{StepState.STARTED}' THEN now() END)),
            updated_at = now()
        FROM accepted AS a WHERE j.id = a.job_id
        RETURNING {job_columns("j")}, j.steps
    ), recorded AS (
        INSERT INTO job_events (job_id, from_status, to_status, attempt, actor, kind, step,
                                step_state, detail, seconds)
        SELECT job_id, job_status, job_status, current_attempt, '{Actor.WORKFLOW}',
               '{EventKind.STEP}', step, state, detail,
               CASE WHEN state = '{StepState.SUCCEEDED}'
                    THEN COALESCE(extract(epoch FROM now() - started_at), 0) END
        FROM accepted
        RETURNING id AS event_id, job_id, seconds
    ), cancel AS ({
            cancel_runs(
                f'''SELECT c.workflow_run_id, c.job_id, c.dispatch_id, {_REFUSED_RUN_REASON}
            FROM checked AS c
            WHERE c.dispatch_id IS NOT NULL AND c.workflow_run_id IS NOT NULL
              AND (NOT c.fence_ok OR c.stale)'''
            )
        })
    SELECT c.n, r.event_id, r.seconds, c.issued, c.last_state, x.steps AS reports,
           {progress.DB_NOW}, {job_columns("x")}
    FROM checked AS c
    CROSS JOIN LATERAL (
        SELECT * FROM updated AS u WHERE u.id = c.job_id
        UNION ALL
        SELECT {JOB_COLUMNS}, steps FROM locked AS p
        WHERE p.id = c.job_id AND NOT EXISTS (SELECT 1 FROM updated AS u WHERE u.id = c.job_id)
    ) AS x
    LEFT JOIN recorded AS r ON r.job_id = c.job_id
    """
    )


STEP_REPORTS = _step_statement(one=False)
"""Step reports of a batch (array parameters)."""
STEP_REPORT = _step_statement(one=True)
"""STEP_REPORTS for a batch of one (scalar parameters)."""
_STEP_REPORTS = _Write(STEP_REPORTS, STEP_REPORT, _STEP_FIELDS)
_STEP_COLUMNS = 7  # n, event_id, seconds, issued, last_state, reports, db_now


class _StepReport(msgspec.Struct, frozen=True):
    job_id: UUID
    attempt: int
    dispatch_id: UUID | None
    workflow_run_id: str | None
    step: str
    state: StepState
    detail: str | None


async def _run_step_reports(requests: Sequence[_StepReport]) -> list[Job | BaseException]:
    statement, values = _STEP_REPORTS.bind(requests)
    medians = await progress.learned()
    rows = _by_n(await fetch(statement, **values))
    answers: list[Job | BaseException] = []
    committed: list[Committed] = []
    for n, request in enumerate(requests, 1):
        row = rows.get(n)
        if row is None:
            answers.append(errors.NotFoundError("job not found", job_id=str(request.job_id)))
            continue
        job = progress.with_progress(job_from_row(row, _STEP_COLUMNS), row, medians)
        if row["event_id"] is not None:
            committed.append(Committed(row["event_id"], job.id, job.user_id, False))
            metrics.STEP_REPORTS.labels(request.state).inc()
            if row["seconds"] is not None:
                metrics.STEP_DURATION.labels(request.step).observe(row["seconds"])
            answers.append(job)
            continue
        refusal = _refusal(job, request.attempt, request.dispatch_id, row["issued"])
        if refusal is not None:
            answers.append(refusal)
        elif job.status != JobStatus.PROVISIONING:
            answers.append(
                errors.InvalidTransitionError(
                    f"steps are reported while provisioning; the job is {job.status}",
                    reason="invalid_transition",
                    current_status=str(job.status),
                )
            )
        elif row["last_state"] == request.state:
            answers.append(job)  # a repeat: recorded already
        else:
            answers.append(
                errors.InvalidTransitionError(
                    f"step {request.step} is {row['last_state']}: it cannot be reported "
                    f"{request.state} now",
                    reason="invalid_transition",
                    step=request.step,
                    step_state=row["last_state"],
                    requested_state=str(request.state),
                )
            )
    announce(committed)
    return answers


_step_reports: Batcher[_StepReport, Job] = Batcher(
    "step", _run_step_reports, keys=lambda r: (r.job_id,)
)


async def report_step(
    job_id: UUID,
    *,
    attempt: int,
    step: str,
    state: StepState | str,
    dispatch_id: UUID | None = None,
    workflow_run_id: str | None = None,
    detail: str | None = None,
) -> Job:
    """Record a step the workflow reports for this attempt (see STEP_REPORTS).

    InvalidReferenceError for a step not in the plan (JOBS_PROVISION_STEPS); the job
    answered, as a status callback is (refusals: StaleAttemptError,
    SupersededDispatchError, InvalidTransitionError).
    """
    plan = progress.plan_names()
    if step not in plan:
        raise errors.InvalidReferenceError(
            f"{step!r} is not a step of the provisioning plan", steps=plan
        )
    return await _step_reports.submit(
        _StepReport(
            job_id=job_id,
            attempt=attempt,
            dispatch_id=dispatch_id,
            workflow_run_id=workflow_run_id,
            step=step,
            state=StepState(state),
            detail=detail,
        )
    )


# --------------------------------------------------------------------------- progress

JOB_PROGRESS = Statement(
    f"""SELECT j.id, {progress.step_reports("j")} AS reports, {progress.DB_NOW}
        FROM ({jobs_by_id("CAST(:job_ids AS uuid[])", "id, steps")}) AS j"""
)


async def with_progress(jobs: Sequence[Job]) -> list[Job]:
    """The jobs, each with its progress (one statement for them all)."""
    if not jobs:
        return []
    medians = await progress.learned(progress.eta_wanted(job.status for job in jobs))
    rows = {row["id"]: row for row in await fetch(JOB_PROGRESS, job_ids=[j.id for j in jobs])}
    return [
        progress.with_progress(job, rows[job.id], medians) if job.id in rows else job
        for job in jobs
    ]


# --------------------------------------------------------------------------- retry

RETRY = Statement(
    f"""
    WITH locked AS (
        SELECT {JOB_COLUMNS} FROM provisioning_jobs WHERE id = :job_id FOR NO KEY UPDATE
    ), moved AS (
        UPDATE provisioning_jobs AS j SET
            status = '{JobStatus.QUEUED}', retry_count = j.retry_count + 1,
            max_retries = CASE WHEN :grant_extra
                               THEN GREATEST(j.max_retries, j.retry_count + 1)
                               ELSE j.max_retries END,
            queued_at = now(), workflow_run_id = NULL, error = NULL, failed_step = NULL,
            failure_reason = NULL, claimed_at = NULL, last_heartbeat_at = NULL,
            first_heartbeat_at = NULL, heartbeat_count = 0, steps = '{{}}', completed_at = NULL,
            dispatch_id = NULL, updated_at = now()
        FROM locked
        WHERE j.id = locked.id AND locked.status IN ({sql_list(RETRY_SOURCES)})
          AND (locked.retry_count < locked.max_retries OR :grant_extra)
        RETURNING {job_columns("j")}, locked.status AS from_status
    ), event AS ({record_events("moved", actor=":actor", reason=":reason")}
    )
    SELECT true AS moved, e.event_id, CAST('{{}}' AS jsonb) AS reports, {progress.DB_NOW},
           {JOB_COLUMNS}
    FROM moved JOIN event AS e ON e.job_id = id
    UNION ALL
    SELECT false, NULL, NULL, NULL, {JOB_COLUMNS} FROM locked
    WHERE NOT EXISTS (SELECT 1 FROM moved)
    """
)
_RETRY_COLUMNS = 4  # moved, event_id, reports, db_now


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
    medians = await progress.learned()
    row = await fetchrow(
        RETRY,
        job_id=job_id,
        actor=actor,
        reason=reason or ("extra attempt granted" if grant_extra_attempt else "retry"),
        grant_extra=grant_extra_attempt,
    )
    if row is not None and row["moved"]:
        metrics.TRANSITIONS.labels(JobStatus.QUEUED).inc()
        job = progress.with_progress(job_from_row(row, _RETRY_COLUMNS), row, medians)
        announce([Committed(row["event_id"], job.id, job.user_id, True)])
        return job
    if row is None:
        raise errors.NotFoundError("job not found", job_id=str(job_id))
    job = job_from_row(row, _RETRY_COLUMNS)
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
# first wins and the job stays provisioning. (NO KEY: nothing here changes a key,
# so the foreign-key checks of rows that reference the job never wait on it.)
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
        FOR NO KEY UPDATE SKIP LOCKED
    ), moved AS ({fail_jobs("stale", error="stale.error", failure_reason="stale.reason")}
    ), event AS ({record_events("moved", actor=f"'{Actor.SYSTEM}'", reason="error")}
    ), cancel AS ({cancel_attempt_runs("moved", "'timed out: ' || m.failure_reason")}
    )"""


SWEEP = Statement(
    _fail_stale("true", "LIMIT :batch")
    + f"""
    SELECT e.event_id, {job_columns("m")} FROM moved AS m JOIN event AS e ON e.job_id = m.id"""
)
GET_JOB_CHECKED = Statement(
    _fail_stale("id = :job_id")
    + f"""
    SELECT true AS timed_out, e.event_id,
           (SELECT {progress.step_reports("p")} FROM provisioning_jobs AS p WHERE p.id = m.id)
           AS reports,
           {progress.DB_NOW}, {job_columns("m")}
    FROM moved AS m JOIN event AS e ON e.job_id = m.id
    UNION ALL
    SELECT false, NULL, {progress.step_reports("j")}, {progress.DB_NOW},
           {job_columns("j")}
    FROM provisioning_jobs AS j
    WHERE id = :job_id AND NOT EXISTS (SELECT 1 FROM moved)"""
)
_CHECKED_COLUMNS = 4  # timed_out, event_id, reports, db_now


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
    medians = await progress.learned()
    row = await fetchrow(GET_JOB_CHECKED, job_id=job_id, **timeouts())
    if row is None:
        raise errors.NotFoundError("job not found", job_id=str(job_id))
    job = progress.with_progress(job_from_row(row, _CHECKED_COLUMNS), row, medians)
    if row["timed_out"]:
        _count_stale(job)
        announce([Committed(row["event_id"], job.id, job.user_id, False)])
    return job, row["timed_out"]


async def get_job(job_id: UUID) -> Job:
    """The job, with its progress, after failing it if it is stale (the dashboard's
    on-demand check): one statement."""
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
        jobs = [job_from_row(row, 1) for row in rows]
        for job in jobs:
            _count_stale(job)
        events = zip(rows, jobs, strict=True)
        announce([Committed(row["event_id"], job.id, job.user_id, False) for row, job in events])
        failed += jobs
        if len(rows) < batch_size:
            return failed


# --------------------------------------------------------------------------- reads

BY_AGENT = Statement(
    f"""SELECT {JOB_COLUMNS} FROM provisioning_jobs WHERE agent_id = :agent_id
        ORDER BY created_at DESC, id DESC LIMIT 1"""
)
HISTORY_COLUMNS = """e.id, e.job_id, e.from_status, e.to_status, e.attempt, e.actor, e.reason,
    e.created_at, e.kind, e.step, e.step_state, e.detail"""
"""A `job_events` row aliased `e`, as `history_event` reads it."""
EVENTS = Statement(
    f"""SELECT {HISTORY_COLUMNS}
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


def history_event(row: asyncpg.Record | tuple[Any, ...]) -> HistoryEvent:
    """A `job_events` row (HISTORY_COLUMNS, first) as the event of its kind."""
    event_id, job_id, from_status, to_status, attempt, actor, reason, at = row[:8]
    kind, step, state, detail = row[8:12]
    if kind == EventKind.STEP:
        return StepEvent(event_id, job_id, attempt, step, state, at, detail)
    return JobEvent(event_id, job_id, from_status, to_status, attempt, actor, reason, at)


async def list_job_events(job_id: UUID) -> list[HistoryEvent]:
    """The job's history, both kinds, oldest first; NotFoundError for an unknown job."""
    rows = await fetch(EVENTS, job_id=job_id)
    if not rows:
        raise errors.NotFoundError("job not found", job_id=str(job_id))
    return [history_event(r) for r in rows if r[0] is not None]


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
