"""The pipeline end to end: real `jobs-app serve` processes on real PostgreSQL dispatch to
a GitHub stand-in served over HTTP on loopback (tests/github_standin.py), whose runner
acts as the workflow through jobs_app's signed callbacks.

Conditions are forced (faults injected per request, processes killed) and waited for
with bounds; counts are exact.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from jobs_app.services import jobs as job_service
from tests.conftest import API_HEADERS, CALLBACK_SECRET, LoggedServer, free_port, record_figure
from tests.github_standin import Fault, FaultKind, GitHubStandIn, RunnerConfig, github_env
from tests.http_helpers import make_job, stripe_event, stripe_headers


def runner(**over: Any) -> RunnerConfig:
    return RunnerConfig(secret=CALLBACK_SECRET, **({"start_delay": 0.05, "interval": 0.05} | over))


async def wait_for(what: str, check: Callable[[], Any], within: float, every: float = 0.1) -> Any:
    """Poll `check` (sync or async) until it returns something truthy, for at most `within` s."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(every)  # polling with a bound


async def seed_users(db: asyncpg.Connection, n: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """n users with one agent each, made directly in the database (arranging, not testing)."""
    tag = uuid.uuid4().hex[:8]
    rows = await db.fetch(
        """WITH u AS (
               INSERT INTO users (email)
               SELECT 'e2e-' || i || '-' || $2 || '@example.com' FROM generate_series(1, $1) i
               RETURNING id)
           INSERT INTO agents (user_id, name) SELECT id, 'agent' FROM u
           RETURNING user_id, id""",
        n,
        tag,
    )
    return [(r["user_id"], r["id"]) for r in rows]


async def job_states(db: asyncpg.Connection) -> Counter[str]:
    return Counter(r["status"] for r in await db.fetch("SELECT status FROM provisioning_jobs"))


# --------------------------------------------------------------------------- the big one


async def test_500_paid_checkouts_across_4_processes_with_20_percent_faults(
    db: asyncpg.Connection,
    start_logged_server: Callable[..., Any],
    start_github_standin: Callable[..., GitHubStandIn],
) -> None:
    """Every job ends `running`; each was moved by exactly one run; a job has a second run
    only where GitHub's answer was lost after it created a run that then showed late,
    and every such extra run was refused (409) at its first callback and cancelled."""
    n = 500
    standin = start_github_standin(runner=runner(heartbeats=1))
    lost_answer = (FaultKind.CREATED_502, FaultKind.CREATED_DROP, FaultKind.CREATED_HOLD)
    standin.faults.plan(
        "dispatch",
        rate=0.2,
        seed=20261128,
        kinds=[
            Fault(FaultKind.ERROR_500),
            Fault(FaultKind.CREATED_502),
            Fault(FaultKind.CREATED_DROP),
            Fault(FaultKind.CREATED_HOLD, hold=3),
            Fault(FaultKind.HOLD, hold=3),
            Fault(FaultKind.RATE_LIMIT_429, retry_after=1),
            Fault(FaultKind.SECONDARY_403, retry_after=1),
            # The answer is lost and the run shows (and starts) only after the grace period.
            Fault(FaultKind.CREATED_502, list_delay=5, start_delay=5),
        ],
    )
    servers: list[LoggedServer] = await asyncio.gather(
        *(start_logged_server(1, **github_env(standin, free_port())) for _ in range(4))
    )
    pairs = await seed_users(db, n)

    started = time.monotonic()
    limit = asyncio.Semaphore(40)

    async def pay(i: int, client: httpx.AsyncClient) -> int:
        user_id, agent_id = pairs[i]
        body = stripe_event(user_id, agent_id)
        async with limit:
            r = await client.post(
                f"{servers[i % 4].url}/webhooks/stripe", content=body, headers=stripe_headers(body)
            )
        return r.status_code

    async with httpx.AsyncClient(timeout=30) as client:
        codes = await asyncio.gather(*(pay(i, client) for i in range(n)))
    assert Counter(codes) == {200: n}

    async def all_running() -> bool:
        return (await job_states(db)) == {"running": n}

    try:
        await wait_for("every job running", all_running, within=240, every=0.5)
    except AssertionError:
        # Say where the runs stopped: what each run's last callback got.
        stops = Counter(
            (c.kind, c.status, c.http_status, c.reason, c.detail[:120])
            for run in standin.runs()
            for c in run.callbacks[-1:]
            if c.exit_code != 0
        )
        silent = sum(1 for run in standin.runs() if not run.callbacks)
        raise AssertionError(
            f"not every job running: {dict(await job_states(db))}; runs never called back: "
            f"{silent}; failed last callbacks: {stops.most_common(10)}"
        ) from None
    elapsed = time.monotonic() - started

    jobs = {r["id"]: r for r in await db.fetch("SELECT * FROM provisioning_jobs")}
    runs_by_job: dict[uuid.UUID, list[Any]] = defaultdict(list)
    for run in standin.runs():
        runs_by_job[uuid.UUID(run.inputs["job_id"])].append(run)
    assert set(runs_by_job) == set(jobs)

    # Exactly one run moved each job: its provisioning callback was taken, and it is the
    # run of the dispatch the job is bound to.
    for job_id, runs in runs_by_job.items():
        movers = [
            run
            for run in runs
            if any(c.status == "provisioning" and c.http_status == 200 for c in run.callbacks)
        ]
        assert len(movers) == 1, (job_id, [(r.id, r.callbacks) for r in runs])
        assert uuid.UUID(movers[0].dispatch_id) == jobs[job_id]["dispatch_id"]
        assert jobs[job_id]["workflow_run_id"] == str(movers[0].id)
    events = await db.fetch(
        "SELECT job_id, array_agg(to_status ORDER BY id) AS path FROM job_events GROUP BY job_id"
    )
    assert {tuple(e["path"]) for e in events} == {("queued", "provisioning", "running")}

    # A second run only where an answer was lost after its run was created.
    lost_jobs = {
        jobs_of_dispatch
        for record in standin.records("dispatch")
        if record.fault in lost_answer
        for jobs_of_dispatch in [next(
            (job_id for job_id, runs in runs_by_job.items()
             if any(r.dispatch_id == record.dispatch_id for r in runs)), None)]
        if jobs_of_dispatch is not None
    }  # fmt: skip
    extra = {job_id: runs for job_id, runs in runs_by_job.items() if len(runs) > 1}
    assert set(extra) <= lost_jobs
    extra_runs = [
        run
        for job_id, runs in extra.items()
        for run in runs
        if uuid.UUID(run.dispatch_id) != jobs[job_id]["dispatch_id"]
    ]
    assert len(extra_runs) == sum(len(runs) - 1 for runs in extra.values())

    # Each extra run stopped at its first callback (409) or before it started, and its
    # cancellation was done (GitHub answers 409 for a run already over: that is done too).
    async def cancellations_done() -> bool:
        done = await db.fetch("SELECT workflow_run_id FROM run_cancellations WHERE state = 'done'")
        return {r["workflow_run_id"] for r in done} == {str(r.id) for r in extra_runs}

    await wait_for("the extra runs' cancellations", cancellations_done, within=60)
    await wait_for("the extra runs over", lambda: all(r.runner_done for r in extra_runs), 60)
    for run in extra_runs:
        assert run.cancelled or run.stopped_by_409, run
        assert not run.callbacks or (
            run.stopped_by_409
            and len(run.callbacks) == 1
            and run.callbacks[0].reason == "superseded_dispatch"
        ), run.callbacks
    movers = [
        r for r in standin.runs() if str(r.id) in {j["workflow_run_id"] for j in jobs.values()}
    ]
    assert len(movers) == n and not any(r.cancelled for r in movers)  # no mover cancelled
    assert await db.fetchval("SELECT count(*) FROM run_cancellations") == len(extra_runs)

    dispatch_records = standin.records("dispatch")
    faults = Counter(str(r.fault) for r in dispatch_records if r.fault)
    record_figure(
        "dispatch: 500 jobs, 4 processes, 20% faults",
        jobs=n,
        seconds_to_all_running=round(elapsed, 1),
        dispatch_requests=len(dispatch_records),
        faulted_requests=dict(faults),
        reconcile_listings=len(standin.records("list")),
        jobs_with_a_second_run=len(extra),
        extra_runs_refused_or_cancelled=len(extra_runs),
        extra_runs_cancelled_before_calling_back=sum(not r.callbacks for r in extra_runs),
        violations=0,
    )
    for server in servers:
        assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


# --------------------------------------------------------------------------- a process killed


async def test_a_process_killed_mid_dispatch_loses_nothing(
    db: asyncpg.Connection,
    start_logged_server: Callable[..., Any],
    start_github_standin: Callable[..., GitHubStandIn],
) -> None:
    """SIGKILL while its requests are in flight: another process takes each dispatch over
    once its lease expires (not before), reconciles first, and no job gets a second run."""
    lease, interval, timeout = 15.0, 0.2, 5.0
    standin = start_github_standin(runner=runner())
    # The first requests hang past the kill: half of them after creating their run, which
    # starts only after the lease has expired (else its callback would bind it first).
    standin.faults.push(
        "dispatch",
        Fault(FaultKind.CREATED_HOLD, hold=60, start_delay=lease + 5),
        Fault(FaultKind.HOLD, hold=60),
        count=3,
    )
    env = {
        "DISPATCH_LEASE_SECONDS": str(lease),
        "DISPATCH_INTERVAL_SECONDS": str(interval),
        "JOBS_GITHUB_TIMEOUT_SECONDS": str(timeout),
    }
    # Six queued jobs before the victim starts: its first round claims them all at once.
    jobs = [
        {"id": str(job.id)}
        for user_id, agent_id in await seed_users(db, 6)
        for job in [
            (
                await job_service.enqueue_provisioning_job(
                    agent_id=agent_id, user_id=user_id, stripe_event_id=f"evt_{uuid.uuid4().hex}"
                )
            ).job
        ]
    ]
    # The workflow calls back through one public URL (a load balancer in production):
    # here the survivor's, so runs the victim started report to it.
    survivor_port = free_port()
    public = {"JOBS_PUBLIC_URL": f"http://127.0.0.1:{survivor_port}"}
    victim = await start_logged_server(1, **github_env(standin, free_port(), **env, **public))
    await wait_for("6 requests in flight", lambda: len(standin.records("dispatch")) >= 6, 30)
    victim.proc.kill()
    victim.proc.wait()
    killed_at = await db.fetchval("SELECT now()")
    claimed = await db.fetch("SELECT id, lease_owner, lease_expires_at FROM dispatches")
    assert len(claimed) == 6
    assert {o["lease_owner"].split(":")[1] for o in claimed} == {str(victim.proc.pid)}
    # It died mid-dispatch: no outcome of its requests was recorded.
    assert await db.fetchval("SELECT count(*) FROM dispatch_tries") == 0

    survivor = await start_logged_server(1, **github_env(standin, survivor_port, **env))

    async def all_running() -> bool:
        return (await job_states(db)) == {"running": 6}

    try:
        await wait_for("every job running", all_running, within=120, every=0.2)
    except AssertionError:
        rows = await db.fetch("SELECT state, tries, last_error, lease_owner FROM dispatches")
        tries = await db.fetch("SELECT dispatch_id, kind, outcome, message FROM dispatch_tries")
        raise AssertionError(
            ([tuple(r) for r in rows], [tuple(t) for t in tries], survivor.log_text()[-4000:])
        ) from None

    runs = Counter(run.inputs["job_id"] for run in standin.runs())
    assert runs == {job["id"]: 1 for job in jobs}  # none dispatched twice
    for dispatch in claimed:
        tries = await db.fetch(
            "SELECT kind, outcome, created_at FROM dispatch_tries WHERE dispatch_id = $1 "
            "ORDER BY id",
            dispatch["id"],
        )
        # Taken over only once the lease expired, and the run looked for before anything.
        assert tries[0]["kind"] == "reconcile", tries
        assert tries[0]["created_at"] >= dispatch["lease_expires_at"]
        delay = (tries[0]["created_at"] - killed_at).total_seconds()
        assert delay <= lease + interval + 10, delay  # lease + interval, and a bounded slack
    outcomes = Counter(r["state"] for r in await db.fetch("SELECT state FROM dispatches"))
    # The runs created before the kill were found; the others were dispatched anew.
    assert outcomes == {"dispatched": 6, "lost": 3}
    record_figure(
        "dispatch: SIGKILL mid-dispatch",
        dispatches_of_the_killed_process=len(claimed),
        lease_seconds=lease,
        runs_per_job=sorted(set(runs.values())),
        found_by_reconciliation=3,
        dispatched_anew_after_the_grace_period=3,
    )
    assert "Traceback" not in survivor.log_text(), survivor.log_text()[-3000:]


async def test_sigterm_gives_the_leases_back_so_another_replica_takes_over_at_once(
    db: asyncpg.Connection,
    start_logged_server: Callable[..., Any],
    start_github_standin: Callable[..., GitHubStandIn],
) -> None:
    """A deploy stops a replica while its dispatch requests hang: it gives every lease
    back (the cut-off requests marked for reconciling), so the next replica works on them
    at once, long before the leases would have expired."""
    standin = start_github_standin(runner=runner())
    standin.faults.push("dispatch", Fault(FaultKind.HOLD, hold=60), count=3)
    env = {"DISPATCH_LEASE_SECONDS": "60", "JOBS_GITHUB_TIMEOUT_SECONDS": "15"}
    for user_id, agent_id in await seed_users(db, 3):
        await job_service.enqueue_provisioning_job(
            agent_id=agent_id, user_id=user_id, stripe_event_id=f"evt_{uuid.uuid4().hex}"
        )
    port = free_port()
    leaving = await start_logged_server(1, **github_env(standin, port, **env))
    await wait_for("3 requests in flight", lambda: len(standin.records("dispatch")) >= 3, 30)
    held = await db.fetch("SELECT id, lease_owner, lease_expires_at FROM dispatches")
    assert len(held) == 3 and all(h["lease_owner"] for h in held)

    leaving.stop()  # SIGTERM, and wait for the exit
    assert leaving.proc.returncode in (0, -15)
    released = await db.fetch("SELECT state, lease_owner FROM dispatches")
    assert [(r["state"], r["lease_owner"]) for r in released] == [("unknown", None)] * 3
    assert "dispatcher stopped" in leaving.log_text()

    await start_logged_server(1, **github_env(standin, port, **env))

    async def all_running() -> bool:
        return (await job_states(db)) == {"running": 3}

    await wait_for("every job running", all_running, within=60, every=0.2)
    for dispatch in held:
        first = await db.fetchrow(
            "SELECT kind, created_at FROM dispatch_tries WHERE dispatch_id = $1 ORDER BY id",
            dispatch["id"],
        )
        assert first["kind"] == "reconcile"  # looked for first: the request may have landed
        assert first["created_at"] < dispatch["lease_expires_at"]  # not left to expire
    assert Counter(run.inputs["job_id"] for run in standin.runs()).most_common(1)[0][1] == 1


# --------------------------------------------------------------------------- GitHub's answers


async def test_after_a_429_the_process_sends_nothing_for_retry_after_seconds(
    db: asyncpg.Connection,
    start_logged_server: Callable[..., Any],
    start_github_standin: Callable[..., GitHubStandIn],
) -> None:
    retry_after = 3
    standin = start_github_standin(runner=None)
    standin.faults.push("dispatch", Fault(FaultKind.RATE_LIMIT_429, retry_after=retry_after))
    server = await start_logged_server(1, **github_env(standin, free_port()))
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=30) as api:
        await make_job(api)
        # The process has the 429 in hand once it recorded it: only then more work.
        await wait_for(
            "the 429 recorded",
            lambda: db.fetchval(
                "SELECT count(*) = 1 FROM dispatch_tries WHERE outcome = 'rate_limited'"
            ),
            within=30,
        )
        for _ in range(4):
            await make_job(api)
    await wait_for(
        "every job dispatched",
        lambda: db.fetchval("SELECT count(*) = 5 FROM dispatches WHERE state = 'dispatched'"),
        within=60,
    )
    records = sorted(standin.records(), key=lambda r: r.received)
    [limited] = [r for r in records if r.status == 429]
    after = [r for r in records if r.received > limited.received]
    assert len([r for r in after if r.endpoint == "dispatch"]) == 5
    assert limited.answered is not None
    assert min(r.received for r in after) - limited.answered >= retry_after
    health = (await httpx.AsyncClient().get(f"{server.url}/health")).json()
    assert health["dispatcher"]["provisioner"] == "github"


