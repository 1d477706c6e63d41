"""Workflow steps, progress and the learned ETA, against a real `jobs-app serve` process:
step reports over signed callbacks (every refusal changing nothing), the job's
`progress` at each point, the history and the streams holding both kinds in one ordered
sequence, and the estimate of the time left learned from past jobs.

Durations are made by moving a step's start back in the database (not by sleeping), so
the medians are known exactly whatever the machine's speed."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from jobs_app.services.progress import Learned, Medians
from tests.conftest import API_HEADERS, LoggedServer
from tests.http_helpers import callback, make_job, signed_headers
from tests.sse_helpers import SSEReader

SERVER_ENV = {"JOBS_ETA_REFRESH_SECONDS": "0"}
"""The module's server reads the medians for every answer: each test sees exactly what the
ones before it left (the copy a process keeps has a test of its own, below)."""
PLAN = ["create_vm", "install_agent", "health_check"]  # the default JOBS_PROVISION_STEPS
LABELS = ["Creating your VM", "Installing your agent", "Checking your agent"]
TOLERANCE = 0.3


@pytest.fixture
async def api(server: LoggedServer, db: asyncpg.Connection) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the module's server; `db` first, so each test starts from empty tables."""
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=20) as client:
        yield client


async def job_of(api: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await api.get(f"/api/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def status(api: httpx.AsyncClient, job_id: str, to: str, **extra: Any) -> httpx.Response:
    return await callback(api, job_id, "status", {"attempt": 1, "status": to, **extra})


async def step(
    api: httpx.AsyncClient, job_id: str, name: str, state: str, **extra: Any
) -> httpx.Response:
    return await callback(
        api, job_id, "steps", {"attempt": 1, "step": name, "state": state, **extra}
    )


async def ok_step(api: httpx.AsyncClient, job_id: str, name: str, state: str) -> dict[str, Any]:
    response = await step(api, job_id, name, state)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def provisioning_job(api: httpx.AsyncClient) -> dict[str, Any]:
    job = await make_job(api)
    response = await status(api, job["id"], "provisioning")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def backdate_start(db: asyncpg.Connection, job_id: str, name: str, seconds: float) -> None:
    """The step started `seconds` earlier than it did (on the job's row, where its
    duration is measured from), so its duration is known."""
    moved = await db.execute(
        """UPDATE provisioning_jobs SET steps = jsonb_set(steps, ARRAY[$2, 'started_at'],
               to_jsonb(CAST(steps -> $2 ->> 'started_at' AS timestamptz)
                        - make_interval(secs => $3)))
           WHERE id = $1 AND steps ? $2""",
        uuid.UUID(job_id),
        name,
        seconds,
    )
    assert moved == "UPDATE 1"


async def history(api: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"/api/jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def states(job: dict[str, Any]) -> list[str]:
    return [s["state"] for s in job["progress"]["steps"]]


# --------------------------------------------------------------------------- a job's steps


async def test_a_job_driven_through_its_steps(api: httpx.AsyncClient) -> None:
    job = await make_job(api)
    job_stream = SSEReader(api, f"/api/jobs/{job['id']}/events/stream")
    user_stream = SSEReader(api, f"/api/users/{job['user_id']}/events/stream")
    try:
        await job_stream.wait_open()
        await user_stream.wait_open()
        progress = job["progress"]
        shown = [(s["name"], s["label"]) for s in progress["steps"]]
        assert shown == list(zip(PLAN, LABELS, strict=True))
        assert states(job) == ["pending"] * 3
        assert (progress["completed"], progress["total"], progress["current"]) == (0, 3, None)
        assert progress["eta_seconds"] is None  # no past jobs to learn from

        assert states((await status(api, job["id"], "provisioning")).json()) == ["pending"] * 3
        seen: list[dict[str, Any]] = []
        for index, name in enumerate(PLAN):
            started = await ok_step(api, job["id"], name, "started")
            assert started["progress"]["current"] == name
            assert started["progress"]["completed"] == index
            expected = ["succeeded"] * index + ["started"] + ["pending"] * (2 - index)
            assert states(started) == expected
            done = await ok_step(api, job["id"], name, "succeeded")
            assert done["progress"]["current"] is None
            assert done["progress"]["completed"] == index + 1
            shown = done["progress"]["steps"][index]
            assert shown["started_at"] <= shown["finished_at"]
            assert shown["started_at"] == started["progress"]["steps"][index]["started_at"]
            seen.append(done)
            assert await job_of(api, job["id"]) == done  # GET answers what the callback did
        running = (await status(api, job["id"], "running")).json()
        assert running["progress"]["completed"] == 3 and states(running) == ["succeeded"] * 3
        assert running["progress"]["eta_seconds"] is None

        items = await history(api, job["id"])
        kinds = [(e["kind"], e.get("to_status") or f"{e['step']}:{e['state']}") for e in items]
        assert kinds == [
            ("transition", "queued"),
            ("transition", "provisioning"),
            *[("step", f"{name}:{state}") for name in PLAN for state in ("started", "succeeded")],
            ("transition", "running"),
        ]
        ids = [e["id"] for e in items]
        assert ids == sorted(ids)

        await job_stream.wait_for(len(items))
        await user_stream.wait_for(len(items) - 1)
        assert job_stream.ids == ids
        assert user_stream.ids == ids[1:]  # a user stream starts with nothing old
        assert [e["event"] for e in job_stream.events] == [kind for kind, _ in kinds]
        for message, stored in zip(job_stream.events, items, strict=True):
            assert {k: message["data"][k] for k in stored} == stored
        first_step = job_stream.events[2]["data"]
        assert set(first_step) >= {"id", "job_id", "attempt", "step", "state", "created_at", "job"}
        assert first_step["job"]["progress"]["total"] == 3

        # Resumed from a step's id: exactly the rest, both kinds.
        resume_from = ids[4]
        resumed = SSEReader(
            api, f"/api/jobs/{job['id']}/events/stream", {"Last-Event-ID": str(resume_from)}
        )
        try:
            await resumed.wait_for(len(ids) - 5)
            assert resumed.ids == ids[5:]
            assert [e["event"] for e in resumed.events] == ["step"] * 3 + ["transition"]
        finally:
            await resumed.close()
    finally:
        await job_stream.close()
        await user_stream.close()


async def test_a_step_reported_succeeded_without_start_and_a_failure_without_its_step(
    api: httpx.AsyncClient,
) -> None:
    job = await provisioning_job(api)
    done = await ok_step(api, job["id"], "create_vm", "succeeded")
    first = done["progress"]["steps"][0]
    assert first["state"] == "succeeded" and first["started_at"] == first["finished_at"]
    await ok_step(api, job["id"], "install_agent", "started")
    # The workflow fails without saying where: the step that was running is recorded.
    failed = await status(api, job["id"], "failed", error="ansible exited 2")
    assert failed.status_code == 200, failed.text
    assert failed.json()["failed_step"] == "install_agent"
    assert failed.json()["progress"]["eta_seconds"] is None
    # A retry starts the steps anew.
    retried = await api.post(f"/api/jobs/{job['id']}/retry")
    assert retried.status_code == 200, retried.text
    assert retried.json()["attempt"] == 2 and states(retried.json()) == ["pending"] * 3
    # A failure the workflow places keeps its own step.
    placed = await provisioning_job(api)
    await ok_step(api, placed["id"], "create_vm", "started")
    failed = await status(api, placed["id"], "failed", error="x", failed_step="quota")
    assert failed.json()["failed_step"] == "quota"


# --------------------------------------------------------------------------- refusals


async def snapshot(db: asyncpg.Connection, job_id: str) -> tuple[Any, ...]:
    job = await db.fetchrow("SELECT * FROM provisioning_jobs WHERE id = $1", uuid.UUID(job_id))
    events = await db.fetch(
        "SELECT * FROM job_events WHERE job_id = $1 ORDER BY id", uuid.UUID(job_id)
    )
    return dict(job), [dict(e) for e in events]


async def test_every_refusal_changes_nothing(
    api: httpx.AsyncClient, db: asyncpg.Connection, server: LoggedServer
) -> None:
    queued = await make_job(api)
    job = await provisioning_job(api)
    await ok_step(api, job["id"], "create_vm", "started")
    await ok_step(api, job["id"], "create_vm", "succeeded")
    before = {j: await snapshot(db, j) for j in (queued["id"], job["id"])}
    cancellations = await db.fetchval("SELECT count(*) FROM run_cancellations")

    async def refused(job_id: str, body: dict[str, Any], code: int) -> dict[str, Any]:
        response = await callback(api, job_id, "steps", body)
        assert response.status_code == code, response.text
        assert response.headers["content-type"].startswith("application/json")
        return dict(response.json())

    base = {"attempt": 1, "step": "install_agent", "state": "started"}
    stale = await refused(job["id"], base | {"attempt": 2}, 409)
    assert stale["extra"]["reason"] == "stale_attempt"
    not_provisioning = await refused(queued["id"], base, 409)
    assert not_provisioning["extra"]["reason"] == "invalid_transition"
    backwards = await refused(job["id"], base | {"step": "create_vm"}, 409)
    assert backwards["extra"]["reason"] == "invalid_transition"
    failed_after = await refused(job["id"], base | {"step": "create_vm", "state": "failed"}, 409)
    assert failed_after["extra"]["reason"] == "invalid_transition"
    unknown = await refused(job["id"], base | {"step": "make_coffee"}, 422)
    assert unknown["extra"]["steps"] == PLAN and "make_coffee" in unknown["detail"]
    for bad in (
        base | {"state": "paused"},
        base | {"detail": "x" * 501},
        base | {"step": "Not A Name"},
        base | {"attempt": 0},
        {k: v for k, v in base.items() if k != "step"},
        base | {"extra_field": 1},
    ):
        answer = await refused(job["id"], bad, 400)
        assert answer["detail"], bad
    raw = b'{"attempt": 1, "step": '
    response = await api.post(
        f"/api/callbacks/jobs/{job['id']}/steps", content=raw, headers=signed_headers(raw)
    )
    assert response.status_code == 400 and response.json()["detail"]
    unsigned = await api.post(f"/api/callbacks/jobs/{job['id']}/steps", json=base)
    assert unsigned.status_code == 401
    missing = await callback(api, str(uuid.uuid4()), "steps", base)
    assert missing.status_code == 404

    # A repeat of the step's last report: 200, nothing recorded.
    repeat = await step(api, job["id"], "create_vm", "succeeded")
    assert repeat.status_code == 200, repeat.text
    assert {j: await snapshot(db, j) for j in before} == before
    assert await db.fetchval("SELECT count(*) FROM run_cancellations") == cancellations
    assert "Traceback" not in server.log_text()


async def test_a_superseded_dispatch_is_refused_and_its_run_cancelled(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    job = await make_job(api)
    issued = []
    for _ in range(2):
        await db.execute(
            "UPDATE dispatches SET state = 'lost' WHERE job_id = $1", uuid.UUID(job["id"])
        )
        issued.append(
            await db.fetchval(
                "INSERT INTO dispatches (job_id, attempt, provisioner) VALUES ($1, 1, 'github') "
                "RETURNING id",
                uuid.UUID(job["id"]),
            )
        )
    bound, other = (str(d) for d in issued)
    moved = await status(api, job["id"], "provisioning", dispatch_id=bound, workflow_run_id="r1")
    assert moved.status_code == 200, moved.text
    before = await snapshot(db, job["id"])
    for dispatch, run in ((other, "r2"), (str(uuid.uuid4()), "r3")):  # another; never issued
        refused = await step(
            api, job["id"], "create_vm", "started", dispatch_id=dispatch, workflow_run_id=run
        )
        assert refused.status_code == 409, refused.text
        assert refused.json()["extra"]["reason"] == "superseded_dispatch"
    assert await snapshot(db, job["id"]) == before
    cancelled = await db.fetch("SELECT workflow_run_id FROM run_cancellations ORDER BY 1")
    assert [r["workflow_run_id"] for r in cancelled] == ["r2", "r3"]
    # The bound dispatch's reports are taken.
    taken = await step(
        api, job["id"], "create_vm", "started", dispatch_id=bound, workflow_run_id="r1"
    )
    assert taken.status_code == 200, taken.text


async def test_concurrent_duplicate_reports_record_one_event(
    api: httpx.AsyncClient, db: asyncpg.Connection, start_logged_server: Any
) -> None:
    """Twenty copies of each report at once, through two server processes of two workers
    each (so they race in different processes, on different connections): one event each."""
    servers = [await start_logged_server(2) for _ in range(2)]
    job = await provisioning_job(api)
    clients = [
        httpx.AsyncClient(base_url=s.url, timeout=20, limits=httpx.Limits(max_connections=40))
        for s in servers
    ]
    try:
        for state in ("started", "succeeded"):
            body = json.dumps({"attempt": 1, "step": "create_vm", "state": state}).encode()
            answers = await asyncio.gather(
                *(
                    clients[n % 2].post(
                        f"/api/callbacks/jobs/{job['id']}/steps",
                        content=body,
                        headers=signed_headers(body),
                    )
                    for n in range(20)
                )
            )
            assert [a.status_code for a in answers] == [200] * 20
    finally:
        for client in clients:
            await client.aclose()
    rows = await db.fetch(
        "SELECT step_state FROM job_events WHERE job_id = $1 AND kind = 'step' ORDER BY id",
        uuid.UUID(job["id"]),
    )
    assert [r["step_state"] for r in rows] == ["started", "succeeded"]
    metrics = (await api.get("/metrics")).text
    assert 'jobs_step_duration_seconds_count{step="create_vm"}' in metrics
    assert re.search(r'jobs_step_reports_total\{state="started"\} \d', metrics)


# --------------------------------------------------------------------------- the ETA

DURATIONS = {"create_vm": 1.0, "install_agent": 0.5, "health_check": 0.3}
WAIT = 2.0


async def past_job(api: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """A job that waited WAIT seconds in the queue and whose steps took DURATIONS."""
    job = await make_job(api)
    await db.execute(
        "UPDATE provisioning_jobs SET queued_at = queued_at - make_interval(secs => $2) "
        "WHERE id = $1",
        uuid.UUID(job["id"]),
        WAIT,
    )
    assert (await status(api, job["id"], "provisioning")).status_code == 200
    for name, seconds in DURATIONS.items():
        await ok_step(api, job["id"], name, "started")
        await backdate_start(db, job["id"], name, seconds)
        await ok_step(api, job["id"], name, "succeeded")
    assert (await status(api, job["id"], "running")).status_code == 200


def near(eta: float | None, expected: float) -> bool:
    return eta is not None and abs(eta - expected) <= TOLERANCE


async def test_the_eta_is_learned_from_past_jobs(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    for _ in range(4):
        await past_job(api, db)
    fresh = await provisioning_job(api)
    assert fresh["progress"]["eta_seconds"] is None  # 4 samples: not trusted yet
    for _ in range(2):
        await past_job(api, db)  # 6 samples of each

    queued = await make_job(api)
    assert near(queued["progress"]["eta_seconds"], WAIT + 1.8), queued["progress"]
    job = (await status(api, queued["id"], "provisioning")).json()
    assert near(job["progress"]["eta_seconds"], 1.8), job["progress"]
    job = await ok_step(api, queued["id"], "create_vm", "started")
    assert near(job["progress"]["eta_seconds"], 1.8), job["progress"]
    await backdate_start(db, queued["id"], "create_vm", 0.6)  # 0.6 s into a 1.0 s step
    assert near((await job_of(api, queued["id"]))["progress"]["eta_seconds"], 0.4 + 0.8)
    await backdate_start(db, queued["id"], "create_vm", 5.0)  # overran: never below 0
    assert near((await job_of(api, queued["id"]))["progress"]["eta_seconds"], 0.8)
    job = await ok_step(api, queued["id"], "create_vm", "succeeded")
    assert near(job["progress"]["eta_seconds"], 0.8), job["progress"]
    await ok_step(api, queued["id"], "install_agent", "succeeded")
    job = await ok_step(api, queued["id"], "health_check", "started")
    assert near(job["progress"]["eta_seconds"], 0.3), job["progress"]
    job = await ok_step(api, queued["id"], "health_check", "succeeded")
    assert job["progress"]["eta_seconds"] == 0
    running = (await status(api, queued["id"], "running")).json()
    assert running["progress"]["eta_seconds"] is None
    failed = (await status(api, fresh["id"], "failed", error="x")).json()
    assert failed["progress"]["eta_seconds"] is None


async def test_a_process_reads_the_medians_at_most_every_refresh(
    start_logged_server: Any, db: asyncpg.Connection
) -> None:
    """With JOBS_ETA_REFRESH_SECONDS an hour, a process's answers use the medians it read
    first, whatever was learned since; another process reads the new ones."""
    first = await start_logged_server(JOBS_ETA_REFRESH_SECONDS="3600")
    async with httpx.AsyncClient(base_url=first.url, headers=API_HEADERS, timeout=20) as api:
        early = await make_job(api)  # read now: nothing learned yet
        assert early["progress"]["eta_seconds"] is None
        for _ in range(6):
            await past_job(api, db)
        queued = await make_job(api)
        assert queued["progress"]["eta_seconds"] is None  # the copy from before
        assert (await job_of(api, queued["id"]))["progress"]["eta_seconds"] is None
    second = await start_logged_server(JOBS_ETA_REFRESH_SECONDS="3600")
    async with httpx.AsyncClient(base_url=second.url, headers=API_HEADERS, timeout=20) as api:
        seen = await job_of(api, queued["id"])
        assert near(seen["progress"]["eta_seconds"], WAIT + 1.8), seen["progress"]


def test_the_copy_goes_stale_after_its_age() -> None:
    now = [100.0]
    learned = Learned(clock=lambda: now[0])
    assert learned.stale(2.0)  # nothing read yet
    medians = Medians({"create_vm": (1.0, 6)}, (2.0, 6))
    assert learned.remember(medians) is medians and learned.medians is medians
    assert not learned.stale(2.0)
    now[0] += 1.9
    assert not learned.stale(2.0)
    now[0] += 0.1
    assert learned.stale(2.0)
    assert learned.stale(0.0)  # JOBS_ETA_REFRESH_SECONDS=0: every answer reads them
    learned.remember(medians)
    assert learned.stale(0.0)
