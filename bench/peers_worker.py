"""One system's round of the peers section, in a process of its own (bench/peers.py starts it).

    python -m bench.peers_worker setup --system pgqueuer --url URL
    python -m bench.peers_worker run --system jobs_app --url URL --callers 16 --pool 16 \\
        --warmup 1 --duration 3 --users 20000 --tag p3

`setup` applies the system's schema to its (fresh, empty) database. `run` starts the
system's full lifecycle from `--callers` concurrent tasks on a pool of `--pool`
connections, lets it warm up, then measures a window of `--duration` seconds between
two snapshots taken on a connection of its own (not counted, not pooled):

  * jobs: rows that reached the final state, counted in the database (committed rows);
  * WAL bytes: pg_wal_lsn_diff of pg_current_wal_lsn() (server-wide);
  * write transactions: the pg_current_xact_id() delta (transactions that were given an
    xid, server-wide), less the snapshot's own;
  * commits: pg_stat_database.xact_commit of the database (read-only ones too);
  * round trips: counted on the client, by bench.counting, over every connection the
    system opens (asyncpg: CountingConnection; psycopg: count_psycopg()).

Either command prints one JSON line, the last line of stdout; whatever the libraries
print goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from bench import seed
from bench.counting import CountingConnection, count_psycopg, start_tally
from bench.loader import run_loop

SYSTEMS = ("jobs_app", "pgqueuer", "procrastinate")


# What counts as one finished job, per system: committed rows in the final state.
FINAL_STATE = {
    "jobs_app": "SELECT count(*) FROM provisioning_jobs WHERE status = 'running'",
    "pgqueuer": "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'",
    "procrastinate": "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'",
}

# pgqueuer's consumer dequeues and logs completions in batches of this size (its
# default is 10); the peers section passes it on.
PGQUEUER_BATCH = 10
PGQUEUER_ENTRYPOINT = "bench_job"


def service_module() -> Any:
    """The jobs service jobs_app's callers use."""
    return importlib.import_module("jobs_app.services.jobs")


# --------------------------------------------------------------------------- snapshots


class Probe:
    """The measuring connection (plain asyncpg: never counted as the load's round trips),
    keeping count of its own statements and xids, to take them out of the figures."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.statements = 0
        self.xids = 0

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record:
        self.statements += 1
        row = await self.conn.fetchrow(sql, *args)
        assert row is not None
        return row

    async def xid(self) -> int:
        """In a transaction of its own, which this gives an xid."""
        self.xids += 1
        return int((await self.fetchrow("SELECT pg_current_xact_id()::text AS x"))["x"])


@dataclass(frozen=True)
class Snapshot:
    at: float
    """Server time of the statement that read `done` (its rows are as of then)."""
    lsn: str
    done: int
    xid: int
    xids: int
    """The probe's own xids so far (this snapshot's included)."""
    other_commits: int = 0
    """xact_commit of every other database: work that this run did not do."""
    checkpoints: int = 0
    commits: int = 0
    statements: int = 0
    """The probe's own statements that `commits` counts."""


async def snapshot(probe: Probe, system: str) -> Snapshot:
    """The window's ends: taken while the load runs."""
    checkpoints = (
        "SELECT num_timed + num_requested FROM pg_stat_checkpointer"  # PostgreSQL 17+
        if (await probe.fetchrow("SELECT to_regclass('pg_stat_checkpointer') AS v"))["v"]
        else "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
    )
    row = await probe.fetchrow(
        f"""
        SELECT extract(epoch FROM statement_timestamp())::float8 AS at,
               pg_current_wal_lsn()::text AS lsn,
               (SELECT coalesce(sum(xact_commit), 0) FROM pg_stat_database
                WHERE datname IS DISTINCT FROM current_database())::bigint AS other_commits,
               ({checkpoints}) AS checkpoints,
               ({FINAL_STATE[system]}) AS done
        """
    )
    return Snapshot(xid=await probe.xid(), xids=probe.xids, **dict(row))


