"""Section 4: HTTP. `jobs-app serve --workers 2` against a bare Litestar app running
the same statements behind the same server (`bench/bare_app.py` under uvicorn with
2 workers, uvloop and httptools, as `jobs-app serve` runs it).

Load comes from a separate process on loopback: wrk when installed (one thread,
16 connections, a Lua script cycling over job ids; the callback signature is
computed before each run, well inside its 300 s tolerance, since it covers the
body and timestamp only), else (or with BENCH_LOADER=python) `python -m bench.loader`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import seed
from bench.context import Context
from bench.measure import interleave, median, paired_ratio

HTTP_TARGET = 0.6
WORKERS = 2
CONNECTIONS = 16
REPO = Path(__file__).resolve().parent.parent
JOB_IDS = 1024


@dataclass
class Endpoint:
    name: str
    method: str
    prefix: str
    suffix: str
    headers: dict[str, str]
    body: str
    expect: int
    ids: list[str]

    def path(self, job_id: str) -> str:
        return f"{self.prefix}{job_id}{self.suffix}"


def _sign(secret: str, body: str) -> str:
    """The X-Signature contract: t=<unix>,v1=<hex HMAC-SHA256 of f"{t}.{body}">."""
    t = int(time.time())
    digest = hmac.new(secret.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, name: str, command: list[str], env: dict[str, str], ready: str) -> None:
        self.name = name
        self.port = _free_port()
        self.command = [*command, "--port", str(self.port)]
        self.env = env
        self.ready = ready
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix=f"bench-{name}-", suffix=".log", delete=False
        )
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, within: float = 90.0) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.command,
            env=self.env,
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends it and its workers
        )
        deadline = time.monotonic() + within
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise RuntimeError(f"{self.name} exited: {self.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(f"http://127.0.0.1:{self.port}{self.ready}")
                    if response.status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} did not become ready: {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
        self.log.close()
        if os.environ.get("BENCH_KEEP_LOGS"):
            print(f"  {self.name} log: {self.log.name}")
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.log.name)


def _jobs_app_command() -> list[str]:
    exe = shutil.which("jobs-app")
    return [exe] if exe else [sys.executable, "-m", "jobs_app.cli"]


# --------------------------------------------------------------------------- load

_WRK_SCRIPT = """
local ids = {%(ids)s}
local n = #ids
local method, prefix, suffix, body = %(method)s, %(prefix)s, %(suffix)s, %(body)s
local headers = {%(headers)s}
local threads = 0
function setup(thread)
  thread:set("offset", threads * 131)
  threads = threads + 1
end
local i = 0
function init(args)
  i = offset or 0
end
function request()
  i = i + 1
  return wrk.format(method, prefix .. ids[(i %% n) + 1] .. suffix, headers, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %%d, "seconds": %%f, "non_2xx": %%d, "socket_errors": %%d,'
    .. ' "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration / 1e6, e.status,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _lua(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Lua string literal for our ASCII


async def _load(endpoint: Endpoint, port: int, duration: float, workdir: Path) -> dict[str, Any]:
    """One load run from a separate process; requests/s and latency."""
    headers = dict(endpoint.headers)
    if "X-Signature" in headers:
        headers["X-Signature"] = _sign(headers["X-Signature"], endpoint.body)
    wrk = None if os.environ.get("BENCH_LOADER") == "python" else shutil.which("wrk")
    if wrk:
        script = workdir / f"{endpoint.name}.lua"
        script.write_text(
            _WRK_SCRIPT
            % {
                "ids": ", ".join(_lua(i) for i in endpoint.ids),
                "method": _lua(endpoint.method),
                "prefix": _lua(endpoint.prefix),
                "suffix": _lua(endpoint.suffix),
                "body": _lua(endpoint.body) if endpoint.body else "nil",
                "headers": ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in headers.items()),
            }
        )
        command = [
            wrk,
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{max(round(duration), 1)}s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ]
        tool = "wrk"
    else:
        requests = workdir / f"{endpoint.name}.json"
        requests.write_text(
            json.dumps(
                [[endpoint.method, endpoint.path(i), headers, endpoint.body] for i in endpoint.ids]
            )
        )
        command = [
            sys.executable,
            "-m",
            "bench.loader",
            "--port",
            str(port),
            "--connections",
            str(CONNECTIONS),
            "--duration",
            str(duration),
            "--requests",
            str(requests),
        ]
        tool = "bench.loader"
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await process.communicate()
    text = out.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("BENCH_JSON "):
            line = line.removeprefix("BENCH_JSON ")
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            result["rps"] = result["requests"] / result["seconds"]
            result["tool"] = tool
            return result
    raise RuntimeError(f"load generator gave no result: {text[-500:]}")


# --------------------------------------------------------------------------- the section


