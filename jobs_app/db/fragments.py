"""The SQL rules every statement shares, each written once and named.

Services build their statements from these blocks, so a rule (how a job fails, how an
event is recorded, which runs an attempt leaves behind) lives in one place, and the
state lists come from `jobs_app.core.lifecycle`. Adding a column to the job means the
table, its migration, `Job` (core.models) and nothing here: the column list is Job's.

Conventions: a block that reads rows takes the name of a CTE or table alias (`source`,
`moved`); values come as `:named` parameters or SQL expressions written by our own code,
never as text from a caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import asyncpg

from jobs_app.core.lifecycle import (
    TRANSITIONS,
    WORKING_DISPATCH_STATES,
    FailureReason,
    JobStatus,
    StepState,
)
from jobs_app.core.models import JOB_FIELDS, Job

# --------------------------------------------------------------------------- the job's row

JOB_COLUMNS = ", ".join(JOB_FIELDS)
"""A job's columns in `Job`'s field order: every statement returns them so, and rows map
onto the Struct positionally (`job_from_row`)."""


def job_columns(alias: str) -> str:
    """JOB_COLUMNS of the table aliased `alias`."""
    return ", ".join(f"{alias}.{column}" for column in JOB_FIELDS)


def job_from_row(record: asyncpg.Record, offset: int = 0) -> Job:
    """The Job of a row that holds JOB_COLUMNS from column `offset` on."""
    return Job(*record[offset : offset + len(JOB_FIELDS)])


def job_by_id(key: str, columns: str = JOB_COLUMNS, *, lock: bool = False) -> str:
    """SQL: a subquery, to join LATERAL, selecting `columns` of the job whose id is the
    SQL expression `key` (with `lock`, locking the row FOR NO KEY UPDATE).

    A primary-key lookup the planner may not flatten into a join (OFFSET 0). Written as a
    join (or `id = ANY(ids)`), the generic plan that a pooled connection caches for a
    prepared statement, made while the table was still small, scans the whole table, and
    keeps doing so as the table grows, until the next ANALYZE.
    """
    locking = "FOR NO KEY UPDATE" if lock else ""
    return f"(SELECT {columns} FROM provisioning_jobs WHERE id = {key} OFFSET 0 {locking})"


def jobs_by_id(ids: str, columns: str = JOB_COLUMNS, *, lock: bool = False) -> str:
    """SQL selecting `columns` of the jobs whose ids the uuid[] expression `ids` lists,
    each once, in id order, each a `job_by_id` lookup; with `lock`, each row is locked as
    it is read, so concurrent batches lock their rows in one order and never deadlock."""
    return f"""SELECT j.* FROM (SELECT DISTINCT k.id FROM unnest({ids}) AS k(id) ORDER BY k.id) AS k
        CROSS JOIN LATERAL {job_by_id("k.id", columns, lock=lock)} AS j"""


def requests_input(fields: Sequence[tuple[str, str]], *, one: bool) -> str:
    """SQL: a batch's requests as rows, each with its place `n` (from 1), from parameters
    named after the fields (each given with its SQL type): arrays (`CAST(:job_id AS
    uuid[])`, one element per request), or, for a batch of one (`one`), scalars. A batch
    of one has a statement of its own: its plan knows it reads one row, where the arrays'
    (unnest, sort, hash joins) would cost a lone caller ~8% of its call."""
    if one:
        columns = ", ".join(f"CAST(:{name} AS {sql_type}) AS {name}" for name, sql_type in fields)
        return f"SELECT {columns}, CAST(1 AS bigint) AS n"
    arrays = ", ".join(f"CAST(:{name} AS {sql_type}[])" for name, sql_type in fields)
    names = ", ".join(name for name, _ in fields)
    return f"SELECT * FROM unnest({arrays}) WITH ORDINALITY AS i({names}, n)"


def locked_jobs(key: str, columns: str, *, one: bool) -> str:
    """SQL selecting `columns` of the batch's jobs, each row locked FOR NO KEY UPDATE, their
    ids the parameter `key` of `requests_input` (an array, or one id with `one`)."""
    if one:
        return f"SELECT * FROM {job_by_id(f'CAST(:{key} AS uuid)', columns, lock=True)} AS j"
    return jobs_by_id(f"CAST(:{key} AS uuid[])", columns, lock=True)


def sql_list(values: Iterable[str]) -> str:
    """A literal IN-list of our own enum values (never input): `'queued', 'provisioning'`."""
    return ", ".join(f"'{value}'" for value in values)


# --------------------------------------------------------------------------- transitions


def set_status(
    to: JobStatus,
    *,
    error: str = "NULL",
    failed_step: str = "NULL",
    failure_reason: str = "NULL",
) -> str:
    """The SET clause that moves a row to `to`: the status, the timestamps the lifecycle
    says the move stamps, and the failure's columns when it carries one (each an SQL
    expression)."""
    rule = TRANSITIONS[to]
    sets = [f"status = '{to}'", *(f"{column} = now()" for column in rule.stamps)]
    if rule.carries_failure:
        sets += [
            f"error = {error}",
            f"failed_step = {failed_step}",
            f"failure_reason = {failure_reason}",
        ]
    return ", ".join([*sets, "updated_at = now()"])


def fail_jobs(
    source: str,
    *,
    error: str,
    failure_reason: FailureReason | str,
    failed_step: str = "NULL",
) -> str:
    """Fail every job of `source` (rows locked by the caller, with `id` and `from_status`):
    an UPDATE returning the job's columns and `from_status`, for `record_events`.

    `failure_reason` is a FailureReason, or an SQL expression when it varies by row.
    """
    reason = f"'{failure_reason}'" if isinstance(failure_reason, FailureReason) else failure_reason
    sets = set_status(JobStatus.FAILED, error=error, failed_step=failed_step, failure_reason=reason)
    return f"""UPDATE provisioning_jobs AS j SET {sets}
        FROM {source} WHERE j.id = {source}.id
        RETURNING {job_columns("j")}, {source}.from_status"""


def set_status_to(
    to: str,
    *,
    error: str,
    failed_step: str,
    failure_reason: str,
) -> str:
    """`set_status` for a target that varies by row: `to` is an SQL expression naming
    the status; each stamp and the failure's columns are written only for the targets the
    lifecycle says (the row keeps its value otherwise). The UPDATE's table is aliased j."""
    stamped: dict[str, list[JobStatus]] = {}
    for status, rule in TRANSITIONS.items():
        for column in rule.stamps:
            stamped.setdefault(column, []).append(status)
    failing = sql_list(status for status, rule in TRANSITIONS.items() if rule.carries_failure)
    sets = [f"status = {to}"]
    sets += [
        f"{column} = CASE WHEN {to} IN ({sql_list(statuses)}) THEN now() ELSE j.{column} END"
        for column, statuses in stamped.items()
    ]
    sets += [
        f"{column} = CASE WHEN {to} IN ({failing}) THEN {value} ELSE j.{column} END"
        for column, value in (
            ("error", error),
            ("failed_step", failed_step),
            ("failure_reason", failure_reason),
        )
    ]
    return ", ".join([*sets, "updated_at = now()"])


