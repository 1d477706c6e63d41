"""The workflow's side against a real `jobs-app serve` process: the signed callback
client and `jobs-app callback`, the simulated provisioner, the GitHub stand-in's runner,
and deploy/github/provision.yml (linted, and its provisioning step run by bash)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from jobs_app.core.provisioning import DispatchRequest, Outcome
from jobs_app.loops.provisioners.github import GitHubProvisioner
from jobs_app.loops.provisioners.simulated import SimulatedProvisioner
from jobs_app.workflow import callback_client
from tests.conftest import API_HEADERS, CALLBACK_SECRET, TEST_DATABASE_URL, LoggedServer
from tests.github_standin import OPTIONAL_INPUTS, WORKFLOW_INPUTS, GitHubStandIn, RunnerConfig
from tests.http_helpers import make_job

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "deploy" / "github" / "provision.yml"
JOBS_APP = [sys.executable, "-m", "jobs_app.cli"]


@pytest.fixture
async def api(server: LoggedServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        yield client


def base_url(server: LoggedServer, job_id: Any) -> str:
    return f"{server.url}/api/callbacks/jobs/{job_id}"


async def job_of(api: httpx.AsyncClient, job_id: Any) -> dict[str, Any]:
    response = await api.get(f"/api/jobs/{job_id}", headers=API_HEADERS)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_for_job(
    api: httpx.AsyncClient, job_id: Any, predicate: Callable[[dict[str, Any]], bool], within=15.0
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        job = await job_of(api, job_id)
        if predicate(job):
            return job
        assert time.monotonic() < deadline, f"job never got there: {job}"
        await asyncio.sleep(0.05)  # polling with a bound


async def cli(*args: str, secret: str = CALLBACK_SECRET) -> tuple[int, str]:
    env = {**os.environ, callback_client.SECRET_ENV: secret}
    env.pop(callback_client.URL_ENV, None)
    proc = await asyncio.create_subprocess_exec(
        *JOBS_APP, "callback", *args, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def issue_dispatch(job: dict[str, Any]) -> uuid.UUID:
    """A dispatch the service issued for the job's current attempt (what the dispatcher
    commits before it asks GitHub): callbacks naming any other id are refused. An
    earlier live one is marked lost, as reconciliation would."""
    conn = await asyncpg.connect(TEST_DATABASE_URL)
    try:
        await conn.execute(
            "UPDATE dispatches SET state = 'lost' WHERE job_id = $1 AND state = 'pending'",
            uuid.UUID(job["id"]),
        )
        dispatch_id: uuid.UUID = await conn.fetchval(
            "INSERT INTO dispatches (job_id, attempt, provisioner) VALUES ($1, $2, 'github') "
            "RETURNING id",
            uuid.UUID(job["id"]),
            job["attempt"],
        )
        return dispatch_id
    finally:
        await conn.close()


async def dispatch_request(
    server: LoggedServer, job: dict[str, Any], **over: Any
) -> DispatchRequest:
    values: dict[str, Any] = {
        "job_id": job["id"],
        "attempt": job["attempt"],
        "dispatch_id": await issue_dispatch(job),
        "agent_id": job["agent_id"],
        "user_id": job["user_id"],
        "region": job["region"],
        "callback_url": base_url(server, job["id"]),
    }
    values.update(over)
    return DispatchRequest(**values)


# --------------------------------------------------------------------------- the client


async def test_the_client_moves_a_job_and_says_what_a_409_means(
    server: LoggedServer, api: httpx.AsyncClient
) -> None:
    job = await make_job(api)
    base = base_url(server, job["id"])
    dispatch_id = await issue_dispatch(job)
    async with httpx.AsyncClient(timeout=10) as client:
        started = await callback_client.send_status(
            client, base, CALLBACK_SECRET, attempt=1, status="provisioning",
            dispatch_id=dispatch_id, workflow_run_id="42",
        )  # fmt: skip
        assert started.ok and started.exit_code == 0, started
        assert started.body["status"] == "provisioning"
        assert started.body["workflow_run_id"] == "42"
        beat = await callback_client.send_heartbeat(
            client, base, CALLBACK_SECRET, attempt=1, dispatch_id=dispatch_id, workflow_run_id="42"
        )
        assert beat.status_code == 204 and beat.exit_code == 0
        stale = await callback_client.send_heartbeat(client, base, CALLBACK_SECRET, attempt=2)
        assert stale.status_code == 409 and stale.stop and stale.exit_code == 3
        assert stale.detail
        wrong = await callback_client.send_heartbeat(client, base, "not-the-secret", attempt=1)
        assert wrong.status_code == 401 and wrong.exit_code == 1 and wrong.tries == 1
    assert (await job_of(api, job["id"]))["status"] == "provisioning"


async def test_network_errors_are_retried_then_reported() -> None:
    from tests.conftest import free_port

    async with httpx.AsyncClient(timeout=2) as client:
        result = await callback_client.send_status(
            client, f"http://127.0.0.1:{free_port()}/api/callbacks/jobs/x", "s",
            attempt=1, status="running", retries=2, backoff=0.01,
        )  # fmt: skip
    assert result.status_code is None and result.tries == 3 and result.exit_code == 1
    assert "ConnectError" in result.detail


# --------------------------------------------------------------------------- the CLI


async def test_cli_ok_bad_secret_unknown_job_and_409(
    server: LoggedServer, api: httpx.AsyncClient
) -> None:
    job = await make_job(api)
    base = base_url(server, job["id"])

    rc, err = await cli(
        "status", "--url", base, "--attempt", "1", "--status", "provisioning",
        "--dispatch-id", str(await issue_dispatch(job)), "--workflow-run-id", "777",
    )  # fmt: skip
    assert (rc, err) == (0, "")
    assert (await job_of(api, job["id"]))["status"] == "provisioning"
    rc, err = await cli("heartbeat", "--url", base, "--attempt", "1")
    assert (rc, err) == (0, "")
    assert (await job_of(api, job["id"]))["last_heartbeat_at"] is not None

    rc, err = await cli("heartbeat", "--url", base, "--attempt", "1", secret="wrong")
    assert rc == 1 and "HTTP 401" in err

    unknown = base_url(server, uuid.uuid4())
    rc, err = await cli("status", "--url", unknown, "--attempt", "1", "--status", "running")
    assert rc == 1 and "HTTP 404" in err

    rc, err = await cli("status", "--url", base, "--attempt", "2", "--status", "running")
    assert rc == 3 and "HTTP 409" in err  # an old (here: unknown) attempt must stop

    queued = await make_job(api)
    rc, err = await cli(
        "status", "--url", base_url(server, queued["id"]), "--attempt", "1", "--status", "running"
    )
    assert rc == 3 and "HTTP 409" in err  # queued -> running is not a move the workflow makes
    assert (await job_of(api, queued["id"]))["status"] == "queued"


async def test_cli_reads_the_url_from_the_environment_and_needs_a_secret(
    server: LoggedServer, api: httpx.AsyncClient
) -> None:
    job = await make_job(api)
    env = {
        **os.environ,
        callback_client.SECRET_ENV: CALLBACK_SECRET,
        callback_client.URL_ENV: base_url(server, job["id"]),
    }
    proc = await asyncio.create_subprocess_exec(
        *JOBS_APP, "callback", "status", "--attempt", "1", "--status", "provisioning", env=env
    )
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    assert (await job_of(api, job["id"]))["status"] == "provisioning"

    del env[callback_client.SECRET_ENV]
    proc = await asyncio.create_subprocess_exec(
        *JOBS_APP, "callback", "heartbeat", "--attempt", "1", env=env,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and b"JOBS_CALLBACK_SECRET" in err


async def test_cli_heartbeat_loop_beats_until_killed_and_stops_on_409(
    server: LoggedServer, api: httpx.AsyncClient
) -> None:
    job = await make_job(api)
    base = base_url(server, job["id"])
    started = await cli("status", "--url", base, "--attempt", "1", "--status", "provisioning")
    assert started == (0, "")

    env = {**os.environ, callback_client.SECRET_ENV: CALLBACK_SECRET}
    loop = await asyncio.create_subprocess_exec(
        *JOBS_APP, "callback", "heartbeat", "--url", base, "--attempt", "1", "--every", "0.2",
        env=env,
    )  # fmt: skip
    try:
        first = (await wait_for_job(api, job["id"], lambda j: j["last_heartbeat_at"] is not None))[
            "last_heartbeat_at"
        ]
        await wait_for_job(api, job["id"], lambda j: j["last_heartbeat_at"] != first)
        assert loop.returncode is None  # still beating
    finally:
        loop.terminate()
        await asyncio.wait_for(loop.wait(), 30)

    stale = await asyncio.create_subprocess_exec(
        *JOBS_APP, "callback", "heartbeat", "--url", base, "--attempt", "9", "--every", "0.2",
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(stale.communicate(), 60)
    assert stale.returncode == 3 and b"HTTP 409" in err


# --------------------------------------------------------------------------- simulated


async def test_the_simulated_provisioner_drives_a_job_to_running(
    server: LoggedServer, api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="jobs_app.provisioners.simulated")
    job = await make_job(api)
    plan = ["create_vm", "install_agent", "health_check"]  # the default JOBS_PROVISION_STEPS
    provisioner = SimulatedProvisioner(
        secret=CALLBACK_SECRET, start_delay=0.0, steps=plan, interval=0.05
    )
    try:
        req = await dispatch_request(server, job)
        result = await provisioner.dispatch(req)
        assert result.outcome is Outcome.OK and result.simulated
        assert result.workflow_run_id == f"sim-{req.dispatch_id.hex[:12]}"
        assert result.run_url is None

        done = await wait_for_job(api, job["id"], lambda j: j["status"] == "running")
        assert done["workflow_run_id"] == result.workflow_run_id
        assert done["last_heartbeat_at"] is not None
        outcomes = provisioner.outcomes[result.workflow_run_id]
        assert [o.status_code for o in outcomes] == [200, *[200, 204, 200] * 3, 200]
        progress = done["progress"]
        assert [s["name"] for s in progress["steps"]] == plan
        assert {s["state"] for s in progress["steps"]} == {"succeeded"}
        assert (progress["completed"], progress["total"], progress["current"]) == (3, 3, None)
        assert progress["eta_seconds"] is None  # running: nothing left to estimate

        found = await provisioner.find_run(req.dispatch_id, done["created_at"])
        assert found.outcome is Outcome.OK and found.workflow_run_id == result.workflow_run_id
        other = await provisioner.find_run(uuid.uuid4(), done["created_at"])
        assert other.outcome is Outcome.NOT_FOUND
    finally:
        await provisioner.aclose()
    assert "nothing is provisioned" in caplog.text  # it says it is simulated


async def test_the_simulated_run_stops_at_a_409_and_can_be_cancelled(
    server: LoggedServer, api: httpx.AsyncClient
) -> None:
    job = await make_job(api)
    provisioner = SimulatedProvisioner(secret=CALLBACK_SECRET, start_delay=0.0, interval=0.05)
    slow = SimulatedProvisioner(secret=CALLBACK_SECRET, start_delay=3600)
    try:
        stale = await provisioner.dispatch(await dispatch_request(server, job, attempt=5))
        run_id = stale.workflow_run_id
        assert run_id is not None

        deadline = time.monotonic() + 15
        while not (provisioner.outcomes.get(run_id) and run_id not in provisioner._runs):
            assert time.monotonic() < deadline, "the simulated run never stopped"
            await asyncio.sleep(0.02)  # polling with a bound
        assert [o.status_code for o in provisioner.outcomes[run_id]] == [409]
        assert (await job_of(api, job["id"]))["status"] == "queued"

        waiting = await slow.dispatch(await dispatch_request(server, job))
        assert waiting.workflow_run_id is not None
        assert (await slow.cancel_run(waiting.workflow_run_id)).outcome is Outcome.OK
        assert (await slow.cancel_run("sim-unknown")).outcome is Outcome.NOT_FOUND
    finally:
        await provisioner.aclose()
        await slow.aclose()
    assert (await job_of(api, job["id"]))["status"] == "queued"


# --------------------------------------------------------------------------- the stand-in's runner


@pytest.mark.parametrize("use_cli", [False, True], ids=["in-process", "jobs-app-callback"])
async def test_the_standin_runner_acts_as_the_workflow(
    server: LoggedServer,
    api: httpx.AsyncClient,
    start_github_standin: Callable[..., GitHubStandIn],
    use_cli: bool,
) -> None:
    standin = start_github_standin(
        runner=RunnerConfig(secret=CALLBACK_SECRET, start_delay=0.0, interval=0.05, use_cli=use_cli)
    )
    provisioner = GitHubProvisioner(
        api_url=standin.url, repository=standin.repository, workflow="provision.yml",
        app_id=standin.app_id, private_key=standin.private_key,
        installation_id=standin.installation_id, timeout=5.0,
    )  # fmt: skip
    job = await make_job(api)
    stale_job = await make_job(api)
    try:
        ok = await provisioner.dispatch(await dispatch_request(server, job))
        stale = await provisioner.dispatch(await dispatch_request(server, stale_job, attempt=3))
        assert ok.outcome is Outcome.OK and stale.outcome is Outcome.OK
        assert ok.workflow_run_id and stale.workflow_run_id
        run, stale_run = standin.run(ok.workflow_run_id), standin.run(stale.workflow_run_id)
        await standin.wait_until(lambda: run.runner_done and stale_run.runner_done, within=60)
    finally:
        await provisioner.aclose()

    done = await job_of(api, job["id"])
    assert done["status"] == "running"
    assert done["workflow_run_id"] == str(run.id)
    assert [(c.kind, c.status, c.exit_code) for c in run.callbacks] == [
        ("status", "provisioning", 0),
        ("heartbeat", None, 0),
        ("status", "running", 0),
    ]
    assert run.conclusion == "success" and not run.stopped_by_409
    assert [c.exit_code for c in stale_run.callbacks] == [3]
    assert stale_run.stopped_by_409 and stale_run.conclusion == "failure"
    assert (await job_of(api, stale_job["id"]))["status"] == "queued"
    if not use_cli:
        assert [c.http_status for c in run.callbacks] == [200, 204, 200]
        assert stale_run.callbacks[0].http_status == 409


# --------------------------------------------------------------------------- the workflow file


def test_the_workflow_declares_the_seven_string_inputs_and_the_run_name() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    trigger = workflow[True]["workflow_dispatch"]  # YAML 1.1 reads the key `on` as True
    inputs = trigger["inputs"]
    assert set(inputs) == WORKFLOW_INPUTS | OPTIONAL_INPUTS
    assert all(spec["type"] == "string" for spec in inputs.values())
    assert all(inputs[name]["required"] for name in WORKFLOW_INPUTS)
    # The dispatch's trace context, when jobs_app traces, reaches `jobs-app callback`.
    assert not inputs["traceparent"]["required"]
    env = workflow["jobs"]["provision"]["env"]
    assert env["TRACEPARENT"] == "${{ inputs.traceparent }}"
    assert workflow["run-name"] == "provision ${{ inputs.dispatch_id }}"
    steps = workflow["jobs"]["provision"]["steps"]
    assert steps[-1]["if"].startswith("always()")
    text = WORKFLOW.read_text()
    assert "jobs-app callback heartbeat --every 60" in text
    assert "jobs-app callback status --status provisioning" in text


def test_the_workflow_passes_actionlint() -> None:
    actionlint = shutil.which("actionlint", path=str(Path(sys.executable).parent))
    assert actionlint, "actionlint is a dev dependency (pip install -e '.[dev]')"
    done = subprocess.run(
        [actionlint, "-no-color", str(WORKFLOW)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _provision_script(placeholder_work: str) -> str:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    [step] = [s for s in workflow["jobs"]["provision"]["steps"] if s.get("id") == "provision"]
    script = str(step["run"])
    marker = "# PLACEHOLDER: configure it"
    assert marker in script
    return script.replace(marker, f"{placeholder_work}\n            {marker}")


@pytest.mark.parametrize(
    ("attempt", "work", "exit_code", "stopped"),
    [("1", "true", 0, False), ("1", "false", 1, False), ("4", "sleep 60", 3, True)],
    ids=["provisioned", "provisioning-failed", "409-stops-the-run"],
)
async def test_the_provisioning_step_runs_under_bash(
    server: LoggedServer,
    api: httpx.AsyncClient,
    tmp_path: Path,
    attempt: str,
    work: str,
    exit_code: int,
    stopped: bool,
) -> None:
    """The step's shell logic, as the runner runs it (bash -e), with the real CLI: a 409
    (a heartbeat's or a step report's) ends the step with 3 at once, else the
    provisioning decides; each step of the plan is reported as it goes."""
    job = await make_job(api)
    assert (await cli("status", "--url", base_url(server, job["id"]), "--attempt", "1",
                      "--status", "provisioning"))[0] == 0  # fmt: skip
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "jobs-app"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m jobs_app.cli "$@"\n')
    shim.chmod(0o755)
    github_env, github_output = tmp_path / "env", tmp_path / "output"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        callback_client.SECRET_ENV: CALLBACK_SECRET,
        callback_client.URL_ENV: base_url(server, job["id"]),
        "JOBS_ATTEMPT": attempt,
        "JOBS_DISPATCH_ID": str(await issue_dispatch(job)),
        "GITHUB_RUN_ID": "31337",
        "GITHUB_ENV": str(github_env),
        "GITHUB_OUTPUT": str(github_output),
    }
    script = tmp_path / "step.sh"
    script.write_text(_provision_script(work))
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "bash", "--noprofile", "--norc", "-eo", "pipefail", str(script), env=env
    )
    assert await asyncio.wait_for(proc.wait(), 50) == exit_code
    if stopped:
        assert time.monotonic() - started < 50  # not after the 60 s of "provisioning"
        assert "JOBS_STOPPED=true" in github_env.read_text()
    else:
        assert not github_env.exists() or "JOBS_STOPPED" not in github_env.read_text()
        # The step reports tell where it got to, as the customer's progress bar shows it.
        done = exit_code == 0
        last = "provisioning=health_check" if done else "provisioning=install_agent"
        assert github_output.read_text().splitlines()[-1] == last
        steps = (await job_of(api, job["id"]))["progress"]["steps"]
        expected = ["succeeded"] * 3 if done else ["succeeded", "started", "pending"]
        assert [s["state"] for s in steps] == expected
