"""The README's first command, as a newcomer runs it: `make run` with no DATABASE_URL.

Starts `make run` (embedded PostgreSQL, dev mode, the simulated workflow), waits for
/health, creates a user, an agent and a job through the API, waits (bounded) for the job
to reach `running` by itself, reads the job's event stream (the simulated run's steps,
each started then succeeded, between provisioning and running), then sends SIGTERM and
expects a clean, prompt exit.
Exits non-zero, with the server's last lines, on any failure.

    python .ci/make_run_smoke.py [--port 8000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
TOKEN = "make-run-smoke-token"
START_SECONDS = 180  # a fresh clone initialises the embedded PostgreSQL first
RUNNING_SECONDS = 60
STOP_SECONDS = 30


def fail(message: str, lines: list[str]) -> None:
    print("".join(lines[-60:]), file=sys.stderr)
    print(f"make run smoke: {message}", file=sys.stderr)
    raise SystemExit(1)


def wait(what: str, check, within: float, lines: list[str], proc: subprocess.Popen) -> object:  # type: ignore[no-untyped-def, type-arg]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"make run exited ({proc.returncode}) while waiting for {what}", lines)
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.2)  # polling a separate process, with a bound
    fail(f"timed out after {within:.0f}s waiting for {what}", lines)
    return None


PLAN = ["create_vm", "install_agent", "health_check"]  # the default JOBS_PROVISION_STEPS


def stream_until_running(client: httpx.Client, job_id: str, lines: list[str]) -> list[str]:
    """The job's stream from its start (its history, replayed) up to `running`: each
    message as `transition:<status>` or `step:<name>:<state>`."""
    seen: list[str] = []
    event = ""
    with client.stream("GET", f"/api/jobs/{job_id}/events/stream", timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if event == "step":
                    seen.append(f"step:{data['step']}:{data['state']}")
                else:
                    seen.append(f"transition:{data['to_status']}")
                if seen[-1] == "transition:running":
                    break
    steps = [f"step:{name}:{state}" for name in PLAN for state in ("started", "succeeded")]
    expected = ["transition:queued", "transition:provisioning", *steps, "transition:running"]
    if seen != expected:
        fail(f"the job's stream showed {seen}, not {expected}", lines)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    port = parser.parse_args().port
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise SystemExit(f"make run smoke: something already listens on port {port}")

    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env |= {"JOBS_API_TOKEN": TOKEN, "SERVE_ARGS": f"--port {port}"}
    proc = subprocess.Popen(
        ["make", "run"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the SIGTERM reaches the server
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(
            raw.decode(errors="replace")
            for raw in iter(proc.stdout.readline, b"")  # type: ignore[union-attr]
        ),
        daemon=True,
    )
    reader.start()
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    started = time.monotonic()
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=5) as client:
            health = wait(
                "/health",
                lambda: (r := client.get("/health")).status_code == 200 and r.json(),
                START_SECONDS,
                lines,
                proc,
            )
            print(f"make run smoke: healthy after {time.monotonic() - started:.1f}s: {health}")
            user = client.post("/api/users", json={"email": f"smoke-{uuid.uuid4().hex[:8]}@x.io"})
            agent = client.post("/api/agents", json={"user_id": user.json()["id"], "name": "a"})
            job = client.post(
                "/api/jobs",
                json={
                    "user_id": user.json()["id"],
                    "agent_id": agent.json()["id"],
                    "stripe_event_id": f"evt_smoke_{uuid.uuid4().hex}",
                },
            )
            if job.status_code != 201:
                fail(f"POST /api/jobs answered {job.status_code}: {job.text}", lines)
            job_id = job.json()["id"]
            queued = time.monotonic()
            wait(
                "the job to reach running",
                lambda: client.get(f"/api/jobs/{job_id}").json()["status"] == "running",
                RUNNING_SECONDS,
                lines,
                proc,
            )
            print(f"make run smoke: job running {time.monotonic() - queued:.1f}s after enqueue")
            seen = stream_until_running(client, job_id, lines)
            print(f"make run smoke: the job's stream: {' '.join(seen)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    # The output ends when every process of the group has exited (the server last).
    reader.join(timeout=STOP_SECONDS)
    if reader.is_alive():
        os.killpg(proc.pid, signal.SIGKILL)
        fail(f"make run still running {STOP_SECONDS}s after SIGTERM", lines)
    proc.wait(timeout=5)
    text = "".join(lines)
    if "shut down" not in text or "Traceback" in text:
        fail("no clean shutdown in the server's output", lines)
    print(f"make run smoke: stopped cleanly after SIGTERM (make exited {proc.returncode})")


if __name__ == "__main__":
    main()
