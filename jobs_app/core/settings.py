"""One typed settings object, read once from the environment."""

from __future__ import annotations

import functools
import os
import re
import secrets
from pathlib import Path

import msgspec

from jobs_app.core import lifecycle
from jobs_app.core.provisioning import DEFAULT_GITHUB_API_URL, GitHubConfig


class SettingsError(RuntimeError):
    """The environment does not describe a service that can start."""


DEFAULT_PROVISION_STEPS = (
    "create_vm=Creating your VM,install_agent=Installing your agent,"
    "health_check=Checking your agent"
)
_STEP_NAME = re.compile(r"^[a-z0-9_]{1,40}$")


class ProvisionStep(msgspec.Struct, frozen=True, array_like=True):
    """One step of the provisioning workflow's plan: its name, and what a customer sees."""

    name: str
    label: str


def parse_provision_steps(raw: str) -> tuple[ProvisionStep, ...]:
    """`name=Label,name=Label`: names `[a-z0-9_]{1,40}`, each once, labels not empty."""
    steps: list[ProvisionStep] = []
    for item in raw.split(","):
        name, sep, label = item.partition("=")
        name, label = name.strip(), label.strip()
        if not sep or not _STEP_NAME.match(name) or not label:
            raise SettingsError(
                "JOBS_PROVISION_STEPS must be a comma-separated list of name=Label "
                f"(names [a-z0-9_]{{1,40}}), got {raw!r}"
            )
        if any(step.name == name for step in steps):
            raise SettingsError(f"JOBS_PROVISION_STEPS names the step {name!r} twice")
        steps.append(ProvisionStep(name, label))
    return tuple(steps)


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
    max_retries: int = lifecycle.MAX_RETRIES
    sweep_interval_seconds: float = 30.0
    signature_tolerance_seconds: int = 300
    pool_min_size: int = 2
    pool_max_size: int = 10
    db_timeout_seconds: float = 10.0
    """Upper bound for acquiring a connection and for one statement."""
    max_body_bytes: int = 1024 * 1024
    # Dispatching (see jobs_app/dispatch/).
    provisioner: str = ""
    """`github`, `simulated` or `none`; empty: `simulated` in dev mode, else `none`."""
    public_url: str = ""
    """The base URL the workflow calls back (JOBS_PUBLIC_URL)."""
    github_api_url: str = DEFAULT_GITHUB_API_URL
    github_repository: str = ""
    github_workflow: str = ""
    github_ref: str = "main"
    github_app_id: str = ""
    github_app_private_key: str = ""
    github_installation_id: str = ""
    github_token: str = ""
    github_timeout_seconds: float = 10.0
    dispatch_interval_seconds: float = 1.0
    dispatch_lease_seconds: float = 60.0
    dispatch_deadline_seconds: float = lifecycle.DISPATCH_DEADLINE_SECONDS
    dispatch_reconcile_grace_seconds: float = lifecycle.DISPATCH_RECONCILE_GRACE_SECONDS
    dispatch_backoff_base_seconds: float = 5.0
    dispatch_backoff_max_seconds: float = 300.0
    dispatch_batch: int = 20
    """Dispatches one process works on at once."""
    access_log: bool = False
    """One structured access line per request (`jobs-app serve --access-log`)."""
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
    provision_steps: tuple[ProvisionStep, ...] = parse_provision_steps(DEFAULT_PROVISION_STEPS)
    """The provisioning workflow's steps, in order (JOBS_PROVISION_STEPS)."""
    eta_refresh_seconds: float = 2.0
    """Each process re-reads the learned medians behind the ETA at most this often
    (JOBS_ETA_REFRESH_SECONDS; 0: every answer reads them)."""

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

    @property
    def effective_provisioner(self) -> str:
        return self.provisioner or ("simulated" if self.dev_mode else "none")

    def check_dispatch(self) -> Settings:
        """These settings, if they describe a provisioner that can start; else an error
        naming the variable to set or unset."""
        kind = self.effective_provisioner
        if kind not in PROVISIONERS:
            raise SettingsError(
                f"JOBS_PROVISIONER must be one of {', '.join(PROVISIONERS)}, got {kind!r}"
            )
        if kind == "none":
            return self
        if not self.public_url:
            raise SettingsError(f"JOBS_PUBLIC_URL is required with JOBS_PROVISIONER={kind}")
        if not self.public_url.startswith(("http://", "https://")):
            raise SettingsError(f"JOBS_PUBLIC_URL must be an http(s) URL, got {self.public_url!r}")
        if kind != "github":
            return self
        if self.dispatch_lease_seconds < 3 * self.github_timeout_seconds:
            # A lease must outlive the requests made under it (a dispatch, or a lookup
            # and a record), or another process takes over a dispatch still in flight.
            raise SettingsError(
                "DISPATCH_LEASE_SECONDS must be at least 3 x JOBS_GITHUB_TIMEOUT_SECONDS "
                f"({self.dispatch_lease_seconds:g} < 3 x {self.github_timeout_seconds:g})"
            )
        try:
            self.github_config()
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        return self

    def github_config(self) -> GitHubConfig:
        """The GitHub provisioner's settings; ValueError naming the variable at fault."""
        return GitHubConfig(
            repository=self.github_repository,
            workflow=self.github_workflow,
            ref=self.github_ref,
            api_url=self.github_api_url,
            app_id=self.github_app_id or None,
            private_key=self.github_app_private_key or None,
            installation_id=self.github_installation_id or None,
            token=self.github_token or None,
            timeout=self.github_timeout_seconds,
        )


