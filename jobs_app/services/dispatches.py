"""The dispatches service: every statement that reads or changes a dispatch.

A dispatch is one job attempt's request to start the workflow. The dispatcher
claims work here (new queued attempts, and dispatches due another try) under a
lease kept in PostgreSQL, talks to the provisioner with no connection held, and
records each outcome here in one statement. Invariants are PostgreSQL's: at most
one live dispatch per attempt (a partial unique index the claim's INSERT arbitrates
on), `FOR UPDATE SKIP LOCKED` so N dispatchers never take the same row, and a
record only lands while its writer still holds the lease. Time is `now()`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from jobs_app.core import metrics
from jobs_app.core.lifecycle import (
    ACTIVE_STATUSES,
    CLOSED_DISPATCH_STATES,
    LIVE_DISPATCH_STATES,
    Actor,
    CancellationState,
    DispatchState,
    FailureReason,
    JobStatus,
    TryKind,
)
from jobs_app.core.models import Dispatch, DispatchTry, Job
from jobs_app.core.provisioning import Result
from jobs_app.db.fragments import (
    JOB_COLUMNS,
    LEASE_HELD,
    RELEASE_LEASE,
    WORKING,
    cancel_runs,
    fail_jobs,
    job_by_id,
    job_columns,
    job_from_row,
    record_events,
    record_try,
    sql_list,
)
from jobs_app.db.statement import Statement, fetch, fetchrow
from jobs_app.services.announcements import Committed, announce

_LIVE = sql_list(LIVE_DISPATCH_STATES)
_QUEUED = f"'{JobStatus.QUEUED}'"
_SYSTEM = f"'{Actor.SYSTEM}'"


class Claim(msgspec.Struct, frozen=True):
    """A dispatch this process now holds the lease of, with the job's inputs."""

    dispatch_id: UUID
    job_id: UUID
    attempt: int
    tries: int
    created_at: datetime
    reconcile: bool
    """Its outcome is unknown (or its last holder died): look for its run before sending."""
    agent_id: UUID
    user_id: UUID
    region: str


class Cancellation(msgspec.Struct, frozen=True):
    workflow_run_id: str
    job_id: UUID
    dispatch_id: UUID | None
    tries: int


# --------------------------------------------------------------------------- claim


# New work first: queued attempts with no live dispatch get one (the partial unique
# index makes a racing claim's INSERT a no-op). Then dispatches due another try whose
# lease is free or expired; one taken over from a holder that never recorded its
# outcome may have started a run, so it is reconciled first, and the grace period
# counts from now.
def _claim_ctes(exclude: str = "") -> str:
    """The claim's CTEs (fresh, created, due, taken; `:batch` of each); `exclude` keeps
    jobs out (in the round: those the deadline CTEs are failing)."""
    return f"""
    fresh AS (
        SELECT j.id, j.attempt FROM provisioning_jobs AS j
        WHERE j.status = {_QUEUED} {exclude}
          AND NOT EXISTS (SELECT 1 FROM dispatches AS d
                          WHERE d.job_id = j.id AND d.attempt = j.attempt
                            AND d.state IN ({_LIVE}))
        ORDER BY j.queued_at
        LIMIT :batch
        FOR NO KEY UPDATE OF j SKIP LOCKED
    ), created AS (
        INSERT INTO dispatches (job_id, attempt, provisioner, lease_owner, lease_expires_at)
        SELECT id, attempt, :provisioner, :owner, now() + make_interval(secs => :lease)
        FROM fresh
        ON CONFLICT (job_id, attempt) WHERE state IN ({_LIVE}) DO NOTHING
        RETURNING id, job_id, attempt, tries, created_at, false AS reconcile
    ), due AS (
        SELECT d.id, (d.state = '{DispatchState.UNKNOWN}' OR d.lease_owner IS NOT NULL)
               AS reconcile
        FROM dispatches AS d
        JOIN provisioning_jobs AS j ON j.id = d.job_id AND j.attempt = d.attempt
        WHERE d.state IN ({WORKING}) AND d.next_try_at <= now()
          AND (d.lease_expires_at IS NULL OR d.lease_expires_at < now())
          AND j.status = {_QUEUED} {exclude}
        ORDER BY d.next_try_at
        LIMIT :batch
        FOR UPDATE OF d SKIP LOCKED
    ), taken AS (
        UPDATE dispatches AS d SET
            lease_owner = :owner, lease_expires_at = now() + make_interval(secs => :lease),
            state = CASE WHEN due.reconcile THEN '{DispatchState.UNKNOWN}' ELSE d.state END,
            unknown_since = CASE WHEN due.reconcile THEN COALESCE(d.unknown_since, now())
                                 ELSE d.unknown_since END,
            updated_at = now()
        FROM due WHERE d.id = due.id
        RETURNING d.id, d.job_id, d.attempt, d.tries, d.created_at, due.reconcile
    ), claimed AS (
        SELECT c.id AS dispatch_id, c.job_id, c.attempt, c.tries, c.created_at, c.reconcile,
               j.agent_id, j.user_id, j.region
        FROM (SELECT * FROM created UNION ALL SELECT * FROM taken) AS c
        CROSS JOIN LATERAL {job_by_id("c.job_id", "agent_id, user_id, region")} AS j
    )"""


