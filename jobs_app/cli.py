"""`jobs-app serve`, `jobs-app dispatch` and `jobs-app migrate`."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import msgspec

from jobs_app.core.logs import get_logger
from jobs_app.core.settings import Settings, SettingsError, get_settings, load_settings


def _migrate() -> None:
    from jobs_app.db import connector

    asyncio.run(connector.migrate())


def _prepare_metrics_dir() -> None:
    """Give all workers one empty prometheus multiprocess directory."""
    path = Path(
        os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="jobs-app-metrics-")
    )
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


GRACEFUL_SHUTDOWN_SECONDS = 10


log = get_logger("jobs_app.cli")


def _check_dispatch(settings: Settings) -> None:
    """Stop at start on contradictory dispatch settings; warn when nothing dispatches."""
    settings.check_dispatch()
    if settings.effective_provisioner == "none":
        log.warning(
            "JOBS_PROVISIONER is not set: nothing starts the provisioning workflow, and "
            "jobs wait for runs started elsewhere. Set JOBS_PROVISIONER=github (or "
            "simulated) to dispatch."
        )


def _check_tracing() -> None:
    """OTEL_* settings that cannot work stop us here, naming the variable (exit code 2),
    rather than in every worker, or at the first request."""
    from jobs_app.core import tracing

    tracing.check_settings()


def serve(host: str, port: int, workers: int, access_log: bool) -> None:
    import uvicorn

    settings = get_settings().require_secrets()
    _check_tracing()
    if settings.dev_mode and not settings.public_url:
        # The simulated workflow calls this very server back.
        os.environ["JOBS_PUBLIC_URL"] = f"http://{host}:{port}"
        settings = msgspec.structs.replace(settings, public_url=os.environ["JOBS_PUBLIC_URL"])
    _check_dispatch(settings)
    # Workers are fresh processes that read the environment: hand them the secrets
    # dev mode may have generated, so every worker agrees.
    os.environ["JOBS_API_TOKEN"] = settings.api_token
    os.environ["JOBS_CALLBACK_SECRET"] = settings.callback_secret
    os.environ["STRIPE_WEBHOOK_SECRET"] = settings.stripe_webhook_secret
    if access_log:  # read by every worker's app (http.middleware.RequestContextMiddleware)
        os.environ["JOBS_ACCESS_LOG"] = "1"
    get_settings.cache_clear()  # a worker in this process must read them back, not regenerate
    _migrate()
    _prepare_metrics_dir()
    uvicorn.run(
        "jobs_app.app:app",
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        # Logging is the app's (configured in create_app, in each worker); the access
        # line is its own too: uvicorn's would carry the raw query string.
        log_config=None,
        access_log=False,
        proxy_headers=False,
        # SIGTERM: stop accepting, let requests in flight finish within this, then
        # run the lifespan's shutdown (README, "Shutdown and deploys").
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


def dispatch() -> None:
    """The dispatcher alone, for deployments that run it apart from the API."""
    settings = get_settings()
    _check_dispatch(settings)
    if settings.effective_provisioner == "none":
        raise SettingsError("jobs-app dispatch needs JOBS_PROVISIONER=github (or simulated)")
    _check_tracing()
    asyncio.run(_dispatch_until_stopped(settings))


async def _dispatch_until_stopped(settings: Settings) -> None:
    from jobs_app.core import tracing
    from jobs_app.core.redaction import service_secrets
    from jobs_app.db import connector
    from jobs_app.loops.background import BackgroundLoops

    # The same resource, processors and redaction as under serve: the dispatcher's
    # rounds, their statements and GitHub calls.
    tracing.configure_tracing(service_secrets(settings))
    await connector.start_pool(settings)
    loops = BackgroundLoops(settings, sweep=False)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await loops.start()
    try:
        await stopped.wait()
    finally:
        await loops.stop()
        await connector.close_pool()
        tracing.shutdown_tracing()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jobs-app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="migrate, then serve the API and admin")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    serve_cmd.add_argument("--workers", type=int, default=1)
    serve_cmd.add_argument(
        "--access-log",
        action="store_true",
        help="one structured line per request (also JOBS_ACCESS_LOG=1)",
    )
    commands.add_parser("migrate", help="apply all migrations (safe to run concurrently)")
    commands.add_parser(
        "dispatch", help="run only the dispatcher (serve runs one in every process too)"
    )
    from jobs_app.workflow.callback_client import add_callback_parser, run_callback_command

    add_callback_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "callback":  # the workflow's client: no settings, no database
        raise SystemExit(run_callback_command(args))

    from jobs_app.core.logs import configure_logging

    try:
        configure_logging(load_settings())  # a bad setting stops every command here, named
        if args.command == "serve":
            serve(args.host, args.port, args.workers, args.access_log)
        elif args.command == "migrate":
            _migrate()
        elif args.command == "dispatch":
            dispatch()
    except SettingsError as exc:
        print(f"jobs-app: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
