"""Section 9: a lone caller (concurrency 1), the p50 latency of a transition.

One task enqueues a job, moves it to provisioning, then to running, and again, each call
made alone: nothing else is in the process's batches, so every call is a batch of one,
its own statement and commit. The process runs what a `jobs-app serve` worker runs
beside its requests (the listener announcing commits, the sweeper). Each round starts
every side in a fresh process against its own database (migrated as production is),
and the sides then take turns job by job (the order alternating), so that each job of
one side is timed right beside one of the other's, under the same load from whatever
else the machine runs; the first tenth of each run's jobs are left out (warm-up).

The sides:
  * shipped: the service as it is;
  * custom plans: the same, its pool's sessions left to PostgreSQL's default
    `plan_cache_mode` (auto), which planned the batch statements anew on every call;
  * no live loops: the same without the listener and sweeper (what announcing each commit
    to the other replicas costs a lone caller);
  * medians per call: the same with `JOBS_ETA_REFRESH_SECONDS=0`, every answer reading the
    ETA's medians instead of the process's copy (what that copy saves);
  * baseline (`--lone-baseline DIR`, optional): another checkout's `jobs_app` (say a
    `git worktree` of an older commit), its own migrations and settings, driven by the
    same loop through the two calls every version has.

    python -m bench --only lone --lone-baseline /tmp/before-group-commit
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from statistics import median
from typing import Any

from bench import dbs, seed
from bench.context import Context
from bench.measure import backend_cpu, cpu_since, paired_ratio

REPO = Path(__file__).resolve().parent.parent
TARGET = 1.1
"""A transition's p50 over the baseline's, at most (the write-path issue's target)."""
CALLS = 600
"""Jobs per run (three calls each); --quick: 60."""
SIDE_ENV: dict[str, dict[str, str]] = {
    "custom plans": {},
    "no live loops": {},
    "medians per call": {"JOBS_ETA_REFRESH_SECONDS": "0"},
}
"""The variants of the shipped service, and the environment each runs with beyond the
database's (the first two differ in what the worker does: see `_run`)."""


async def lone(ctx: Context, baseline: str | None) -> dict[str, Any]:
    sides: dict[str, Path] = {name: REPO for name in ("shipped", *SIDE_ENV)}
    if baseline:
        sides["baseline"] = Path(baseline)  # resolved by the command line
    calls = 60 if ctx.quick else CALLS
    suffix = uuid.uuid4().hex[:8]
    urls: dict[str, str] = {}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    try:
        for name, repo in sides.items():
            db = f"jobs_app_bench_lone_{len(urls)}_{suffix}"
            urls[name] = await dbs.create(ctx.server_url, db)
            await _migrate(repo, urls[name])
        for r in range(ctx.budget.rounds):
            results = await _round(sides, urls, f"lone{r}", calls)
            for name, result in results.items():
                samples[name].append(result)
                print(
                    f"  {name:<16} p50 ms: enqueue {result['enqueue']:.3f}"
                    f"  provisioning {result['provisioning']:.3f}"
                    f"  running {result['running']:.3f}"
                    f"  CPU per job: client {result['cpu']:.3f}"
                    f" server {result['server_cpu']:.3f}",
                    flush=True,
                )
    finally:
        for url in urls.values():
            await dbs.drop(ctx.server_url, dbs.name_of(url))
    rows = []
    shipped = samples["shipped"]
    for name in sides:
        runs = samples[name]
        row: dict[str, Any] = {"side": name}
        for op in ("enqueue", "provisioning", "running", "transition"):
            row[f"{op}_p50_ms"] = median(r[op] for r in runs)
        row["client_cpu_ms_per_job"] = median(r["cpu"] for r in runs)
        row["server_cpu_ms_per_job"] = median(r["server_cpu"] for r in runs)
        if name != "shipped":
            # The shipped side's latency over this side's, paired by round.
            row["shipped_over_it"] = paired_ratio(
                [r["transition"] for r in shipped], [r["transition"] for r in runs]
            )
        rows.append(row)
    return {
        "calls_per_run": calls,
        "rounds": ctx.budget.rounds,
        "target": TARGET,
        "baseline": baseline,
        "rows": rows,
        "samples": samples,
    }


async def _migrate(repo: Path, url: str) -> None:
    env = os.environ | {"DATABASE_URL": url}
    piccolo = Path(sys.executable).with_name("piccolo")
    await asyncio.to_thread(
        subprocess.run,
        [str(piccolo), "migrations", "forwards", "all"],
        cwd=repo,
        env=env,
        check=True,
        capture_output=True,
    )


async def _round(
    sides: dict[str, Path], urls: dict[str, str], tag: str, calls: int
) -> dict[str, dict[str, float]]:
    """One worker per side, started together, then one job at a time, side after side."""
    workers = {
        name: await _start(repo, urls[name], name, tag, calls) for name, repo in sides.items()
    }
    try:
        for worker in workers.values():
            await _expect(worker, "ready")
        order = list(workers.values())
        for n in range(calls):
            for worker in order if n % 2 == 0 else reversed(order):
                assert worker.stdin is not None
                worker.stdin.write(b"go\n")
                await _expect(worker, "done")
        results = {}
        for name, worker in workers.items():
            assert worker.stdin is not None
            worker.stdin.close()
            results[name] = json.loads(await _expect(worker, "{"))
            await worker.wait()
        return results
    finally:
        for worker in workers.values():
            if worker.returncode is None:
                worker.kill()
                await worker.wait()


async def _start(
    repo: Path, url: str, side: str, tag: str, calls: int
) -> asyncio.subprocess.Process:
    env = os.environ | {"DATABASE_URL": url} | SIDE_ENV.get(side, {})
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.lone",
        "--repo",
        str(repo),
        "--url",
        url,
        "--side",
        side,
        "--tag",
        tag,
        "--calls",
        str(calls),
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _expect(worker: asyncio.subprocess.Process, start: str) -> str:
    """The worker's next line, which must begin with `start`."""
    assert worker.stdout is not None
    line = (await asyncio.wait_for(worker.stdout.readline(), 120)).decode().strip()
    if not line.startswith(start):
        raise RuntimeError(f"lone worker said {line!r}, not {start!r} (exit {worker.returncode})")
    return line


# --------------------------------------------------------------------------- the worker


async def _run(args: Any) -> dict[str, float]:
    """In the worker process: `args.repo`'s jobs_app, driven one call at a time."""
    import asyncpg

    sys.path.insert(0, args.repo)  # that checkout's jobs_app, not this one's
    from jobs_app.core.settings import get_settings
    from jobs_app.db import connector
    from jobs_app.loops.background import BackgroundLoops
    from jobs_app.services import jobs

    conn = await asyncpg.connect(args.url)
    try:
        await seed.users(conn, args.tag, 1, args.calls)
    finally:
        await conn.close()
    if args.side == "custom plans":
        await connector.start_pool(
            server_settings=connector.SESSION_SETTINGS | {"plan_cache_mode": "auto"}
        )
    else:
        await connector.start_pool()
    loops = BackgroundLoops(get_settings(), dispatch=False)
    if args.side != "no live loops":
        await loops.start()
    times: dict[str, list[float]] = {"enqueue": [], "provisioning": [], "running": []}
    turns = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(turns), sys.stdin)
    print("ready", flush=True)
    cpu = 0.0
    server_before: dict[int, float] = {}
    try:
        for n in range(1, args.calls + 1):
            if not await turns.readline():  # the bench's turn to this side, or its end
                break
            if n == args.calls // 10 + 1:
                server_before = await backend_cpu(args.url)
            started, cpu_started = time.perf_counter(), time.process_time()
            enqueued = await jobs.enqueue_provisioning_job(
                user_id=seed.user_id(args.tag, n),
                agent_id=seed.agent_id(args.tag, n),
                stripe_event_id=seed.stripe_event_id(args.tag, n),
            )
            queued = time.perf_counter()
            await jobs.update_job_status(enqueued.job.id, status="provisioning", attempt=1)
            claimed = time.perf_counter()
            await jobs.update_job_status(enqueued.job.id, status="running", attempt=1)
            done = time.perf_counter()
            if n > args.calls // 10:
                cpu += time.process_time() - cpu_started
            times["enqueue"].append(queued - started)
            times["provisioning"].append(claimed - queued)
            times["running"].append(done - claimed)
            print("done", flush=True)
        server = cpu_since(server_before, await backend_cpu(args.url))
        await turns.read()  # the end of the round
    finally:
        if args.side != "no live loops":
            await loops.stop()
        await connector.close_pool()
    warm = args.calls // 10
    result = {op: median(values[warm:]) * 1000 for op, values in times.items()}
    both = times["provisioning"][warm:] + times["running"][warm:]
    result["transition"] = median(both) * 1000
    result["cpu"] = cpu * 1000 / (args.calls - warm)
    result["server_cpu"] = server * 1000 / (args.calls - warm)
    return result


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.lone")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--side", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--calls", type=int, required=True)
    args = parser.parse_args()
    from bench.loader import run_loop

    print(json.dumps(run_loop(_run(args))), flush=True)


if __name__ == "__main__":
    main()
