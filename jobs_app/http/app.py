"""The Litestar application: routes, the one exception map, and the lifespan
(connection pool, sweeper, live updates)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from jobs_app import database, observability, sweeper
from jobs_app.admin import admin_route_handlers
from jobs_app.dispatch.dispatcher import Dispatcher
from jobs_app.dispatch.factory import make_provisioner
from jobs_app.http.callbacks import CallbackController
from jobs_app.http.errors import EXCEPTION_HANDLERS
from jobs_app.http.jobs import AgentController, JobController, UserController
from jobs_app.http.ops import health, prometheus_metrics
from jobs_app.http.webhooks import stripe_webhook
from jobs_app.live.streams import (
    cors_config,
    install_log_filters,
    live_route_handlers,
    live_updates,
)
from jobs_app.metrics import MetricsMiddleware
from jobs_app.settings import Settings, get_settings

log = observability.get_logger("jobs_app")


def create_app(
    settings: Settings | None = None, *, run_sweeper: bool = True, run_dispatcher: bool = True
) -> Litestar:
    """Build the app. Refuses to start without its secrets (unless in dev mode), or with
    dispatch settings that contradict each other."""
    settings = (settings or get_settings()).require_secrets().check_dispatch()
    observability.configure_tracing()  # only when the OTEL_* variables ask for it
    tracing_plugin = observability.tracing.litestar_plugin()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await database.start_pool(settings)
        task = None
        if run_sweeper:
            task = asyncio.create_task(sweeper.run_forever(settings.sweep_interval_seconds))
        provisioner = make_provisioner(settings) if run_dispatcher else None
        dispatcher = None if provisioner is None else Dispatcher(provisioner, settings)
        app.state.dispatcher = dispatcher
        if dispatcher is not None:
            dispatcher.start()
        try:
            async with live_updates(app, settings) as live:
                if dispatcher is not None:
                    # A job enqueued or retried is dispatched now, not at the next poll.
                    live.listener.add_observer(lambda n: dispatcher.wake() if n.queued else None)
                yield
        finally:
            # Shutdown runs after uvicorn has stopped accepting connections and the
            # requests in flight have finished (or serve's graceful timeout passed).
            # Steps in order; add new ones here, before the pool closes:
            #   - background loops stop (the sweeper; the dispatcher, which gives up
            #     the dispatch leases it holds so another replica takes them at once);
            #   - the live-update listener closes its LISTEN connection;
            #   - then the pool, then buffered spans are exported.
            log.info("shutting down")
            # Leases first, so another replica takes this process's dispatches at once.
            if dispatcher is not None:
                await dispatcher.stop()
                await dispatcher.provisioner.aclose()
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await database.close_pool()
            observability.shutdown_tracing()
            log.info("shut down")

    app = Litestar(
        route_handlers=[
            UserController,
            AgentController,
            JobController,
            CallbackController,
            stripe_webhook,
            health,
            prometheus_metrics,
            *admin_route_handlers(settings),
            *live_route_handlers(),
        ],
        cors_config=cors_config(settings),
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[MetricsMiddleware, *observability.tracing.litestar_middleware()],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="jobs_app",
            version="0.1.0",
            description="Provisioning jobs for hosted AI agents.",
            path="/schema",
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(type="http", scheme="bearer"),
                }
            ),
        ),
        plugins=[
            # Configures logging as the app is built, not only in the CLI: each uvicorn
            # worker is a process of its own.
            observability.structlog_plugin(settings),
            *([tracing_plugin] if tracing_plugin else []),
        ],
        debug=False,
    )
    app.state.settings = settings
    app.state.dispatcher = None
    # Outermost: around Litestar's exception handling and routing, so 404s get a
    # request id and an access line too (app middleware never sees them).
    app.asgi_handler = observability.RequestContextMiddleware(
        app.asgi_handler, access_log=settings.access_log
    )
    install_log_filters()
    return app
