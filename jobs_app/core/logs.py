"""Structured logging: one structlog pipeline for structlog's loggers and the standard
library's (Piccolo, asyncpg, uvicorn, Litestar, ours), configured once per process.

Every line goes through one synchronous stderr handler, formatted in the thread that
logged it, so the request's and the job's context (structlog contextvars) are on it.
Outside dev mode a line is one JSON object; in dev mode it is a readable console line;
JOBS_LOG_FORMAT=json|console overrides.
"""

from __future__ import annotations

import contextlib
import logging
import logging.config
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Literal
from uuid import UUID

import msgspec
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from jobs_app.core import tracing
from jobs_app.core.redaction import Redactor, service_secrets
from jobs_app.core.settings import Settings

LogFormat = Literal["json", "console"]

# Loggers that say too much at INFO: httpx logs every request's whole URL (query
# strings may hold tokens); the access line is ours, not uvicorn's.
QUIET_LOGGERS = {"httpx": "WARNING", "httpcore": "WARNING", "uvicorn.access": "WARNING"}

if not structlog.is_configured():
    # Until configure_logging runs, structlog's default prints to stdout, which breaks
    # programs whose stdout is data (test children, `jobs-app` output read by scripts).
    # Hand events to the standard library instead: stderr, WARNING and up, like it.
    structlog.configure(
        processors=[structlog.dev.ConsoleRenderer(colors=False)],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a line is written, not when configured
    (test runners swap it; a handler holding the old one writes to a closed file)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        """The stream is always the current sys.stderr."""


def get_logger(name: str) -> Any:
    """A structlog logger, e.g. `get_logger("jobs_app.dispatch")`: log with key-value
    fields, `log.info("job claimed", job_id=..., attempt=...)`."""
    return structlog.get_logger(name)


def log_format(settings: Settings, env: Mapping[str, str] | None = None) -> LogFormat:
    chosen = (os.environ if env is None else env).get("JOBS_LOG_FORMAT", "").strip().lower()
    if chosen in ("json", "console"):
        return chosen  # type: ignore[return-value]
    return "console" if settings.dev_mode else "json"


# ---------------------------------------------------------------- job context


def _present(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def bind_job(
    job_id: Any,
    attempt: int | None = None,
    *,
    dispatch_id: Any = None,
    workflow_run_id: str | None = None,
    **fields: Any,
) -> None:
    """Put a job's fields on every line logged from here to the end of the current
    request (each request runs in a context of its own)."""
    structlog.contextvars.bind_contextvars(
        **_present(
            dict(
                job_id=job_id,
                attempt=attempt,
                dispatch_id=dispatch_id,
                workflow_run_id=workflow_run_id,
                **fields,
            )
        )
    )


@contextlib.contextmanager
def job_context(
    job_id: Any,
    attempt: int | None = None,
    *,
    dispatch_id: Any = None,
    workflow_run_id: str | None = None,
    **fields: Any,
) -> Iterator[None]:
    """Put a job's fields on every line logged inside the block, then restore what was
    there: for loops that handle one job after another (dispatcher, sweeper).

        with job_context(job.id, job.attempt, dispatch_id=dispatch_id):
            log.info("dispatched")
    """
    values = _present(
        dict(
            job_id=job_id,
            attempt=attempt,
            dispatch_id=dispatch_id,
            workflow_run_id=workflow_run_id,
            **fields,
        )
    )
    with structlog.contextvars.bound_contextvars(**values):
        yield


# ---------------------------------------------------------------- processors


def _add_trace_ids(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    event.update(tracing.current_trace_ids())
    return event


def _drop_color_message(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """uvicorn adds an ANSI-coloured copy of its message: the plain one is enough."""
    event.pop("color_message", None)
    return event


def _json_fallback(value: Any) -> Any:
    """What msgspec can't encode is written as its str() (never repr(): UUID('…'))."""
    return str(value)


_encoder = msgspec.json.Encoder(enc_hook=_json_fallback)


_FIRST = ("timestamp", "level", "logger", "event")


def _serialize(event: dict[str, Any], **_: Any) -> str:
    """One JSON object, the fields every line has first."""
    ordered = {k: event.pop(k) for k in _FIRST if k in event}
    ordered.update(event)
    return _encoder.encode(ordered).decode()


def _readable_ids(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Console lines show a UUID as its text, not UUID('…')."""
    for key, value in event.items():
        if isinstance(value, UUID):
            event[key] = str(value)
    return event


class _Redact:
    """Last line of defence: no secret reaches the output, whatever an exception message
    or a third-party logger put in the line (jobs_app.core.redaction says what is secret)."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor

    def __call__(self, _: WrappedLogger, __: str, line: Any) -> Any:
        # Runs after the renderer: `line` is the rendered text.
        return self.redactor.text(line) if isinstance(line, str) else line


def _shared_processors() -> list[Processor]:
    """Applied to structlog's events and to standard-library records alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        _drop_color_message,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
        structlog.processors.StackInfoRenderer(),
    ]


def _renderers(fmt: LogFormat, settings: Settings) -> list[Processor]:
    rendering: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt == "json":
        rendering += [
            # A traceback is a string field ("exception"), so "Traceback" stays greppable.
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_serialize),
        ]
    else:
        rendering.append(_readable_ids)
        rendering.append(
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
            )
        )
    return [*rendering, _Redact(Redactor(service_secrets(settings)))]


def configure_logging(settings: Settings, fmt: LogFormat | None = None) -> None:
    """Configure structlog and the standard library: one synchronous stderr handler (no
    queue thread, which would format lines where the request's context is gone), the
    same renderer for both. Called by the CLI and by the app factory (each uvicorn
    worker is a process of its own); calling it again reconfigures."""
    fmt = fmt or log_format(settings)
    level = os.environ.get("JOBS_LOG_LEVEL", "INFO").upper()
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "structured": {
                    "()": structlog.stdlib.ProcessorFormatter,
                    "foreign_pre_chain": _shared_processors(),
                    "processors": _renderers(fmt, settings),
                }
            },
            "handlers": {"console": {"()": StderrHandler, "formatter": "structured"}},
            "loggers": {
                "litestar": {"level": level, "handlers": [], "propagate": True},
                **{name: {"level": lvl, "propagate": True} for name, lvl in QUIET_LOGGERS.items()},
            },
            "root": {"handlers": ["console"], "level": level},
        }
    )
    structlog.configure(
        processors=[*_shared_processors(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
