"""The Litestar application: every route (the admin mount included), the one exception
map, the middleware, and the lifespan (pool, background loops, live updates)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from jobs_app.core import tracing
from jobs_app.core.logs import configure_logging, get_logger
from jobs_app.core.redaction import service_secrets
from jobs_app.core.settings import Settings, get_settings
from jobs_app.db import connector
from jobs_app.http.admin import admin_route_handlers
from jobs_app.http.callbacks import CallbackController
from jobs_app.http.console import console_router, template_config
from jobs_app.http.errors import EXCEPTION_HANDLERS
from jobs_app.http.jobs import AgentController, JobController, UserController
from jobs_app.http.live.hub import LiveHub, end_streams_on_signal
from jobs_app.http.live.sse import QUIET_CUT_OFF
from jobs_app.http.middleware import (
    REDACT_QUERY,
    MetricsMiddleware,
    RequestContextMiddleware,
    tracing_middleware,
    tracing_plugin,
)
from jobs_app.http.ops import health, prometheus_metrics
from jobs_app.http.streams import STREAM_ROUTES, cors_config
from jobs_app.http.webhooks import stripe_webhook
from jobs_app.loops.background import BackgroundLoops

log = get_logger("jobs_app")


def create_app(
    settings: Settings | None = None, *, run_sweeper: bool = True, run_dispatcher: bool = True
) -> Litestar:
    """Build the app. Refuses to start without its secrets (unless in dev mode), or with
    dispatch settings that contradict each other."""
    settings = (settings or get_settings()).require_secrets().check_dispatch()
    # Each uvicorn worker is a process of its own: logging is configured as the app is built.
    configure_logging(settings)
    # Only when the OTEL_* variables ask for it; spans hide the secrets the logs hide.
    tracing.configure_tracing(service_secrets(settings))
    plugin = tracing_plugin()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await connector.start_pool(settings)
        loops = BackgroundLoops(settings, sweep=run_sweeper, dispatch=run_dispatcher)
        await loops.start()
        assert loops.listener is not None
        hub = LiveHub(settings, loops.listener)
        app.state.live = hub
        app.state.dispatcher = loops.dispatcher
        undo_signals = end_streams_on_signal(hub)
        try:
            yield
        finally:
            # Shutdown runs after uvicorn has stopped accepting connections and the
            # requests in flight have finished (or serve's graceful timeout passed):
            # open streams end, the background loops stop (the dispatcher gives its
            # leases back first, so another replica takes them at once; the listener
            # closes last), then the pool closes and buffered spans are exported.
            log.info("shutting down")
            undo_signals()
            hub.close_all()
            await loops.stop()
            await connector.close_pool()
            tracing.shutdown_tracing()
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
            console_router(),  # before the admin's mount: /admin/console/ is ours
            *admin_route_handlers(settings),
            *STREAM_ROUTES,
        ],
        cors_config=cors_config(settings),
        template_config=template_config(),
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[MetricsMiddleware, *tracing_middleware()],
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
        plugins=[plugin] if plugin else [],
        logging_config=None,  # configured above, for structlog and the standard library
        debug=False,
    )
    app.state.settings = settings
    app.state.dispatcher = None
    # Outermost: around Litestar's exception handling and routing, so 404s get a
    # request id and an access line too (app middleware never sees them).
    app.asgi_handler = RequestContextMiddleware(app.asgi_handler, access_log=settings.access_log)
    logging.getLogger("uvicorn.access").addFilter(REDACT_QUERY)
    logging.getLogger("uvicorn.error").addFilter(QUIET_CUT_OFF)
    return app