async def test_a_refused_dispatch_fails_the_job_with_githubs_message(
    db: asyncpg.Connection,
    start_logged_server: Callable[..., Any],
    start_github_standin: Callable[..., GitHubStandIn],
) -> None:
    standin = start_github_standin(runner=None)
    message = "Workflow does not have 'workflow_dispatch' trigger"
    standin.faults.push("dispatch", Fault(FaultKind.REJECT_422, message=message))
    server = await start_logged_server(1, **github_env(standin, free_port()))
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=30) as api:
        job = await make_job(api)

        async def failed() -> dict[str, Any] | None:
            got = (await api.get(f"/api/jobs/{job['id']}")).json()
            return got if got["status"] == "failed" else None

        got = await wait_for("the job failed", failed, within=30)
        assert got["failure_reason"] == "dispatch_error"
        assert got["error"] == f"GitHub answered 422: {message}"
        [item] = (await api.get(f"/api/jobs/{job['id']}/dispatches")).json()["items"]
    assert item["state"] == "failed" and item["tries"] == 1
    assert item["last_error"] == f"GitHub answered 422: {message}"
    assert [(t["kind"], t["outcome"], t["status_code"]) for t in item["history"]] == [
        ("dispatch", "rejected", 422)
    ]
    assert {
        "dispatch_id", "attempt", "state", "tries", "workflow_run_id", "run_url", "last_error",
        "created_at", "dispatched_at",
    } <= set(item)  # fmt: skip


