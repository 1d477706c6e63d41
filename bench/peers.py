"""Section 8: jobs_app's full lifecycle beside two PostgreSQL job queues, pgqueuer and
procrastinate, on the same server, in one run.

What one job is, in each system (each its real API, imported, never copied):
  * jobs_app: `enqueue_provisioning_job` -> `update_job_status(provisioning)` ->
    `update_job_status(running)`, three service-layer calls made one after the other by
    the caller, each its own statement and commit; a fresh user (and agent) per job,
    seeded beforehand (one job in flight per user). Final state: a provisioning_jobs row
    with status 'running'.
  * pgqueuer: `Queries.enqueue` from the callers; one `QueueManager` (its consumer)
    dequeues in batches of PGQUEUER_BATCH (its default, 10), runs a no-op entrypoint
    and logs the completion through its buffer (a batch per flush: its design). Final
    state: a pgqueuer_log row with status 'successful'. Schema: `Queries.install()`
    (durability 'durable', its default: every table logged, like jobs_app's).
  * procrastinate: `Task.defer_async` from the callers; one worker
    (`App.run_worker_async`, concurrency = callers) fetches the job, runs a no-op task
    and finishes it. Final state: a procrastinate_jobs row with status 'succeeded'.
    Connector: `PsycopgConnector` as its README shows it (psycopg's binary build when
    installed); procrastinate 3 ships no asyncpg connector.

The same for all three: --concurrency callers (16); pools of 16 connections for the
statements, opened in full before the run (jobs_app: its own asyncpg pool; pgqueuer:
an asyncpg pool of 17, one held by its consumer's LISTEN, the same no-reset setting
as jobs_app's; procrastinate: a psycopg pool of 16 plus its own LISTEN connection). A
queue's producers do not wait for their jobs to run, so they may keep at most
4 x callers jobs submitted and not yet run (jobs_app's callers have one each): the
queue stays short and the producers do not starve the consumer of connections.

Each round runs every system once, in turn (the order alternating, as everywhere in
the bench), each in a fresh process (`python -m bench.peers_worker`) against its own
fresh database. A process warms up, then measures a window between two snapshots on a
connection of its own:
  * jobs/s: rows that reached the final state in the window, counted in the database;
  * write xacts/job: the pg_current_xact_id() delta (transactions given an xid);
  * WAL bytes/job: the pg_current_wal_lsn() delta;
  * round trips/job: counted on the client (bench.counting) over all its connections;
  * commits/job: pg_stat_database.xact_commit, read-only transactions too. Backends
    report it at most once a second, so it is read before the load starts and after
    the last of the run's backends has exited, and divided by the jobs of that run
    (the callers stop, the queue is drained, so every job begun is finished).
Transaction ids and WAL are the server's: another database's work would show in them
(`other_db_commits` says whether there was any).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from bench import dbs
from bench.context import Context
from bench.measure import interleave, median, paired_ratio
from bench.peers_worker import PGQUEUER_BATCH

REPO = Path(__file__).resolve().parent.parent
PEERS = ("pgqueuer", "procrastinate")
# What the peers need importable (the optional extra `jobs_app[bench]` installs them).
NEEDS = {
    "pgqueuer": ("pgqueuer", "asyncpg"),
    "procrastinate": ("procrastinate", "psycopg", "psycopg_pool"),
}
# jobs_app's throughput over each peer's: at least, and what to aim for.
TARGETS: dict[str, tuple[float, float | None]] = {
    "pgqueuer": (1.0, 1.5),
    "procrastinate": (3.0, None),
}
FIRST_RATE_GUESS = 3000.0  # jobs_app jobs/s, to size the users seeded for the first round


class WorkerFailed(RuntimeError):
    pass


def missing(system: str) -> str | None:
    for module in NEEDS.get(system, ()):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[bench]')"
    return None


async def _worker(command: str, system: str, url: str, *options: str, within: float) -> dict:
    env = os.environ.copy()
    env["DATABASE_URL"] = url  # jobs_app's settings read it; the peers get --url
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.peers_worker",
        command,
        "--system",
        system,
        "--url",
        url,
        *options,
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise WorkerFailed(f"{system} {command}: no result within {within:.0f} s") from None
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = err.decode().strip()[-1500:]
        raise WorkerFailed(f"{system} {command} exited {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def _per_job(result: dict[str, Any], key: str) -> float | None:
    value = result.get(key)
    return value / result["jobs"] if value is not None and result["jobs"] else None


def _commits_per_job(result: dict[str, Any]) -> float | None:
    run = result["run"]
    return run["commits"] / run["jobs"] if run["commits"] is not None and run["jobs"] else None


def _median_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None


async def peers(ctx: Context, duration: float, warmup: float) -> dict[str, Any]:
    budget = ctx.budget
    callers = budget.concurrency
    pool = callers
    backlog = 4 * callers
    systems = ["jobs_app"]
    skipped: dict[str, str] = {}
    for peer in PEERS:
        reason = missing(peer)
        if reason is None:
            systems.append(peer)
        else:
            skipped[peer] = reason
            print(f"  {peer}: skipped, {reason}", flush=True)
    failed: dict[str, str] = {}
    urls: dict[str, str] = {}
    setups: dict[str, dict[str, Any]] = {}
    run_timeout = warmup + duration + 90
    suffix = uuid.uuid4().hex[:8]
    estimate = FIRST_RATE_GUESS
    serial = 0

    async def one_run(system: str) -> dict[str, Any] | None:
        nonlocal estimate, serial
        if system in failed:
            return None
        options = [
            "--callers", str(callers),
            "--pool", str(pool),
            "--warmup", str(warmup),
            "--duration", str(duration),
            "--backlog", str(backlog),
            "--batch-size", str(PGQUEUER_BATCH),
        ]  # fmt: skip
        for attempt in range(2):
            serial += 1
            users = math.ceil(estimate * (warmup + duration + 2) * 1.5) + 4 * callers
            extra = ["--users", str(users), "--tag", f"peers{serial}"]
            try:
                result = await _worker(
                    "run", system, urls[system], *options, *extra, within=run_timeout
                )
            except WorkerFailed as exc:
                if system == "jobs_app":
                    raise
                failed[system] = str(exc)
                print(f"  {system}: FAILED, left out from here on: {exc}", flush=True)
                return None
            if system == "jobs_app":
                estimate = max(estimate, result["jobs_s"])
                if result.get("exhausted") and attempt == 0:
                    print("  jobs_app ran out of seeded users: measuring again", flush=True)
                    continue
            break
        print(
            f"  {system:<14} {result['jobs_s']:>8.0f} jobs/s"
            f"  write xacts/job {_fmt(_per_job(result, 'write_xacts'))}"
            f"  WAL B/job {_fmt(_per_job(result, 'wal_bytes'), '.0f')}"
            f"  round trips/job {_fmt(_per_job(result, 'round_trips'))}",
            flush=True,
        )
        return result

    try:
        for system in systems:
            urls[system] = await dbs.create(
                ctx.server_url, f"jobs_app_bench_peers_{system}_{suffix}"
            )
            try:
                setups[system] = await _worker("setup", system, urls[system], within=180)
            except WorkerFailed as exc:
                if system == "jobs_app":
                    raise
                failed[system] = str(exc)
                print(f"  {system}: setup FAILED: {exc}", flush=True)
        sides = [(system, lambda system=system: one_run(system)) for system in systems]
        samples = await interleave(sides, budget.rounds)
    finally:
        for url in urls.values():
            await dbs.drop(ctx.server_url, dbs.name_of(url))

    rows = []
    base = samples["jobs_app"]
    for system in systems:
        runs = samples[system]
        present = [r for r in runs if r is not None]
        if not present:
            continue
        row: dict[str, Any] = {
            "system": system,
            "jobs_s": median([r["jobs_s"] for r in present]),
            "write_xacts_per_job": _median_of([_per_job(r, "write_xacts") for r in present]),
            "commits_per_job": _median_of([_commits_per_job(r) for r in present]),
            "wal_bytes_per_job": _median_of([_per_job(r, "wal_bytes") for r in present]),
            "round_trips_per_job": _median_of([_per_job(r, "round_trips") for r in present]),
            "pool": present[0].get("pool"),
            "versions": setups.get(system, {}),
        }
        if system in TARGETS:
            pairs = [(a, b) for a, b in zip(base, runs, strict=True) if a and b]
            ratio = paired_ratio([a["jobs_s"] for a, _ in pairs], [b["jobs_s"] for _, b in pairs])
            least, aim = TARGETS[system]
            row |= {"ratio": ratio, "target": least, "aim": aim, "met": ratio >= least}
        rows.append(row)
    every = [r for runs in samples.values() for r in runs if r is not None]
    notes = _notes(every)
    for note in notes:
        print(f"  note: {note}", flush=True)
    return {
        "callers": callers,
        "pool_size": pool,
        "backlog": backlog,
        "pgqueuer_batch_size": PGQUEUER_BATCH,
        "rounds": budget.rounds,
        "duration_s": duration,
        "warmup_s": warmup,
        "rows": rows,
        "skipped": skipped,
        "failed": failed,
        "notes": notes,
        "samples": {system: samples[system] for system in systems},
    }


def _notes(runs: list[dict[str, Any]]) -> list[str]:
    notes = []
    checkpoints = sum(1 for r in runs if r["checkpoints"])
    if checkpoints:
        notes.append(
            f"{checkpoints} of {len(runs)} windows saw a checkpoint (WAL per job is higher"
            " just after one: full-page images)"
        )
    busy = [r for r in runs if r["run"]["other_db_commits"] > 0]
    if busy:
        total = sum(r["run"]["other_db_commits"] for r in busy)
        notes.append(
            f"other databases committed {total:,} transactions during {len(busy)} of"
            f" {len(runs)} runs: the server-wide xid and WAL figures include their writes"
        )
    undrained = [r["system"] for r in runs if r.get("drained") is False]
    if undrained:
        notes.append(f"queue not drained at the end of a run: {', '.join(undrained)}")
    exhausted = sum(1 for r in runs if r.get("exhausted"))
    if exhausted:
        notes.append(f"jobs_app ran out of seeded users in {exhausted} runs")
    return notes


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)