CLAIM = Statement(f"WITH {_claim_ctes()} SELECT * FROM claimed")


async def claim(owner: str, provisioner: str, *, lease_seconds: float, batch: int) -> list[Claim]:
    """Take up to `batch` new and up to `batch` due dispatches under a lease for `owner`."""
    rows = await fetch(
        CLAIM, owner=owner, provisioner=provisioner, lease=float(lease_seconds), batch=batch
    )
    return [Claim(*row) for row in rows]


# --------------------------------------------------------------------------- outcomes

# Every record also writes the try, and lands only while its writer holds the lease: a
# process that lost it to a takeover writes nothing (the new holder reconciles and
# records). A callback that binds or supersedes the dispatch leaves the lease to its
# holder, whose answer still lands. One exception: a run id GitHub gave is kept even when
# the dispatch was closed meanwhile (superseded, lost or failed), so that run is cancelled.

RECORD_STARTED = Statement(
    f"""
    WITH d AS (
        UPDATE dispatches SET
            state = CASE WHEN state IN ({WORKING}) THEN '{DispatchState.DISPATCHED}'
                         ELSE state END,
            tries = tries + :counted,
            workflow_run_id = COALESCE(:workflow_run_id, workflow_run_id),
            run_url = COALESCE(:run_url, run_url),
            dispatched_at = COALESCE(dispatched_at, now()), last_error = NULL, {RELEASE_LEASE}
        WHERE id = :dispatch_id
          AND (lease_owner = :owner OR state IN ({sql_list(CLOSED_DISPATCH_STATES)}))
        RETURNING id, job_id, attempt, workflow_run_id, state
    ), try AS ({record_try("d")}
    ), cancel AS ({
        cancel_runs(
            f'''SELECT d.workflow_run_id, d.job_id, d.id,
                   'started for an attempt that is over or bound to another run'
            FROM d JOIN provisioning_jobs AS j ON j.id = d.job_id
            WHERE d.workflow_run_id IS NOT NULL
              AND NOT (j.status IN ({sql_list(ACTIVE_STATUSES)}) AND j.attempt = d.attempt
                       AND (j.dispatch_id IS NULL OR j.dispatch_id = d.id))'''
        )
    })
    SELECT state FROM d
    """
)
RECORD_AGAIN_LATER = Statement(
    f"""
    WITH d AS (
        UPDATE dispatches SET
            tries = tries + :counted, last_error = :message,
            next_try_at = now() + make_interval(secs => :delay), {RELEASE_LEASE}
        WHERE {LEASE_HELD}
        RETURNING id
    ), try AS ({record_try("d")})
    SELECT count(*) FROM d
    """
)
RECORD_UNKNOWN = Statement(
    f"""
    WITH d AS (
        UPDATE dispatches SET
            state = '{DispatchState.UNKNOWN}', unknown_since = COALESCE(unknown_since, now()),
            tries = tries + 1, last_error = :message,
            next_try_at = now() + make_interval(secs => :delay), {RELEASE_LEASE}
        WHERE {LEASE_HELD}
        RETURNING id
    ), try AS ({record_try("d")})
    SELECT count(*) FROM d
    """
)
_GRACE_OVER = "unknown_since < now() - make_interval(secs => :grace)"
RECORD_NOT_FOUND = Statement(
    f"""
    WITH d AS (
        UPDATE dispatches SET
            state = CASE WHEN {_GRACE_OVER} THEN '{DispatchState.LOST}' ELSE state END,
            last_error = CASE WHEN {_GRACE_OVER}
                              THEN 'no run found for this dispatch within the grace period'
                              ELSE last_error END,
            next_try_at = now() + make_interval(secs => :delay), {RELEASE_LEASE}
        WHERE {LEASE_HELD}
        RETURNING id, state
    ), try AS ({record_try("d")})
    SELECT state FROM d
    """
)
# GitHub refused the request itself: the dispatch and its queued job fail together.
RECORD_REJECTED = Statement(
    f"""
    WITH d AS (
        UPDATE dispatches SET state = '{DispatchState.FAILED}', tries = tries + 1,
            last_error = :message, {RELEASE_LEASE}
        WHERE {LEASE_HELD}
        RETURNING id, job_id, attempt
    ), try AS ({record_try("d")}
    ), locked AS (
        SELECT j.id, j.status AS from_status FROM provisioning_jobs AS j JOIN d ON j.id = d.job_id
        WHERE j.attempt = d.attempt AND j.status = {_QUEUED}
        FOR NO KEY UPDATE OF j
    ), moved AS ({
        fail_jobs("locked", error=":message", failure_reason=FailureReason.DISPATCH_ERROR)
    }), event AS ({record_events("moved", actor=_SYSTEM, reason="error")})
    SELECT {JOB_COLUMNS} FROM moved
    """
)