async def test_wrong_credentials_pause_dispatching_and_say_so_in_health(
    db: asyncpg.Connection,
    start_logged_server: Callable[..., Any],
    start_github_standin: Callable[..., GitHubStandIn],
) -> None:
    standin = start_github_standin(runner=None)
    env = github_env(standin, free_port(), JOBS_GITHUB_INSTALLATION_ID="999")
    server = await start_logged_server(1, **env)
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=30) as api:
        job = await make_job(api)

        async def paused() -> dict[str, Any] | None:
            health = await api.get("/health")
            body = health.json()
            return body if body.get("dispatcher", {}).get("state") == "paused" else None

        health = await wait_for("the dispatcher paused", paused, within=30)
        assert health["status"] == "ok"  # the API itself works: still 200
        assert health["dispatcher"]["reason"].startswith("misconfigured")
        assert (await api.get(f"/api/jobs/{job['id']}")).json()["status"] == "queued"
        metrics = (await api.get("/metrics")).text
    assert 'jobs_dispatch_pauses_total{reason="misconfigured"}' in metrics
    assert "dispatching paused: provisioner misconfigured" in server.log_text()
    assert standin.records("dispatch") == []  # the token was refused: nothing dispatched


async def test_on_github_enterprise_server_the_run_id_comes_from_the_first_callback(
    db: asyncpg.Connection,
    start_logged_server: Callable[..., Any],
    start_github_standin: Callable[..., GitHubStandIn],
) -> None:
    standin = start_github_standin(runner=runner(), ghes=True)
    server = await start_logged_server(1, **github_env(standin, free_port()))
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=30) as api:
        job = await make_job(api)

        async def running() -> dict[str, Any] | None:
            got = (await api.get(f"/api/jobs/{job['id']}")).json()
            return got if got["status"] == "running" else None

        done = await wait_for("the job running", running, within=30)
        [item] = (await api.get(f"/api/jobs/{job['id']}/dispatches")).json()["items"]
    [run] = standin.runs()
    assert [r.status for r in standin.records("dispatch")] == [204]
    assert item["state"] == "dispatched" and item["bound"]
    assert item["workflow_run_id"] == done["workflow_run_id"] == str(run.id)


