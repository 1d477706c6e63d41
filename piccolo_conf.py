"""Piccolo configuration: the engine (DATABASE_URL, or the embedded PostgreSQL
started on first connection) and the registered apps."""

from piccolo.conf.apps import AppRegistry

from jobs_app.database import LazyPostgresEngine

DB = LazyPostgresEngine()

APP_REGISTRY = AppRegistry(
    apps=[
        "jobs_app.piccolo_app",
        "piccolo.apps.user.piccolo_app",
        "piccolo_api.session_auth.piccolo_app",
    ]
)