def _try_values(dispatch_id: UUID, kind: str, result: Result) -> dict[str, Any]:
    return {
        "dispatch_id": dispatch_id,
        "kind": kind,
        "outcome": str(result.outcome),
        "status_code": result.status_code,
        "message": result.message,
        "workflow_run_id": result.workflow_run_id,
    }


async def record_started(
    dispatch_id: UUID, owner: str, kind: str, result: Result
) -> DispatchState | None:
    """The run exists (GitHub accepted the dispatch, or reconciliation found it).

    The dispatch's state once recorded (`dispatched`, or a closed state whose run is now
    to be cancelled); None when the record was dropped: the lease was lost meanwhile.
    """
    row = await fetchrow(
        RECORD_STARTED,
        owner=owner,
        counted=int(kind == TryKind.DISPATCH),
        run_url=result.run_url,
        **_try_values(dispatch_id, kind, result),
    )
    return None if row is None else DispatchState(row["state"])


async def record_again_later(
    dispatch_id: UUID, owner: str, kind: str, result: Result, delay: float
) -> bool:
    """Nothing was started (or a lookup failed): try again after `delay` seconds."""
    row = await fetchrow(
        RECORD_AGAIN_LATER,
        owner=owner,
        counted=int(kind == "dispatch"),
        delay=float(delay),
        **_try_values(dispatch_id, kind, result),
    )
    return bool(row and row[0])


async def record_unknown(dispatch_id: UUID, owner: str, result: Result, delay: float) -> bool:
    """The run may exist: reconcile after `delay` seconds, never send blindly."""
    row = await fetchrow(
        RECORD_UNKNOWN,
        owner=owner,
        delay=float(delay),
        **_try_values(dispatch_id, "dispatch", result),
    )
    return bool(row and row[0])


async def record_not_found(
    dispatch_id: UUID, owner: str, result: Result, *, grace: float, delay: float
) -> bool:
    """Reconciliation found no run. True when the grace period is over and the
    dispatch is now lost (the next claim gives the attempt a new dispatch)."""
    row = await fetchrow(
        RECORD_NOT_FOUND,
        owner=owner,
        grace=float(grace),
        delay=float(delay),
        **_try_values(dispatch_id, "reconcile", result),
    )
    return row is not None and row["state"] == "lost"


async def record_rejected(dispatch_id: UUID, owner: str, result: Result) -> Job | None:
    """GitHub refused the request for good: the dispatch fails, and its queued job with
    `dispatch_error` (returned when this call failed it)."""
    row = await fetchrow(
        RECORD_REJECTED, owner=owner, **_try_values(dispatch_id, "dispatch", result)
    )
    if row is None:
        return None
    metrics.TRANSITIONS.labels(JobStatus.FAILED).inc()
    job = job_from_row(row, 1)
    announce([Committed(row["event_id"], job.id, job.user_id, False)])
    return job


_DEADLINE_ERROR = """'Dispatch deadline: no workflow run started within ' || :deadline || 's'
    || COALESCE(' (last error: ' || (
           SELECT d.last_error FROM dispatches AS d
           WHERE d.job_id = j.id AND d.attempt = j.attempt AND d.last_error IS NOT NULL
           ORDER BY d.updated_at DESC LIMIT 1) || ')', '')"""