# --------------------------------------------------------------------------- logs


async def test_a_jobs_whole_story_is_in_the_json_logs_by_job_id_alone(
    db: asyncpg.Connection,
    start_logged_server: Callable[..., Any],
    start_github_standin: Callable[..., GitHubStandIn],
) -> None:
    """Webhook → dispatch → callbacks → running, pulled out of a real serve's JSON lines
    by job_id alone; the dispatch lines carry the dispatch and the run; no secret."""
    standin = start_github_standin(runner=runner(heartbeats=1))
    server = await start_logged_server(1, **github_env(standin, free_port()))
    [(user_id, agent_id)] = await seed_users(db, 1)
    body = stripe_event(user_id, agent_id)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        hook = await client.post("/webhooks/stripe", content=body, headers=stripe_headers(body))
        job_id = hook.json()["job_id"]

        async def running() -> bool:
            got = await client.get(f"/api/jobs/{job_id}", headers=API_HEADERS)
            return bool(got.json()["status"] == "running")

        await wait_for("the job running", running, within=60)
    [run] = standin.runs()
    server.stop()

    story = [r for r in server.json_lines() if r.get("job_id") == job_id]
    told = [r["event"] for r in story if r["logger"] != "jobs_app.access"]
    assert told == [
        "job enqueued",
        "workflow dispatched",
        "status reported",
        "heartbeat",
        "status reported",
    ], told
    [dispatched] = [r for r in story if r["event"] == "workflow dispatched"]
    assert dispatched["workflow_run_id"] == str(run.id)
    assert dispatched["dispatch_id"] == run.dispatch_id and dispatched["attempt"] == 1
    assert all(r["dispatch_id"] == run.dispatch_id for r in story if r["event"] != "job enqueued")
    text = server.log_text()
    tokens = list(standin._tokens)  # the installation tokens it issued to the server
    assert tokens
    for secret in (standin.private_key.splitlines()[1], *tokens, CALLBACK_SECRET):
        assert secret not in text


