"""Section 6: live updates.

1. What live updates cost the write path: enqueue, claim, heartbeat and complete through
   the service layer with the process's listener running (every commit announced: local
   fan-out, one NOTIFY per round to other replicas, the catch-up read) vs not running
   (nothing announced), interleaved. Another LISTEN connection counts the NOTIFYs.
2. N open event streams on one `jobs-app serve` process (1,000; quick: 50): the
   server's memory per stream, `GET /api/jobs/{id}` p50/p99 with no stream open and
   with all of them open, commit-to-receipt p50/p99 of one transition per job fanned
   out to every stream, and a client that never reads: cut off, the others unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import socket
import tempfile
import time
from typing import Any

import asyncpg
import httpx

from bench import seed
from bench.context import Context
from bench.measure import drive, interleave, median, paired_ratio, percentile
from bench.operations import OPERATIONS, Inputs
from bench.web import REPO, Server, _jobs_app_command

STREAMS_PER_USER = 10


# --------------------------------------------------------------------------- announcement cost


async def announcement_cost(ctx: Context) -> list[dict[str, Any]]:
    from jobs_app.loops.listener import Listener

    budget = ctx.budget
    inputs = Inputs(ctx)
    await inputs.setup()
    counter = await asyncpg.connect(ctx.url)
    notified = 0

    def count(*_: Any) -> None:
        nonlocal notified
        notified += 1

    await counter.add_listener("job_events", count)
    rows = []
    try:
        for name in ("enqueue", "claim", "heartbeat", "complete"):
            op = OPERATIONS[name]
            estimate = 2000.0

            def side(announced: bool, op: Any = op, name: str = name) -> Any:
                async def measure() -> float:
                    nonlocal estimate
                    listener = Listener(ctx.url) if announced else None
                    if listener is not None:
                        # Running, as in a serving process: its start (a connection, LISTEN)
                        # is not what a transition pays, so it is not in the window.
                        await listener.start()
                        await asyncio.wait_for(listener.listening.wait(), 30)
                    try:
                        if op.single_use:
                            values = await inputs.single_use(name, budget.supply(estimate))
                        else:
                            values = inputs.fixed(name)
                        rate = await drive(
                            op.service,
                            iter(values) if op.single_use else itertools.cycle(values),
                            concurrency=budget.concurrency,
                            duration=budget.duration if budget.ops is None else None,
                            ops=budget.ops,
                        )
                    finally:
                        if listener is not None:
                            await listener.stop()
                    estimate = max(estimate, rate.per_second)
                    return rate.per_second

                return measure

            await side(True)()  # warm up: statements prepared on every pooled connection
            samples = await interleave([("on", side(True)), ("off", side(False))], budget.rounds)
            row = {
                "operation": name,
                "announced_ops_s": median(samples["on"]),
                "silent_ops_s": median(samples["off"]),
                "ratio": paired_ratio(samples["on"], samples["off"]),
            }
            print(
                f"  {name:<10} announced {row['announced_ops_s']:>7.0f}/s"
                f"  not announced {row['silent_ops_s']:>7.0f}/s  ratio {row['ratio']:.2f}",
                flush=True,
            )
            rows.append(row)
    finally:
        await counter.close()
    assert notified > 0  # the announced side did tell other replicas
    return rows


# --------------------------------------------------------------------------- streams


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class _Stream:
    """A minimal SSE reader: counts messages and notes each one's receipt time."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client, self.url = client, url
        self.open = asyncio.Event()
        self.ids: list[int] = []
        self.received: dict[int, float] = {}
        self.status = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with self.client.stream("GET", self.url, timeout=httpx.Timeout(120)) as r:
            self.status = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("retry:"):
                    self.open.set()
                elif line.startswith("id: "):
                    event_id = int(line[4:])
                    self.ids.append(event_id)
                    self.received[event_id] = time.time()
        self.open.set()

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await self.task


async def _until(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)  # polling the readers with a deadline


async def _latencies(client: httpx.AsyncClient, paths: list[str], n: int) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        r = await client.get(paths[i % len(paths)])
        out.append(time.perf_counter() - started)
        assert r.status_code == 200, r.text
    return out