# A queued attempt whose first dispatch is older than the deadline and none of whose
# dispatches has started a run: fail it, and close its dispatches. Runs every round,
# also while dispatching is paused (misconfigured), so no job waits past its deadline.
_DEADLINE_CTES = f"""
    late AS (
        SELECT j.id, j.status AS from_status FROM provisioning_jobs AS j
        WHERE j.status = {_QUEUED}
          AND (SELECT min(d.created_at) FROM dispatches AS d
               WHERE d.job_id = j.id AND d.attempt = j.attempt)
              < now() - make_interval(secs => :deadline)
          AND NOT EXISTS (SELECT 1 FROM dispatches AS d
                          WHERE d.job_id = j.id AND d.attempt = j.attempt
                            AND d.state = '{DispatchState.DISPATCHED}')
        FOR NO KEY UPDATE OF j SKIP LOCKED
    ), moved AS ({
    fail_jobs("late", error=_DEADLINE_ERROR, failure_reason=FailureReason.DISPATCH_ERROR)
}), event AS ({record_events("moved", actor=_SYSTEM, reason="error")}
    ), closed AS (
        UPDATE dispatches AS d SET state = '{DispatchState.FAILED}', {RELEASE_LEASE}
        FROM moved WHERE d.job_id = moved.id AND d.attempt = moved.attempt
          AND d.state IN ({WORKING})
    ), failed AS (
        SELECT e.event_id, {job_columns("m")} FROM moved AS m JOIN event AS e ON e.job_id = m.id
    )"""
FAIL_PAST_DEADLINE = Statement(f"WITH {_DEADLINE_CTES} SELECT * FROM failed")


async def fail_past_deadline(deadline_seconds: float) -> list[Job]:
    rows = await fetch(FAIL_PAST_DEADLINE, deadline=int(deadline_seconds))
    jobs = [job_from_row(row, 1) for row in rows]
    if jobs:
        metrics.TRANSITIONS.labels(JobStatus.FAILED).inc(len(jobs))
        events = zip(rows, jobs, strict=True)
        announce([Committed(row["event_id"], job.id, job.user_id, False) for row, job in events])
    return jobs


# On shutdown: give the leases back so another process takes them at once. A dispatch
# whose request was still in flight may have started a run: it is reconciled first.
_IN_FLIGHT = "id = ANY(CAST(:in_flight AS uuid[]))"
RELEASE_LEASES = Statement(
    f"""
    UPDATE dispatches SET
        state = CASE WHEN {_IN_FLIGHT} THEN '{DispatchState.UNKNOWN}' ELSE state END,
        unknown_since = CASE WHEN {_IN_FLIGHT} THEN COALESCE(unknown_since, now())
                             ELSE unknown_since END,
        next_try_at = now(), {RELEASE_LEASE}
    WHERE lease_owner = :owner AND state IN ({WORKING})
    RETURNING id
    """
)


async def release_leases(owner: str, in_flight: list[UUID]) -> int:
    """Give back every lease `owner` holds; the number given back."""
    return len(await fetch(RELEASE_LEASES, owner=owner, in_flight=in_flight))


# --------------------------------------------------------------------------- cancellations

# A cancellation is claimed by pushing its next try out by a lease's length (so no
# other process takes it meanwhile); cancelling twice is harmless anyway.
_CANCELLATION_CTES = f"""
    cancellations_due AS (
        SELECT workflow_run_id FROM run_cancellations
        WHERE state = '{CancellationState.REQUESTED}' AND next_try_at <= now()
        ORDER BY next_try_at LIMIT :cancel_batch
        FOR UPDATE SKIP LOCKED
    ), cancellations AS (
        UPDATE run_cancellations AS c SET next_try_at = now() + make_interval(secs => :lease)
        FROM cancellations_due AS due WHERE c.workflow_run_id = due.workflow_run_id
        RETURNING c.workflow_run_id, c.job_id, c.dispatch_id, c.tries
    )"""
CLAIM_CANCELLATIONS = Statement(f"WITH {_CANCELLATION_CTES} SELECT * FROM cancellations")
RECORD_CANCELLATION = Statement(
    f"""
    WITH c AS (
        UPDATE run_cancellations SET
            tries = tries + 1, last_error = :message,
            state = CASE WHEN :done THEN '{CancellationState.DONE}'
                         WHEN tries + 1 >= :max_tries THEN '{CancellationState.FAILED}'
                         ELSE '{CancellationState.REQUESTED}' END,
            done_at = CASE WHEN :done THEN now() END,
            next_try_at = now() + make_interval(secs => :delay)
        WHERE workflow_run_id = :workflow_run_id
        RETURNING dispatch_id
    )
    {
        record_try(
            "c",
            dispatch_id="dispatch_id",
            kind=f"'{TryKind.CANCEL}'",
            where="dispatch_id IS NOT NULL",
        )
    }
    """
)


async def claim_cancellations(*, lease_seconds: float, batch: int) -> list[Cancellation]:
    rows = await fetch(CLAIM_CANCELLATIONS, lease=float(lease_seconds), cancel_batch=batch)
    return [Cancellation(*row) for row in rows]


