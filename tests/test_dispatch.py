"""The dispatcher and its service layer on real PostgreSQL.

The provisioner here is a scripted one (it implements the Provisioner protocol and
answers what each test tells it): these tests are about what the dispatcher does with
each answer. The GitHub provisioner against a GitHub stand-in over HTTP, and whole
server processes, are tested in test_github_provisioner.py and test_dispatch_e2e.py.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
import pytest

from jobs_app.core import errors
from jobs_app.core.lifecycle import Actor, JobStatus
from jobs_app.core.provisioning import DispatchRequest, Outcome, Result
from jobs_app.core.settings import get_settings
from jobs_app.loops.dispatcher import Dispatcher
from jobs_app.services import accounts, dispatches
from jobs_app.services import jobs as job_service

PUBLIC = "http://jobs.example"


class ScriptedProvisioner:
    """Answers from a script: `answers` is consumed one per dispatch request (the last
    one repeats); `runs` are what find_run knows, by dispatch id."""

    name = "scripted"

    def __init__(self, *answers: Result) -> None:
        self.answers = list(answers) or [ok()]
        self.requests: list[DispatchRequest] = []
        self.lookups: list[uuid.UUID] = []
        self.cancelled: list[str] = []
        self.runs: dict[uuid.UUID, Result] = {}
        self.gate: asyncio.Event | None = None
        self.requested = asyncio.Event()

    async def dispatch(self, request: DispatchRequest) -> Result:
        self.requests.append(request)
        self.requested.set()
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer

    async def find_run(self, dispatch_id: uuid.UUID, created_since: datetime) -> Result:
        self.lookups.append(dispatch_id)
        return self.runs.get(dispatch_id, Result(outcome=Outcome.NOT_FOUND))

    async def cancel_run(self, workflow_run_id: str) -> Result:
        self.cancelled.append(workflow_run_id)
        return Result(outcome=Outcome.OK, status_code=202)

    async def aclose(self) -> None:
        pass


_run_ids = iter(range(1000, 10**9))


def ok(run_id: str | None = None) -> Result:
    run = run_id or str(next(_run_ids))
    return Result(
        outcome=Outcome.OK,
        status_code=200,
        workflow_run_id=run,
        run_url=f"https://github.example/o/r/actions/runs/{run}",
    )


def settings(**overrides: Any):  # type: ignore[no-untyped-def]
    base = msgspec.structs.replace(
        get_settings(),
        public_url=PUBLIC,
        dispatch_interval_seconds=0.05,
        dispatch_reconcile_grace_seconds=30,
        dispatch_backoff_base_seconds=0.01,
        dispatch_backoff_max_seconds=0.05,
    )
    return msgspec.structs.replace(base, **overrides)


async def new_job(user_agent: tuple[uuid.UUID, uuid.UUID]) -> Any:
    user_id, agent_id = user_agent
    return (
        await job_service.enqueue_provisioning_job(
            agent_id=agent_id, user_id=user_id, stripe_event_id=f"evt_{uuid.uuid4().hex}"
        )
    ).job


async def round_(dispatcher: Dispatcher) -> int:
    """One round, and the work it started, to the end."""
    n = await dispatcher.run_once()
    await dispatcher.drain()
    return n


async def rows(db: asyncpg.Connection, job_id: uuid.UUID) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM dispatches WHERE job_id = $1 ORDER BY created_at", job_id)


async def make_due(db: asyncpg.Connection, job_id: uuid.UUID) -> None:
    """Force the condition instead of waiting for it: every dispatch's next try is now."""
    await db.execute("UPDATE dispatches SET next_try_at = now() WHERE job_id = $1", job_id)


# --------------------------------------------------------------------------- happy path


