"""OpenTelemetry traces: off unless the standard variables ask for them.

Installed with the `otel` extra (`pip install 'jobs_app[otel]'`). Tracing is on when
OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set or
OTEL_TRACES_EXPORTER names an exporter, and OTEL_SDK_DISABLED is not true; the rest
(OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, headers, sampler) is read by the SDK.
Then: the HTTP layer's OpenTelemetry middleware makes a span per request, the asyncpg
instrumentation one per statement (no parameters recorded), the httpx instrumentation
one per outgoing call, and `round_span` one per dispatcher or sweeper round.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACER_NAME = "jobs_app"

_provider: TracerProvider | None = None

try:
    from opentelemetry import trace as _trace
except ImportError:  # the `otel` extra is not installed: nothing is traced
    _trace = None  # type: ignore[assignment]


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces (the OTEL_* variables)."""
    e = os.environ if env is None else env
    if e.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = e.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter
        or e.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or e.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporter_from_env() -> Any:
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if exporter not in ("otlp", "otlp_proto_http"):
        raise RuntimeError(
            f"OTEL_TRACES_EXPORTER={exporter!r}: jobs_app ships the otlp (HTTP) and console "
            "exporters"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout: from OTEL_EXPORTER_OTLP_*


def configure_tracing(provider: TracerProvider | None = None) -> TracerProvider | None:
    """Set up tracing once per process; returns the provider, or None when off.

    `provider` is for tests (an in-memory exporter); without it, tracing starts only
    when the environment asks for it, with a batching OTLP exporter.
    """
    global _provider
    if _provider is not None:
        return _provider
    if provider is None:
        if not wanted():
            return None
        if _trace is None:
            raise RuntimeError(
                "OTEL_* variables ask for traces, but the otel extra is not installed: "
                "pip install 'jobs_app[otel]'"
            )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # Resource.create() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
        name = os.environ.get("OTEL_SERVICE_NAME", "jobs_app")
        resource = Resource.create({"service.name": name})
        provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
        provider.add_span_processor(BatchSpanProcessor(_exporter_from_env()))

    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    AsyncPGInstrumentor(capture_parameters=False).instrument(tracer_provider=provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    _provider = provider
    return provider


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


def current_trace_ids() -> dict[str, str]:
    """trace_id and span_id of the current span, for log lines; empty when none."""
    if _provider is None or _trace is None:
        return {}
    context = _trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {
        "trace_id": _trace.format_trace_id(context.trace_id),
        "span_id": _trace.format_span_id(context.span_id),
    }
