"""The span processor that hides secrets before any span is buffered or exported.

Instrumentations record URLs, queries and (when asked to by
OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*) headers under names that change from one
version to the next (`http.url`, `http.target`, `url.full`, `url.query`...), so no
attribute is trusted by its name: every string in a span (its name, attributes, events,
links, status and resource) goes through the same Redactor as the logs. Imported only
when tracing is on (it needs the `otel` extra).
"""

from __future__ import annotations

from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import Link, Status

from jobs_app.core.redaction import Redactor


def redact_attributes(redactor: Redactor, attributes: Any) -> dict[str, Any]:
    return {key: redactor.attribute(key, value) for key, value in (attributes or {}).items()}


def redact_resource(redactor: Redactor, resource: Resource) -> Resource:
    return Resource(redact_attributes(redactor, resource.attributes), resource.schema_url)


class RedactingSpanProcessor(SpanProcessor):
    """Hands `inner` (the batching or simple processor in front of the exporter) a copy
    of each ended span with its secrets hidden: nothing secret is ever queued."""

    def __init__(self, inner: SpanProcessor, redactor: Redactor) -> None:
        self.inner = inner
        self.redactor = redactor
        self._resource: tuple[Resource, Resource] | None = None  # (as given, redacted)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.inner.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        self.inner.on_end(self.redact(span))

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def redact(self, span: ReadableSpan) -> ReadableSpan:
        text = self.redactor.text
        status = span.status
        if status.description:
            status = Status(status.status_code, text(status.description))
        return ReadableSpan(
            name=text(span.name),
            context=span.context,
            parent=span.parent,
            resource=self._redacted_resource(span.resource),
            attributes=redact_attributes(self.redactor, span.attributes),
            events=[
                Event(text(e.name), redact_attributes(self.redactor, e.attributes), e.timestamp)
                for e in span.events
            ],
            links=[
                Link(link.context, redact_attributes(self.redactor, link.attributes))
                for link in span.links
            ],
            kind=span.kind,
            status=status,
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )

    def _redacted_resource(self, resource: Resource) -> Resource:
        # One resource per provider: redact it once, not per span.
        cached = self._resource
        if cached is None or cached[0] is not resource:
            cached = self._resource = (resource, redact_resource(self.redactor, resource))
        return cached[1]