async def test_a_queued_job_gets_one_dispatch_with_the_workflow_inputs(db, user_agent):
    job = await new_job(user_agent)
    provisioner = ScriptedProvisioner(ok("77"))
    dispatcher = Dispatcher(provisioner, settings())
    assert await round_(dispatcher) == 1

    [request] = provisioner.requests
    assert request.inputs() == {
        "job_id": str(job.id),
        "attempt": "1",
        "dispatch_id": str(request.dispatch_id),
        "agent_id": str(job.agent_id),
        "user_id": str(job.user_id),
        "region": "us-east",
        "callback_url": f"{PUBLIC}/api/callbacks/jobs/{job.id}",
    }
    [row] = await rows(db, job.id)
    assert (row["id"], row["state"], row["tries"], row["workflow_run_id"]) == (
        request.dispatch_id,
        "dispatched",
        1,
        "77",
    )
    assert row["lease_owner"] is None and row["dispatched_at"] is not None
    # The job stays queued until the workflow says it started.
    assert (await job_service.get_job(job.id)).status == JobStatus.QUEUED
    # More rounds find nothing to do: one run per attempt.
    assert await round_(dispatcher) == 0
    assert len(provisioner.requests) == 1

    [item] = await dispatches.list_dispatches(job.id) or []
    assert (item.dispatch_id, item.state, item.tries, item.workflow_run_id, item.bound) == (
        request.dispatch_id,
        "dispatched",
        1,
        "77",
        False,
    )
    assert [(t.kind, t.outcome, t.status_code) for t in item.history] == [("dispatch", "ok", 200)]


async def test_n_dispatchers_racing_give_one_dispatch_per_job(db, database):
    """50 queued jobs, 10 dispatchers claiming at once on separate connections: each
    job's attempt gets exactly one dispatch, sent exactly once."""
    jobs = []
    for i in range(50):
        user = await accounts.create_user(f"race-{i}-{uuid.uuid4().hex[:6]}@example.com")
        agent = await accounts.create_agent(user.id, "a")
        jobs.append(await new_job((user.id, agent.id)))
    provisioner = ScriptedProvisioner(ok())
    dispatchers = [Dispatcher(provisioner, settings(dispatch_batch=50)) for _ in range(10)]
    for _ in range(3):
        await asyncio.gather(*(round_(d) for d in dispatchers))

    assert len(provisioner.requests) == 50
    assert {r.job_id for r in provisioner.requests} == {j.id for j in jobs}
    counts = await db.fetch("SELECT job_id, count(*) FROM dispatches GROUP BY job_id")
    assert len(counts) == 50 and {c["count"] for c in counts} == {1}


async def test_claims_race_on_the_partial_unique_index(db, user_agent):
    """Claims racing for one job, many times over: one live dispatch, never two."""
    for _ in range(20):
        job = await new_job(user_agent)
        owners = [f"owner-{i}" for i in range(10)]
        claimed = await asyncio.gather(
            *(dispatches.claim(o, "scripted", lease_seconds=60, batch=5) for o in owners)
        )
        assert sum(len(c) for c in claimed) == 1
        assert len(await rows(db, job.id)) == 1
        await job_service.update_job_status(job.id, status="failed", attempt=1, actor=Actor.SYSTEM)


# --------------------------------------------------------------------------- outcomes


async def test_a_refused_dispatch_fails_the_job_with_githubs_message(db, user_agent):
    job = await new_job(user_agent)
    refused = Result(
        outcome=Outcome.REJECTED, status_code=422, message="Unexpected inputs provided: ['x']"
    )
    provisioner = ScriptedProvisioner(refused)
    await round_(Dispatcher(provisioner, settings()))

    failed = await job_service.get_job(job.id)
    assert failed.status == JobStatus.FAILED
    assert failed.failure_reason == "dispatch_error"
    assert failed.error == "GitHub answered 422: Unexpected inputs provided: ['x']"
    events = await job_service.list_job_events(job.id)
    assert [(e.from_status, e.to_status, e.actor) for e in events][-1] == (
        "queued",
        "failed",
        "system",
    )
    [row] = await rows(db, job.id)
    assert (row["state"], row["tries"]) == ("failed", 1)
    # A retry is a new attempt with a new dispatch.
    retried = await job_service.retry_job(job.id)
    provisioner.answers = [ok("88")]
    await round_(Dispatcher(provisioner, settings()))
    second = (await rows(db, job.id))[-1]
    assert (second["attempt"], second["state"], second["workflow_run_id"]) == (
        retried.attempt,
        "dispatched",
        "88",
    )
    assert second["id"] != row["id"]


