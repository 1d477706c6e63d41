"""The service layer (jobs_app/jobs.py) against real PostgreSQL.

Every function, every transition (legal, idempotent and illegal), attempt fencing,
retries, timeouts on the database clock (arranged by backdating rows, never by
sleeping), and the reads. Arranging and asserting goes through the raw `db`
connection, so what is checked is what PostgreSQL holds.
"""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any

import asyncpg
import msgspec
import pytest

from jobs_app.core import errors, lifecycle
from jobs_app.core.lifecycle import (
    CONCURRENT_PROVISION_MESSAGE,
    RETRY_SOURCES,
    TRANSITIONS,
    FailureReason,
    JobStatus,
)
from jobs_app.core.models import JOB_FIELDS, Job
from jobs_app.core.settings import get_settings
from jobs_app.services import accounts, jobs

STATUSES = ["queued", "provisioning", "running", "failed"]
# The state machine as the issue states it, written out independently of lifecycle.py.
LEGAL = {
    ("queued", "provisioning"),
    ("provisioning", "running"),
    ("queued", "failed"),
    ("provisioning", "failed"),
}
IDEMPOTENT = {("provisioning", "provisioning"), ("running", "running"), ("failed", "failed")}
ILLEGAL = [
    (src, to)
    for src in STATUSES
    for to in [*STATUSES, "bogus"]
    if (src, to) not in LEGAL and (src, to) not in IDEMPOTENT
]


# --------------------------------------------------------------------------- helpers


async def job_row(db: asyncpg.Connection, job_id: uuid.UUID) -> dict[str, Any]:
    row = await db.fetchrow("SELECT * FROM provisioning_jobs WHERE id = $1", job_id)
    assert row is not None
    return dict(row)


