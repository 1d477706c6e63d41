"""The Litestar application: routes, the one exception map, and the lifespan
(connection pool, sweeper, live updates)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from jobs_app import database, sweeper
from jobs_app.admin import admin_route_handlers
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

log = logging.getLogger("jobs_app")


def create_app(settings: Settings | None = None, *, run_sweeper: bool = True) -> Litestar:
    """Build the app. Refuses to start without its secrets (unless in dev mode)."""
    settings = (settings or get_settings()).require_secrets()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await database.start_pool(settings)
        task = None
        if run_sweeper:
            task = asyncio.create_task(sweeper.run_forever(settings.sweep_interval_seconds))
        try:
            async with live_updates(app, settings):
                yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await database.close_pool()

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
        middleware=[MetricsMiddleware],
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
        debug=False,
    )
    app.state.settings = settings
    install_log_filters()
    return app