async def test_an_unknown_outcome_is_reconciled_never_resent(db, user_agent):
    job = await new_job(user_agent)
    provisioner = ScriptedProvisioner(
        Result(outcome=Outcome.UNKNOWN, message="Server disconnected without sending a response")
    )
    dispatcher = Dispatcher(provisioner, settings())
    await round_(dispatcher)
    [row] = await rows(db, job.id)
    assert row["state"] == "unknown" and row["unknown_since"] is not None

    # The run is there after all: the next due round finds it by its dispatch id.
    provisioner.runs[row["id"]] = ok("4242")
    await make_due(db, job.id)
    await round_(dispatcher)
    assert len(provisioner.requests) == 1
    assert provisioner.lookups == [row["id"]]
    [row] = await rows(db, job.id)
    assert (row["state"], row["workflow_run_id"], row["tries"]) == ("dispatched", "4242", 1)
    [item] = await dispatches.list_dispatches(job.id) or []
    assert [(t.kind, t.outcome) for t in item.history] == [
        ("dispatch", "unknown"),
        ("reconcile", "ok"),
    ]


async def test_no_run_within_the_grace_period_means_a_new_dispatch(db, user_agent):
    job = await new_job(user_agent)
    provisioner = ScriptedProvisioner(Result(outcome=Outcome.UNKNOWN, status_code=502), ok("9"))
    dispatcher = Dispatcher(provisioner, settings())
    await round_(dispatcher)
    [first] = await rows(db, job.id)

    # Not found, within the grace period: still unknown, looked for again later.
    await make_due(db, job.id)
    await round_(dispatcher)
    assert (await rows(db, job.id))[0]["state"] == "unknown"
    assert len(provisioner.requests) == 1

    # The grace period is over (forced): lost, and the attempt gets a new dispatch.
    await db.execute(
        "UPDATE dispatches SET unknown_since = now() - interval '1 hour' WHERE id = $1",
        first["id"],
    )
    await make_due(db, job.id)
    await round_(dispatcher)
    await round_(dispatcher)
    lost, second = await rows(db, job.id)
    assert (lost["id"], lost["state"]) == (first["id"], "lost")
    assert (second["state"], second["workflow_run_id"]) == ("dispatched", "9")
    assert [r.dispatch_id for r in provisioner.requests] == [first["id"], second["id"]]


async def test_nothing_sent_is_sent_again_with_backoff(db, user_agent):
    job = await new_job(user_agent)
    refused = Result(outcome=Outcome.NOT_SENT, message="connection refused")
    provisioner = ScriptedProvisioner(refused, refused, ok("5"))
    dispatcher = Dispatcher(provisioner, settings())
    for _ in range(3):
        await round_(dispatcher)
        await make_due(db, job.id)
    [row] = await rows(db, job.id)
    assert (row["state"], row["tries"], row["workflow_run_id"]) == ("dispatched", 3, "5")
    assert {r.dispatch_id for r in provisioner.requests} == {row["id"]}
    assert provisioner.lookups == []


async def test_rate_limited_pauses_this_dispatcher(db, user_agent):
    job = await new_job(user_agent)
    limited = Result(outcome=Outcome.RATE_LIMITED, status_code=429, retry_after=3600)
    provisioner = ScriptedProvisioner(limited, ok())
    dispatcher = Dispatcher(provisioner, settings())
    await round_(dispatcher)
    health = dispatcher.health()
    assert health.state == "paused" and "rate limited" in (health.reason or "")
    assert health.resumes_in_seconds is not None and health.resumes_in_seconds > 3000

    # Even with the dispatch due and another job queued, a paused dispatcher sends nothing.
    await make_due(db, job.id)
    assert await round_(dispatcher) == 0
    assert len(provisioner.requests) == 1
    [row] = await rows(db, job.id)
    assert (row["state"], row["lease_owner"]) == ("pending", None)
    assert (await job_service.get_job(job.id)).status == JobStatus.QUEUED


async def test_misconfigured_pauses_and_keeps_jobs_queued_until_their_deadline(db, user_agent):
    job = await new_job(user_agent)
    provisioner = ScriptedProvisioner(
        Result(outcome=Outcome.MISCONFIGURED, status_code=404, message="Not Found")
    )
    dispatcher = Dispatcher(provisioner, settings(dispatch_backoff_base_seconds=600))
    await round_(dispatcher)
    health = dispatcher.health()
    assert health.state == "paused"
    assert health.reason == "misconfigured: GitHub answered 404: Not Found"
    assert (await job_service.get_job(job.id)).status == JobStatus.QUEUED

    # The deadline passes (forced): the job fails with dispatch_error, paused or not.
    await db.execute(
        "UPDATE dispatches SET created_at = now() - interval '1 hour' WHERE job_id = $1", job.id
    )
    await round_(dispatcher)
    failed = await job_service.get_job(job.id)
    assert failed.status == JobStatus.FAILED and failed.failure_reason == "dispatch_error"
    assert failed.error is not None and failed.error.startswith(
        "Dispatch deadline: no workflow run started within 600s"
    )
    assert "Not Found" in failed.error
    [row] = await rows(db, job.id)
    assert row["state"] == "failed"