async def http(ctx: Context, duration: float) -> dict[str, Any]:
    token, secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    # Jobs to hit: provisioning ones for heartbeats, terminal ones to read.
    tag = ctx.tag("http")
    await seed.users(ctx.conn, tag, 1, 2 * JOB_IDS)
    await seed.jobs(
        ctx.conn,
        tag,
        first=1,
        count=JOB_IDS,
        owners=JOB_IDS,
        first_owner=1,
        status="provisioning",
    )
    await seed.jobs(
        ctx.conn, tag, first=JOB_IDS + 1, count=JOB_IDS, owners=JOB_IDS, first_owner=JOB_IDS + 1
    )
    await ctx.conn.execute("ANALYZE provisioning_jobs")
    busy = [str(seed.job_id(tag, i)) for i in range(1, JOB_IDS + 1)]
    done = [str(seed.job_id(tag, i)) for i in range(JOB_IDS + 1, 2 * JOB_IDS + 1)]
    endpoints = [
        Endpoint(
            "heartbeat",
            "POST",
            "/api/callbacks/jobs/",
            "/heartbeat",
            {"Content-Type": "application/json", "X-Signature": secret},
            '{"attempt": 1}',
            204,
            busy,
        ),
        Endpoint(
            "get_job",
            "GET",
            "/api/jobs/",
            "",
            {"Authorization": f"Bearer {token}"},
            "",
            200,
            done,
        ),
    ]

    metrics_dir = tempfile.mkdtemp(prefix="bench-metrics-")
    workdir = Path(tempfile.mkdtemp(prefix="bench-http-"))
    env = {
        **os.environ,
        "DATABASE_URL": ctx.url,
        "JOBS_API_TOKEN": token,
        "JOBS_CALLBACK_SECRET": secret,
        "STRIPE_WEBHOOK_SECRET": secrets.token_urlsafe(24),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.pop("JOBS_DEV_MODE", None)
    service = Server(
        "service",
        [*_jobs_app_command(), "serve", "--host", "127.0.0.1", "--workers", str(WORKERS)],
        {**env, "PROMETHEUS_MULTIPROC_DIR": metrics_dir},
        "/health",
    )
    bare = Server(
        "bare",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.bare_app:app",
            "--host",
            "127.0.0.1",
            "--workers",
            str(WORKERS),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--no-proxy-headers",
            "--log-level",
            "warning",
        ],
        {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        "/ping",
    )
    rows = []
    try:
        await asyncio.gather(service.start(), bare.start())
        for endpoint in endpoints:
            for server in (service, bare):
                await _check(endpoint, server)
            rows.append(await _compare(ctx, endpoint, service, bare, duration, workdir))
            row = rows[-1]
            print(
                f"  {row['endpoint']:<28} service {row['service_rps']:>8.0f} req/s"
                f"  bare {row['bare_rps']:>8.0f} req/s  ratio {row['ratio']:.2f}",
                flush=True,
            )
    finally:
        await service.stop()
        await bare.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "workers": WORKERS,
        "connections": CONNECTIONS,
        "duration_s": duration,
        "server": "uvicorn (uvloop, httptools)",
        "target": HTTP_TARGET,
        "rows": rows,
    }


async def _check(endpoint: Endpoint, server: Server) -> None:
    """One request by hand: the route answers what the contract says."""
    headers = dict(endpoint.headers)
    if "X-Signature" in headers:
        headers["X-Signature"] = _sign(headers["X-Signature"], endpoint.body)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        response = await client.request(
            endpoint.method,
            endpoint.path(endpoint.ids[0]),
            headers=headers,
            content=endpoint.body.encode() or None,
        )
    if response.status_code != endpoint.expect:
        raise RuntimeError(
            f"{server.name} {endpoint.method} {endpoint.path(endpoint.ids[0])}:"
            f" {response.status_code} {response.text[:300]}"
        )


async def _compare(
    ctx: Context,
    endpoint: Endpoint,
    service: Server,
    bare: Server,
    duration: float,
    workdir: Path,
) -> dict[str, Any]:
    # Warm-up: every worker's pool connects and prepares (a smoke run goes without).
    if not ctx.quick:
        for server in (service, bare):
            await _load(endpoint, server.port, 1, workdir)

    def side(server: Server) -> Any:
        async def measure() -> dict[str, Any]:
            return await _load(endpoint, server.port, duration, workdir)

        return measure

    samples = await interleave(
        [("service", side(service)), ("bare", side(bare))], 1 if ctx.quick else ctx.budget.rounds
    )

    def figures(name: str) -> Iterator[tuple[str, Any]]:
        runs = samples[name]
        yield f"{name}_rps", median([r["rps"] for r in runs])
        yield f"{name}_p50_ms", median([r["p50_us"] / 1000 for r in runs])
        yield f"{name}_p99_ms", median([r["p99_us"] / 1000 for r in runs])
        yield f"{name}_non_2xx", sum(r["non_2xx"] for r in runs)
        yield f"{name}_socket_errors", sum(r["socket_errors"] for r in runs)
        yield f"{name}_samples", [r["rps"] for r in runs]

    row: dict[str, Any] = {
        "endpoint": f"{endpoint.method} {endpoint.prefix}{{id}}{endpoint.suffix}"
    }
    row |= dict(figures("service"))
    row |= dict(figures("bare"))
    row["ratio"] = paired_ratio(row["service_samples"], row["bare_samples"])
    row["met"] = row["ratio"] >= HTTP_TARGET
    row["tool"] = samples["service"][0]["tool"]
    if row["service_non_2xx"] or row["bare_non_2xx"]:
        row["met"] = False
        row["note"] = "some answers were not 2xx: see *_non_2xx and the logs' tails"
        row["service_log_tail"] = service.tail(40)
        row["bare_log_tail"] = bare.tail(40)
    return row