async def job_events(db: asyncpg.Connection, job_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT * FROM job_events WHERE job_id = $1 ORDER BY id", job_id)
    return [dict(r) for r in rows]


async def snapshot(db: asyncpg.Connection, job_id: uuid.UUID) -> tuple[dict, list[dict]]:
    return await job_row(db, job_id), await job_events(db, job_id)


async def count(db: asyncpg.Connection, table: str) -> int:
    return await db.fetchval(f"SELECT count(*) FROM {table}")


async def age(db: asyncpg.Connection, job_id: uuid.UUID, **seconds_ago: float) -> None:
    """Backdate timestamp columns to `now() - N seconds` (the database clock)."""
    sets = ", ".join(
        f"{column} = now() - make_interval(secs => ${i + 2})"
        for i, column in enumerate(seconds_ago)
    )
    await db.execute(
        f"UPDATE provisioning_jobs SET {sets} WHERE id = $1",
        job_id,
        *(float(s) for s in seconds_ago.values()),
    )


async def new_user_agent(name: str | None = None) -> tuple[uuid.UUID, uuid.UUID]:
    user = await accounts.create_user(name or f"u-{uuid.uuid4().hex[:10]}@example.com")
    agent = await accounts.create_agent(user.id, "agent")
    return user.id, agent.id


async def enqueue(ua: tuple[uuid.UUID, uuid.UUID], event: str = "evt_1", **kwargs: Any) -> Job:
    user_id, agent_id = ua
    result = await jobs.enqueue_provisioning_job(
        agent_id=agent_id, user_id=user_id, stripe_event_id=event, **kwargs
    )
    assert result.created
    return result.job


async def job_in(ua: tuple[uuid.UUID, uuid.UUID], status: str, event: str = "evt_1") -> Job:
    """A job brought to `status` through the service layer (attempt 1)."""
    job = await enqueue(ua, event)
    if status == "queued":
        return job
    job = await jobs.update_job_status(
        job.id, status="provisioning", attempt=1, workflow_run_id="run-1"
    )
    if status == "running":
        job = await jobs.update_job_status(job.id, status="running", attempt=1)
    elif status == "failed":
        job = await jobs.update_job_status(
            job.id, status="failed", attempt=1, error="boom", failed_step="boot"
        )
    assert job.status == status
    return job


def unprogressed(job: Job) -> Job:
    """The job without its progress (which holds the database's now())."""
    return msgspec.structs.replace(job, progress=None)


def assert_job_matches_row(job: Job, row: dict[str, Any]) -> None:
    for field in JOB_FIELDS:
        assert getattr(job, field) == row[field], field


# --------------------------------------------------------------------------- constants


def test_constants_and_default_settings() -> None:
    assert lifecycle.HEARTBEAT_INTERVAL_SECONDS == 60
    assert lifecycle.JOB_TIMEOUT_SECONDS == 900
    assert lifecycle.MAX_RETRIES == 3
    settings = get_settings()
    assert settings.job_timeout_seconds == 900
    assert settings.job_deadline_seconds == 3600
    assert settings.queue_timeout_seconds == 900
    assert settings.max_retries == 3


def test_lifecycle_data_is_the_issue_state_machine() -> None:
    from_lifecycle = {(s.value, to.value) for to, rule in TRANSITIONS.items() for s in rule.sources}
    assert from_lifecycle == LEGAL
    assert tuple(RETRY_SOURCES) == (JobStatus.FAILED,)
    assert {s.value for s in JobStatus} == set(STATUSES)


# --------------------------------------------------------------------------- users, agents


async def test_create_and_find_user(db: asyncpg.Connection) -> None:
    user = await accounts.create_user("Alice@Example.com")
    row = await db.fetchrow("SELECT * FROM users WHERE id = $1", user.id)
    assert row["email"] == "Alice@Example.com"
    assert row["created_at"] == user.created_at
    assert (await accounts.find_user_by_email("alice@example.COM")).id == user.id
    with pytest.raises(errors.NotFoundError):
        await accounts.find_user_by_email("nobody@example.com")
    with pytest.raises(errors.DuplicateError):
        await accounts.create_user("Alice@Example.com")
    assert await count(db, "users") == 1


async def test_create_agent(db: asyncpg.Connection) -> None:
    user = await accounts.create_user("bob@example.com")
    agent = await accounts.create_agent(user.id, "my agent")
    assert (agent.user_id, agent.name) == (user.id, "my agent")
    row = await db.fetchrow("SELECT * FROM agents WHERE id = $1", agent.id)
    assert (row["user_id"], row["name"]) == (user.id, "my agent")
    with pytest.raises(errors.NotFoundError):
        await accounts.create_agent(uuid.uuid4(), "orphan")
    assert await count(db, "agents") == 1


# --------------------------------------------------------------------------- enqueue


async def test_enqueue_creates_job_and_event(db, user_agent) -> None:
    user_id, agent_id = user_agent
    result = await jobs.enqueue_provisioning_job(
        agent_id=agent_id, user_id=user_id, stripe_event_id="evt_new"
    )
    assert result.created is True
    job = result.job
    assert (job.user_id, job.agent_id, job.stripe_event_id) == (user_id, agent_id, "evt_new")
    assert job.status == JobStatus.QUEUED
    assert (job.attempt, job.retry_count, job.max_retries) == (1, 0, 3)
    assert job.region == "us-east"
    assert job.workflow_run_id is job.error is job.failed_step is job.failure_reason is None
    assert job.claimed_at is job.last_heartbeat_at is job.completed_at is None
    row = await job_row(db, job.id)
    assert_job_matches_row(job, row)
    assert row["queued_at"] == row["created_at"]
    [event] = await job_events(db, job.id)
    assert event["from_status"] is None
    assert event["to_status"] == "queued"
    assert (event["attempt"], event["actor"], event["reason"]) == (1, "api", "enqueued")


async def test_enqueue_options(db, user_agent) -> None:
    user_id, agent_id = user_agent
    result = await jobs.enqueue_provisioning_job(
        agent_id=agent_id,
        user_id=user_id,
        stripe_event_id="evt_opts",
        region="eu-west",
        max_retries=5,
        actor="operator:carol",
    )
    assert (result.job.region, result.job.max_retries) == ("eu-west", 5)
    [event] = await job_events(db, result.job.id)
    assert event["actor"] == "operator:carol"


async def test_enqueue_replay_returns_same_job_without_new_rows(db, user_agent) -> None:
    user_id, agent_id = user_agent
    first = await jobs.enqueue_provisioning_job(
        agent_id=agent_id, user_id=user_id, stripe_event_id="evt_dup"
    )
    before = await snapshot(db, first.job.id)
    again = await jobs.enqueue_provisioning_job(
        agent_id=agent_id, user_id=user_id, stripe_event_id="evt_dup"
    )
    assert again.created is False
    assert again.job == first.job
    assert await snapshot(db, first.job.id) == before
    assert await count(db, "provisioning_jobs") == 1
    assert await count(db, "job_events") == 1


async def test_enqueue_replay_after_job_moved_on(db, user_agent) -> None:
    job = await job_in(user_agent, "running", event="evt_done")
    user_id, agent_id = user_agent
    again = await jobs.enqueue_provisioning_job(
        agent_id=agent_id, user_id=user_id, stripe_event_id="evt_done"
    )
    assert (again.created, again.job.id, again.job.status) == (False, job.id, "running")
    assert await count(db, "provisioning_jobs") == 1


async def test_enqueue_same_event_for_another_user_or_agent_conflicts(db, user_agent) -> None:
    user_id, _ = user_agent
    job = await enqueue(user_agent, "evt_shared")
    before = await snapshot(db, job.id)
    other_user, other_agent = await new_user_agent()
    with pytest.raises(errors.IdempotencyConflictError) as info:
        await jobs.enqueue_provisioning_job(
            agent_id=other_agent, user_id=other_user, stripe_event_id="evt_shared"
        )
    assert str(job.id) not in info.value.message
    second_agent = await accounts.create_agent(user_id, "second")
    with pytest.raises(errors.IdempotencyConflictError):
        await jobs.enqueue_provisioning_job(
            agent_id=second_agent.id, user_id=user_id, stripe_event_id="evt_shared"
        )
    assert await snapshot(db, job.id) == before
    assert await count(db, "provisioning_jobs") == 1
    assert await count(db, "job_events") == 1


async def test_enqueue_unknown_references(db, user_agent) -> None:
    user_id, agent_id = user_agent
    with pytest.raises(errors.NotFoundError):
        await jobs.enqueue_provisioning_job(
            agent_id=agent_id, user_id=uuid.uuid4(), stripe_event_id="evt_a"
        )
    with pytest.raises(errors.NotFoundError):
        await jobs.enqueue_provisioning_job(
            agent_id=uuid.uuid4(), user_id=user_id, stripe_event_id="evt_b"
        )
    _, foreign_agent = await new_user_agent()
    with pytest.raises(errors.InvalidReferenceError):
        await jobs.enqueue_provisioning_job(
            agent_id=foreign_agent, user_id=user_id, stripe_event_id="evt_c"
        )
    assert await count(db, "provisioning_jobs") == 0
    assert await count(db, "job_events") == 0


@pytest.mark.parametrize("active", ["queued", "provisioning"])
async def test_second_active_job_for_user_is_refused(db, user_agent, active) -> None:
    job = await job_in(user_agent, active, event="evt_first")
    before = await snapshot(db, job.id)
    user_id, _ = user_agent
    other_agent = await accounts.create_agent(user_id, "other")
    for agent_id in (user_agent[1], other_agent.id):
        with pytest.raises(errors.ConcurrentProvisionError) as info:
            await jobs.enqueue_provisioning_job(
                agent_id=agent_id, user_id=user_id, stripe_event_id=f"evt_{agent_id}"
            )
        assert info.value.message == CONCURRENT_PROVISION_MESSAGE
        assert str(info.value) == (
            "A provisioning job is already in progress. Please wait for it to complete."
        )
    assert await snapshot(db, job.id) == before
    assert await count(db, "provisioning_jobs") == 1


@pytest.mark.parametrize("finished", ["running", "failed"])
async def test_new_job_allowed_once_previous_finished(db, user_agent, finished) -> None:
    await job_in(user_agent, finished, event="evt_first")
    job = await enqueue(user_agent, "evt_second")
    assert job.status == "queued"
    assert await count(db, "provisioning_jobs") == 2


async def test_other_users_active_job_does_not_block(db, user_agent) -> None:
    await enqueue(user_agent, "evt_1")
    other = await new_user_agent()
    job = await enqueue(other, "evt_2")
    assert job.user_id == other[0]


async def test_check_concurrent_provision(db, user_agent) -> None:
    user_id, _ = user_agent
    other_user, _ = await new_user_agent()
    assert await jobs.check_concurrent_provision(user_id) is None
    job = await enqueue(user_agent, "evt_1")
    with pytest.raises(errors.ConcurrentProvisionError) as info:
        await jobs.check_concurrent_provision(user_id)
    assert info.value.message == CONCURRENT_PROVISION_MESSAGE
    assert await jobs.check_concurrent_provision(other_user) is None
    await jobs.update_job_status(job.id, status="provisioning", attempt=1)
    with pytest.raises(errors.ConcurrentProvisionError):
        await jobs.check_concurrent_provision(user_id)
    await jobs.update_job_status(job.id, status="running", attempt=1)
    assert await jobs.check_concurrent_provision(user_id) is None
    failed = await job_in(user_agent, "failed", event="evt_2")
    assert failed.status == "failed"
    assert await jobs.check_concurrent_provision(user_id) is None
    assert await jobs.check_concurrent_provision(uuid.uuid4()) is None


# --------------------------------------------------------------------------- transitions


async def test_queued_to_provisioning(db, user_agent) -> None:
    job = await enqueue(user_agent)
    before = await job_row(db, job.id)
    moved = await jobs.update_job_status(
        job.id, status="provisioning", attempt=1, workflow_run_id="run-42"
    )
    row = await job_row(db, job.id)
    assert_job_matches_row(moved, row)
    assert moved.status == "provisioning"
    assert moved.workflow_run_id == "run-42"
    assert moved.claimed_at is not None and moved.claimed_at > before["created_at"]
    assert moved.updated_at == moved.claimed_at > before["updated_at"]
    assert moved.completed_at is moved.last_heartbeat_at is moved.error is None
    event = (await job_events(db, job.id))[-1]
    assert (event["from_status"], event["to_status"]) == ("queued", "provisioning")
    assert (event["attempt"], event["actor"], event["reason"]) == (1, "workflow", "run-42")
    assert len(await job_events(db, job.id)) == 2


async def test_provisioning_to_running(db, user_agent) -> None:
    job = await job_in(user_agent, "provisioning")
    moved = await jobs.update_job_status(job.id, status="running", attempt=1)
    row = await job_row(db, job.id)
    assert_job_matches_row(moved, row)
    assert moved.status == "running"
    assert moved.completed_at is not None and moved.completed_at > job.claimed_at
    assert moved.claimed_at == job.claimed_at
    assert moved.workflow_run_id == "run-1"  # kept when not sent again
    assert moved.error is moved.failure_reason is None
    events = await job_events(db, job.id)
    assert [(e["from_status"], e["to_status"]) for e in events] == [
        (None, "queued"),
        ("queued", "provisioning"),
        ("provisioning", "running"),
    ]


async def test_queued_to_failed(db, user_agent) -> None:
    job = await enqueue(user_agent)
    moved = await jobs.update_job_status(
        job.id,
        status="failed",
        attempt=1,
        error="no capacity",
        failed_step="schedule",
        failure_reason=FailureReason.OPERATOR,
        actor="operator:dave",
    )
    row = await job_row(db, job.id)
    assert_job_matches_row(moved, row)
    assert moved.status == "failed"
    assert (moved.error, moved.failed_step) == ("no capacity", "schedule")
    assert moved.failure_reason == "operator"
    assert moved.completed_at is not None and moved.claimed_at is None
    event = (await job_events(db, job.id))[-1]
    assert (event["from_status"], event["to_status"]) == ("queued", "failed")
    assert (event["actor"], event["reason"], event["attempt"]) == (
        "operator:dave",
        "no capacity",
        1,
    )


async def test_provisioning_to_failed_defaults(db, user_agent) -> None:
    job = await job_in(user_agent, "provisioning")
    moved = await jobs.update_job_status(job.id, status="failed", attempt=None)
    assert moved.status == "failed"
    assert moved.error == "failed"
    assert moved.failure_reason == FailureReason.WORKFLOW_ERROR
    assert moved.failed_step is None
    assert moved.completed_at is not None
    event = (await job_events(db, job.id))[-1]
    assert (event["from_status"], event["to_status"], event["actor"]) == (
        "provisioning",
        "failed",
        "workflow",
    )


@pytest.mark.parametrize(("src", "to"), sorted(LEGAL))
async def test_every_legal_transition_moves_and_records(db, user_agent, src, to) -> None:
    job = await job_in(user_agent, src)
    events_before = await job_events(db, job.id)
    moved = await jobs.update_job_status(job.id, status=to, attempt=1)
    assert moved.status == to
    assert (await job_row(db, job.id))["status"] == to
    events = await job_events(db, job.id)
    assert len(events) == len(events_before) + 1
    assert (events[-1]["from_status"], events[-1]["to_status"]) == (src, to)


@pytest.mark.parametrize(("src", "to"), ILLEGAL)
async def test_every_illegal_transition_changes_nothing(db, user_agent, src, to) -> None:
    job = await job_in(user_agent, src)
    before = await snapshot(db, job.id)
    for attempt in (1, None):
        with pytest.raises(errors.InvalidTransitionError) as info:
            await jobs.update_job_status(
                job.id, status=to, attempt=attempt, error="x", workflow_run_id="run-x"
            )
        assert type(info.value) is errors.InvalidTransitionError
        assert await snapshot(db, job.id) == before


@pytest.mark.parametrize(("src", "to"), sorted(IDEMPOTENT))
async def test_repeating_the_current_status_is_idempotent(db, user_agent, src, to) -> None:
    job = await job_in(user_agent, src)
    before = await snapshot(db, job.id)
    for attempt in (1, None):
        again = await jobs.update_job_status(
            job.id, status=to, attempt=attempt, error="other", workflow_run_id="run-other"
        )
        assert unprogressed(again) == unprogressed(job)
        assert await snapshot(db, job.id) == before


async def test_illegal_transition_error_names_statuses(db, user_agent) -> None:
    job = await job_in(user_agent, "running")
    with pytest.raises(errors.InvalidTransitionError) as info:
        await jobs.update_job_status(job.id, status="failed", attempt=1)
    assert info.value.extra == {
        "reason": "invalid_transition",
        "current_status": "running",
        "requested_status": "failed",
    }


async def test_update_status_unknown_job(db) -> None:
    with pytest.raises(errors.NotFoundError):
        await jobs.update_job_status(uuid.uuid4(), status="provisioning", attempt=1)
    with pytest.raises(errors.NotFoundError):
        await jobs.update_job_status(uuid.uuid4(), status="failed", attempt=None)


@pytest.mark.parametrize("src", STATUSES)
@pytest.mark.parametrize("to", ["provisioning", "running", "failed"])
async def test_stale_attempt_is_refused_for_status_updates(db, user_agent, src, to) -> None:
    job = await job_in(user_agent, src)
    before = await snapshot(db, job.id)
    for attempt in (0, 2):
        with pytest.raises(errors.StaleAttemptError) as info:
            await jobs.update_job_status(job.id, status=to, attempt=attempt)
        assert info.value.extra == {
            "reason": "stale_attempt",
            "current_attempt": 1,
            "attempt": attempt,
        }
    assert await snapshot(db, job.id) == before


async def test_late_callback_from_previous_attempt_cannot_touch_the_retry(db, user_agent) -> None:
    job = await job_in(user_agent, "failed")
    retried = await jobs.retry_job(job.id)
    retried = await jobs.update_job_status(
        retried.id, status="provisioning", attempt=2, workflow_run_id="run-2"
    )
    before = await snapshot(db, job.id)
    for status in ("provisioning", "running", "failed"):
        with pytest.raises(errors.StaleAttemptError):
            await jobs.update_job_status(job.id, status=status, attempt=1)
    with pytest.raises(errors.StaleAttemptError):
        await jobs.record_heartbeat(job.id, attempt=1)
    assert await snapshot(db, job.id) == before
    running = await jobs.update_job_status(job.id, status="running", attempt=2)
    assert (running.status, running.attempt) == ("running", 2)


# --------------------------------------------------------------------------- heartbeats


async def test_heartbeat_on_provisioning_job(db, user_agent) -> None:
    job = await job_in(user_agent, "provisioning")
    events_before = await job_events(db, job.id)
    beat = await jobs.record_heartbeat(job.id, attempt=1)
    row = await job_row(db, job.id)
    assert_job_matches_row(beat, row)
    assert beat.status == "provisioning"
    assert beat.last_heartbeat_at is not None and beat.last_heartbeat_at > job.claimed_at
    assert beat.updated_at == beat.last_heartbeat_at
    second = await jobs.record_heartbeat(job.id, attempt=1)
    assert second.last_heartbeat_at > beat.last_heartbeat_at
    assert await job_events(db, job.id) == events_before  # heartbeats are not transitions


@pytest.mark.parametrize("status", ["queued", "running", "failed"])
async def test_heartbeat_only_while_provisioning(db, user_agent, status) -> None:
    job = await job_in(user_agent, status)
    before = await snapshot(db, job.id)
    with pytest.raises(errors.InvalidTransitionError) as info:
        await jobs.record_heartbeat(job.id, attempt=1)
    assert info.value.extra == {"reason": "invalid_transition", "current_status": status}
    assert await snapshot(db, job.id) == before


@pytest.mark.parametrize("status", STATUSES)
async def test_heartbeat_stale_attempt(db, user_agent, status) -> None:
    job = await job_in(user_agent, status)
    before = await snapshot(db, job.id)
    with pytest.raises(errors.StaleAttemptError) as info:
        await jobs.record_heartbeat(job.id, attempt=2)
    assert info.value.extra == {"reason": "stale_attempt", "current_attempt": 1, "attempt": 2}
    assert await snapshot(db, job.id) == before


async def test_heartbeat_unknown_job(db) -> None:
    with pytest.raises(errors.NotFoundError):
        await jobs.record_heartbeat(uuid.uuid4(), attempt=1)


# --------------------------------------------------------------------------- retry


async def test_retry_requeues_as_next_attempt_and_clears_previous_run(db, user_agent) -> None:
    job = await enqueue(user_agent)
    await jobs.update_job_status(job.id, status="provisioning", attempt=1, workflow_run_id="run-1")
    await jobs.record_heartbeat(job.id, attempt=1)
    failed = await jobs.update_job_status(
        job.id, status="failed", attempt=1, error="disk", failed_step="attach"
    )
    assert None not in (
        failed.claimed_at,
        failed.last_heartbeat_at,
        failed.completed_at,
        failed.error,
        failed.failed_step,
        failed.failure_reason,
        failed.workflow_run_id,
    )
    queued_at_before = (await job_row(db, job.id))["queued_at"]
    retried = await jobs.retry_job(job.id)
    row = await job_row(db, job.id)
    assert_job_matches_row(retried, row)
    assert retried.status == "queued"
    assert (retried.retry_count, retried.attempt, retried.max_retries) == (1, 2, 3)
    for field in (
        "claimed_at",
        "last_heartbeat_at",
        "completed_at",
        "error",
        "failed_step",
        "failure_reason",
        "workflow_run_id",
    ):
        assert getattr(retried, field) is None, field
    assert row["queued_at"] > queued_at_before
    assert row["queued_at"] == retried.updated_at
    assert (retried.created_at, retried.stripe_event_id) == (job.created_at, "evt_1")
    event = (await job_events(db, job.id))[-1]
    assert (event["from_status"], event["to_status"]) == ("failed", "queued")
    assert (event["attempt"], event["actor"], event["reason"]) == (2, "api", "retry")


async def test_retry_actor_and_reason(db, user_agent) -> None:
    job = await job_in(user_agent, "failed")
    await jobs.retry_job(job.id, actor="operator:erin", reason="customer asked")
    event = (await job_events(db, job.id))[-1]
    assert (event["actor"], event["reason"]) == ("operator:erin", "customer asked")


@pytest.mark.parametrize("status", ["queued", "provisioning", "running"])
async def test_retry_only_from_failed(db, user_agent, status) -> None:
    job = await job_in(user_agent, status)
    before = await snapshot(db, job.id)
    for grant in (False, True):
        with pytest.raises(errors.InvalidTransitionError) as info:
            await jobs.retry_job(job.id, grant_extra_attempt=grant)
        assert type(info.value) is errors.InvalidTransitionError
        assert info.value.extra == {"current_status": status}
    assert await snapshot(db, job.id) == before


async def test_retry_unknown_job(db) -> None:
    with pytest.raises(errors.NotFoundError):
        await jobs.retry_job(uuid.uuid4())


async def fail_current_attempt(job_id: uuid.UUID, attempt: int) -> Job:
    await jobs.update_job_status(job_id, status="provisioning", attempt=attempt)
    return await jobs.update_job_status(job_id, status="failed", attempt=attempt, error="e")


async def test_retries_exhausted_then_operator_grants_one_more(db, user_agent) -> None:
    job = await enqueue(user_agent, max_retries=2)
    await fail_current_attempt(job.id, 1)
    assert (await jobs.retry_job(job.id)).attempt == 2
    await fail_current_attempt(job.id, 2)
    assert (await jobs.retry_job(job.id)).attempt == 3
    failed = await fail_current_attempt(job.id, 3)
    assert (failed.retry_count, failed.max_retries) == (2, 2)
    before = await snapshot(db, job.id)
    with pytest.raises(errors.RetriesExhaustedError) as info:
        await jobs.retry_job(job.id)
    assert info.value.extra == {"retry_count": 2, "max_retries": 2}
    assert await snapshot(db, job.id) == before

    granted = await jobs.retry_job(job.id, grant_extra_attempt=True, actor="operator:frank")
    assert granted.status == "queued"
    assert (granted.retry_count, granted.max_retries, granted.attempt) == (3, 3, 4)
    event = (await job_events(db, job.id))[-1]
    assert (event["from_status"], event["to_status"], event["attempt"]) == ("failed", "queued", 4)
    assert (event["actor"], event["reason"]) == ("operator:frank", "extra attempt granted")


async def test_zero_retry_budget(db, user_agent) -> None:
    job = await enqueue(user_agent, max_retries=0)
    await jobs.update_job_status(job.id, status="failed", attempt=1)
    with pytest.raises(errors.RetriesExhaustedError):
        await jobs.retry_job(job.id)
    granted = await jobs.retry_job(job.id, grant_extra_attempt=True)
    assert (granted.retry_count, granted.max_retries, granted.attempt) == (1, 1, 2)


async def test_grant_extra_attempt_within_budget_keeps_max_retries(db, user_agent) -> None:
    job = await job_in(user_agent, "failed")
    granted = await jobs.retry_job(job.id, grant_extra_attempt=True)
    assert (granted.retry_count, granted.max_retries) == (1, 3)


async def test_retry_blocked_by_another_active_job(db, user_agent) -> None:
    failed = await job_in(user_agent, "failed", event="evt_old")
    active = await enqueue(user_agent, "evt_new")
    before = await snapshot(db, failed.id)
    with pytest.raises(errors.ConcurrentProvisionError) as info:
        await jobs.retry_job(failed.id)
    assert info.value.message == CONCURRENT_PROVISION_MESSAGE
    with pytest.raises(errors.ConcurrentProvisionError):
        await jobs.retry_job(failed.id, grant_extra_attempt=True)
    assert await snapshot(db, failed.id) == before
    await jobs.update_job_status(active.id, status="provisioning", attempt=1)
    with pytest.raises(errors.ConcurrentProvisionError):
        await jobs.retry_job(failed.id)
    await jobs.update_job_status(active.id, status="running", attempt=1)
    assert (await jobs.retry_job(failed.id)).status == "queued"


# --------------------------------------------------------------------------- timeouts

HEARTBEAT_ERROR = re.compile(r"^Timeout: No heartbeat for (\d+)s$")


def seconds_in(pattern: re.Pattern[str] | str, text: str | None) -> int:
    assert text is not None
    match = re.fullmatch(pattern, text)
    assert match, text
    return int(match.group(1))


async def test_heartbeat_timeout(db, user_agent) -> None:
    job = await job_in(user_agent, "provisioning")
    await age(db, job.id, claimed_at=1200, updated_at=1200)
    assert await jobs.check_job_timeout(job.id) is True
    row = await job_row(db, job.id)
    assert row["status"] == "failed"
    assert row["failure_reason"] == "heartbeat_timeout"
    assert 1200 <= seconds_in(HEARTBEAT_ERROR, row["error"]) <= 1230
    assert row["completed_at"] is not None and row["failed_step"] is None
    event = (await job_events(db, job.id))[-1]
    assert (event["from_status"], event["to_status"]) == ("provisioning", "failed")
    assert (event["actor"], event["attempt"], event["reason"]) == ("system", 1, row["error"])
    # Done once: a second check has nothing to do and records nothing.
    events = await job_events(db, job.id)
    assert await jobs.check_job_timeout(job.id) is False
    assert await job_events(db, job.id) == events


async def test_timeout_counts_from_last_heartbeat(db, user_agent) -> None:
    job = await job_in(user_agent, "provisioning")
    await jobs.record_heartbeat(job.id, attempt=1)
    await age(db, job.id, claimed_at=1800, last_heartbeat_at=60, updated_at=60)
    assert await jobs.check_job_timeout(job.id) is False
    assert (await job_row(db, job.id))["status"] == "provisioning"
    await age(db, job.id, last_heartbeat_at=1000)
    assert await jobs.check_job_timeout(job.id) is True
    row = await job_row(db, job.id)
    assert 1000 <= seconds_in(HEARTBEAT_ERROR, row["error"]) <= 1030


async def test_timeout_falls_back_to_updated_at(db, user_agent) -> None:
    job = await job_in(user_agent, "provisioning")
    await db.execute("UPDATE provisioning_jobs SET claimed_at = NULL WHERE id = $1", job.id)
    await age(db, job.id, updated_at=950)
    assert await jobs.check_job_timeout(job.id) is True
    row = await job_row(db, job.id)
    assert 950 <= seconds_in(HEARTBEAT_ERROR, row["error"]) <= 980


async def test_default_heartbeat_timeout_boundary(db, user_agent) -> None:
    job = await job_in(user_agent, "provisioning")
    await age(db, job.id, claimed_at=14 * 60, updated_at=14 * 60)
    assert await jobs.check_job_timeout(job.id) is False
    await age(db, job.id, claimed_at=16 * 60, updated_at=16 * 60)
    assert await jobs.check_job_timeout(job.id) is True


async def test_deadline_exceeded_despite_heartbeats(db, user_agent) -> None:
    job = await job_in(user_agent, "provisioning")
    await jobs.record_heartbeat(job.id, attempt=1)
    await age(db, job.id, claimed_at=3000, last_heartbeat_at=5, updated_at=5)
    assert await jobs.check_job_timeout(job.id) is False
    await age(db, job.id, claimed_at=7200)
    assert await jobs.check_job_timeout(job.id) is True
    row = await job_row(db, job.id)
    assert (row["status"], row["failure_reason"]) == ("failed", "deadline_exceeded")
    n = seconds_in(r"Deadline exceeded: provisioning for (\d+)s", row["error"])
    assert 7200 <= n <= 7230
    event = (await job_events(db, job.id))[-1]
    assert (event["to_status"], event["actor"], event["reason"]) == (
        "failed",
        "system",
        row["error"],
    )


async def test_queue_timeout(db, user_agent) -> None:
    job = await enqueue(user_agent)
    await age(db, job.id, queued_at=600, created_at=600, updated_at=600)
    assert await jobs.check_job_timeout(job.id) is False
    await age(db, job.id, queued_at=1000, created_at=1000, updated_at=1000)
    assert await jobs.check_job_timeout(job.id) is True
    row = await job_row(db, job.id)
    assert (row["status"], row["failure_reason"]) == ("failed", "queue_timeout")
    assert 1000 <= seconds_in(r"Queue timeout: queued for (\d+)s", row["error"]) <= 1030
    event = (await job_events(db, job.id))[-1]
    assert (event["from_status"], event["to_status"], event["actor"]) == (
        "queued",
        "failed",
        "system",
    )
    # The user is no longer blocked.
    assert (await enqueue(user_agent, "evt_next")).status == "queued"


async def test_queue_timeout_counts_from_requeue_not_creation(db, user_agent) -> None:
    job = await job_in(user_agent, "failed")
    await age(db, job.id, created_at=7200, queued_at=7200)
    await jobs.retry_job(job.id)
    await age(db, job.id, updated_at=7200)
    assert await jobs.check_job_timeout(job.id) is False
    assert (await job_row(db, job.id))["status"] == "queued"


@pytest.mark.parametrize("status", ["running", "failed"])
async def test_finished_jobs_never_time_out(db, user_agent, status) -> None:
    job = await job_in(user_agent, status)
    await age(
        db,
        job.id,
        queued_at=99999,
        claimed_at=99999,
        last_heartbeat_at=99999,
        updated_at=99999,
        created_at=99999,
    )
    before = await snapshot(db, job.id)
    assert await jobs.check_job_timeout(job.id) is False
    assert await jobs.sweep_stale_jobs() == []
    assert await snapshot(db, job.id) == before


async def test_check_job_timeout_unknown_job(db) -> None:
    with pytest.raises(errors.NotFoundError):
        await jobs.check_job_timeout(uuid.uuid4())


async def test_get_job(db, user_agent) -> None:
    job = await job_in(user_agent, "provisioning")
    fetched = await jobs.get_job(job.id)
    assert unprogressed(fetched) == unprogressed(job)
    assert fetched.progress is not None and fetched.progress.total == 3
    await age(db, job.id, claimed_at=1200, updated_at=1200)
    failed = await jobs.get_job(job.id)  # the on-read check fails the stale job
    assert failed.status == "failed"
    assert failed.failure_reason == "heartbeat_timeout"
    assert_job_matches_row(failed, await job_row(db, job.id))
    assert (await job_events(db, job.id))[-1]["actor"] == "system"
    with pytest.raises(errors.NotFoundError):
        await jobs.get_job(uuid.uuid4())


async def test_sweep_fails_every_stale_job_and_nothing_else(db) -> None:
    stale_heartbeat = await job_in(await new_user_agent(), "provisioning", "e1")
    await age(db, stale_heartbeat.id, claimed_at=1200, updated_at=1200)
    stale_deadline = await job_in(await new_user_agent(), "provisioning", "e2")
    await jobs.record_heartbeat(stale_deadline.id, attempt=1)
    await age(db, stale_deadline.id, claimed_at=4000, last_heartbeat_at=10, updated_at=10)
    stale_queued = await job_in(await new_user_agent(), "queued", "e3")
    await age(db, stale_queued.id, queued_at=1000, updated_at=1000)
    fresh_provisioning = await job_in(await new_user_agent(), "provisioning", "e4")
    fresh_queued = await job_in(await new_user_agent(), "queued", "e5")
    old_running = await job_in(await new_user_agent(), "running", "e6")
    await age(db, old_running.id, claimed_at=9000, updated_at=9000, queued_at=9000)
    untouched = [fresh_provisioning.id, fresh_queued.id, old_running.id]
    before = {job_id: await snapshot(db, job_id) for job_id in untouched}
    events_before = await count(db, "job_events")

    swept = await jobs.sweep_stale_jobs()

    reasons = {job.id: job.failure_reason for job in swept}
    assert reasons == {
        stale_heartbeat.id: "heartbeat_timeout",
        stale_deadline.id: "deadline_exceeded",
        stale_queued.id: "queue_timeout",
    }
    for job in swept:
        assert job.status == "failed"
        assert_job_matches_row(job, await job_row(db, job.id))
        event = (await job_events(db, job.id))[-1]
        assert (event["to_status"], event["actor"], event["reason"]) == (
            "failed",
            "system",
            job.error,
        )
    assert await count(db, "job_events") == events_before + 3
    assert {job_id: await snapshot(db, job_id) for job_id in untouched} == before
    assert await jobs.sweep_stale_jobs() == []
    assert await count(db, "job_events") == events_before + 3


@pytest.mark.parametrize("batch_size", [1, 2, 3])
async def test_sweep_in_batches(db, batch_size) -> None:
    ids = set()
    for i in range(3):
        job = await job_in(await new_user_agent(), "provisioning", f"e{i}")
        await age(db, job.id, claimed_at=1200, updated_at=1200)
        ids.add(job.id)
    swept = await jobs.sweep_stale_jobs(batch_size=batch_size)
    assert {job.id for job in swept} == ids
    assert len(swept) == 3
    assert await db.fetchval("SELECT count(*) FROM job_events WHERE actor = 'system'") == 3


async def test_heartbeat_after_timeout_but_before_sweep_keeps_job(db, user_agent) -> None:
    job = await job_in(user_agent, "provisioning")
    await age(db, job.id, claimed_at=1200, updated_at=1200)
    beat = await jobs.record_heartbeat(job.id, attempt=1)
    assert beat.status == "provisioning"
    assert await jobs.sweep_stale_jobs() == []
    assert await jobs.check_job_timeout(job.id) is False
    assert (await job_row(db, job.id))["status"] == "provisioning"
    assert (await jobs.update_job_status(job.id, status="running", attempt=1)).status == "running"


async def test_timeouts_come_from_settings(db, user_agent, monkeypatch) -> None:
    short = msgspec.structs.replace(
        get_settings(), job_timeout_seconds=60, job_deadline_seconds=300, queue_timeout_seconds=30
    )
    monkeypatch.setattr(jobs, "get_settings", lambda: short)
    job = await job_in(user_agent, "provisioning")
    await age(db, job.id, claimed_at=90, updated_at=90)
    assert await jobs.check_job_timeout(job.id) is True
    assert (await job_row(db, job.id))["failure_reason"] == "heartbeat_timeout"

    queued = await enqueue(user_agent, "evt_q")
    await age(db, queued.id, queued_at=45)
    [swept] = await jobs.sweep_stale_jobs()
    assert (swept.id, swept.failure_reason) == (queued.id, "queue_timeout")

    other = await job_in(user_agent, "provisioning", "evt_d")
    await jobs.record_heartbeat(other.id, attempt=1)
    await age(db, other.id, claimed_at=400, last_heartbeat_at=5, updated_at=5)
    assert (await jobs.get_job(other.id)).failure_reason == "deadline_exceeded"


# --------------------------------------------------------------------------- reads


async def test_get_job_by_stripe_event_id(db, user_agent) -> None:
    job = await enqueue(user_agent, "evt_lookup")
    assert await jobs.get_job_by_stripe_event_id("evt_lookup") == unprogressed(job)
    assert await jobs.get_job_by_stripe_event_id("evt_missing") is None


async def test_get_job_by_agent_id_returns_newest(db, user_agent) -> None:
    user_id, agent_id = user_agent
    assert await jobs.get_job_by_agent_id(agent_id) is None
    first = await job_in(user_agent, "failed", "evt_1")
    second = await enqueue(user_agent, "evt_2")
    assert (await jobs.get_job_by_agent_id(agent_id)).id == second.id
    other_agent = await accounts.create_agent(user_id, "other")
    assert await jobs.get_job_by_agent_id(other_agent.id) is None
    # Newest by created_at, not by insertion order.
    await age(db, second.id, created_at=3600)
    assert (await jobs.get_job_by_agent_id(agent_id)).id == first.id
    assert await jobs.get_job_by_agent_id(uuid.uuid4()) is None


async def test_list_job_events_oldest_first(db, user_agent) -> None:
    job = await job_in(user_agent, "failed")
    await jobs.retry_job(job.id)
    await jobs.update_job_status(job.id, status="provisioning", attempt=2)
    await jobs.update_job_status(job.id, status="running", attempt=2)
    events = await jobs.list_job_events(job.id)
    assert [(e.from_status, e.to_status, e.attempt) for e in events] == [
        (None, "queued", 1),
        ("queued", "provisioning", 1),
        ("provisioning", "failed", 1),
        ("failed", "queued", 2),
        ("queued", "provisioning", 2),
        ("provisioning", "running", 2),
    ]
    assert [e.actor for e in events] == ["api", "workflow", "workflow", "api"] + ["workflow"] * 2
    assert all(e.job_id == job.id for e in events)
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert [e.created_at for e in events] == sorted(e.created_at for e in events)
    raw = await job_events(db, job.id)
    assert [e.id for e in events] == [r["id"] for r in raw]


async def test_list_job_events_unknown_and_empty(db, user_agent) -> None:
    with pytest.raises(errors.NotFoundError):
        await jobs.list_job_events(uuid.uuid4())
    user_id, agent_id = user_agent
    job_id = await db.fetchval(
        "INSERT INTO provisioning_jobs (agent_id, user_id) VALUES ($1, $2) RETURNING id",
        agent_id,
        user_id,
    )
    assert await jobs.list_job_events(job_id) == []


async def _all_pages(**kwargs: Any) -> tuple[list[uuid.UUID], list[int]]:
    ids: list[uuid.UUID] = []
    sizes: list[int] = []
    cursor = None
    for _ in range(100):
        page = await jobs.list_jobs(cursor=cursor, **kwargs)
        ids += [job.id for job in page.items]
        sizes.append(len(page.items))
        cursor = page.next_cursor
        if cursor is None:
            return ids, sizes
    raise AssertionError("paging did not end")


async def test_list_jobs_keyset_paging_and_filters(db) -> None:
    user_1, agent_1a = await new_user_agent()
    agent_1b = (await accounts.create_agent(user_1, "b")).id
    user_2, agent_2 = await new_user_agent()
    # Failed jobs (no one-active limit); created_at with ties, so the id breaks them.
    insert = """
        INSERT INTO provisioning_jobs (agent_id, user_id, status, failure_reason, created_at)
        SELECT $1, $2, 'failed', 'operator', now() - (g % 3) * interval '1 minute'
        FROM generate_series(1, $3) g"""
    await db.execute(insert, agent_1a, user_1, 5)
    await db.execute(insert, agent_1b, user_1, 3)
    await db.execute(insert, agent_2, user_2, 4)
    queued = await enqueue((user_1, agent_1b), "evt_q")

    async def expected(where: str = "true", *args: Any) -> list[uuid.UUID]:
        rows = await db.fetch(
            f"SELECT id FROM provisioning_jobs WHERE {where} ORDER BY created_at DESC, id DESC",
            *args,
        )
        return [r["id"] for r in rows]

    cases: list[tuple[dict[str, Any], str, tuple[Any, ...]]] = [
        ({}, "true", ()),
        ({"user_id": user_1}, "user_id = $1", (user_1,)),
        ({"agent_id": agent_1b}, "agent_id = $1", (agent_1b,)),
        ({"status": JobStatus.FAILED}, "status = 'failed'", ()),
        ({"status": JobStatus.QUEUED}, "status = 'queued'", ()),
        (
            {"user_id": user_1, "agent_id": agent_1b, "status": JobStatus.FAILED},
            "user_id = $1 AND agent_id = $2 AND status = 'failed'",
            (user_1, agent_1b),
        ),
        ({"user_id": user_2, "agent_id": agent_1a}, "false", ()),
    ]
    for filters, where, args in cases:
        want = await expected(where, *args)
        for limit in (1, 2, 3, 50):
            ids, sizes = await _all_pages(limit=limit, **filters)
            assert ids == want, (filters, limit)
            assert all(size == limit for size in sizes[:-1])
            assert 0 <= sizes[-1] <= limit
            # Exactly `limit` rows left: no further page is promised.
            if want and len(want) % limit == 0:
                assert sizes[-1] == limit
    assert (await jobs.list_jobs(status=JobStatus.QUEUED)).items[0].id == queued.id
    whole = await jobs.list_jobs(limit=13)
    assert len(whole.items) == 13 and whole.next_cursor is None
    first = await jobs.list_jobs(limit=12)
    assert first.next_cursor is not None
    rest = await jobs.list_jobs(limit=12, cursor=first.next_cursor)
    assert len(rest.items) == 1 and rest.next_cursor is None


async def test_list_jobs_empty(db) -> None:
    page = await jobs.list_jobs()
    assert page.items == [] and page.next_cursor is None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "not a cursor!",
        "é",
        "abc",
        _b64(b"not json"),
        _b64(b"{}"),
        _b64(b"[1, 2]"),
        _b64(b'["2024-01-01T00:00:00Z", "not-a-uuid"]'),
        _b64(b'["yesterday", "00000000-0000-0000-0000-000000000000"]'),
    ],
)
async def test_list_jobs_bad_cursor(db, cursor) -> None:
    with pytest.raises(errors.BadRequestError):
        await jobs.list_jobs(cursor=cursor)


