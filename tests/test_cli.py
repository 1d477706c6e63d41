"""`jobs-app serve` as an operator runs it: secrets, dev mode, workers."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import httpx

from tests.conftest import free_port

SECRETS = ("JOBS_API_TOKEN", "JOBS_CALLBACK_SECRET", "STRIPE_WEBHOOK_SECRET")


def _env(database: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return {**env, "DATABASE_URL": database, "DB_POOL_MAX_SIZE": "4", **extra}


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
            # Several requests, so both workers are likely to answer: all accept the token.
            answers = await asyncio.gather(
                *[client.get("/api/jobs", headers=headers) for _ in range(20)]
            )
            assert {r.status_code for r in answers} == {200}
            # Metrics are summed over both workers (prometheus multiprocess mode).
            metrics = (await client.get("/metrics")).text
            line = 'jobs_http_requests_total{method="GET",route="/api/jobs",status="200"}'
            counted = [float(x.split()[-1]) for x in metrics.splitlines() if x.startswith(line)]
            assert counted == [20.0], metrics
            # ... and both workers counted some of them.
            assert len(list((tmp_path / "metrics").glob("counter_*.db"))) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=20)