def transition_allowed(to: str, current: str) -> str:
    """Whether the lifecycle lets a job in status `current` move to `to` (SQL expressions)."""
    cases = " ".join(
        f"WHEN '{status}' THEN {current} IN ({sql_list(rule.sources)})"
        for status, rule in TRANSITIONS.items()
    )
    return f"(CASE {to} {cases} ELSE false END)"


def record_events(moved: str, *, actor: str, reason: str, seconds: str = "NULL") -> str:
    """Write one `job_events` row for each job of `moved` (job columns and `from_status`):
    the history row of a transition, in the transition's own statement. A move out of
    provisioning keeps the attempt's heartbeats (how many, first, last); `seconds` is what
    the move ends, when it measures something (the wait before provisioning). Returns
    each event's `event_id` and `job_id`, for the statement to hand back (the writer
    announces the events once they are committed)."""
    left = f"from_status = '{JobStatus.PROVISIONING}'"
    return f"""INSERT INTO job_events (job_id, from_status, to_status, attempt, actor, reason,
                                   seconds, heartbeat_count, first_heartbeat_at,
                                   last_heartbeat_at)
        SELECT id, from_status, status, attempt, {actor}, {reason}, {seconds},
               CASE WHEN {left} THEN heartbeat_count END,
               CASE WHEN {left} THEN first_heartbeat_at END,
               CASE WHEN {left} THEN last_heartbeat_at END
        FROM {moved}
        RETURNING id AS event_id, job_id"""


