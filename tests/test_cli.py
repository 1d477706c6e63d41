"""`jobs-app serve` as an operator runs it: secrets, dev mode, workers."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from tests.conftest import free_port

SECRETS = ("JOBS_API_TOKEN", "JOBS_CALLBACK_SECRET", "STRIPE_WEBHOOK_SECRET")


def _env(database: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return {**env, "DATABASE_URL": database, "DB_POOL_MAX_SIZE": "4", **extra}


def _api_jobs_200_per_worker(metrics_dir: Path) -> dict[str, float]:
    """GET /api/jobs answered 200, as counted in each worker's own metrics file."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        for metric in MultiProcessCollector.merge([str(path)]):
            for sample in metric.samples:
                labels = (sample.labels.get("route"), sample.labels.get("status"))
                if sample.name == "jobs_http_requests_total" and labels == ("/api/jobs", "200"):
                    counts[path.name] = sample.value
    return counts


def test_serve_refuses_to_start_without_secrets(database):
    result = subprocess.run(
        [sys.executable, "-m", "jobs_app.cli", "serve", "--port", str(free_port())],
        env=_env(database),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    for name in SECRETS:
        assert name in result.stderr
    assert "JOBS_DEV_MODE" in result.stderr


@pytest.mark.parametrize(
    "steps", ["create_vm", "create_vm=A,Bad Name=B", "a=A,a=B", "a=", ","], ids=repr
)
def test_serve_refuses_a_malformed_plan_of_steps_naming_the_variable(database, steps):
    env = _env(database) | {"JOBS_DEV_MODE": "1", "JOBS_PROVISION_STEPS": steps}
    result = subprocess.run(
        [sys.executable, "-m", "jobs_app.cli", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "JOBS_PROVISION_STEPS" in result.stderr
    assert "Traceback" not in result.stderr


async def test_dev_mode_generates_secrets_once_for_all_workers(database, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - spawning returns at once; nothing waits here
            [sys.executable, "-m", "jobs_app.cli", "serve", "--port", str(port), "--workers", "2"],
            env=_env(
                database,
                JOBS_DEV_MODE="1",
                PYTHONUNBUFFERED="1",
                PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, log.read_text()
                assert asyncio.get_running_loop().time() < deadline, "server never became healthy"
                await asyncio.sleep(0.1)  # polling a starting process
            tokens = re.findall(r"generated JOBS_API_TOKEN=(\S+)", log.read_text())
            assert len(tokens) == 1, log.read_text()
            headers = {"Authorization": f"Bearer {tokens[0]}"}
            # Which worker accepts a connection is the kernel's choice, so send until
            # both have counted some (a new connection each time: a kept-alive one
            # stays with its worker), within a bound; every answer must be a 200.
            sent = 0
            per_worker: dict[str, float] = {}
            bound = asyncio.get_running_loop().time() + 120
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                headers=headers,
                limits=httpx.Limits(max_keepalive_connections=0),
            ) as fresh:
                while len(per_worker) < 2:
                    assert asyncio.get_running_loop().time() < bound, (sent, per_worker)
                    answers = await asyncio.gather(*[fresh.get("/api/jobs") for _ in range(10)])
                    assert {r.status_code for r in answers} == {200}
                    sent += len(answers)
                    per_worker = _api_jobs_200_per_worker(tmp_path / "metrics")
            # A worker counts a request just after sending its answer: wait for the last
            # counts to land, then they must add up to exactly what was sent.
            while sum(per_worker.values()) < sent:
                assert asyncio.get_running_loop().time() < bound, (sent, per_worker)
                await asyncio.sleep(0.05)  # polling another process's progress
                per_worker = _api_jobs_200_per_worker(tmp_path / "metrics")
            assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values()), per_worker
            assert sum(per_worker.values()) == sent, (sent, per_worker)
            # /metrics sums both workers' counts (prometheus multiprocess mode).
            metrics = (await client.get("/metrics")).text
            line = 'jobs_http_requests_total{method="GET",route="/api/jobs",status="200"}'
            counted = [float(x.split()[-1]) for x in metrics.splitlines() if x.startswith(line)]
            assert counted == [float(sent)], metrics
    finally:
        proc.terminate()
        proc.wait(timeout=20)