PROVISIONERS = ("github", "simulated", "none")

_TRUE = {"1", "true", "yes", "on"}


def _private_key(env: dict[str, str]) -> str:
    inline = env.get("JOBS_GITHUB_APP_PRIVATE_KEY", "")
    path = env.get("JOBS_GITHUB_APP_PRIVATE_KEY_FILE", "")
    if inline and path:
        raise SettingsError(
            "set JOBS_GITHUB_APP_PRIVATE_KEY or JOBS_GITHUB_APP_PRIVATE_KEY_FILE, not both"
        )
    if not path:
        return inline
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SettingsError(
            f"JOBS_GITHUB_APP_PRIVATE_KEY_FILE: cannot read {path!r}: {exc.strerror}"
        ) from None


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
        max_retries=int(_env_number(e, "MAX_RETRIES", d.max_retries, minimum=0)),
        sweep_interval_seconds=_env_number(e, "SWEEP_INTERVAL_SECONDS", d.sweep_interval_seconds),
        pool_min_size=int(_env_number(e, "DB_POOL_MIN_SIZE", d.pool_min_size)),
        pool_max_size=int(_env_number(e, "DB_POOL_MAX_SIZE", d.pool_max_size)),
        db_timeout_seconds=_env_number(e, "DB_TIMEOUT_SECONDS", d.db_timeout_seconds),
        provisioner=e.get("JOBS_PROVISIONER", "").strip().lower(),
        public_url=e.get("JOBS_PUBLIC_URL", "").strip().rstrip("/"),
        github_api_url=(e.get("JOBS_GITHUB_API_URL") or d.github_api_url).rstrip("/"),
        github_repository=e.get("JOBS_GITHUB_REPOSITORY", "").strip(),
        github_workflow=e.get("JOBS_GITHUB_WORKFLOW", "").strip(),
        github_ref=e.get("JOBS_GITHUB_REF") or d.github_ref,
        github_app_id=e.get("JOBS_GITHUB_APP_ID", "").strip(),
        github_app_private_key=_private_key(e),
        github_installation_id=e.get("JOBS_GITHUB_INSTALLATION_ID", "").strip(),
        github_token=e.get("JOBS_GITHUB_TOKEN", "").strip(),
        github_timeout_seconds=_env_number(
            e, "JOBS_GITHUB_TIMEOUT_SECONDS", d.github_timeout_seconds, minimum=0.1
        ),
        dispatch_interval_seconds=_env_number(
            e, "DISPATCH_INTERVAL_SECONDS", d.dispatch_interval_seconds, minimum=0.01
        ),
        dispatch_lease_seconds=_env_number(e, "DISPATCH_LEASE_SECONDS", d.dispatch_lease_seconds),
        dispatch_deadline_seconds=_env_number(
            e, "DISPATCH_DEADLINE_SECONDS", d.dispatch_deadline_seconds
        ),
        dispatch_reconcile_grace_seconds=_env_number(
            e, "DISPATCH_RECONCILE_GRACE_SECONDS", d.dispatch_reconcile_grace_seconds, minimum=0
        ),
        dispatch_backoff_base_seconds=_env_number(
            e, "DISPATCH_BACKOFF_BASE_SECONDS", d.dispatch_backoff_base_seconds, minimum=0.01
        ),
        dispatch_backoff_max_seconds=_env_number(
            e, "DISPATCH_BACKOFF_MAX_SECONDS", d.dispatch_backoff_max_seconds, minimum=0.01
        ),
        dispatch_batch=int(_env_number(e, "DISPATCH_BATCH", d.dispatch_batch)),
        access_log=e.get("JOBS_ACCESS_LOG", "").lower() in _TRUE,
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
        provision_steps=parse_provision_steps(
            e.get("JOBS_PROVISION_STEPS") or DEFAULT_PROVISION_STEPS
        ),
        eta_refresh_seconds=_env_number(
            e, "JOBS_ETA_REFRESH_SECONDS", d.eta_refresh_seconds, minimum=0
        ),
    )


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return load_settings()