async def test_operator_fail_refuses_an_already_failed_job(user_agent, db):
    user_id, agent_id = user_agent
    job = (
        await jobs.enqueue_provisioning_job(
            agent_id=agent_id, user_id=user_id, stripe_event_id="evt_op"
        )
    ).job
    await jobs.update_job_status(job.id, status="failed", attempt=1, error="boom")
    with pytest.raises(errors.InvalidTransitionError, match="already failed"):
        await jobs.update_job_status(
            job.id,
            status="failed",
            attempt=None,
            error="operator says",
            failure_reason=FailureReason.OPERATOR,
            actor="operator:ann",
            repeat_ok=False,
        )
    assert await db.fetchval("SELECT error FROM provisioning_jobs") == "boom"
    assert await db.fetchval("SELECT count(*) FROM job_events") == 2


async def test_list_jobs_refuses_a_limit_below_one(db):
    with pytest.raises(errors.BadRequestError):
        await jobs.list_jobs(limit=0)


async def test_bad_actor_is_a_domain_error(user_agent, db):
    user_id, agent_id = user_agent
    with pytest.raises(errors.BadRequestError, match="actor"):
        await jobs.enqueue_provisioning_job(
            agent_id=agent_id, user_id=user_id, stripe_event_id="evt_actor", actor="nobody"
        )
    assert await db.fetchval("SELECT count(*) FROM provisioning_jobs") == 0