async def settled(probe: Probe, system: str) -> Snapshot:
    """The run's ends: taken with no other session on the database, so that
    pg_stat_database is complete. A backend adds its commits to it at most once a
    second, and all of a pool's connections do so in step: read between two busy
    moments it can be a second behind, a third of a 3 s window. So commits are read
    before the load starts and after its every backend has exited (which flushes)."""
    await probe.fetchrow("SELECT pg_stat_force_next_flush()")  # our own, at commit
    statements = probe.statements
    row = await probe.fetchrow(
        f"""
        SELECT extract(epoch FROM statement_timestamp())::float8 AS at,
               pg_current_wal_lsn()::text AS lsn,
               (SELECT xact_commit FROM pg_stat_database
                WHERE datname = current_database()) AS commits,
               (SELECT coalesce(sum(xact_commit), 0) FROM pg_stat_database
                WHERE datname IS DISTINCT FROM current_database())::bigint AS other_commits,
               ({FINAL_STATE[system]}) AS done
        """
    )
    return Snapshot(xid=await probe.xid(), xids=probe.xids, statements=statements, **dict(row))


async def alone(probe: Probe, within: float = 10.0) -> bool:
    """Wait until no other backend is connected to the database (a closed client's
    backend exits, and flushes its statistics, a moment after the socket closes)."""
    deadline = time.monotonic() + within
    while True:
        row = await probe.fetchrow(
            "SELECT count(*) AS n FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        if row["n"] == 0:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)


@dataclass
class Load:
    """A running system: its callers' progress, and the round trips it has made."""

    client_jobs: Callable[[], int]
    round_trips: Callable[[], int]


@dataclass
class Window:
    started: Snapshot
    ended: Snapshot
    round_trips: int
    client_jobs: int


async def measure(probe: Probe, system: str, load: Load, args: Any) -> Window:
    await asyncio.sleep(args.warmup)
    started = await snapshot(probe, system)
    trips, jobs = load.round_trips(), load.client_jobs()
    await asyncio.sleep(args.duration)
    ended = await snapshot(probe, system)
    return Window(started, ended, load.round_trips() - trips, load.client_jobs() - jobs)


# --------------------------------------------------------------------------- systems


async def _callers(n: int, stop: asyncio.Event, call: Callable[[], Awaitable[bool]]) -> None:
    """`n` tasks calling `call` until stopped (or until it returns False)."""

    async def caller() -> None:
        while not stop.is_set():
            if not await call():
                return

    await asyncio.gather(*(caller() for _ in range(n)))


async def _stopped(stop: asyncio.Event, callers: asyncio.Task[None]) -> None:
    """Stop the callers; a caller still waiting after a while (a stalled consumer keeps a
    producer waiting for room) is cancelled, so a run always ends."""
    stop.set()
    try:
        await asyncio.wait_for(callers, 30)
    except TimeoutError:
        print("callers did not stop within 30 s: cancelled", file=sys.stderr)


class Backlog:
    """Producers wait while `limit` jobs are submitted and not yet run: the queue does not
    grow without end, and the producers do not starve the consumer of connections."""

    def __init__(self, limit: int) -> None:
        self.room = asyncio.Semaphore(limit)
        self.submitted = 0
        self.executed = 0
        self.ran_one = asyncio.Event()

    async def submit(self, enqueue: Callable[[], Awaitable[object]]) -> bool:
        await self.room.acquire()
        try:
            await enqueue()
        except BaseException:
            self.room.release()
            raise
        self.submitted += 1
        return True

    def ran(self) -> None:
        self.executed += 1
        self.room.release()
        self.ran_one.set()

    async def drain(self, within: float = 30) -> None:
        """Wait (a bounded while) for the consumer to run every job submitted."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self.executed < self.submitted:
                    self.ran_one.clear()
                    await self.ran_one.wait()


async def seed_jobs_app(probe: Probe, args: Any) -> None:
    await seed.users(probe.conn, args.tag, 1, args.users)


@contextlib.asynccontextmanager
async def jobs_app(args: Any, extra: dict[str, Any]) -> AsyncIterator[Load]:
    """enqueue -> provisioning -> running, three service calls per job, a fresh user each.
    A caller finishes the job it has begun before it stops. The process runs what a
    `jobs-app serve` process runs beside its requests (the listener announcing every
    commit to live streams and other replicas, and the sweeper), the dispatcher aside."""
    from jobs_app.core.settings import get_settings
    from jobs_app.db import connector as database
    from jobs_app.loops.background import BackgroundLoops

    service = service_module()
    owners = (
        (seed.user_id(args.tag, i), seed.agent_id(args.tag, i), i) for i in itertools.count(1)
    )
    done = 0
    exhausted = False
    tally = start_tally()
    await database.start_pool(
        min_size=args.pool, max_size=args.pool, connection_class=CountingConnection
    )
    loops = BackgroundLoops(get_settings(), dispatch=False)
    await loops.start()

    async def lifecycle() -> bool:
        nonlocal done, exhausted
        user_id, agent_id, n = next(owners)
        if n > args.users:
            exhausted = True
            return False
        enqueued = await service.enqueue_provisioning_job(
            user_id=user_id, agent_id=agent_id, stripe_event_id=seed.stripe_event_id(args.tag, n)
        )
        job_id = enqueued.job.id
        await service.update_job_status(job_id, status="provisioning", attempt=1)
        await service.update_job_status(job_id, status="running", attempt=1)
        done += 1
        return True

    stop = asyncio.Event()
    callers = asyncio.create_task(_callers(args.callers, stop, lifecycle))
    try:
        yield Load(lambda: done, lambda: tally.round_trips)
    finally:
        await _stopped(stop, callers)
        await loops.stop()
        await database.close_pool()
    extra.update(
        service_module=service.__name__,
        live_updates="on (listener, announcements, catch-up read, sweeper)",
        pool=f"asyncpg, min=max={args.pool}, no reset round trip (jobs_app's own pool)",
        in_flight=args.callers,
        exhausted=exhausted,
    )


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Like jobs_app's pool: no RESET round trip when a connection goes back."""


@contextlib.asynccontextmanager
async def pgqueuer(args: Any, extra: dict[str, Any]) -> AsyncIterator[Load]:
    """Queries.enqueue from the callers; one QueueManager consumes: dequeues in batches of
    `args.batch_size`, runs a no-op entrypoint, logs completions through its buffer."""
    from pgqueuer.db import AsyncpgPoolDriver
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    tally = start_tally()
    # The consumer's LISTEN holds one pool connection for the whole run: one more, so
    # the statements have as many as the other systems'.
    size = args.pool + 1
    pool = await asyncpg.create_pool(
        args.url, min_size=size, max_size=size, connection_class=CountingConnection, reset=_no_reset
    )
    assert pool is not None
    queries = Queries(AsyncpgPoolDriver(pool))
    manager = QueueManager(queries)
    backlog = Backlog(args.backlog)

    @manager.entrypoint(PGQUEUER_ENTRYPOINT)
    async def bench_job(job: Any) -> None:
        backlog.ran()

    async def enqueue() -> bool:
        return await backlog.submit(lambda: queries.enqueue(PGQUEUER_ENTRYPOINT, None))

    consumer = asyncio.create_task(manager.run(batch_size=args.batch_size))
    stop = asyncio.Event()
    callers = asyncio.create_task(_callers(args.callers, stop, enqueue))
    try:
        yield Load(lambda: backlog.executed, lambda: tally.round_trips)
    finally:
        await _stopped(stop, callers)
        await backlog.drain()
        manager.shutdown.set()  # flushes the completions it still holds
        await consumer
        await pool.close()
    extra.update(
        pool=f"asyncpg, min=max={size} (one held by the consumer's LISTEN), no reset round trip",
        batch_size=args.batch_size,
        in_flight=args.backlog,
        submitted=backlog.submitted,
        executed=backlog.executed,
        drained=backlog.executed >= backlog.submitted,
    )


@contextlib.asynccontextmanager
async def procrastinate(args: Any, extra: dict[str, Any]) -> AsyncIterator[Load]:
    """defer_async from the callers; one worker (concurrency = callers) runs a no-op task."""
    import procrastinate as lib

    counted = count_psycopg()
    tally = start_tally()
    app = lib.App(
        connector=lib.PsycopgConnector(conninfo=args.url, min_size=args.pool, max_size=args.pool)
    )
    backlog = Backlog(args.backlog)

    @app.task(name="bench_job")
    async def bench_job() -> None:
        backlog.ran()

    async def defer() -> bool:
        return await backlog.submit(bench_job.defer_async)

    async with app.open_async():
        worker = asyncio.create_task(
            app.run_worker_async(
                concurrency=args.callers, install_signal_handlers=False, name="bench"
            )
        )
        stop = asyncio.Event()
        callers = asyncio.create_task(_callers(args.callers, stop, defer))
        try:
            yield Load(lambda: backlog.executed, lambda: tally.round_trips if counted else -1)
        finally:
            await _stopped(stop, callers)
            await backlog.drain()
            worker.cancel()  # a graceful stop: running jobs finish and are recorded
            with contextlib.suppress(asyncio.CancelledError):
                await worker
    extra.update(
        pool=f"psycopg_pool, min=max={args.pool} (its LISTEN connection is outside it)",
        worker_concurrency=args.callers,
        in_flight=args.backlog,
        submitted=backlog.submitted,
        executed=backlog.executed,
        drained=backlog.executed >= backlog.submitted,
        round_trips_counted=counted,
    )


RUNNERS = {"jobs_app": jobs_app, "pgqueuer": pgqueuer, "procrastinate": procrastinate}
PREPARE = {"jobs_app": seed_jobs_app}


# --------------------------------------------------------------------------- setup


async def setup(system: str, url: str) -> dict[str, Any]:
    started = time.perf_counter()
    if system == "jobs_app":
        from jobs_app.db import connector as database

        await database.migrate()
    elif system == "pgqueuer":
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(url)
        try:
            await Queries(AsyncpgDriver(conn)).install()
        finally:
            await conn.close()
    elif system == "procrastinate":
        import procrastinate

        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
    else:
        raise ValueError(system)
    return {"system": system, "setup_s": time.perf_counter() - started, **versions(system)}


def versions(system: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = {
        "jobs_app": ["asyncpg"],
        "pgqueuer": ["pgqueuer", "asyncpg"],
        "procrastinate": ["procrastinate", "psycopg", "psycopg-pool"],
    }[system]
    found = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    if system == "procrastinate":
        with contextlib.suppress(ImportError):
            import psycopg

            found["psycopg_impl"] = psycopg.pq.__impl__
    return found


# --------------------------------------------------------------------------- run


async def run(args: Any) -> dict[str, Any]:
    probe = Probe(await asyncpg.connect(args.url))
    extra: dict[str, Any] = {}
    try:
        if args.system in PREPARE:
            await PREPARE[args.system](probe, args)
        first = await settled(probe, args.system)
        async with RUNNERS[args.system](args, extra) as load:
            window = await measure(probe, args.system, load, args)
        gone = await alone(probe)
        last = await settled(probe, args.system)
        s0, s1 = window.started, window.ended
        row = await probe.fetchrow(
            "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::float8 AS window,"
            " pg_wal_lsn_diff($3::text::pg_lsn, $4::text::pg_lsn)::float8 AS run",
            s1.lsn,
            s0.lsn,
            last.lsn,
            first.lsn,
        )
    finally:
        await probe.conn.close()
    jobs = s1.done - s0.done
    seconds = s1.at - s0.at
    run_jobs = last.done - first.done
    run_commits = last.commits - first.commits - (last.statements - first.statements)
    trips = window.round_trips
    return {
        "system": args.system,
        # The window: throughput, WAL, write transactions, round trips.
        "jobs": jobs,
        "seconds": seconds,
        "jobs_s": jobs / seconds if seconds > 0 else 0.0,
        "wal_bytes": row["window"],
        "write_xacts": (s1.xid - s0.xid) - (s1.xids - s0.xids),
        "round_trips": trips if trips >= 0 else None,
        "client_jobs": window.client_jobs,
        "other_db_commits": s1.other_commits - s0.other_commits,
        "checkpoints": s1.checkpoints - s0.checkpoints,
        # The run, from before the load started to after its last backend exited:
        # every commit (read-only ones too), and the same totals as above for a check.
        "run": {
            "jobs": run_jobs,
            "commits": run_commits if gone else None,
            "write_xacts": (last.xid - first.xid) - (last.xids - first.xids),
            "wal_bytes": row["run"],
            "seconds": last.at - first.at,
            "other_db_commits": last.other_commits - first.other_commits,
        },
        "callers": args.callers,
        **extra,
        **versions(args.system),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.peers_worker")
    parser.add_argument("command", choices=("setup", "run"))
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--pool", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--users", type=int, default=20_000, help="jobs_app: users to seed")
    parser.add_argument("--tag", default="peers", help="jobs_app: seeded rows' tag")
    parser.add_argument("--batch-size", type=int, default=PGQUEUER_BATCH, help="pgqueuer")
    parser.add_argument(
        "--backlog", type=int, default=64, help="peers: jobs submitted and not yet run, at most"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.system == "jobs_app":
        # Before anything reads the settings: jobs_app's engine points at this database.
        os.environ["DATABASE_URL"] = args.url
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        if args.command == "setup":
            result = run_loop(setup(args.system, args.url))
        else:
            result = run_loop(run(args))
    out.write(json.dumps(result) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
