"""One typed settings object, read once from the environment."""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path

import msgspec

from jobs_app import lifecycle


class SettingsError(RuntimeError):
    """The environment does not describe a service that can start."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str | None = None
    """postgresql:// URL; None means the embedded PostgreSQL under `data_dir`."""
    data_dir: Path = Path(".jobs_app")
    api_token: str = ""
    callback_secret: str = ""
    stripe_webhook_secret: str = ""
    dev_mode: bool = False
    """Generate missing secrets instead of refusing to start (never in production)."""
    production: bool = False
    """HTTPS deployment: the admin's session cookies are marked Secure."""
    admin_allowed_hosts: tuple[str, ...] = ()
    """Host names the admin's CSRF check accepts as Referer when served over HTTPS."""
    job_timeout_seconds: int = lifecycle.JOB_TIMEOUT_SECONDS
    job_deadline_seconds: int = lifecycle.JOB_DEADLINE_SECONDS
    queue_timeout_seconds: int = lifecycle.QUEUE_TIMEOUT_SECONDS
    heartbeat_interval_seconds: int = lifecycle.HEARTBEAT_INTERVAL_SECONDS
    max_retries: int = lifecycle.MAX_RETRIES
    sweep_interval_seconds: float = 30.0
    signature_tolerance_seconds: int = 300
    pool_min_size: int = 2
    pool_max_size: int = 10
    db_timeout_seconds: float = 10.0
    """Upper bound for acquiring a connection and for one statement."""
    max_body_bytes: int = 1024 * 1024
    sse_ping_seconds: float = 15.0
    """A `: ping` comment on a live stream after this long without a message."""
    sse_max_streams: int = 1000
    """Open event streams per process; beyond it 429."""
    sse_max_streams_per_user: int = 10
    """Open event streams per user per process (a job stream counts for its job's user)."""
    sse_send_timeout_seconds: float = 30.0
    """A stream whose client takes no data for this long is cut off (it resumes later)."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to open event streams (CORS); none by default."""

    def require_secrets(self) -> Settings:
        """Settings with every secret present: generated in dev mode, else an error naming them."""
        names = {
            "api_token": "JOBS_API_TOKEN",
            "callback_secret": "JOBS_CALLBACK_SECRET",
            "stripe_webhook_secret": "STRIPE_WEBHOOK_SECRET",
        }
        missing = [env for attr, env in names.items() if not getattr(self, attr)]
        if not missing:
            return self
        if not self.dev_mode:
            raise SettingsError(
                f"missing secrets: {', '.join(missing)}. Set them in the environment, "
                "or set JOBS_DEV_MODE=1 to generate throwaway ones for local development."
            )
        generated = {
            attr: secrets.token_urlsafe(32) for attr, env in names.items() if env in missing
        }
        for attr, value in generated.items():
            print(f"jobs_app dev mode: generated {names[attr]}={value}", flush=True)
        return msgspec.structs.replace(self, **generated)


_TRUE = {"1", "true", "yes", "on"}


def _env_number(env: dict[str, str], name: str, default: float, minimum: float = 1) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Build settings from an environment mapping (os.environ by default)."""
    e = dict(os.environ if env is None else env)
    d = Settings()
    return Settings(
        database_url=e.get("DATABASE_URL") or None,
        data_dir=Path(e.get("JOBS_APP_DATA_DIR") or d.data_dir),
        api_token=e.get("JOBS_API_TOKEN", ""),
        callback_secret=e.get("JOBS_CALLBACK_SECRET", ""),
        stripe_webhook_secret=e.get("STRIPE_WEBHOOK_SECRET", ""),
        dev_mode=e.get("JOBS_DEV_MODE", "").lower() in _TRUE,
        production=e.get("JOBS_PRODUCTION", "").lower() in _TRUE,
        admin_allowed_hosts=tuple(
            h.strip() for h in e.get("JOBS_ADMIN_ALLOWED_HOSTS", "").split(",") if h.strip()
        ),
        job_timeout_seconds=int(_env_number(e, "JOB_TIMEOUT_SECONDS", d.job_timeout_seconds)),
        job_deadline_seconds=int(_env_number(e, "JOB_DEADLINE_SECONDS", d.job_deadline_seconds)),
        queue_timeout_seconds=int(_env_number(e, "QUEUE_TIMEOUT_SECONDS", d.queue_timeout_seconds)),
        heartbeat_interval_seconds=int(
            _env_number(e, "HEARTBEAT_INTERVAL_SECONDS", d.heartbeat_interval_seconds)
        ),
        max_retries=int(_env_number(e, "MAX_RETRIES", d.max_retries, minimum=0)),
        sweep_interval_seconds=_env_number(e, "SWEEP_INTERVAL_SECONDS", d.sweep_interval_seconds),
        pool_min_size=int(_env_number(e, "DB_POOL_MIN_SIZE", d.pool_min_size)),
        pool_max_size=int(_env_number(e, "DB_POOL_MAX_SIZE", d.pool_max_size)),
        db_timeout_seconds=_env_number(e, "DB_TIMEOUT_SECONDS", d.db_timeout_seconds),
        sse_ping_seconds=_env_number(e, "SSE_PING_SECONDS", d.sse_ping_seconds, minimum=0.1),
        sse_max_streams=int(_env_number(e, "SSE_MAX_STREAMS", d.sse_max_streams, minimum=0)),
        sse_max_streams_per_user=int(
            _env_number(e, "SSE_MAX_STREAMS_PER_USER", d.sse_max_streams_per_user, minimum=0)
        ),
        sse_send_timeout_seconds=_env_number(
            e, "SSE_SEND_TIMEOUT_SECONDS", d.sse_send_timeout_seconds, minimum=0.1
        ),
        cors_origins=tuple(
            o.strip() for o in e.get("JOBS_CORS_ORIGINS", "").split(",") if o.strip()
        ),
    )


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return load_settings()
