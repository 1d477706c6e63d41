"""`python -m bench`: every section in one run, against one fresh database.

The database is created on DATABASE_URL's server (or the embedded PostgreSQL when
DATABASE_URL is unset), migrated as in production, and dropped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import sys
import time
import traceback
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench import dbs, report
from bench.context import Context
from bench.loader import run_loop
from bench.measure import Budget, rounded

SECTIONS = (
    "service",
    "round_trips",
    "lifecycle",
    "http",
    "scale",
    "live",
    "dispatch",
    "peers",
    "lone",
)
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks: the service layer against raw asyncpg, round trips, full "
        "lifecycles against the commit limit, HTTP against a bare Litestar app, scale, live "
        "updates, dispatch, the full lifecycle beside pgqueuer and procrastinate, and a lone "
        "caller's latency.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument(
        "--scale-rows", type=int, help="jobs in the large table (default 1,000,000; quick 10,000)"
    )
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--duration", type=float, help="seconds per measurement (default 0.5)")
    how.add_argument("--ops", type=int, help="operations per measurement, instead of a duration")
    parser.add_argument("--rounds", type=int, help="rounds of A/B per comparison (default 9)")
    parser.add_argument("--http-duration", type=float, help="seconds per HTTP load run (default 2)")
    parser.add_argument(
        "--peers-duration",
        type=float,
        help="peers: seconds measured per run (default 3; quick 0.5)",
    )
    parser.add_argument(
        "--peers-warmup",
        type=float,
        help="peers: seconds of load before the measured window (default 1; quick 0.3)",
    )
    parser.add_argument(
        "--lone-baseline",
        type=lambda path: str(Path(path).resolve()),
        help="lone: another checkout's directory, measured beside this one (optional)",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent tasks (16)")
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        metavar="SECTION",
        help=f"run only this section (repeatable): {', '.join(SECTIONS)}",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.scale_rows is None:
        args.scale_rows = 10_000 if quick else 1_000_000
    if args.duration is None and args.ops is None:
        args.duration = 0.1 if quick else 0.5
    if args.rounds is None:
        args.rounds = 1 if quick else 9
    if args.http_duration is None:
        args.http_duration = 1.0 if quick else 2.0
    if args.peers_duration is None:
        args.peers_duration = 0.5 if quick else 3.0
    if args.peers_warmup is None:
        args.peers_warmup = 0.3 if quick else 1.0
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = run_loop(_run(args, argv if argv is not None else sys.argv[1:]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rounded(results), indent=2) + "\n")
    print()
    print(report.render(results))
    print(f"\nJSON: {args.json}")
    return results


async def _run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from jobs_app.core.settings import get_settings, load_settings
    from jobs_app.db.connector import embedded_database_url

    settings = load_settings()
    server_url = settings.database_url or embedded_database_url(settings)
    url = await dbs.create(server_url, f"jobs_app_bench_{uuid.uuid4().hex[:10]}")
    # From here on every jobs_app module reads the bench database.
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    from jobs_app.db import connector

    connector.get_engine().config = {"dsn": url}
    results: dict[str, Any] = {"meta": {}, "sections": {}}
    conn: asyncpg.Connection | None = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            await connector.migrate()
        await connector.start_pool()
        conn = await asyncpg.connect(url)
        results["meta"] = await _meta(conn, args, argv)
        ctx = Context(
            url=url,
            server_url=server_url,
            budget=Budget(
                rounds=args.rounds,
                duration=args.duration if args.ops is None else None,
                ops=args.ops,
                concurrency=args.concurrency,
            ),
            quick=args.quick,
            scale_rows=args.scale_rows,
            conn=conn,
        )
        for name in args.only or SECTIONS:
            print(f"[{name}]", flush=True)
            started = time.perf_counter()
            try:
                section = await _section(name, ctx, args)
            except Exception as exc:
                traceback.print_exc()
                section = {"error": f"{type(exc).__name__}: {exc}"}
            section["seconds"] = time.perf_counter() - started
            results["sections"][name] = section
        results["meta"]["load_after"] = _load()
        results["meta"]["seconds"] = sum(s["seconds"] for s in results["sections"].values())
    finally:
        if conn is not None:
            await conn.close()
        await connector.close_pool()
        await dbs.drop(server_url, dbs.name_of(url))
    return results


async def _section(name: str, ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    if name == "service":
        from bench.service import service_vs_raw

        return await service_vs_raw(ctx)
    if name == "round_trips":
        from bench.service import round_trips

        return await round_trips(ctx)
    if name == "lifecycle":
        from bench.workflow import lifecycle

        return await lifecycle(ctx)
    if name == "http":
        from bench.web import http

        return await http(ctx, args.http_duration)
    if name == "scale":
        from bench.scale import scale

        return await scale(ctx)
    if name == "live":
        from bench.live import live

        return await live(ctx)
    if name == "dispatch":
        from bench.dispatch import dispatch

        return await dispatch(ctx)
    if name == "peers":
        from bench.peers import peers

        return await peers(ctx, args.peers_duration, args.peers_warmup)
    if name == "lone":
        from bench.lone import lone

        return await lone(ctx, args.lone_baseline)
    raise ValueError(name)


def _load() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "?"


async def _meta(conn: asyncpg.Connection, args: argparse.Namespace, argv: list[str]) -> dict:
    from jobs_app.core.settings import get_settings

    settings = get_settings()
    version = await conn.fetchval("SHOW server_version")
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "load_before": _load(),
        "python": platform.python_version(),
        "asyncpg": asyncpg.__version__,
        "postgres": f"PostgreSQL {version}",
        "synchronous_commit": await conn.fetchval("SHOW synchronous_commit"),
        "pool_min_size": settings.pool_min_size,
        "pool_max_size": settings.pool_max_size,
        "event_loop": "uvloop" if "uvloop" in sys.modules else "asyncio",
    }