def running_step(job: str) -> str:
    """The step `job`'s current attempt is in (its `steps`): the last one started and not
    ended."""
    return f"""(SELECT s.key FROM jsonb_each({job}.steps) AS s
        WHERE s.value ->> 'state' = '{StepState.STARTED}'
        ORDER BY s.value ->> 'started_at' DESC LIMIT 1)"""


# --------------------------------------------------------------------------- fencing


def dispatch_issued(job: str, dispatch: str = "CAST(:dispatch_id AS uuid)") -> str:
    """Whether the dispatch `dispatch` names was issued for the current attempt of `job`
    (never NULL; false when `dispatch` is NULL)."""
    # A scalar subquery on the primary key, not EXISTS: EXISTS is costed for its first
    # row, which a plan made on a small table finds cheapest with a sequential scan.
    return f"""COALESCE((SELECT true FROM dispatches AS d WHERE d.id = {dispatch}
                   AND d.job_id = {job}.id AND d.attempt = {job}.attempt), false)"""


def fence_ok(job: str, issued: str, dispatch: str = "CAST(:dispatch_id AS uuid)") -> str:
    """Whether a callback naming the dispatch `dispatch` may move `job`'s attempt: it names
    none (a run started by hand), the attempt is bound to it, or the attempt is unbound
    and the dispatch was issued for it (`issued`, then the callback binds it).

    A real boolean, never NULL: a NULL would refuse the move (as false does in a WHERE)
    but also pass for "not refused" in a NOT, and a refused run would not be cancelled.
    """
    return f"""({dispatch} IS NULL OR COALESCE({job}.dispatch_id = {dispatch}, {issued}))"""


# --------------------------------------------------------------------------- runs to cancel


def cancel_runs(rows: str) -> str:
    """Put runs up for cancellation, each once: `rows` selects (workflow_run_id, job_id,
    dispatch_id, reason); a run already listed keeps its first reason."""
    return f"""INSERT INTO run_cancellations (workflow_run_id, job_id, dispatch_id, reason)
        {rows}
        ON CONFLICT (workflow_run_id) DO NOTHING"""


def cancel_attempt_runs(moved: str, reason: str, condition: str = "true") -> str:
    """Cancel the runs of each job of `moved` (job columns) when it leaves its attempt
    other than by its workflow's word (an operator, a timeout): every run its dispatches
    started, and the run it was told of."""
    return cancel_runs(
        f"""SELECT DISTINCT ON (r.run_id) r.run_id, m.id, r.dispatch_id, {reason}
        FROM {moved} AS m CROSS JOIN LATERAL (
            SELECT d.workflow_run_id AS run_id, d.id AS dispatch_id FROM dispatches AS d
            WHERE d.job_id = m.id AND d.attempt = m.attempt
            UNION ALL SELECT m.workflow_run_id, NULL) AS r
        WHERE r.run_id IS NOT NULL AND {condition}
        ORDER BY r.run_id, r.dispatch_id NULLS LAST"""
    )


# --------------------------------------------------------------------------- dispatches

RELEASE_LEASE = "lease_owner = NULL, lease_expires_at = NULL, updated_at = now()"
"""SET clause: the dispatch is no longer being worked on by anyone."""
LEASE_HELD = "id = :dispatch_id AND lease_owner = :owner"
"""WHERE clause: the dispatch, only while `:owner` still holds its lease."""
WORKING = sql_list(WORKING_DISPATCH_STATES)


def record_try(
    source: str,
    *,
    dispatch_id: str = "id",
    kind: str = ":kind",
    outcome: str = ":outcome",
    where: str = "true",
) -> str:
    """Write a `dispatch_tries` row for each row of `source` (its dispatch in the column
    `dispatch_id`): what one request to the provisioner came to."""
    return f"""INSERT INTO dispatch_tries
            (dispatch_id, kind, outcome, status_code, message, workflow_run_id)
        SELECT {dispatch_id}, {kind}, {outcome}, :status_code, :message, :workflow_run_id
        FROM {source} WHERE {where}"""