async def test_a_dispatched_attempt_has_no_dispatch_deadline(db, user_agent):
    job = await new_job(user_agent)
    await round_(Dispatcher(ScriptedProvisioner(ok()), settings()))
    await db.execute(
        "UPDATE dispatches SET created_at = now() - interval '1 hour' WHERE job_id = $1", job.id
    )
    assert await dispatches.fail_past_deadline(600) == []
    assert (await job_service.get_job(job.id)).status == JobStatus.QUEUED


# --------------------------------------------------------------------------- leases


async def test_an_expired_lease_is_taken_over_and_reconciled_first(db, user_agent):
    """A dispatcher died after claiming (maybe after sending): another takes the
    dispatch over once the lease expires, and looks for the run before sending."""
    job = await new_job(user_agent)
    [claim] = await dispatches.claim("dead-process", "scripted", lease_seconds=60, batch=5)
    provisioner = ScriptedProvisioner(ok("2"))
    survivor = Dispatcher(provisioner, settings())
    assert await round_(survivor) == 0  # the lease is still held

    await db.execute(
        "UPDATE dispatches SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        claim.dispatch_id,
    )
    provisioner.runs[claim.dispatch_id] = ok("1")
    assert await round_(survivor) == 1
    assert provisioner.requests == []  # found, not sent again
    [row] = await rows(db, job.id)
    assert (row["state"], row["workflow_run_id"]) == ("dispatched", "1")
    # The dead process's late record changes nothing: it no longer holds the lease.
    assert not await dispatches.record_unknown(claim.dispatch_id, "dead-process", ok(), 1)
    assert (await rows(db, job.id))[0]["state"] == "dispatched"


async def test_a_lease_lost_during_the_request_drops_the_late_record(db, user_agent, caplog):
    """The lease runs out while the request hangs and another process takes the dispatch
    over and records it. The first process's answer, when it comes, is dropped: no second
    record, and no "workflow dispatched" line from it (it says the record was dropped)."""
    job = await new_job(user_agent)
    slow = ScriptedProvisioner(ok("7"))
    slow.gate = asyncio.Event()  # the request hangs
    first = Dispatcher(slow, settings())
    await first.run_once()
    await asyncio.wait_for(slow.requested.wait(), 30)
    [row] = await rows(db, job.id)
    await db.execute(
        "UPDATE dispatches SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        row["id"],
    )
    other = ScriptedProvisioner(ok())
    other.runs[row["id"]] = ok("7")  # the hanging request did start run 7
    await round_(Dispatcher(other, settings()))
    assert other.requests == [] and other.lookups == [row["id"]]

    caplog.clear()
    caplog.set_level("INFO", logger="jobs_app.dispatcher")
    slow.gate.set()
    await first.drain()
    told = caplog.text
    assert "workflow dispatched" not in told, told
    assert "dispatch outcome dropped: the lease was lost to another process" in told
    [row] = await rows(db, job.id)
    assert (row["state"], row["workflow_run_id"], row["tries"]) == ("dispatched", "7", 0)
    tries = await db.fetch(
        "SELECT kind, outcome FROM dispatch_tries WHERE dispatch_id = $1 ORDER BY id", row["id"]
    )
    assert [(t["kind"], t["outcome"]) for t in tries] == [("reconcile", "ok")]


async def test_a_callback_binding_the_dispatch_mid_request_leaves_its_record_to_land(
    db, user_agent, caplog
):
    """The run calls back before GitHub's answer reaches the dispatcher: the callback
    binds the attempt, and the dispatcher's record (the run's URL, the try) still lands."""
    job = await new_job(user_agent)
    slow = ScriptedProvisioner(ok("8"))
    slow.gate = asyncio.Event()
    dispatcher = Dispatcher(slow, settings())
    await dispatcher.run_once()
    await asyncio.wait_for(slow.requested.wait(), 30)
    [row] = await rows(db, job.id)
    await job_service.update_job_status(
        job.id, status="provisioning", attempt=1, dispatch_id=row["id"], workflow_run_id="8"
    )
    caplog.set_level("INFO", logger="jobs_app.dispatcher")
    slow.gate.set()
    await dispatcher.drain()
    assert "workflow dispatched" in caplog.text
    [row] = await rows(db, job.id)
    assert (row["state"], row["run_url"], row["tries"]) == (
        "dispatched",
        "https://github.example/o/r/actions/runs/8",
        1,
    )