async def streams(ctx: Context) -> dict[str, Any]:
    count = 50 if ctx.quick else 1000
    users = count // STREAMS_PER_USER
    token = secrets.token_urlsafe(24)
    tag = ctx.tag("live")
    await seed.users(ctx.conn, tag, 1, users)
    await seed.jobs(
        ctx.conn, tag, first=1, count=users, owners=users, first_owner=1, status="queued"
    )
    job_ids = [seed.job_id(tag, i) for i in range(1, users + 1)]
    await ctx.conn.execute(
        "INSERT INTO job_events (job_id, to_status, attempt, actor, reason)"
        " SELECT id, 'queued', 1, 'api', 'enqueued' FROM unnest($1::uuid[]) AS id",
        job_ids,
    )
    env = {
        **os.environ,
        "DATABASE_URL": ctx.url,
        "JOBS_API_TOKEN": token,
        "JOBS_CALLBACK_SECRET": secrets.token_urlsafe(24),
        "STRIPE_WEBHOOK_SECRET": secrets.token_urlsafe(24),
        "SSE_MAX_STREAMS": str(count + 10),
        "SSE_SEND_TIMEOUT_SECONDS": "2",
        "SSE_MAX_STREAMS_PER_USER": str(STREAMS_PER_USER + 1),  # room for the stalled one
        "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-live-metrics-"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.pop("JOBS_DEV_MODE", None)
    server = Server(
        "live",
        [*_jobs_app_command(), "serve", "--host", "127.0.0.1", "--workers", "1"],
        env,
        "/health",
    )
    await server.start()
    assert server.process is not None
    base = f"http://127.0.0.1:{server.port}"
    limits = httpx.Limits(max_connections=count + 50, max_keepalive_connections=20)
    headers = {"Authorization": f"Bearer {token}"}
    readers: list[_Stream] = []
    stalled: socket.socket | None = None
    try:
        async with (
            httpx.AsyncClient(base_url=base, headers=headers, limits=limits) as client,
            httpx.AsyncClient(base_url=base, headers=headers) as probe,
        ):
            paths = [f"/api/jobs/{j}" for j in job_ids]
            samples = 200 if ctx.quick else 1000
            await _latencies(probe, paths, 50)  # warm up
            rss_before = _rss_kib(server.process.pid)
            idle = await _latencies(probe, paths, samples)

            readers = [
                _Stream(client, f"/api/jobs/{job_ids[i % users]}/events/stream")
                for i in range(count)
            ]
            await _until(lambda: all(r.open.is_set() for r in readers), 120, "streams open")
            assert all(r.status == 200 for r in readers)
            await _until(lambda: all(len(r.ids) >= 1 for r in readers), 60, "replays")
            rss_after = _rss_kib(server.process.pid)
            busy = await _latencies(probe, paths, samples)

            # One transition per job, each fanned out to its 10 streams.
            moved = await ctx.conn.fetch(
                "WITH m AS (UPDATE provisioning_jobs SET status = 'provisioning',"
                " claimed_at = now() WHERE id = ANY($1::uuid[]) RETURNING id)"
                " SELECT id FROM m",
                job_ids,
            )
            assert len(moved) == users
            for job_id in job_ids:
                await ctx.conn.execute(
                    "INSERT INTO job_events (job_id, from_status, to_status, attempt, actor)"
                    " VALUES ($1, 'queued', 'provisioning', 1, 'workflow')",
                    job_id,
                )
            await _until(lambda: all(len(r.ids) >= 2 for r in readers), 60, "live messages")
            created = {
                r["id"]: r["created_at"].timestamp()
                for r in await ctx.conn.fetch(
                    "SELECT id, created_at FROM job_events WHERE to_status = 'provisioning'"
                    " AND job_id = ANY($1::uuid[])",
                    job_ids,
                )
            }
            delivery = [
                r.received[event_id] - at
                for r in readers
                for event_id, at in created.items()
                if event_id in r.received
            ]
            assert len(delivery) == count

            # A client that never reads, on the first job; 4 MB of history follows.
            stalled = socket.socket()
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect(("127.0.0.1", server.port))
            stalled.sendall(
                f"GET /api/jobs/{job_ids[0]}/events/stream HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {token}\r\n\r\n".encode()
            )
            first = [r for r in readers if r.url.endswith(f"/{job_ids[0]}/events/stream")]
            big = 400
            started = time.monotonic()
            await ctx.conn.execute(
                "INSERT INTO job_events (job_id, to_status, attempt, actor, reason)"
                " SELECT $1, 'provisioning', 1, 'system', repeat('x', 10000)"
                " FROM generate_series(1, $2::int)",
                job_ids[0],
                big,
            )
            await _until(lambda: all(len(r.ids) >= 2 + big for r in first), 60, "big history")
            others_done = time.monotonic() - started

            def cut_off() -> bool:
                text = httpx.get(f"{base}/metrics").text
                return "jobs_sse_streams_cut_off_total 1.0" in text

            await _until(cut_off, 30, "the stalled client cut off")
            cut_after = time.monotonic() - started
    finally:
        if stalled is not None:
            stalled.close()
        for reader in readers:
            await reader.close()
        await server.stop()
    return {
        "streams": count,
        "rss_before_mib": rss_before / 1024,
        "rss_after_mib": rss_after / 1024,
        "kib_per_stream": (rss_after - rss_before) / count,
        "get_job_idle_p50_ms": median(idle) * 1000,
        "get_job_idle_p99_ms": percentile(idle, 99) * 1000,
        "get_job_streams_open_p50_ms": median(busy) * 1000,
        "get_job_streams_open_p99_ms": percentile(busy, 99) * 1000,
        "delivery_p50_ms": median(delivery) * 1000,
        "delivery_p99_ms": percentile(delivery, 99) * 1000,
        "stalled_cut_off_after_s": cut_after,
        "others_got_big_history_in_s": others_done,
        "others_complete": True,
    }


async def live(ctx: Context) -> dict[str, Any]:
    return {"announcements": await announcement_cost(ctx), "streams": await streams(ctx)}
