"""Progress the customer can watch: the plan's steps as the job's current attempt reported
them, and an estimate of the time left learned from past jobs.

The statements that return a job to the API add the attempt's step states
(`step_reports`: the job's `steps`, which each step report updates on the row it locks)
and the database's `now()` (`DB_NOW`). The medians (`MEDIANS`: the last 50 samples of
each step and of the wait before provisioning, through two small partial indexes) move
slowly, one sample in 50 at a time, so each process keeps the copy it last read and
reads them again, in one small statement of their own, at most every
`JOBS_ETA_REFRESH_SECONDS` (2 s by default; 0 reads them for every answer): `learned()`.
Reading them for every answer cost a lone transition 5-10%, and even carried unread in a
write statement they cost it ~4% (its executor set the subquery up on every call); the
support console reads them fresh, in its own statements. `progress()` turns the three
into the `Progress` every answer carries.

- a step is `pending`, `started`, `succeeded` or `failed` as its last report says; one
  reported `succeeded` without `started` started when it succeeded;
- `eta_seconds` = the median of every step not yet succeeded (plus the median wait from
  queued to provisioning while queued), minus the time already spent in the running
  step (that step never below 0); null while any needed median has fewer than
  MIN_SAMPLES samples, and once the job is running or failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import msgspec

from jobs_app.core.lifecycle import EventKind, JobStatus, StepState
from jobs_app.core.models import Job, Progress, StepProgress
from jobs_app.core.settings import ProvisionStep, get_settings
from jobs_app.db.statement import Statement, fetchrow

SAMPLES = 50
"""The medians are taken over this many latest samples."""
MIN_SAMPLES = 5
"""Below this many samples, a median is not trusted: no estimate."""
ESTIMATED = frozenset({JobStatus.QUEUED, JobStatus.PROVISIONING})
"""The statuses a job has an estimate in; past them, `eta_seconds` is null."""


def step_reports(job: str) -> str:
    """SQL: the current attempt's step states of `job` (its `steps` column)."""
    return f"{job}.steps"


MEDIANS = f"""(
    SELECT json_agg(json_build_array(m.step, m.median, m.samples)) FROM (
        SELECT s.step, percentile_cont(0.5) WITHIN GROUP (ORDER BY x.seconds) AS median,
               count(x.seconds) AS samples
        FROM unnest(CAST(:plan AS text[])) AS s(step)
        LEFT JOIN LATERAL (
            SELECT e.seconds FROM job_events AS e
            WHERE e.kind = '{EventKind.STEP}' AND e.step_state = '{StepState.SUCCEEDED}'
              AND e.step = s.step
            ORDER BY e.id DESC LIMIT {SAMPLES}) AS x ON true
        GROUP BY s.step
        UNION ALL
        SELECT NULL, percentile_cont(0.5) WITHIN GROUP (ORDER BY w.seconds), count(w.seconds)
        FROM (SELECT e.seconds FROM job_events AS e
              WHERE e.kind = '{EventKind.TRANSITION}' AND e.to_status = '{JobStatus.PROVISIONING}'
              ORDER BY e.id DESC LIMIT {SAMPLES}) AS w
    ) AS m)"""
"""SQL: `[[step or null (the wait), median seconds, samples], ...]` for the steps of
`:plan` (the plan's step names)."""

READ_MEDIANS = Statement(f"SELECT {MEDIANS} AS medians")

DB_NOW = "now() AS db_now"
"""The column every job-returning statement adds once (with `step_reports` per job): the
clock the time already spent in a step is measured by."""


def eta_wanted(statuses: Iterable[JobStatus | str]) -> bool:
    """Whether a job in one of these statuses has an estimate."""
    return any(status in ESTIMATED for status in statuses)


def plan() -> tuple[ProvisionStep, ...]:
    return get_settings().provision_steps


def plan_names() -> list[str]:
    """The plan's step names (the `:plan` of a statement that reads the medians)."""
    return [step.name for step in plan()]