async def test_stop_gives_leases_back_and_marks_cut_off_requests_for_reconciling(db, user_agent):
    job = await new_job(user_agent)
    provisioner = ScriptedProvisioner(ok())
    provisioner.gate = asyncio.Event()  # the request hangs
    dispatcher = Dispatcher(provisioner, settings())
    await dispatcher.run_once()
    await asyncio.wait_for(provisioner.requested.wait(), 30)
    await dispatcher.stop(grace=0.1)
    [row] = await rows(db, job.id)
    assert (row["state"], row["lease_owner"]) == ("unknown", None)

    # Another process takes it at once, and reconciles before sending.
    other = ScriptedProvisioner(ok())
    other.runs[row["id"]] = ok("3")
    await round_(Dispatcher(other, settings()))
    assert other.requests == [] and other.lookups == [row["id"]]
    assert (await rows(db, job.id))[0]["workflow_run_id"] == "3"


# --------------------------------------------------------------------------- fencing


async def dispatched_job(
    user_agent: tuple[uuid.UUID, uuid.UUID], db: asyncpg.Connection
) -> tuple[Any, uuid.UUID]:
    job = await new_job(user_agent)
    await round_(Dispatcher(ScriptedProvisioner(ok()), settings()))
    [row] = await rows(db, job.id)
    return job, row["id"]


async def test_the_first_callback_binds_the_attempt_and_fences_out_others(db, user_agent):
    job, dispatch_id = await dispatched_job(user_agent, db)
    moved = await job_service.update_job_status(
        job.id, status="provisioning", attempt=1, dispatch_id=dispatch_id, workflow_run_id="r1"
    )
    assert moved.dispatch_id == dispatch_id

    stranger = uuid.uuid4()
    for call in (
        lambda: job_service.update_job_status(
            job.id, status="running", attempt=1, dispatch_id=stranger, workflow_run_id="r9"
        ),
        lambda: job_service.record_heartbeat(
            job.id, attempt=1, dispatch_id=stranger, workflow_run_id="r9"
        ),
    ):
        with pytest.raises(errors.SupersededDispatchError) as info:
            await call()
        assert info.value.extra["reason"] == "superseded_dispatch"
    # The refused run is queued for cancellation; the job did not move.
    assert await db.fetchval("SELECT reason FROM run_cancellations WHERE workflow_run_id = 'r9'")
    assert (await job_service.get_job(job.id)).status == JobStatus.PROVISIONING

    # The bound dispatch moves it; callbacks naming no dispatch behave as before.
    await job_service.record_heartbeat(job.id, attempt=1, dispatch_id=dispatch_id)
    await job_service.record_heartbeat(job.id, attempt=1)
    done = await job_service.update_job_status(
        job.id, status="running", attempt=1, dispatch_id=dispatch_id
    )
    assert done.status == JobStatus.RUNNING
    [item] = await dispatches.list_dispatches(job.id) or []
    assert item.bound and item.state == "dispatched"


async def test_a_dispatch_never_issued_for_the_attempt_cannot_bind_it(db, user_agent):
    job, _ = await dispatched_job(user_agent, db)
    with pytest.raises(errors.SupersededDispatchError) as info:
        await job_service.update_job_status(
            job.id, status="provisioning", attempt=1, dispatch_id=uuid.uuid4()
        )
    assert info.value.message == "this dispatch was not issued for the job's current attempt"
    assert (await job_service.get_job(job.id)).status == JobStatus.QUEUED


