"""Section 7: dispatching, against the GitHub stand-in on loopback (tests/github_standin.py).

1. Throughput: N queued jobs (1,000; quick: 50), one dispatcher in this process with
   the GitHub provisioner (App auth, one HTTP client): dispatches per second until
   every job has its run.
2. Latency from enqueue (the call returned: committed) to the dispatch request reaching
   the stand-in, p50/p99, with the listener's notifications waking the dispatcher and
   with polling alone (DISPATCH_INTERVAL_SECONDS=1): jobs enqueued one at a time, 50 ms
   apart.

The claim's plan at 1,000,000 jobs is reported by the scale section (`claim_plan`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgspec

from bench.context import Context
from bench.measure import median, percentile
from jobs_app.core.settings import get_settings
from jobs_app.db import connector
from jobs_app.loops.dispatcher import Dispatcher
from jobs_app.loops.listener import Listener
from jobs_app.loops.provisioners.github import GitHubProvisioner
from jobs_app.services import jobs
from tests.github_standin import GitHubStandIn

LATENCY_GAP = 0.05


async def _users(ctx: Context, n: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    rows = await ctx.conn.fetch(
        """WITH u AS (
               INSERT INTO users (email)
               SELECT $2 || '-' || i || '@bench.example' FROM generate_series(1, $1) i
               RETURNING id)
           INSERT INTO agents (user_id, name) SELECT id, 'agent' FROM u
           RETURNING user_id, id""",
        n,
        ctx.tag("dispatch"),
    )
    return [(r["user_id"], r["id"]) for r in rows]


async def _enqueue(pair: tuple[uuid.UUID, uuid.UUID]) -> uuid.UUID:
    user_id, agent_id = pair
    result = await jobs.enqueue_provisioning_job(
        agent_id=agent_id, user_id=user_id, stripe_event_id=f"evt_bench_{uuid.uuid4().hex}"
    )
    return result.job.id


def _provisioner(standin: GitHubStandIn) -> GitHubProvisioner:
    return GitHubProvisioner(
        api_url=standin.url,
        repository=standin.repository,
        workflow="provision.yml",
        app_id=standin.app_id,
        private_key=standin.private_key,
        installation_id=standin.installation_id,
    )


async def throughput(ctx: Context, standin: GitHubStandIn) -> dict[str, Any]:
    n = 50 if ctx.quick else 1000
    for pair in await _users(ctx, n):
        await _enqueue(pair)
    settings = msgspec.structs.replace(
        get_settings(), public_url="http://jobs.example", dispatch_batch=50
    )
    provisioner = _provisioner(standin)
    dispatcher = Dispatcher(provisioner, settings)
    before = len(standin.records("dispatch"))
    started = time.perf_counter()
    try:
        while await dispatcher.run_once():  # a batch claimed, sent and recorded per round
            await dispatcher.drain()
    finally:
        await provisioner.aclose()
    seconds = time.perf_counter() - started
    sent = len(standin.records("dispatch")) - before
    assert sent == n, (sent, n)
    rate = n / seconds
    print(f"  {n} dispatches in {seconds:.2f} s: {rate:,.0f}/s", flush=True)
    return {"jobs": n, "seconds": seconds, "dispatches_per_s": rate}


async def latency(ctx: Context, standin: GitHubStandIn, *, notify: bool) -> dict[str, Any]:
    n = 10 if ctx.quick else 100
    pairs = await _users(ctx, n)
    settings = msgspec.structs.replace(
        get_settings(), public_url="http://jobs.example", dispatch_interval_seconds=1.0
    )
    provisioner = _provisioner(standin)
    dispatcher = Dispatcher(provisioner, settings)
    listener = Listener(connector.database_url(settings)) if notify else None
    if listener is not None:
        await listener.start()
        listener.add_observer(lambda note: dispatcher.wake() if note.queued else None)
    dispatcher.start()
    enqueued: dict[str, float] = {}
    try:
        for pair in pairs:
            job_id = await _enqueue(pair)
            enqueued[str(job_id)] = time.monotonic()
            await asyncio.sleep(LATENCY_GAP)  # pacing the load, not synchronising
        deadline = time.monotonic() + 30
        while sum(r.job_id in enqueued for r in _dispatch_requests(standin)) < n:
            assert time.monotonic() < deadline, "dispatches missing"
            await asyncio.sleep(0.05)
    finally:
        await dispatcher.stop()
        await provisioner.aclose()
        if listener is not None:
            await listener.stop()
    delays = [
        (r.received - enqueued[r.job_id]) * 1000
        for r in _dispatch_requests(standin)
        if r.job_id in enqueued
    ]
    row = {
        "mode": "notifications" if notify else "polling (1 s)",
        "jobs": n,
        "p50_ms": median(delays),
        "p99_ms": percentile(delays, 99),
    }
    print(f"  {row['mode']:<16} enqueue → request p50 {row['p50_ms']:.1f} ms, "
          f"p99 {row['p99_ms']:.1f} ms", flush=True)  # fmt: skip
    return row


class _Sent(msgspec.Struct):
    job_id: str
    received: float


def _dispatch_requests(standin: GitHubStandIn) -> list[_Sent]:
    runs = {run.dispatch_id: run.inputs["job_id"] for run in standin.runs()}
    return [
        _Sent(runs[r.dispatch_id], r.received)
        for r in standin.records("dispatch")
        if r.dispatch_id in runs
    ]


async def dispatch(ctx: Context) -> dict[str, Any]:
    # Earlier sections leave queued jobs behind: out of the way, so only ours are dispatched.
    await ctx.conn.execute(
        "UPDATE provisioning_jobs SET status = 'failed', failure_reason = 'operator', "
        "error = 'bench: cleared before the dispatch section', completed_at = now() "
        "WHERE status = 'queued'"
    )
    standin = GitHubStandIn().start()
    try:
        return {
            "throughput": await throughput(ctx, standin),
            "latency": [
                await latency(ctx, standin, notify=True),
                await latency(ctx, standin, notify=False),
            ],
        }
    finally:
        standin.stop()