class Medians(msgspec.Struct):
    """The learned medians: per step, and the wait before provisioning (median, samples)."""

    by_step: dict[str, tuple[float | None, int]]
    wait: tuple[float | None, int]

    def step(self, name: str) -> float | None:
        """The step's median, when it has MIN_SAMPLES samples; else None."""
        return _trusted(self.by_step.get(name, (None, 0)))

    def queue_wait(self) -> float | None:
        """The median wait before provisioning, when it has MIN_SAMPLES samples."""
        return _trusted(self.wait)


_NOTHING_LEARNED = Medians({}, (None, 0))


def _trusted(learned: tuple[float | None, int]) -> float | None:
    median, samples = learned
    return median if median is not None and samples >= MIN_SAMPLES else None


def medians_of(raw: Any) -> Medians:
    """The medians from MEDIANS' column."""
    by_step: dict[str, tuple[float | None, int]] = {}
    wait: tuple[float | None, int] = (None, 0)
    for step, median, samples in _json(raw) or []:
        if step is None:
            wait = (median, samples)
        else:
            by_step[step] = (median, samples)
    return Medians(by_step, wait)


class Learned:
    """A process's copy of the medians, and when it was read."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.medians: Medians | None = None
        self._read_at = 0.0

    def stale(self, max_age: float) -> bool:
        """Whether the copy is missing or older than `max_age` seconds."""
        return self.medians is None or self._clock() - self._read_at >= max_age

    def remember(self, medians: Medians) -> Medians:
        self.medians = medians
        self._read_at = self._clock()
        return medians


_learned = Learned()


async def learned(wanted: bool = True) -> Medians:
    """The medians answers use: this process's copy, read again first when `wanted` (an
    answer may have an estimate: `eta_wanted`) and the copy is older than
    JOBS_ETA_REFRESH_SECONDS. Called before a statement that writes, so that a failed
    read fails the call with nothing changed."""
    if wanted and _learned.stale(get_settings().eta_refresh_seconds):
        return _learned.remember(await read_medians())
    return _learned.medians or _NOTHING_LEARNED


async def read_medians() -> Medians:
    """The medians as the database holds them now."""
    row = await fetchrow(READ_MEDIANS, plan=plan_names())
    return medians_of(None if row is None else row["medians"])


def _json(raw: Any) -> Any:
    return msgspec.json.decode(raw) if isinstance(raw, (str, bytes)) else raw


def progress(job: Job, reports: Any, medians: Medians, now: datetime) -> Progress:
    """The job's progress, from the columns its statement returned (see the module doc)."""
    reported = _json(reports) or {}
    steps: list[StepProgress] = []
    current: str | None = None
    for planned in plan():
        report = reported.get(planned.name)
        if report is None:
            steps.append(StepProgress(planned.name, planned.label, "pending", None, None))
            continue
        state = report["state"]
        if state == StepState.STARTED:
            current = planned.name
        steps.append(
            StepProgress(
                planned.name,
                planned.label,
                state,
                _at(report["started_at"]),
                _at(report["finished_at"]),
            )
        )
    return Progress(
        steps=steps,
        completed=sum(step.state == StepState.SUCCEEDED for step in steps),
        total=len(steps),
        current=current,
        eta_seconds=_eta(job, steps, medians, now),
    )


def _at(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _eta(job: Job, steps: list[StepProgress], medians: Medians, now: datetime) -> float | None:
    if job.status not in ESTIMATED:
        return None
    left = 0.0
    for step in steps:
        if step.state == StepState.SUCCEEDED:
            continue
        median = medians.step(step.name)
        if median is None:
            return None
        if step.state == StepState.STARTED and step.started_at is not None:
            left += max(0.0, median - (now - step.started_at).total_seconds())
        else:
            left += median
    if job.status == JobStatus.QUEUED:
        wait = medians.queue_wait()
        if wait is None:
            return None
        left += wait
    return round(left, 3)


def with_progress(job: Job, row: Any, medians: Medians) -> Job:
    """`job` with its progress, from the columns its statement returned (`reports`,
    `db_now`) and the medians (`learned()`)."""
    shown = progress(job, row["reports"], medians, row["db_now"])
    return msgspec.structs.replace(job, progress=shown)
