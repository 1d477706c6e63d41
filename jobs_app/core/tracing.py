"""OpenTelemetry traces: off unless the standard variables ask for them.

Installed with the `otel` extra (`pip install 'jobs_app[otel]'`). Tracing is on when
OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set or
OTEL_TRACES_EXPORTER names an exporter, and OTEL_SDK_DISABLED is not true; the rest
(OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, headers, sampler, limits, propagators) is
read by the SDK. Then: the HTTP layer's OpenTelemetry middleware makes a span per
request, the asyncpg instrumentation one per statement (no parameters recorded), the
httpx instrumentation one per outgoing call, and `round_span` one per dispatcher or
sweeper round.

Tracing never breaks serving: a setting the SDK would fail on stops `serve` and
`dispatch` at start (`check_settings`, a SettingsError naming the variable); one that
merely cannot export (an unreachable collector, a malformed endpoint) is logged and
the service runs on. Every span passes through core.redaction before it is queued.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from jobs_app.core.settings import SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

TRACER_NAME = "jobs_app"
OTLP_EXPORTERS = ("otlp", "otlp_proto_http")
EXPORTERS = (*OTLP_EXPORTERS, "console")
"""What OTEL_TRACES_EXPORTER may name (comma-separated), besides `none`."""
OTLP_PROTOCOL = "http/protobuf"
"""The one OTLP protocol the `otel` extra ships (opentelemetry-exporter-otlp-proto-http)."""
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
BATCH_VARIABLES = (
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_EXPORT_TIMEOUT",
)

log = logging.getLogger("jobs_app.tracing")

_provider: TracerProvider | None = None

try:
    from opentelemetry import trace as _trace
except ImportError:  # the `otel` extra is not installed: nothing is traced
    _trace = None  # type: ignore[assignment]


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _exporter_names(e: Mapping[str, str]) -> list[str] | None:
    """OTEL_TRACES_EXPORTER as a list (None: not set; empty: `none`)."""
    raw = e.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        return None
    names = [n.strip() for n in raw.split(",") if n.strip()]
    return [] if "none" in names else names


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces (the OTEL_* variables)."""
    e = _env(env)
    if e.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = _exporter_names(e)
    if names is not None:
        return bool(names)
    return any(e.get(v) for v in ENDPOINT_VARIABLES)


def check_settings(env: Mapping[str, str] | None = None) -> None:
    """Raise a SettingsError naming the variable when the OTEL_* settings cannot work
    (the CLI stops with exit code 2 before serving or dispatching); nothing when off.

    What the SDK itself would raise on is tried here, the way configure_tracing will
    build it: limits, the batching processor, the propagators, the exporters (`env`
    for the names; the SDK's own pieces read os.environ).
    """
    e = _env(env)
    if not wanted(e):
        return
    if _trace is None:
        raise SettingsError(
            "OTEL_* variables ask for traces, but the otel extra is not installed: "
            "pip install 'jobs_app[otel]'"
        )
    names = _exporter_names(e) or ["otlp"]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise SettingsError(
            f"OTEL_TRACES_EXPORTER={e.get('OTEL_TRACES_EXPORTER')!r}: no exporter "
            f"{', '.join(unknown)}; jobs_app ships otlp (HTTP/protobuf), console and none"
        )
    if any(n in OTLP_EXPORTERS for n in names):
        for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = e.get(variable, "").strip()
            if protocol:
                if protocol != OTLP_PROTOCOL:
                    raise SettingsError(
                        f"{variable}={protocol!r}: jobs_app's OTLP exporter speaks "
                        f"{OTLP_PROTOCOL} only"
                    )
                break  # the traces-specific one wins over the general one
    _check_propagators(e.get("OTEL_PROPAGATORS", ""))
    _check_sdk(e)


def _check_propagators(raw: str) -> None:
    """The SDK raises at import time on a propagator it cannot load: name it first."""
    for name in (n.strip() for n in raw.split(",")):
        if not name or name.lower() == "none":
            continue
        if not importlib.metadata.entry_points(group="opentelemetry_propagator", name=name):
            raise SettingsError(
                f"OTEL_PROPAGATORS={raw!r}: no propagator {name!r} is installed "
                "(jobs_app ships tracecontext, baggage, b3, b3multi and none)"
            )


def _check_sdk(e: Mapping[str, str]) -> None:
    try:  # the SDK reads the OTEL_*_LIMIT variables as it is imported; its messages name them
        from opentelemetry.sdk.trace import SpanLimits

        SpanLimits()
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    try:
        BatchSpanProcessor(ConsoleSpanExporter()).shutdown()
    except ValueError as exc:
        given = ", ".join(f"{v}={e[v]!r}" for v in BATCH_VARIABLES if v in e) or "OTEL_BSP_*"
        raise SettingsError(f"{given}: {exc}") from None


def endpoint_problems(env: Mapping[str, str] | None = None) -> list[str]:
    """Endpoints the exporter would fail on at each export (the service runs on)."""
    e = _env(env)
    problems = []
    for variable in ENDPOINT_VARIABLES:
        value = e.get(variable, "").strip()
        if not value:
            continue
        try:
            parts = urlsplit(value)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"{variable}={value!r} is not an http(s) URL: no span will be exported")
    return problems


