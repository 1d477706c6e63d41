"""Piccolo configuration: the engine (DATABASE_URL, or the embedded PostgreSQL
started on first connection) and the registered apps."""

from piccolo.conf.apps import AppRegistry

from jobs_app.db.connector import LazyPostgresEngine

DB = LazyPostgresEngine()

APP_REGISTRY = AppRegistry(
    apps=[
        "jobs_app.db.piccolo_app",
        "piccolo.apps.user.piccolo_app",
        "piccolo_api.session_auth.piccolo_app",
    ]
)