# --------------------------------------------------------------------------- simulated


async def test_make_runs_configuration_provisions_a_job_by_itself(
    db: asyncpg.Connection, start_logged_server: Callable[..., Any]
) -> None:
    """Dev mode with no provisioner named: the simulated workflow takes a job created
    through the API to `running`, through the server's own signed callbacks."""
    server = await start_logged_server(1, JOBS_DEV_MODE="1")
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=30) as api:
        job = await make_job(api)

        async def running() -> dict[str, Any] | None:
            got = (await api.get(f"/api/jobs/{job['id']}")).json()
            return got if got["status"] == "running" else None

        done = await wait_for("the job running", running, within=60)
        [item] = (await api.get(f"/api/jobs/{job['id']}/dispatches")).json()["items"]
        events = (await api.get(f"/api/jobs/{job['id']}/events")).json()["items"]
    assert done["workflow_run_id"].startswith("sim-")
    assert item["provisioner"] == "simulated" and item["bound"]
    transitions = [e["to_status"] for e in events if e["kind"] == "transition"]
    assert transitions == ["queued", "provisioning", "running"]
    # The simulated run walks the plan's steps: the progress bar moved to the end.
    steps = [(e["step"], e["state"]) for e in events if e["kind"] == "step"]
    plan = ["create_vm", "install_agent", "health_check"]
    assert steps == [(name, state) for name in plan for state in ("started", "succeeded")]
    assert done["progress"]["completed"] == 3
    assert "simulated" in server.log_text()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"JOBS_PROVISIONER": "github"}, "JOBS_PUBLIC_URL"),
        (
            {"JOBS_PROVISIONER": "github", "JOBS_PUBLIC_URL": "http://x"},
            "JOBS_GITHUB_REPOSITORY",
        ),
        (
            {
                "JOBS_PROVISIONER": "github",
                "JOBS_PUBLIC_URL": "http://x",
                "JOBS_GITHUB_REPOSITORY": "acme/infra",
                "JOBS_GITHUB_WORKFLOW": "provision.yml",
                "JOBS_GITHUB_TOKEN": "t",
                "JOBS_GITHUB_APP_ID": "1",
            },
            "JOBS_GITHUB_TOKEN",
        ),
        (
            {
                "JOBS_PROVISIONER": "github",
                "JOBS_PUBLIC_URL": "http://x",
                "JOBS_GITHUB_REPOSITORY": "acme/infra",
                "JOBS_GITHUB_WORKFLOW": "provision.yml",
                "JOBS_GITHUB_APP_ID": "1",
            },
            "JOBS_GITHUB_INSTALLATION_ID",
        ),
        ({"JOBS_PROVISIONER": "gitlab"}, "JOBS_PROVISIONER"),
    ],
)
async def test_missing_or_contradictory_settings_stop_serve_naming_the_variable(
    database: str, env: dict[str, str], variable: str
) -> None:
    import os
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobs_app.cli", "serve", "--port", str(free_port()),
        env={**os.environ, "DATABASE_URL": database, **env},
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert variable in err.decode(), err.decode()