def _exporters() -> list[Any]:
    exporters: list[Any] = []
    for name in _exporter_names(os.environ) or ["otlp"]:
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())  # endpoint, headers: OTEL_EXPORTER_OTLP_*
    return exporters


def configure_tracing(
    secrets: Iterable[str] = (), *, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Set up tracing once per process; returns the provider, or None when off.

    `secrets` are the service's own (core.redaction.service_secrets), hidden in spans
    like in logs. `exporter` is for tests (in-memory, exported as each span ends);
    without it, tracing starts only when the environment asks for it, with a batching
    processor per exporter of OTEL_TRACES_EXPORTER. Raises SettingsError on settings
    that cannot work (check_settings).
    """
    global _provider
    if _provider is not None:
        return _provider
    if exporter is None:
        if not wanted():
            return None
        check_settings()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from jobs_app.core.redaction import Redactor
    from jobs_app.core.tracing_redaction import RedactingSpanProcessor

    # Resource.create() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    name = os.environ.get("OTEL_SERVICE_NAME", "jobs_app")
    resource = Resource.create({"service.name": name})
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
    redactor = Redactor(secrets)
    if exporter is not None:
        provider.add_span_processor(RedactingSpanProcessor(SimpleSpanProcessor(exporter), redactor))
    else:
        for problem in endpoint_problems():
            log.warning(problem)
        for each in _exporters():
            processor = BatchSpanProcessor(each)
            provider.add_span_processor(RedactingSpanProcessor(processor, redactor))
    _install_safe_propagator()

    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    AsyncPGInstrumentor(capture_parameters=False).instrument(tracer_provider=provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    _provider = provider
    return provider


def _install_safe_propagator() -> None:
    """Wrap the global propagator so that extracting and injecting never fail a request.

    With OTEL_PROPAGATORS=none the SDK's empty composite propagator extracts None, and
    the ASGI middleware makes that the current context: every request then fails.
    A malformed incoming header must not fail one either.
    """
    from opentelemetry import propagate
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import (
        TextMapPropagator,
        default_getter,
        default_setter,
    )

    current = propagate.get_global_textmap()
    if getattr(current, "never_fails", False):
        return

    class NeverFailingPropagator(TextMapPropagator):
        never_fails = True

        def __init__(self, inner: TextMapPropagator) -> None:
            self.inner = inner

        def extract(self, carrier: Any, context: Any = None, getter: Any = default_getter) -> Any:
            try:
                extracted = self.inner.extract(carrier, context, getter=getter)
            except Exception:  # a malformed header: the request starts a trace of its own
                log.debug("trace context not extracted", exc_info=True)
                extracted = None
            if extracted is None:
                return context if context is not None else Context()
            return extracted

        def inject(self, carrier: Any, context: Any = None, setter: Any = default_setter) -> None:
            try:
                self.inner.inject(carrier, context, setter=setter)
            except Exception:
                log.debug("trace context not injected", exc_info=True)

        @property
        def fields(self) -> set[str]:
            return self.inner.fields

    propagate.set_global_textmap(NeverFailingPropagator(current))


def provider() -> TracerProvider | None:
    """The configured provider, or None when tracing is off."""
    return _provider


def shutdown_tracing() -> None:
    """Export what is still buffered and stop (the app's shutdown calls this)."""
    global _provider
    if _provider is None:
        return
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    AsyncPGInstrumentor().uninstrument()
    HTTPXClientInstrumentor().uninstrument()
    _provider.shutdown()
    _provider = None


@contextlib.contextmanager
def round_span(name: str, **attributes: Any) -> Iterator[Any]:
    """One span for one round of a background loop (`sweeper.round`, `dispatch.round`):
    the statements and HTTP calls made inside are its children. A no-op when tracing
    is off. Yields the span (or None) so a round can add attributes as it learns them."""
    if _provider is None:
        yield None
        return
    tracer = _provider.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(name, attributes=attributes or None) as span:
        yield span


def name_current_span(name: str, route: str) -> None:
    """Rename the current (request) span, once the route it served is known."""
    if _provider is None or _trace is None:
        return
    span = _trace.get_current_span()
    if span.is_recording():
        span.update_name(name)
        span.set_attribute("http.route", route)


def _current_context() -> Any:
    """The current span's context when tracing is on and it is valid, else None.
    Never raises: log lines and callbacks must not fail because of tracing."""
    if _provider is None or _trace is None:
        return None
    try:
        context = _trace.get_current_span().get_span_context()
    except Exception:
        return None
    return context if context.is_valid else None


def current_trace_ids() -> dict[str, str]:
    """trace_id and span_id of the current span, for log lines; empty when none."""
    context = _current_context()
    if context is None or _trace is None:
        return {}
    return {
        "trace_id": _trace.format_trace_id(context.trace_id),
        "span_id": _trace.format_span_id(context.span_id),
    }


def current_traceparent() -> str | None:
    """The current span as a W3C `traceparent` value (for the workflow's TRACEPARENT),
    or None when tracing is off or no span is current."""
    context = _current_context()
    if context is None or _trace is None:
        return None
    trace_id = _trace.format_trace_id(context.trace_id)
    span_id = _trace.format_span_id(context.span_id)
    return f"00-{trace_id}-{span_id}-{int(context.trace_flags):02x}"