async def test_two_runs_for_one_attempt_exactly_one_moves_the_job(db, user_agent):
    """A dispatch thought lost (its run showed late) and its replacement both call back,
    racing: one binds the attempt, the other is refused and its run cancelled."""
    for _ in range(10):
        job = await new_job(user_agent)
        provisioner = ScriptedProvisioner(Result(outcome=Outcome.UNKNOWN), ok("late-2"))
        dispatcher = Dispatcher(provisioner, settings())
        await round_(dispatcher)
        await db.execute(
            "UPDATE dispatches SET unknown_since = now() - interval '1 hour', "
            "next_try_at = now() WHERE job_id = $1",
            job.id,
        )
        await round_(dispatcher)
        await round_(dispatcher)
        first, second = await rows(db, job.id)
        run_of = {first["id"]: f"run-a-{job.id}", second["id"]: f"run-b-{job.id}"}

        outcomes = await asyncio.gather(
            *(
                job_service.update_job_status(
                    job.id, status="provisioning", attempt=1, dispatch_id=d, workflow_run_id=r
                )
                for d, r in run_of.items()
            ),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if not isinstance(o, Exception)]
        losers = [o for o in outcomes if isinstance(o, errors.SupersededDispatchError)]
        assert len(winners) == 1 and len(losers) == 1
        bound = winners[0].dispatch_id
        loser_run = next(r for d, r in run_of.items() if d != bound)
        cancelled = await db.fetch(
            "SELECT workflow_run_id FROM run_cancellations WHERE job_id = $1", job.id
        )
        assert loser_run in {c["workflow_run_id"] for c in cancelled}
        events = await job_service.list_job_events(job.id)
        assert [e.to_status for e in events] == ["queued", "provisioning"]
        await job_service.update_job_status(job.id, status="failed", attempt=1)


async def test_operator_fail_cancels_the_known_run_through_the_provisioner(db, user_agent):
    job, dispatch_id = await dispatched_job(user_agent, db)
    run_id = (await rows(db, job.id))[0]["workflow_run_id"]
    await job_service.update_job_status(
        job.id, status="provisioning", attempt=1, dispatch_id=dispatch_id
    )
    await job_service.update_job_status(
        job.id,
        status="failed",
        attempt=None,
        error="stuck",
        actor=Actor.operator("alice"),
        repeat_ok=False,
    )
    provisioner = ScriptedProvisioner()
    await round_(Dispatcher(provisioner, settings()))
    assert provisioner.cancelled == [run_id]
    assert (
        await db.fetchval("SELECT state FROM run_cancellations WHERE workflow_run_id = $1", run_id)
        == "done"
    )
    [item] = await dispatches.list_dispatches(job.id) or []
    assert item.cancel_state == "done"
    assert [t.kind for t in item.history] == ["dispatch", "cancel"]


async def test_the_workflows_own_failure_cancels_nothing(db, user_agent):
    job, dispatch_id = await dispatched_job(user_agent, db)
    await job_service.update_job_status(
        job.id, status="provisioning", attempt=1, dispatch_id=dispatch_id
    )
    await job_service.update_job_status(
        job.id, status="failed", attempt=1, dispatch_id=dispatch_id, error="ansible failed"
    )
    assert await db.fetchval("SELECT count(*) FROM run_cancellations") == 0


async def test_the_sweeper_timing_a_job_out_cancels_its_run(db, user_agent):
    job, dispatch_id = await dispatched_job(user_agent, db)
    run_id = (await rows(db, job.id))[0]["workflow_run_id"]
    await job_service.update_job_status(
        job.id, status="provisioning", attempt=1, dispatch_id=dispatch_id
    )
    await db.execute(
        "UPDATE provisioning_jobs SET claimed_at = now() - interval '2 hours' WHERE id = $1",
        job.id,
    )
    [failed] = await job_service.sweep_stale_jobs()
    assert failed.id == job.id
    reason = await db.fetchval(
        "SELECT reason FROM run_cancellations WHERE workflow_run_id = $1", run_id
    )
    assert reason == "timed out: deadline_exceeded"


async def test_dispatches_of_an_unknown_job_are_none(db):
    assert await dispatches.list_dispatches(uuid.uuid4()) is None


async def test_an_idle_round_is_one_statement(db, monkeypatch):
    """Nothing to fail, cancel or claim: a round costs one statement (one round trip)."""
    from jobs_app.db import statement

    sent: list[str] = []
    real_fetch, real_fetchrow = statement.fetch, statement.fetchrow

    async def fetch(stmt: Any, **values: Any) -> Any:
        sent.append(stmt.sql)
        return await real_fetch(stmt, **values)

    async def fetchrow(stmt: Any, **values: Any) -> Any:
        sent.append(stmt.sql)
        return await real_fetchrow(stmt, **values)

    monkeypatch.setattr(dispatches, "fetch", fetch)
    monkeypatch.setattr(dispatches, "fetchrow", fetchrow)
    dispatcher = Dispatcher(ScriptedProvisioner(), settings())
    for _ in range(3):
        assert await round_(dispatcher) == 0
    assert len(sent) == 3 and set(sent) == {dispatches.ROUND.sql}