async def record_cancellation(
    workflow_run_id: str, result: Result, *, done: bool, delay: float, max_tries: int
) -> None:
    await fetchrow(
        RECORD_CANCELLATION,
        workflow_run_id=workflow_run_id,
        done=done,
        delay=float(delay),
        max_tries=max_tries,
        outcome=str(result.outcome),
        status_code=result.status_code,
        message=result.message,
    )


# --------------------------------------------------------------------------- one round

# A dispatcher's round in one statement (one round trip, also when there is nothing to
# do): fail the attempts past their deadline, claim the runs due a cancel, claim the
# dispatches due work; the jobs being failed are kept out of the claim.
ROUND = Statement(
    f"""
    WITH {_DEADLINE_CTES}, {_CANCELLATION_CTES},
    {_claim_ctes(exclude="AND j.id NOT IN (SELECT id FROM late)")}
    SELECT 'failed' AS kind, row_to_json(f) AS item FROM failed AS f
    UNION ALL SELECT 'cancel', row_to_json(c) FROM cancellations AS c
    UNION ALL SELECT 'claim', row_to_json(c) FROM claimed AS c
    """
)


class Round(msgspec.Struct, frozen=True):
    """What one dispatcher round took on."""

    failed: list[Job]
    """Jobs failed past their dispatch deadline."""
    cancellations: list[Cancellation]
    """Runs to cancel, claimed for a lease's length."""
    claims: list[Claim]
    """Dispatches this process now holds the lease of."""


class _Failed(msgspec.Struct):
    event_id: int


async def run_round(
    owner: str,
    provisioner: str,
    *,
    lease_seconds: float,
    deadline_seconds: float,
    claim_batch: int,
    cancel_batch: int,
) -> Round:
    """One dispatcher round (see ROUND); a batch of 0 claims nothing of that kind."""
    rows = await fetch(
        ROUND,
        owner=owner,
        provisioner=provisioner,
        lease=float(lease_seconds),
        deadline=int(deadline_seconds),
        batch=claim_batch,
        cancel_batch=cancel_batch,
    )
    taken = Round(failed=[], cancellations=[], claims=[])
    committed: list[Committed] = []
    for row in rows:
        item = row["item"].encode()
        if row["kind"] == "claim":
            taken.claims.append(msgspec.json.decode(item, type=Claim))
        elif row["kind"] == "cancel":
            taken.cancellations.append(msgspec.json.decode(item, type=Cancellation))
        else:
            job = msgspec.json.decode(item, type=Job)
            event = msgspec.json.decode(item, type=_Failed)
            committed.append(Committed(event.event_id, job.id, job.user_id, False))
            taken.failed.append(job)
    if taken.failed:
        metrics.TRANSITIONS.labels(JobStatus.FAILED).inc(len(taken.failed))
        announce(committed)
    return taken


# --------------------------------------------------------------------------- reads

# The job's dispatches, oldest first, each with its tries and its run's cancellation;
# one statement, and an unknown job is told apart from one with no dispatch yet.
LIST = Statement(
    """
    SELECT d.id, d.attempt, d.state, d.provisioner, d.tries, d.workflow_run_id, d.run_url,
           d.last_error, d.created_at, d.dispatched_at, d.updated_at,
           d.id IS NOT DISTINCT FROM j.dispatch_id AS bound, c.state AS cancel_state,
           COALESCE((SELECT json_agg(json_build_object(
                        'kind', t.kind, 'outcome', t.outcome, 'status_code', t.status_code,
                        'message', t.message, 'workflow_run_id', t.workflow_run_id,
                        'at', t.created_at) ORDER BY t.id)
                     FROM dispatch_tries AS t WHERE t.dispatch_id = d.id), '[]') AS history
    FROM provisioning_jobs AS j
    LEFT JOIN dispatches AS d ON d.job_id = j.id
    LEFT JOIN run_cancellations AS c ON c.workflow_run_id = d.workflow_run_id
    WHERE j.id = :job_id
    ORDER BY d.created_at, d.id
    """
)


async def list_dispatches(job_id: UUID) -> list[Dispatch] | None:
    """The job's dispatches, oldest first; None for an unknown job."""
    rows = await fetch(LIST, job_id=job_id)
    if not rows:
        return None
    return [
        Dispatch(
            dispatch_id=row["id"],
            history=msgspec.json.decode(row["history"], type=list[DispatchTry]),
            **{k: row[k] for k in _DISPATCH_COLUMNS},
        )
        for row in rows
        if row["id"] is not None
    ]


_DISPATCH_COLUMNS = [f for f in Dispatch.__struct_fields__ if f not in ("dispatch_id", "history")]
