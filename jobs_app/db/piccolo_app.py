"""Piccolo app config: this service's tables and where their migrations live."""

from pathlib import Path

from piccolo.conf.apps import AppConfig

from jobs_app.db.tables import (
    Agent,
    Dispatch,
    DispatchTry,
    JobEvent,
    ProvisioningJob,
    RunCancellation,
    User,
)

MIGRATIONS_FOLDER = Path(__file__).resolve().parents[2] / "piccolo_migrations"

APP_CONFIG = AppConfig(
    app_name="jobs_app",
    migrations_folder_path=str(MIGRATIONS_FOLDER),
    table_classes=[User, Agent, ProvisioningJob, JobEvent, Dispatch, DispatchTry, RunCancellation],
    migration_dependencies=[],
    commands=[],
)
